"""Review of the surfaces beside the paid HTTP path: the served facilitator API racing a live request.

The paid path (``settle: after``) verifies a payment, takes the in-flight lock on
``pay:<network>:<payer>:<nonce>`` in the state store, calls the upstream, and only then settles.
The served ``/facilitator/settle`` runs on the same local facilitator and the same settlement key,
but never looks at that lock (``gateway.surfaces.facilitator_api.SettleOnce`` only deduplicates
its own calls). While the live request waits for its upstream, the very payment it holds (or
another authorization on the same nonce) can be settled through the facilitator API:

* the facilitator API answers ``success: true`` to its caller and moves P's price to our payee;
  the live request's own broadcast then reverts on the gateway's gas, and since the transfer that
  used the nonce came from our own settlement account, ``settled_elsewhere`` does not adopt it: the
  payer, charged, gets a 402 "nothing was charged; pay again" and the ledger row says ``failed``
  (money moved, recorded as not moved; a charge without its answer);
* with a 1-unit authorization on the same nonce, the griefer's whole cost is one atomic unit: the
  gateway pays gas for that transfer, then for its own settlement's revert, and the upstream ran.

The upstream's hook (run while the gateway waits for it) makes the race deterministic: no sleeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from web3 import Web3

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentRequirements
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of
from tests.support import chain_actions
from tests.support.recording_upstream import RecordingUpstream, UpstreamCall

FUNDER = 6  # funds each test's fresh payer (delta-based checks only)
NETWORK = "eip155:31337"
PRICE = 2000  # "0.002" at 6 decimals


@pytest.fixture(scope="module")
def held_upstream() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture
def facilitating(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain,
                 held_upstream: RecordingUpstream) -> RunningGateway:
    """A gateway selling one settle-after read, serving /facilitator for its own payee and asset only."""
    catalog = tmp_path / "review-surfaces.yaml"
    catalog.write_text(f"""
catalog: 1
owner: review-surfaces
payment: {{network: "{NETWORK}", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{held_upstream.url}", timeout_seconds: 20}}
tools:
  - name: held_read
    description: A paid read (settles after the upstream answers)
    method: GET
    path: /held/{{item}}
    upstream_path: /u/held_read/{{item}}
    price: "0.002"
    settle: after
""")
    return start_gateway(catalog, serve_facilitator=True, facilitator_pay_to=PAY_TO)


def facilitator_body(payload: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
    return {"x402Version": 2, "paymentPayload": payload, "paymentRequirements": requirements}


def settlement_txs(devchain: Devchain, first_block: int) -> list[dict[str, Any]]:
    """Every transaction the gateway's settlement account sent from ``first_block`` on, with its receipt status."""
    account = Web3.to_checksum_address(devchain.deployment.deployer)
    sent: list[dict[str, Any]] = []
    for number in range(first_block, devchain.w3.eth.block_number + 1):
        for tx in devchain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            assert not isinstance(tx, bytes)  # full transactions, not hashes
            if tx["from"] == account:
                receipt = devchain.w3.eth.get_transaction_receipt(tx["hash"])
                sent.append({"hash": tx["hash"].to_0x_hex(), "status": receipt["status"]})
    return sent


def held_call(gateway: RunningGateway, held_upstream: RecordingUpstream, path: str, payment: dict[str, Any],
              while_held: dict[str, Any]) -> tuple[httpx.Response, list[httpx.Response]]:
    """``payment`` presented on ``path``; while the gateway waits for the upstream, ``while_held``
    (a /facilitator/settle body) is posted to the same gateway's facilitator API."""
    during: list[httpx.Response] = []

    def hook(call: UpstreamCall) -> None:
        during.append(httpx.post(f"{gateway.url}/facilitator/settle", json=while_held, timeout=60))

    held_upstream.on("held_read", hook)
    try:
        with gateway.client() as client:
            paid = client.get(path, headers={"PAYMENT-SIGNATURE": encode_header(payment)}, timeout=60)
    finally:
        held_upstream.on("held_read", None)
    assert len(during) == 1, "the upstream was not called once"
    return paid, during


def test_a_payment_a_live_request_holds_is_not_settled_for_a_facilitator_caller_as_well(
    facilitating: RunningGateway, devchain: Devchain, held_upstream: RecordingUpstream
) -> None:
    """The payer presents P on /held/1; while its upstream runs, P goes to /facilitator/settle (the
    facilitator's caller: a resource server of the same payee). The live request holds (network,
    payer, nonce) from verify until its outcome is final: it settles P and is served, and the
    facilitator's caller is not told that the same transfer settled for it too."""
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 50_000)
    payer = Payer(key).address
    with facilitating.client() as client:
        offer = offer_of(client.get("/held/1"))
    payment = Payer(key).sign(offer.accepts[0], resource=offer.resource).to_wire()
    before = devchain.balance(payer), devchain.balance(PAY_TO)
    first_block = devchain.w3.eth.block_number + 1
    calls_before = held_upstream.count("held_read")

    paid, [facilitated] = held_call(facilitating, held_upstream, "/held/1", payment,
                                    facilitator_body(payment, payment["accepted"]))

    # One transfer of the price happened (P's own), and the upstream ran once.
    charged = before[0] - devchain.balance(payer)
    assert (charged, devchain.balance(PAY_TO) - before[1]) == (PRICE, PRICE)
    assert held_upstream.count("held_read") - calls_before == 1
    [row] = facilitating.ledger.all()
    sent = settlement_txs(devchain, first_block)
    # Never a charge without the answer: P's price moved to our payee, so the live request is served.
    assert paid.status_code == 200 and row.state == PaymentState.SETTLED, (
        f"charged {charged} by P's own transfer, yet answered {paid.status_code} "
        f"{paid.json().get('error')!r} ({paid.json().get('message')!r}); ledger row {row.state} "
        f"{row.error_reason!r} tx {row.tx_hash}; /facilitator/settle told its caller {facilitated.json()}; "
        f"settlement account sent {sent}"
    )
    # ... and that transfer is not sold a second time, to the facilitator API's caller.
    sold_to_facilitator_caller = facilitated.status_code == 200 and facilitated.json().get("success") is True
    assert not sold_to_facilitator_caller, (
        f"one transfer sold twice: the live request was served and /facilitator/settle told its caller "
        f"{facilitated.json()}"
    )
    assert [tx for tx in sent if tx["status"] != 1] == [], f"the gateway paid gas for a reverted settlement: {sent}"
    assert len(sent) == 1 and row.tx_hash == sent[0]["hash"], f"one payment, broadcasts {sent}, ledger {row.tx_hash}"


def test_a_one_unit_authorization_on_a_live_requests_nonce_cannot_make_its_settlement_revert(
    facilitating: RunningGateway, devchain: Devchain, held_upstream: RecordingUpstream
) -> None:
    """The payer presents P (the price) on /held/2; while its upstream runs, it signs Q: 1 atomic unit
    to the same payee on the same nonce, and has the gateway's own facilitator API settle Q (the
    gateway pays Q's gas). P's settlement then reverts, on the gateway's gas again, and the upstream
    ran for nothing: a griefer's loop costing it one unit a round. A live request's nonce is held."""
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 50_000)
    payer = Payer(key).address
    with facilitating.client() as client:
        offer = offer_of(client.get("/held/2"))
    signed = Payer(key).sign(offer.accepts[0], resource=offer.resource)
    payment = signed.to_wire()
    nonce = bytes.fromhex(payment["payload"]["authorization"]["nonce"].removeprefix("0x"))
    one_unit = PaymentRequirements.model_validate({**payment["accepted"], "amount": "1"})
    dust = Payer(key).sign(one_unit, nonce=nonce).to_wire()
    before = devchain.balance(payer), devchain.balance(PAY_TO)
    first_block = devchain.w3.eth.block_number + 1

    paid, [facilitated] = held_call(facilitating, held_upstream, "/held/2", payment,
                                    facilitator_body(dust, one_unit.to_wire()))

    sent = settlement_txs(devchain, first_block)
    reverted = [tx for tx in sent if tx["status"] != 1]
    assert reverted == [], (
        f"the gateway paid gas for a reverted settlement: {sent}; the facilitator API said {facilitated.json()}, "
        f"the paid request {paid.status_code} {paid.text[:200]}; the griefer spent "
        f"{before[0] - devchain.balance(payer)} unit(s)"
    )
    [row] = facilitating.ledger.all()
    moved = before[0] - devchain.balance(payer)
    assert devchain.balance(PAY_TO) - before[1] == moved
    if paid.status_code == 200:  # served: its price moved, by its own settlement
        assert row.state == PaymentState.SETTLED and moved == PRICE
    else:  # not served: its price did not move
        assert row.state != PaymentState.SETTLED and moved in (0, 1)
