"""Review of who pays and the safety rules, on one real gateway and a real anvil: limits keyed on a
payer must be spent only by that payer's own fresh payments, and a budget must count every payment
that moved money, whatever the shape of its answer. Each asserts the ledger, the balances and the
upstream's call log, not only the status codes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.x402.codec import decode_header_json, encode_header
from settlement.x402.wire import PaymentRequirements
from tests.conftest import PAY_TO, Devchain, GatewayFactory, body_json, offer_of, upstream_hits
from tests.e2e.test_public_replay import rebuilt_from_chain
from tests.support.usage_upstream import UsageUpstream

VICTIM = 3
PAYER = 4
PRICE = 2000  # get_quote and ticks_exact: 0.002 of a 6-decimal token


def paid(client: httpx.Client, devchain: Devchain, path: str, payer: int) -> httpx.Response:
    offer = offer_of(client.get(path))
    header = encode_header(Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource))
    return client.get(path, headers={"PAYMENT-SIGNATURE": header})


def test_a_settled_payment_rebuilt_from_the_chain_spends_none_of_its_payers_rate_limit(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    """THREATS.md: "I have the signature of a settled payment" proves nothing. Once the victim's
    payment settles, its authorization and signature are calldata anyone can read; a griefer who
    replays them on other routes of the same price (each refused: the nonce is used) must not spend
    the victim's per-payer rate limit, or the victim's own fresh payments are locked out."""
    gateway = start_gateway(rate_limit_per_payer="3/1h")
    victim = devchain.address(VICTIM)
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        first = paid(client, devchain, "/quotes/RLA", VICTIM)
        assert first.status_code == 200, first.text
        tx_hash = decode_header_json(first.headers["payment-response"])["transaction"]
        replays = []
        for symbol in ("RLB", "RLC", "RLD", "RLE"):  # public facts only: the calldata and the public offer
            forged = rebuilt_from_chain(devchain, tx_hash, client.get(f"/quotes/{symbol}"))
            replays.append(client.get(f"/quotes/{symbol}", headers={"PAYMENT-SIGNATURE": encode_header(forged)}))
        # the victim's own fresh payments: two more, within its 3 per hour
        second = paid(client, devchain, "/quotes/RLF", VICTIM)
        third = paid(client, devchain, "/quotes/RLG", VICTIM)

    # the griefer got nothing and moved nothing
    assert all(r.status_code in (402, 429) for r in replays), [r.text for r in replays]
    assert all(upstream_hits(upstream, f"GET /api/v1/quote/{s}") == 0 for s in ("RLB", "RLC", "RLD", "RLE"))
    # the victim, who paid, is served: its limit was spent only by its own payments
    assert second.status_code == 200, second.text
    assert third.status_code == 200, third.text
    assert upstream_hits(upstream, "GET /api/v1/quote/RLF") == 1
    assert upstream_hits(upstream, "GET /api/v1/quote/RLG") == 1
    rows = gateway.ledger.all()
    assert sorted(r.path for r in rows if r.state == PaymentState.SETTLED) == ["/quotes/RLA", "/quotes/RLF", "/quotes/RLG"]
    assert {r.payer for r in rows} == {victim}
    assert devchain.balance(PAY_TO) - before == 3 * PRICE


STREAM_CATALOG = """
catalog: 1
owner: acme-review-streams
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
budgets:
  per_payer: {{amount: "0.002", window: 1d}}
upstreams:
  streams:
    base_url: "{streams}"
tools:
  - name: ticks_exact
    description: n events for a fixed price, settled before they start.
    method: GET
    path: /exact/{{n}}
    upstream: streams
    upstream_path: /stream/{{n}}
    price: 0.002
    stream: true
    input_schema: {{type: object, properties: {{n: {{type: string}}}}, required: [n]}}
"""


@pytest.fixture
def streams() -> Iterator[UsageUpstream]:
    upstream = UsageUpstream()
    with ThreadServer(upstream.app()) as server:
        upstream.url = server.url  # type: ignore[attr-defined]
        yield upstream
    upstream.release()


def _exact_header(client: httpx.Client, devchain: Devchain, path: str, payer: int) -> str:
    offer = client.get(path)
    assert offer.status_code == 402, offer.text
    required = decode_header_json(offer.headers["payment-required"])
    accepted = PaymentRequirements.model_validate(required["accepts"][0])
    return encode_header(Payer(devchain.key(payer)).sign(accepted, resource=required["resource"]).to_wire())


def test_an_exact_stream_settled_upfront_counts_against_the_payers_budget(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, streams: UsageUpstream
) -> None:
    """A per-payer budget of 0.002 a day holds one 0.002 stream. An exact stream settles before it
    starts (money moved), then relays; when it ends, the budget must keep what was charged, so a
    second stream the same day is refused before any upstream call or charge."""
    path = tmp_path / "streams.yaml"
    path.write_text(STREAM_CATALOG.format(token=devchain.token, pay_to=PAY_TO, streams=streams.url))  # type: ignore[attr-defined]
    gateway = start_gateway(path)
    payer = devchain.address(PAYER)
    payer_before, payee_before = devchain.balance(payer), devchain.balance(PAY_TO)
    with gateway.client() as client:
        first = client.get("/exact/3", headers={"PAYMENT-SIGNATURE": _exact_header(client, devchain, "/exact/3", PAYER)})
        assert first.status_code == 200 and "payment-response" in first.headers, first.text
        assert first.text.count('"i":') == 3  # the whole stream was read: it ended, its finalizers ran
        second = client.get("/exact/4", headers={"PAYMENT-SIGNATURE": _exact_header(client, devchain, "/exact/4", PAYER)})

    assert second.status_code == 403, second.text[:300]
    assert body_json(second)["error"] == "budget_exceeded"
    assert streams.calls["stream-3"] == 1 and streams.calls["stream-4"] == 0
    rows = gateway.ledger.all()
    assert [(r.path, r.state) for r in rows if r.state == PaymentState.SETTLED] == [("/exact/3", PaymentState.SETTLED)]
    assert payer_before - devchain.balance(payer) == PRICE
    assert devchain.balance(PAY_TO) - payee_before == PRICE
    assert json.loads(json.dumps(body_json(second)))["usedAtomic"] == str(PRICE)
