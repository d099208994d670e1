"""Review of the eighth round's security fixes from the other side: HONEST payers and operators
that the fixes now refuse, break or mislead. Each test asserts the honest outcome; each failed on the
code it was written against (2026-12-05) and passed before the round's fixes (9a8c18e).

1. ``test_a_payer_of_a_gateway_without_chain_access_still_gets_its_receipt``: GET /receipts refuses
   every payment of a gateway that settles through a remote facilitator without an RPC URL
   (``SettlementEvidence.confirmed``: no chain client, no receipt).
2. ``test_a_payment_valid_since_ten_minutes_ago_is_taken_on_a_chain_that_was_idle``: the strict
   validAfter check by ``HeadClock.behind`` refuses a payment back-dated by 600 s (x402 v1 clients)
   on a chain whose latest block is old, though the token takes it in the next block.

Fixed: on a network without chain access the trail's agreeing ``settled`` record signs the receipt;
``HeadClock`` reads the date the node gives its next (pending) block, the chain's clock now even
when it has made no block for a while (the latest block's where the node keeps no pending block).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from web3 import Web3

from gateway.devkit.anvil import Anvil
from gateway.devkit.devchain import setup_devchain
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.schemes.remote import RemoteFacilitator
from settlement.x402.codec import encode_header
from tests.conftest import Devchain, GatewayFactory, demo_catalog, offer_of
from tests.e2e.test_attacks_insider import fetch_receipt
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.local_facilitator import local_facilitator_app

pytestmark = pytest.mark.e2e

PAYER = 8


@pytest.fixture
def remote_facilitator_url(devchain: Devchain) -> Iterator[str]:
    """A facilitator of its own over HTTP (our facilitator API on the test anvil): to the gateway, a
    remote facilitator such as CDP's or x402.org's."""
    with ThreadServer(local_facilitator_app(devchain.deployment)) as server:
        yield f"{server.url}/facilitator"


# -- 1. receipts on a gateway settling through a remote facilitator, without an RPC URL -----------------

def test_a_payer_of_a_gateway_without_chain_access_still_gets_its_receipt(
    start_gateway: GatewayFactory, devchain: Devchain, remote_facilitator_url: str
) -> None:
    """An operator selling through a remote facilitator (CDP, x402.org) and no ``X402GW_RPC_URLS``
    (optional for a remote network: ``build_chains`` skips it) settles every call fine, and the
    settled answer carries its ``X402GW-Receipt``; but ``GET /receipts/{id}`` now refuses every
    payment 409 ``receipt_unconfirmed`` ("the audit trail and the chain do not both bear out this
    payment's settlement"): ``SettlementEvidence.confirmed`` returns False when it has no chain
    client for the network. The honest payer is told its payment is not borne out."""
    gateway = start_gateway(facilitator=RemoteFacilitator(remote_facilitator_url))
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
        assert paid.status_code == 200, paid.text
        assert receipt_of(paid).success and "x402gw-receipt" in paid.headers
        [row] = gateway.ledger.all()
        assert row.state == PaymentState.SETTLED
        again = fetch_receipt(client, devchain.key(PAYER), row.id)
    assert again.status_code == 200, again.text
    assert again.json()["payload"]["transaction"] == row.tx_hash


# -- 2. a payer that back-dates validAfter, on a chain that has been idle --------------------------------

IDLE_SECONDS = 3600  # the chain's latest block is an hour old; its next one is dated now
BACKDATED_SECONDS = 600  # validAfter = now - 600: the x402 v1 clients' default (PR #208: clock skew)


@pytest.fixture(scope="module")
def idle_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil whose latest block is an hour old while its next block is dated by the wall
    clock: an automining dev chain (``x402gw devchain``) nobody sent a transaction to for an hour."""
    directory = tmp_path_factory.mktemp("review-idle")
    with Anvil(extra_args=["--timestamp", str(int(time.time()) - IDLE_SECONDS)]) as anvil:
        deployment = setup_devchain(anvil.rpc_url)
        path = directory / "devchain.json"
        deployment.write(path)
        w3 = Web3(Web3.HTTPProvider(anvil.rpc_url))
        w3.provider.make_request("evm_setTime", [int(time.time())])  # type: ignore[arg-type]  # next block: now
        yield Devchain(anvil, deployment, path, w3)


def test_a_payment_valid_since_ten_minutes_ago_is_taken_on_a_chain_that_was_idle(
    start_gateway: GatewayFactory, idle_chain: Devchain, upstream: str, tmp_path: Path
) -> None:
    """A payer back-dates ``validAfter`` by 600 s (what x402's v1 clients, Python and TypeScript, sign,
    and what the protocol notes recommend against clock skew); the token takes it in any block dated
    after that, i.e. the next one. But the local facilitator now refuses ``validAfter >= now -
    behind`` where ``HeadClock.behind`` is the age of the latest block the gateway read: on a chain
    with no traffic for a while (an automining dev chain, a quiet L2/appchain with blocks on demand)
    that is not how far back the NEXT block may be dated, and every such payment is refused 402
    ``invalid_exact_evm_payload_authorization_valid_after`` ("not yet valid") though it is valid on
    chain."""
    head = int(idle_chain.w3.eth.get_block("latest")["timestamp"])
    assert head < time.time() - IDLE_SECONDS + 120  # the scenario: an hour-old head
    gateway = start_gateway(demo_catalog(tmp_path, upstream), deployment_file=idle_chain.deployment_file)
    payer = Payer(idle_chain.key(PAYER))
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/IDLE"))
        payment = payer.sign(offer.accepts[0], resource=offer.resource, valid_after=int(time.time()) - BACKDATED_SECONDS)
        paid = client.get("/quotes/IDLE", headers={"PAYMENT-SIGNATURE": encode_header(payment.to_wire())})
    assert paid.status_code == 200, paid.text
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED
    assert int(idle_chain.w3.eth.get_block(row.block_number)["timestamp"]) > int(payment.payload["authorization"]["validAfter"])

