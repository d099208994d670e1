"""The unpaid fast path answers exactly as the pipeline would: the same status, headers (CORS,
X-Request-Id, PAYMENT-REQUIRED) and body, the same audit records and the same metrics, for every
kind of request. Two apps built from the same settings, one with the fast path and one without,
get the same requests in the same order; their answers and accounts must match."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import create_app
from gateway.settings import DEFAULT_CATALOG, Settings
from gateway.store import MemoryStore
from settlement.audit import AuditEvent
from tests.gateway.conftest import FakeClock

Request = tuple[str, str, dict[str, str], bytes | None]  # method, path and query, headers, body

ORIGIN = {"Origin": "https://agent.example"}
PREFLIGHT = {"Origin": "https://agent.example", "Access-Control-Request-Method": "GET",
             "Access-Control-Request-Headers": "PAYMENT-SIGNATURE"}
PAYMENT = base64.b64encode(b'{"x402Version":2}').decode()

UNPAID: list[Request] = [
    ("GET", "/quotes/AAPL", {}, None),
    ("GET", "/quotes/AAPL", {}, None),  # the second sight of the same request
    ("GET", "/quotes/MSFT", ORIGIN, None),
    ("HEAD", "/quotes/AAPL", {}, None),
    ("GET", "/quotes/AAPL?extra=1", {}, None),  # 422: additionalProperties false
    ("GET", "/quotes/aapl", {}, None),  # 422: the symbol's pattern
    ("GET", "/weather?city=Lisbon", {}, None),
    ("GET", "/weather?units=imperial&city=Lisbon", {}, None),
    ("GET", "/weather?city=Lisbon&units=imperial", ORIGIN, None),
    ("GET", "/weather?city=Lisbon&city=Porto", {}, None),  # 422: given twice
    ("GET", "/weather", {}, None),  # 422: city is required
    ("GET", "/weather?city=", {}, None),  # 422: minLength
    ("GET", "/reports/42", {}, None),
    ("GET", "/reports/r-1", {}, None),  # 422: the id is numeric
    ("POST", "/orders", {}, None),  # no body: the schema decides
    ("POST", "/orders", {"Content-Type": "application/json"}, b'{"symbol": "AAPL", "quantity": 5}'),
    ("POST", "/orders", {"Content-Type": "application/json"}, b"not json"),
    ("DELETE", "/quotes/AAPL", {}, None),  # 405
    ("GET", "/nothing/here", {}, None),  # 404
    ("GET", "/quotes/A%2FB", {}, None),  # 404: an encoded separator
    ("GET", "/quotes/AAPL", {"Payment-Signature": PAYMENT}, None),  # a payment: the pipeline's
    ("GET", "/quotes/AAPL", {"X-Payment": PAYMENT}, None),
    ("HEAD", "/quotes/AAPL", {"Payment-Signature": PAYMENT}, None),
    ("OPTIONS", "/quotes/AAPL", PREFLIGHT, None),  # CORS preflight
    ("OPTIONS", "/quotes/AAPL", {}, None),
    ("GET", "/quotes/AAPL", {"Host": "other.example:8080"}, None),
    ("GET", "/quotes/AAPL", {"X-Big": "x" * 40_000}, None),  # 431
    ("GET", "/quotes/AAPL", {"Content-Length": "0"}, b""),
    ("GET", "/healthz", {}, None),
    ("GET", "/tools", {}, None),
    ("GET", "/quotes/AAPL", {"Accept": "application/json"}, None),
    # Paid calls and bodies go straight to the pipeline: the same answers, CORS headers included.
    ("GET", "/quotes/AAPL", {**ORIGIN, "Payment-Signature": PAYMENT}, None),
    ("POST", "/orders", {**ORIGIN, "Content-Type": "application/json"}, b'{"symbol": "AAPL", "quantity": 5}'),
    ("GET", "/quotes/AAPL", {"Payment-Signature": "%%% not base64"}, None),
    ("GET", "/healthz", {"Payment-Signature": PAYMENT}, None),  # another route's path: the app's
    ("GET", "/receipts/1", {"Payment-Signature": PAYMENT}, None),  # another route's pattern
]


class RecordingAudit:
    def __init__(self) -> None:
        self.batches: list[list[AuditEvent]] = []

    def submit(self, events: Any) -> None:
        self.batches.append(list(events))

    async def close(self) -> None:
        pass


class NoFacilitator:
    async def verify(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unpaid request never reaches the facilitator")

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unpaid request never reaches the facilitator")


AppFactory = Callable[..., tuple[Starlette, Starlette]]


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[AppFactory]:
    """Two apps with the same settings and their own fake-clocked stores: fast path on, off."""
    built: list[Starlette] = []

    def build(**overrides: Any) -> tuple[Starlette, Starlette]:
        pair = []
        for fast in (True, False):
            clock = FakeClock()
            settings = Settings(
                catalog=[DEFAULT_CATALOG], database_url=f"sqlite:///{tmp_path / f'ledger-{len(built)}.sqlite3'}",
                **overrides,
            )
            app = create_app(settings, facilitator=NoFacilitator(), store=MemoryStore(clock=clock, wall_clock=clock),
                             audit=RecordingAudit(), fast_path=fast)
            app.state.pipeline.safety.breakers.clock = clock
            app.state.clock = clock
            built.append(app)
            pair.append(app)
        return pair[0], pair[1]

    yield build
    for app in built:
        app.state.ledger.close()


def send_all(app: Starlette, requests: list[Request]) -> list[tuple[int, list[tuple[str, str]], bytes]]:
    """Each request in order; headers as sent (order kept), the request id replaced by a marker."""

    async def run() -> list[tuple[int, list[tuple[str, str]], bytes]]:
        transport = httpx.ASGITransport(app=app, client=("10.1.2.3", 40000))
        answers = []
        async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
            for method, url, headers, body in requests:
                response = await client.request(method, url, headers=headers, content=body)
                raw = [(k.decode(), v.decode()) for k, v in response.headers.raw]
                ids = [v for k, v in raw if k == "x-request-id"]
                assert len(ids) <= 1, raw  # preflights and /healthz carry none
                raw = [(k, "<id>" if k == "x-request-id" else v) for k, v in raw]
                answers.append((response.status_code, raw, response.content))
        return answers

    return asyncio.run(run())


def audit_trail(app: Starlette) -> list[list[tuple[str, str | None, str | None, dict[str, Any]]]]:
    """Per request: (event, payer, tool, fields); request ids checked consistent, latencies dropped."""
    trail = []
    for batch in app.state.audit.batches:
        assert len({e.request_id for e in batch}) == 1
        trail.append([(e.event, e.payer, e.tool, {k: v for k, v in e.fields.items() if k != "latencyMs"})
                      for e in batch])
    return trail


def counters(app: Starlette) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in app.state.metrics.registry.collect()
        for s in family.samples
        if s.name.endswith("_total") or s.name.endswith("_count")
    }


def assert_same(fast: Starlette, slow: Starlette, requests: list[Request]) -> list[int]:
    fast_answers, slow_answers = send_all(fast, requests), send_all(slow, requests)
    for request, got, expected in zip(requests, fast_answers, slow_answers, strict=True):
        assert got == expected, request
    assert audit_trail(fast) == audit_trail(slow)
    assert counters(fast) == counters(slow)
    return [status for status, _, _ in fast_answers]


def count_pipeline_calls(app: Starlette) -> list[int]:
    pipeline = app.state.pipeline
    calls = [0]
    handle = pipeline.handle

    async def counted(request: Any) -> Any:
        calls[0] += 1
        return await handle(request)

    pipeline.handle = counted
    return calls


def test_every_kind_of_request_is_answered_and_accounted_as_the_pipeline_does(apps: AppFactory) -> None:
    fast, slow = apps()
    statuses = assert_same(fast, slow, UNPAID)
    assert statuses.count(402) >= 10 and {404, 405, 422, 431} <= set(statuses)


def test_the_fast_path_answers_unpaid_calls_without_the_pipeline(apps: AppFactory) -> None:
    fast, slow = apps()
    calls = count_pipeline_calls(fast)
    eligible: list[Request] = [
        ("GET", "/quotes/AAPL", {}, None), ("GET", "/quotes/AAPL", ORIGIN, None), ("HEAD", "/quotes/AAPL", {}, None),
        ("GET", "/weather?city=Lisbon", {}, None), ("GET", "/reports/42", {"Accept": "application/json"}, None),
        ("GET", "/quotes/AAPL", {"Content-Length": "0"}, b""), ("GET", "/quotes/AAPL", {}, None),
    ]
    assert assert_same(fast, slow, eligible) == [402] * len(eligible)
    assert calls == [0]
    # What it must leave to the pipeline, it does: bodies, refusals before the offer.
    left: list[Request] = [
        ("GET", "/quotes/aapl", {}, None), ("GET", "/quotes/aapl", {}, None),
        ("POST", "/orders", {"Content-Type": "application/json"}, b'{"symbol": "AAPL", "quantity": 5}'),
        ("GET", "/quotes/AAPL", {"Payment-Signature": PAYMENT}, None),
        ("GET", "/quotes/AAPL", {"X-Big": "x" * 40_000}, None),
    ]
    assert assert_same(fast, slow, left) == [422, 422, 402, 400, 431]
    # All but two. The 431: header_limits is a stage of the chain's per-request prefix, which the
    # fast path runs itself (the same stage, the same answer: assert_same compared them). The paid
    # GET: its shape is the unpaid GET's, kept; the stages after the 402 run on it (``_paid``).
    assert calls == [len(left) - 2]


def test_the_resource_url_follows_the_public_url_or_the_host(apps: AppFactory) -> None:
    hosts = [{}, {"Host": "a.example"}, {"Host": "b.example:81"}, {"Host": "a.example"}]
    for overrides in ({}, {"public_url": "https://pay.example/"}):
        fast, slow = apps(**overrides)
        requests: list[Request] = [("GET", "/quotes/AAPL?", h, None) for h in hosts]
        requests += [("GET", "/weather?city=Lisbon", h, None) for h in hosts]
        assert_same(fast, slow, requests)
        resources = {json.loads(body)["resource"]["url"] for _, _, body in send_all(fast, requests)}
        if overrides:
            assert resources == {"https://pay.example/quotes/AAPL", "https://pay.example/weather?city=Lisbon"}
        else:
            assert "http://b.example:81/quotes/AAPL" in resources


def test_v1_challenge_bodies(apps: AppFactory) -> None:
    fast, slow = apps(challenge_body="v1")
    assert_same(fast, slow, UNPAID[:8])
    _, _, body = send_all(fast, [UNPAID[0]])[0]
    assert json.loads(body)["x402Version"] == 1


def test_kill_switch_and_open_breaker_answer_503_before_any_offer(apps: AppFactory) -> None:
    fast, slow = apps()
    requests = [UNPAID[0], UNPAID[6], UNPAID[2]]
    for app in (fast, slow):
        policy = app.state.pipeline.safety.policy
        asyncio.run(policy.set("tools", "get_quote", True, "maintenance"))
    assert assert_same(fast, slow, requests) == [503, 402, 503]
    for app in (fast, slow):
        safety = app.state.pipeline.safety
        asyncio.run(safety.policy.set("tools", "get_quote", False))
        asyncio.run(safety.breakers._open("acme-legacy/legacy", safety.breakers.configs["acme-legacy/legacy"]))
    statuses = assert_same(fast, slow, requests + [("GET", "/quotes/AAPL", ORIGIN, None)])
    assert statuses == [503, 503, 503, 503]
    for app in (fast, slow):
        app.state.clock.advance(3600)  # cool-down over: half-open, unpaid calls get their offer
    assert assert_same(fast, slow, requests) == [402, 402, 402]


def test_per_client_rate_limit(apps: AppFactory) -> None:
    fast, slow = apps(rate_limit_per_client="3/10s")
    requests = [UNPAID[0]] * 4 + [UNPAID[2], UNPAID[6]]
    assert assert_same(fast, slow, requests) == [402, 402, 402, 429, 429, 429]
    for app in (fast, slow):
        app.state.clock.advance(10)
    assert assert_same(fast, slow, requests[:2]) == [402, 402]


def test_header_limit(apps: AppFactory) -> None:
    fast, slow = apps(max_header_bytes=600)
    small, large = {"X-Pad": "p" * 100}, {"X-Pad": "p" * 600}
    statuses = assert_same(fast, slow, [("GET", "/quotes/AAPL", small, None), ("GET", "/quotes/AAPL", large, None),
                                        ("GET", "/quotes/AAPL", small, None)])
    assert statuses == [402, 431, 402]


def test_paid_calls_skip_the_app_stack_but_never_another_routes_path(apps: AppFactory) -> None:
    """A paid call to a catalog path is the pipeline's without Starlette's middlewares and route
    walk; a paid call to a path another route takes (literal or pattern) still goes to the app."""
    fast, _ = apps()
    send_all(fast, [("GET", "/quotes/AAPL", {}, None)])  # builds the middleware stack and the front
    front = fast.middleware_stack
    stack_calls: list[str] = []
    inner = front.app  # type: ignore[union-attr]

    async def counted_stack(scope: Any, receive: Any, send: Any) -> None:
        stack_calls.append(scope["path"])
        await inner(scope, receive, send)

    front.app = counted_stack  # type: ignore[union-attr]
    answers = send_all(fast, [
        ("GET", "/quotes/AAPL", {"Payment-Signature": PAYMENT}, None),
        ("POST", "/orders", {"Content-Type": "application/json"}, b'{"symbol": "AAPL", "quantity": 5}'),
        ("GET", "/healthz", {"Payment-Signature": PAYMENT}, None),
        ("GET", "/receipts/1", {"X-Payment": PAYMENT}, None),
    ])
    assert [status for status, _, _ in answers][:2] == [400, 402]
    assert answers[2][0] == 200 and answers[3][0] != 400  # the health check and the receipts route answered
    assert stack_calls == ["/healthz", "/receipts/1"]
