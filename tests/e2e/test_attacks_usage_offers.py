"""Review of metered and computed prices: a tool charged by its usage (``usage:``, an ``upto`` tool)
that also lists an ``exact`` offer (``offers:``, the tool's own or the catalog's).

The loader refuses ``usage:`` on a tool whose first offer is not ``upto`` (``usage_needs_upto``), and
an exact stream that does not settle before it starts (``stream_settles_upfront``), but it checks
only the first offer: a further ``exact`` offer loads, and is sold at ``price``, which on a usage
tool is the price of ONE unit, settled after the answer as the upto offer is. A payer picking it
buys any usage for one unit's price (an answer reporting 9 units, 0.009 by the rule, for 0.001);
on a stream, the exact payment is settled only once the stream has ended, so a payer that empties
its wallet mid-stream gets the whole stream and pays nothing.

Each test asserts the invariant on the chain balances, the ledger rows and the upstream's call log:
content only for the charge the tool's rule names, and an exact payment final before its content
streams. A fix may refuse such a catalog at load (the tests then pass at once), drop the exact offer
from usage tools, or charge it so the invariant holds; any of them passes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from catalog import CatalogError
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentRequirements
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.support.chain_actions import drain, transfer
from tests.support.usage_upstream import UsageUpstream

EACH = 1_000  # 0.001 per unit, 6 decimals
CATALOG = """
catalog: 1
owner: review-metering
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  lying:
    base_url: "{lying}"
tools:
  - name: metered
    description: Charged 0.001 per unit its answer reports, at most 0.01.
    method: GET
    path: /metered/{{mode}}
    upstream: lying
    upstream_path: /usage/{{mode}}
    price: 0.001
    max_price: 0.01
    payment: {{scheme: upto}}
    usage: {{from: json, pointer: /usage/units}}
    offers:
      - {{asset: "{token}", scheme: exact}}
    input_schema: {{type: object, properties: {{mode: {{type: string}}}}, required: [mode]}}
  - name: ticks
    description: n events at 0.0001 each, charged per event delivered.
    method: GET
    path: /ticks/{{n}}
    upstream: lying
    upstream_path: /stream/{{n}}
    price: 0.0001
    max_price: 0.01
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: events}}
    offers:
      - {{asset: "{token}", scheme: exact}}
    input_schema:
      type: object
      properties: {{n: {{type: string}}, hold_after: {{type: integer}}}}
      required: [n]
"""


@pytest.fixture(scope="module")
def lying() -> Iterator[tuple[str, UsageUpstream]]:
    upstream = UsageUpstream()
    with ThreadServer(upstream.app()) as server:
        yield server.url, upstream


def _gateway(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, lying_url: str) -> RunningGateway | None:
    """The gateway on this catalog; None when the catalog is refused for the exact offer of a usage
    tool (the fix at load: the hole is closed)."""
    path = tmp_path / "review-metering.yaml"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, lying=lying_url))
    try:
        return start_gateway(path)
    except CatalogError as refused:
        assert any("offers" in issue.path or "usage" in issue.path for issue in refused.issues), str(refused)
        return None


def _exact_offer(gateway: RunningGateway, path: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """This request's 402 and its exact offer; None when the tool offers no exact (a fix)."""
    with gateway.client() as http:
        offer = http.get(path)
    assert offer.status_code == 402, offer.text
    required: dict[str, Any] = json.loads(base64.b64decode(offer.headers["PAYMENT-REQUIRED"]))
    exact = [a for a in required["accepts"] if a["scheme"] == "exact"]
    return (required, exact[0]) if exact else None


def _exact_header(devchain: Devchain, payer: int, required: dict[str, Any], accept: dict[str, Any]) -> str:
    requirements = PaymentRequirements.model_validate(accept)
    return encode_header(Payer(devchain.key(payer)).sign(requirements, resource=required["resource"]).to_wire())


def _balances(devchain: Devchain, payer: int) -> tuple[int, int]:
    return devchain.balance(devchain.address(payer)), devchain.balance(PAY_TO)


def _moved(devchain: Devchain, payer: int, before: tuple[int, int]) -> tuple[int, int]:
    now = _balances(devchain, payer)
    return before[0] - now[0], now[1] - before[1]


def test_an_exact_offer_on_a_usage_tool_does_not_buy_nine_units_for_the_price_of_one(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, lying: tuple[str, UsageUpstream],
) -> None:
    """The answer reports 9 units: the rule charges 9 x 0.001 = 0.009 (below the 0.01 maximum). Paid
    through the tool's exact offer (amount 0.001, the price of one unit), it must not be served for
    less than its usage: served only if 0.009 moved, otherwise nothing moved and nothing settled."""
    gateway = _gateway(start_gateway, devchain, tmp_path, lying[0])
    if gateway is None:
        return  # refused at load: no usage tool is sold through an exact offer
    found = _exact_offer(gateway, "/metered/json-9")
    if found is None:
        return  # no exact offer on a usage tool
    required, accept = found
    header = _exact_header(devchain, 6, required, accept)
    before, calls = _balances(devchain, 6), lying[1].calls["json-9"]
    with gateway.client() as http:
        response = http.get("/metered/json-9", headers={"PAYMENT-SIGNATURE": header})
    moved = _moved(devchain, 6, before)
    rows = gateway.ledger.all()
    if "USAGE-CONTENT-" in response.text:  # the 9 units' content was served: the rule's charge is owed
        assert lying[1].calls["json-9"] == calls + 1
        assert moved[0] >= 9 * EACH and moved[0] == moved[1], (
            f"9 units (0.009 by the usage rule) were served for {moved[0]} atomic through the exact offer "
            f"(offered amount {accept['amount']}); ledger: {[(r.state, r.amount) for r in rows]}"
        )
        [row] = rows
        assert (row.state, row.amount) == (PaymentState.SETTLED, moved[0])
    else:  # refused: nothing charged, nothing settled
        assert moved == (0, 0), response.text
        assert all(row.state != PaymentState.SETTLED for row in rows), response.text


def test_an_exact_offer_on_a_usage_stream_does_not_stream_content_before_it_is_paid(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, lying: tuple[str, UsageUpstream],
) -> None:
    """An exact stream must settle before its first byte (README: "paid content never leaves before
    its settlement is final"; the loader refuses ``settle: after`` on an exact stream). Paid through
    the usage stream's exact offer, it is settled only when the stream ends: the payer reads 3
    events, moves its whole balance away, reads the rest, and the settlement then fails. Content
    delivered must mean the payment moved (or no exact offer is sold on such a tool)."""
    gateway = _gateway(start_gateway, devchain, tmp_path, lying[0])
    if gateway is None:
        return
    path = "/ticks/6?hold_after=3"  # the upstream waits after 3 events until released
    found = _exact_offer(gateway, path)
    if found is None:
        return
    required, accept = found
    payer, sink = 7, devchain.address(8)
    header = _exact_header(devchain, payer, required, accept)
    before, calls = _balances(devchain, payer), lying[1].calls["stream-6"]
    received, event = b"", b'{"i": '  # each upstream event's JSON starts so (the gateway's own last event does not)
    try:
        with gateway.client() as http, http.stream("GET", path, headers={"PAYMENT-SIGNATURE": header}) as response:
            status, settled_first = response.status_code, "payment-response" in response.headers
            chunks = response.iter_raw()
            for chunk in chunks:  # the first 3 events (the upstream holds after them)
                received += chunk
                if received.count(event) >= 3:
                    break
            drained = drain(devchain.w3, devchain.token, devchain.key(payer), sink)  # the payer empties its wallet mid-stream
            lying[1].release()
            for chunk in chunks:
                received += chunk
    finally:
        lying[1].release()
    delivered = received.count(event)
    spent, earned = _moved(devchain, payer, before)
    moved = (spent - drained, earned)  # what the payment moved, the payer's own transfer aside
    transfer(devchain.w3, devchain.token, devchain.key(8), devchain.address(payer), drained)  # given back
    rows = gateway.ledger.all()
    assert status == 200 and drained > 0 and lying[1].calls["stream-6"] == calls + 1
    assert delivered == 6, received  # the whole stream reached the payer
    assert moved[0] >= int(accept["amount"]) and moved[0] == moved[1], (
        f"all {delivered} events were streamed through the exact offer (amount {accept['amount']}, receipt before "
        f"content: {settled_first}) and {moved[0]} atomic moved; ledger: {[(r.state, r.amount, r.error_reason) for r in rows]}"
    )
    assert [row.state for row in rows] == [PaymentState.SETTLED]
