"""Attacks on the background following of pending settlements (``keep_resolving``), on a real anvil
with automining off and a gateway on loopback.

The chain's clock, not ours: EIP-3009 refuses an authorization from the block whose timestamp
reaches validBefore, and a node's head can be dated behind the gateway's clock (a slow or stalled
chain, a skewed host). A settlement still in the pool when our clock passes validBefore can then
land in a block dated before it. The row used to be failed ``authorization_expired_unmined`` on our
clock alone: the payer charged, the ledger failed, the resend refused with a plain 402."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import (
    PAY_TO,
    Devchain,
    GatewayFactory,
    body_json,
    demo_catalog,
    offer_of,
    running_devchain,
    upstream_hits,
)
from tests.e2e.test_exactly_once import PAYER, PRICE, assert_ledger_matches_chain, wait_for

pytestmark = pytest.mark.e2e

LAG_SECONDS = 3600  # the chain's blocks are dated an hour behind the gateway's clock


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil whose clock runs behind ours."""
    with running_devchain(tmp_path_factory.mktemp("chain")) as private:
        private.w3.provider.make_request("evm_setTime", [int(time.time()) - LAG_SECONDS])  # type: ignore[arg-type]
        private.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        yield private


def _shortest_window_payment(client: httpx.Client, chain: Devchain, path: str) -> tuple[str, int]:
    """A payment whose validBefore is as close as the tool takes (its 402 names the minimum)."""
    offer = offer_of(client.get(path))
    payer = Payer(chain.key(PAYER))

    def sign(valid_before: int) -> str:
        return encode_header(payer.sign(offer.accepts[0], resource=offer.resource, valid_before=valid_before).to_wire())

    short = client.get(path, headers={"PAYMENT-SIGNATURE": sign(int(time.time()) + 7)})
    assert short.status_code == 402 and body_json(short)["error"] == "payment_window_too_short", short.text
    valid_before = int(time.time()) + int(body_json(short)["minimumValidSeconds"])
    return sign(valid_before), valid_before


def test_a_settlement_pending_past_valid_before_on_our_clock_only_is_not_failed(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, manual_mining: Callable[[], None], tmp_path: Path
) -> None:
    before = chain.balance(PAY_TO)
    catalog = demo_catalog(tmp_path, upstream)  # a 1 s upstream timeout: the shortest window the tool takes is short
    catalog.write_text(catalog.read_text().replace("timeout_seconds: 10", "timeout_seconds: 1"))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=0.5,
                            resolve_pending_seconds=0.1)
    with gateway.client() as client:
        header, valid_before = _shortest_window_payment(client, chain, "/quotes/LAGS")
        pending = client.get("/quotes/LAGS", headers={"PAYMENT-SIGNATURE": header})
    assert pending.status_code == 503 and body_json(pending)["error"] == "settlement_pending", pending.text
    [row] = [r for r in gateway.ledger.all() if r.path == "/quotes/LAGS"]
    pause = threading.Event()
    while time.time() < valid_before + 1:  # our clock past validBefore; the chain's an hour before it
        pause.wait(0.1)
    pause.wait(1.0)  # ten rounds of the background resolver
    manual_mining()  # the settlement still in the pool lands, in a block dated before validBefore
    final = wait_for(lambda: (r := gateway.ledger.get(row.id)) is not None and r.state != PaymentState.PENDING and r,
                     "the background resolver to resolve the row")
    assert chain.w3.eth.get_transaction_receipt(final.tx_hash)["status"] == 1  # the money moved
    assert chain.balance(PAY_TO) - before == PRICE
    assert final.state == PaymentState.SETTLED, final.error_reason
    assert_ledger_matches_chain(gateway.ledger, chain, before)
    with gateway.client() as client:  # the payer's resend gets what it paid for, not a 402
        served = client.get("/quotes/LAGS", headers={"PAYMENT-SIGNATURE": header})
    assert served.status_code == 200 and served.headers["x402gw-replay"] == "true", served.text
    assert upstream_hits(upstream, "GET /api/v1/quote/LAGS") == 1
