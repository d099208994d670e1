"""The paid shape cache under attack: a review of issue 20's change, by which a paid call without a
body takes its shape from the fast path's kept unpaid shape (``UnpaidFastPath._paid``). No divergence from the full pipeline was found: the tests
below are the strongest attempts, and they PASS on the reviewed code. Each runs the same sequence of
paid calls against the fast gateway and a reference gateway built with ``fast_path=False``, on one
anvil with a recording upstream, and compares status, error code, replay mark, the answer (less its
marker), the payer's spend and the upstream calls; the THREATS.md invariant checker runs on both
ledgers, and the fast gateway is shown to have taken the shortcut (``Pipeline.handle`` not called).

The catalog is the attack suite's plus two tools the suite lacks: ``trim_read`` (``answers: trim``,
so ``x402gw_*`` query parameters shape the paid answer) and ``ruled_read`` (priced by a rule over
its ``days`` argument).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

import tests.support.attack_stack as attack_stack_module
from gateway.pipeline import fastpath
from tests.support.attack_stack import (
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

PAYER = 4

EXTRA_TOOLS = """
  - name: trim_read
    description: A paid read whose answer the caller may trim
    method: GET
    path: /t/{{symbol}}
    upstream: rec
    upstream_path: /u/trim_read/{{symbol}}
    price: "0.002"
    answers: {{trim: true}}
    input_schema: *symbol
  - name: ruled_read
    description: A paid read priced by a rule over its days argument
    method: GET
    path: /r
    upstream: rec
    upstream_path: /u/ruled_read
    price: {{base: "0.001", per: days, each: "0.0005"}}
    input_schema:
      type: object
      properties:
        city: {{type: string, minLength: 1, maxLength: 100}}
        days: {{type: integer, minimum: 0, maximum: 30}}
      required: [city, days]
      additionalProperties: false
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attack_stack_module, "ATTACK_CATALOG", attack_stack_module.ATTACK_CATALOG + EXTRA_TOOLS)
        with attack_stack(tmp_path_factory.mktemp("review-paid-shape")) as built:
            yield built


@pytest.fixture(scope="module")
def reference(stack: Stack) -> Iterator[Gateway]:
    with reference_gateway(stack) as gateway:
        yield gateway


Paid = Callable[..., httpx.Response]
Script = Callable[[httpx.Client, Paid, str, httpx.Client], None]


def run(stack: Stack, gateway: Gateway, other: Gateway, script: Script) -> tuple[list[tuple[Any, ...]], int]:
    """``script`` against ``gateway`` (offers may be read from ``other``, which sells the same
    catalog, so a paid call can come first on a key); each call reduced to what must not depend on
    the path it took. Returns those and how often ``Pipeline.handle`` ran; checks the invariant."""
    checker = stack.checker(gateway)
    payer = stack.chain.address(PAYER)
    seen: list[tuple[Any, ...]] = []
    pipeline = gateway.server.server.config.app.state.pipeline
    handle = pipeline.handle
    handled = [0]

    async def counted(request: Any) -> Any:
        handled[0] += 1
        return await handle(request)

    pipeline.handle = counted
    try:
        with gateway.client() as client, other.client() as offers:
            def paid(label: str, method: str, url: str, headers: Any, **kwargs: Any) -> httpx.Response:
                balance, calls = stack.chain.balance(payer), len(stack.upstream.snapshot())
                response = checker.send(client, method, url, headers=headers, label=label, **kwargs)
                try:
                    body = response.json()
                except ValueError:
                    body = None
                answer = ({k: v for k, v in body.items() if k not in ("marker", "paymentId", "requestId")}
                          if isinstance(body, dict) else body)
                upstream = [(c.path, c.query) for c in stack.upstream.snapshot()[calls:]]
                seen.append((label, response.status_code, error_of(response), response.headers.get("x402gw-replay"),
                             response.headers.get("x402gw-trimmed"),
                             answer if response.status_code == 200 else None,
                             "payment-response" in response.headers, "x-payment-response" in response.headers,
                             balance - stack.chain.balance(payer), upstream))
                return response

            script(client, paid, stack.chain.key(PAYER), offers)
    finally:
        pipeline.handle = handle
    checker.check()
    return seen, handled[0]


def required_of(response: httpx.Response) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.b64decode(response.headers["payment-required"]))
    return decoded


def test_rule_prices_and_trimmed_answers_paid_first_on_a_fresh_key(stack: Stack, reference: Gateway) -> None:
    """PASSES (an attempt that held). A paid call is the first request on its key, with an offer
    read from the other gateway, so the fast gateway builds the kept shape from the paid request:
    a rule-priced tool paid at its own price, then with a cheaper query's payment on a dearer
    query, a dearer query's payment on a cheaper one, and a payment for one ``x402gw_fields`` answer
    on another projection / on the untrimmed URL; a v1 payment first on a fresh trimmed key, then an
    unpaid call on that key (its kept 402 is the default v2 one and names the same amount).
    Same outcomes, charges, trimming and upstream calls as the reference; no answer without its own
    settled payment."""

    def script(client: httpx.Client, paid: Paid, key: str, offers: httpx.Client) -> None:
        cheap = offer_for(offers, "GET", "/r?city=Lisbon&days=1")
        dear = offer_for(offers, "GET", "/r?city=Lisbon&days=9")
        assert cheap.accepts[0].amount == "1500" and dear.accepts[0].amount == "5500"
        paid("rule: own price, fresh key", "GET", "/r?city=Lisbon&days=9", v2_header(sign(key, dear)))
        paid("rule: cheap payment on dear query", "GET", "/r?city=Lisbon&days=9", v2_header(sign(key, cheap)))
        paid("rule: dear payment on cheap query", "GET", "/r?city=Lisbon&days=1", v2_header(sign(key, dear)))
        paid("rule: v1 cheap payment on dear query", "GET", "/r?city=Lisbon&days=9", v1_header(sign(key, cheap)))
        paid("rule: reordered query, own offer", "GET", "/r?days=1&city=Lisbon", v2_header(sign(key, cheap)))

        fields = "/t/ABC?x402gw_fields=path"
        trimmed = offer_for(offers, "GET", fields)
        paid("trim: v1 first on fresh key", "GET", fields, v1_header(sign(key, trimmed)))
        unpaid = client.get(fields)
        assert unpaid.status_code == 402 and unpaid.json()["x402Version"] == 2
        assert required_of(unpaid)["accepts"][0]["amount"] == "2000"
        paid("trim: v2 on kept key", "GET", fields, v2_header(sign(key, trimmed)))
        paid("trim: projection's payment on another projection", "GET", "/t/ABC?x402gw_fields=tool",
             v2_header(sign(key, trimmed)))
        paid("trim: projection's payment untrimmed", "GET", "/t/ABC", v2_header(sign(key, trimmed)))
        whole = offer_for(offers, "GET", "/t/ABC")
        paid("trim: untrimmed payment on projection", "GET", fields, v2_header(sign(key, whole)))
        paid("trim: bad x402gw_max_items", "GET", "/t/ABC?x402gw_max_items=-1", v2_header(sign(key, whole)))

    got, handled = run(stack, stack.gateway(), reference, script)
    expected, _ = run(stack, reference, stack.gateway(), script)
    assert got == expected
    statuses = {label: status for label, status, *_ in got}
    assert statuses["rule: own price, fresh key"] == statuses["trim: v2 on kept key"] == 200
    assert statuses["rule: cheap payment on dear query"] == statuses["rule: dear payment on cheap query"] == 402
    assert statuses["trim: projection's payment untrimmed"] == 402
    charged = {label: spent for label, *_, spent, _ in got}
    assert charged["rule: own price, fresh key"] == 5500 and charged["rule: cheap payment on dear query"] == 0
    trimmed_answer = dict((row[0], row[5]) for row in got)["trim: v2 on kept key"]
    assert trimmed_answer == "/u/trim_read/ABC", trimmed_answer
    # Only the calls without a kept shape (the 400 for x402gw_max_items) reached Pipeline.handle.
    assert handled <= 1


def test_header_and_query_variants_and_replays_across_keys(stack: Stack, reference: Gateway) -> None:
    """PASSES (an attempt that held). On one key each: a settled payment resent on the same URL
    (replayed), on the query reordered or percent-encoded (another key, same binding), on another
    Host spelling (``localhost`` for ``127.0.0.1``: another key, whose kept shape names another
    resource) and on a cheaper twin route; both payment headers at once (v1 first on the wire),
    a repeated PAYMENT-SIGNATURE, an X-PAYMENT whose name is sent in upper case, Content-Length: 0
    with a payment, and an Origin (two Host headers: httpx will not send them; an in-process
    ASGI comparison of that case, with a malformed payment, also matched). Same outcomes, receipts' protocol versions,
    charges and upstream calls as the reference; the invariant holds on both ledgers."""

    def script(client: httpx.Client, paid: Paid, key: str, offers: httpx.Client) -> None:
        url = "/w?city=Porto&units=metric"
        offer = offer_for(offers, "GET", url)
        first = sign(key, offer)
        paid("settle", "GET", url, v2_header(first))
        paid("resend", "GET", url, v2_header(first))
        paid("resend, reordered query", "GET", "/w?units=metric&city=Porto", v2_header(first))
        paid("resend, encoded query", "GET", "/w?city=P%6Frto&units=metric", v2_header(first))
        host = httpx.URL(str(client.base_url)).port
        paid("resend, other host", "GET", url, {**v2_header(first), "Host": f"localhost:{host}"})
        paid("fresh, reordered query", "GET", "/w?units=metric&city=Porto", v2_header(sign(key, offer)))

        quote_offer = offer_for(offers, "GET", "/q/VAR")
        both = [("X-PAYMENT", v1_header(sign(key, quote_offer))["X-PAYMENT"]),
                ("PAYMENT-SIGNATURE", v2_header(sign(key, quote_offer))["PAYMENT-SIGNATURE"])]
        paid("both headers, v1 first", "GET", "/q/VAR", both)
        signed = v2_header(sign(key, quote_offer))["PAYMENT-SIGNATURE"]
        paid("repeated header", "GET", "/q/VAR", [("PAYMENT-SIGNATURE", signed), ("PAYMENT-SIGNATURE", signed)])
        paid("upper-case v1 name", "GET", "/q/VAR", [("X-PAYMENT", v1_header(sign(key, quote_offer))["X-PAYMENT"])])
        paid("content-length 0", "GET", "/q/VAR", {**v2_header(sign(key, quote_offer)), "Content-Length": "0"})
        paid("origin", "GET", "/q/VAR", {**v2_header(sign(key, quote_offer)), "Origin": "https://agent.example"})
        paid("twin route", "GET", "/q2/VAR", v2_header(sign(key, quote_offer)))
        paid("head", "HEAD", "/q/VAR", v2_header(sign(key, quote_offer)))

    got, _ = run(stack, stack.gateway(), reference, script)
    expected, _ = run(stack, reference, stack.gateway(), script)
    assert got == expected
    statuses = {label: status for label, status, *_ in got}
    assert statuses["settle"] == 200 and statuses["resend"] == 200
    assert statuses["twin route"] == 402


def test_paid_calls_after_the_kept_shape_was_evicted(stack: Stack, reference: Gateway,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """PASSES (an attempt that held). With room for two kept shapes, unpaid calls on other keys
    evict a key's shape between its 402 and its payment (and between a payment and its resend),
    so the paid call builds the shape again from its own request; another key's payment is sent on
    an evicted key, and a v1 payment rebuilds an evicted key's shape before an unpaid call (which
    still gets the v2 402). Same outcomes, charges and upstream calls as the reference."""
    monkeypatch.setattr(fastpath, "MAX_ENTRIES", 2)

    def script(client: httpx.Client, paid: Paid, key: str, offers: httpx.Client) -> None:
        offer = offer_for(client, "GET", "/q/EVA")
        for symbol in ("EVB", "EVC", "EVD"):
            assert client.get(f"/q/{symbol}").status_code == 402
        payment = sign(key, offer)
        paid("paid after eviction", "GET", "/q/EVA", v2_header(payment))
        for symbol in ("EVE", "EVF", "EVG"):
            assert client.get(f"/q/{symbol}").status_code == 402
        paid("resend after eviction", "GET", "/q/EVA", v2_header(payment))
        other = offer_for(client, "GET", "/q/EVH")
        for symbol in ("EVI", "EVJ"):
            assert client.get(f"/q/{symbol}").status_code == 402
        paid("other key's payment after eviction", "GET", "/q/EVA", v2_header(sign(key, other)))
        paid("v1 after eviction", "GET", "/q/EVH", v1_header(sign(key, other)))
        assert client.get("/q/EVH").json()["x402Version"] == 2

    got, _ = run(stack, stack.gateway(), reference, script)
    expected, _ = run(stack, reference, stack.gateway(), script)
    assert got == expected
    assert [row[1] for row in got] == [200, 200, 402, 200]
