"""Paid calls without a body take their shape from the unpaid call of the same key (issue 20).

The fast path keeps, per method, path, query and Host, what the chain's shape-only stages (route,
body, arguments, offer) write for an unpaid call. A paid call with the same key and no body now
takes those results from it and runs the rest of the chain (``UnpaidFastPath._paid``), skipping
Starlette's request parsing and those four stages. The offer's protocol version is the payment
header's, as ``offer`` reads it.

What must hold, on a real anvil with a recording upstream:
- A gateway with the fast path off is the reference. The same paid calls give the same statuses,
  error codes, replay marks and trimmed answers on both. The payer pays the same, the upstream is
  called as often, and the invariant checker passes on both ledgers.
- The fast gateway answers those paid calls without ``Pipeline.handle``, so the shortcut is taken.
- A paid call never shapes the 402 kept for its key. A v1 payment on a fresh key is followed by an
  unpaid call that still gets the v2 body.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from settlement.ledger import PaymentState
from tests.support.attack_stack import (
    JUNK_SIGNATURE,
    Gateway,
    Stack,
    attack_stack,
    error_of,
    offer_for,
    reference_gateway,
    sign,
    v1_header,
    v2_header,
)

PAYER = 3
ORIGIN = {"Origin": "https://agent.example"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with attack_stack(tmp_path_factory.mktemp("paid-shape")) as built:
        yield built


@pytest.fixture(scope="module")
def reference(stack: Stack) -> Iterator[Gateway]:
    with reference_gateway(stack) as gateway:
        yield gateway


def junk(payload: Any) -> dict[str, Any]:
    wire: dict[str, Any] = payload.to_wire()
    wire["payload"]["signature"] = JUNK_SIGNATURE
    return wire


def session(stack: Stack, gateway: Gateway) -> list[tuple[Any, ...]]:
    """One sequence of paid calls without a body, each reduced to what must not depend on the path
    it took: status, error code, replay mark, the upstream's answer less its marker, the payer's
    spend and the upstream calls it made."""
    checker = stack.checker(gateway)
    key, payer = stack.chain.key(PAYER), stack.chain.address(PAYER)
    seen: list[tuple[Any, ...]] = []
    with gateway.client() as client:
        def paid(label: str, method: str, path: str, headers: dict[str, str]) -> httpx.Response:
            balance, calls = stack.chain.balance(payer), len(stack.upstream.snapshot())
            response = checker.send(client, method, path, headers=headers, label=label)
            try:
                answer = {k: v for k, v in response.json().items() if k not in ("marker", "paymentId", "requestId")}
            except (ValueError, AttributeError):
                answer = None
            seen.append((label, response.status_code, error_of(response), response.headers.get("x402gw-replay"),
                         answer if response.status_code == 200 else None,
                         balance - stack.chain.balance(payer), len(stack.upstream.snapshot()) - calls))
            return response

        quote = offer_for(client, "GET", "/q/SHP")
        first = sign(key, quote)
        paid("v2", "GET", "/q/SHP", v2_header(first))
        paid("resend", "GET", "/q/SHP", v2_header(first))
        paid("junk signature", "GET", "/q/SHP", v2_header(junk(sign(key, quote))))
        paid("v1", "GET", "/w?city=Lisbon", v1_header(sign(key, offer_for(client, "GET", "/w?city=Lisbon"))))
        quote = offer_for(client, "GET", "/q/ORG")
        paid("origin", "GET", "/q/ORG", {**ORIGIN, **v2_header(sign(key, quote))})
        both = {**v2_header(sign(key, quote)), **v1_header(sign(key, quote))}
        paid("both headers", "GET", "/q/ORG", both)
        paid("head", "HEAD", "/q/ORG", v2_header(sign(key, quote)))
        paid("bad arguments", "GET", "/q/lower", v2_header(sign(key, quote)))
        paid("another path's offer", "GET", "/q2/ORG", v2_header(sign(key, quote)))
        quote = offer_for(client, "GET", "/w?city=Porto&units=metric")
        paid("query", "GET", "/w?city=Porto&units=metric", v2_header(sign(key, quote)))
        paid("other query", "GET", "/w?city=Porto&units=imperial", v2_header(sign(key, quote)))
    checker.check()
    return seen


def test_paid_calls_without_a_body_answer_as_the_pipeline_does(stack: Stack, reference: Gateway) -> None:
    fast = stack.gateway()
    handled: list[int] = []
    pipeline = fast.server.server.config.app.state.pipeline
    handle = pipeline.handle

    async def counted(request: Any) -> Any:
        handled.append(1)
        return await handle(request)

    pipeline.handle = counted
    try:
        got = session(stack, fast)
    finally:
        pipeline.handle = handle
    expected = session(stack, reference)
    assert got == expected

    statuses = {label: status for label, status, *_ in got}
    assert statuses["v2"] == statuses["v1"] == statuses["query"] == statuses["origin"] == 200
    assert statuses["resend"] == 200 and dict((s[0], s[3]) for s in got)["resend"] == "true"
    assert statuses["junk signature"] == statuses["another path's offer"] == 402
    assert statuses["bad arguments"] == 422
    # Paid with its own key's offer: every 200 above charged once; the resend, nothing.
    assert [s[5] for s in got if s[1] == 200] == [2000, 0, 2000, 2000, 2000, 2000]
    # Only the calls the shape cache cannot serve went to the pipeline: the HEAD and the 422 (no kept shape).
    assert len(handled) == 2
    for gateway in (fast, reference):
        states = [row.state for row in gateway.ledger.all()]
        assert states.count(PaymentState.SETTLED) == 5


def test_a_paid_call_never_shapes_the_402_kept_for_its_key(stack: Stack, reference: Gateway) -> None:
    """A v1 payment is the first request on a fresh key (its offer read from the reference gateway,
    which sells the same catalog): the 402 then kept for unpaid calls is the gateway's default (v2),
    not the v1 payer's, and a v2 payment on that key is answered in v2."""
    gateway = stack.gateway()
    key = stack.chain.key(PAYER)
    with gateway.client() as client, reference.client() as other:
        fresh = client.get("/q/NEW", headers=v1_header(sign(key, offer_for(other, "GET", "/q/NEW"))))
        assert fresh.status_code == 200, fresh.text
        assert "x-payment-response" in fresh.headers and "payment-response" not in fresh.headers
        unpaid = client.get("/q/NEW")
        assert unpaid.status_code == 402 and unpaid.json()["x402Version"] == 2
        assert json.loads(base64.b64decode(unpaid.headers["payment-required"]))["x402Version"] == 2
        paid = client.get("/q/NEW", headers=v2_header(sign(key, offer_for(other, "GET", "/q/NEW"))))
        assert paid.status_code == 200 and "payment-response" in paid.headers, paid.text
        assert "x-payment-response" not in paid.headers
