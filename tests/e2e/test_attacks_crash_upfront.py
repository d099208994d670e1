"""Review: kill -9 between the steps of a paid call, then a restart, with and without batched
settlement (``X402GW_BATCH_SETTLEMENT``). Real anvil (a private one: automining is switched off to
hold the settlement in the pool while the gateway dies), the sample upstream, gateway processes.

The invariant checked (``/work/shared/THREATS.md``): never a charge without the answer it paid for.
An ``upfront`` tool settles before its upstream runs; a gateway killed after that settlement was
broadcast and before the upstream ran leaves a payer charged for a call that never happened. The
restarted gateway resolves the open row against the chain (``settled``) and knows, from the row
alone, that the request is gone and that no answer exists (``settle_mode`` upfront, no stored
answer, no upstream status): the refund is owed now. Today it is recorded only if and when the
payer happens to send the very same payment again (``exactly_once._answer_lost``); a payer whose
connection died with the gateway (the reference agent does not resend) stays charged for nothing,
and the books count the call as earned."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3.exceptions import TransactionNotFound

from gateway.devkit.payer import Payer
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, demo_catalog, offer_of, running_devchain, upstream_hits
from tests.e2e.test_exactly_once import process_env, raw_request
from tests.support.polling import poll
from tests.support.processes import gateway_processes

NETWORK = "eip155:31337"
UPFRONT_PRICE = 4000  # 0.004 of the 6-decimal test USDC
UPFRONT_TOOL = """
  - name: generate_report_upfront
    description: Generate a report; the generator has side effects, so payment settles first.
    method: GET
    path: /paid-first/reports/{report_id}
    upstream_path: /reports/{report_id}
    price: "0.004"
    settle: upfront
"""


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: these tests switch automining off and on."""
    with running_devchain(tmp_path_factory.mktemp("review-crashes")) as private:
        yield private




def sign_for(client: httpx.Client, chain: Devchain, path: str, payer: int) -> str:
    offer = offer_of(client.get(path))
    return encode_header(Payer(chain.key(payer)).sign(offer.accepts[0], resource=offer.resource).to_wire())


def in_pool(chain: Devchain, tx_hash: str) -> Any:
    """The node's view of our transaction (pending or mined), None while it does not know it."""
    try:
        return chain.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
    except TransactionNotFound:
        return None


def row_of(ledger: Ledger, path: str) -> Payment | None:
    return next((r for r in ledger.all() if r.path == path), None)


def upfront_catalog(tmp_path: Path, upstream: str) -> Path:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    return catalog


@pytest.mark.parametrize("batched", [False, True], ids=["one-transaction", "batched"])
def test_upfront_call_killed_after_its_settlement_broadcast_owes_the_refund_without_a_resend(
    chain: Devchain, upstream: str, tmp_path: Path, manual_mining: Callable[[], None], batched: bool,
) -> None:
    """kill -9 while an ``upfront`` call's settlement waits in the pool (its hash written ahead, the
    upstream not called yet). The transaction lands while no gateway runs; the restarted gateway
    settles the row at start-up. The payer is charged, no answer was ever produced, and the
    request that would have answered is dead: the refund must be owed (recorded on the row, or paid
    back on chain) by the restarted gateway itself, not only if a resend happens to come."""
    payer_index = 4 if batched else 5
    payer = Account.from_key(chain.key(payer_index)).address
    path = f"/paid-first/reports/{4 if batched else 5}"
    extra = {"X402GW_RECEIPT_TIMEOUT_SECONDS": "60", "X402GW_RESOLVE_PENDING_SECONDS": "0.5"}
    if batched:  # one batch of one, sent at once: the same crash point through BatchSettler
        extra["X402GW_BATCH_SETTLEMENT"] = json.dumps({NETWORK: {"max_payments": 1, "max_wait_ms": 50}})
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    env = process_env(chain, upfront_catalog(tmp_path, upstream), database_url, **extra)
    ledger = open_ledger(database_url)
    payer_before, pay_to_before = chain.balance(payer), chain.balance(PAY_TO)
    upstream_key = f"GET {path.removeprefix('/paid-first')}"
    try:
        with gateway_processes([env], tmp_path) as [gateway]:
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                header = sign_for(client, chain, path, payer_index)
            sock = raw_request(gateway.port, path, header)
            row = poll(lambda: row_of(ledger, path), lambda r: r is not None and r.tx_hash is not None, 30)
            assert row is not None and row.tx_hash is not None, "the settlement was never written ahead"
            # The settlement is in the node's pool (mined by nobody while automining is off), and the
            # upfront tool's upstream waits for it: killed exactly between settlement and upstream.
            tx = poll(lambda: in_pool(chain, str(row.tx_hash)), bool, 10)
            assert tx, "the settlement transaction never reached the node"
            if batched:  # it is a BatchSettler batch, not a single transferWithAuthorization
                assert str(tx["to"]).lower() == str(chain.deployment.batch_settler).lower()
            gateway.kill9()
            sock.close()
        manual_mining()  # the settlement lands while no gateway runs
        with gateway_processes([env], tmp_path):
            settled = poll(lambda: ledger.get(row.id), lambda r: r is not None and r.state == PaymentState.SETTLED, 10)
            assert settled is not None and settled.state == PaymentState.SETTLED  # start-up reconcile
            # What the chain and the upstream say: charged once, for a call that never ran.
            assert payer_before - chain.balance(payer) == UPFRONT_PRICE
            assert chain.balance(PAY_TO) - pay_to_before == UPFRONT_PRICE
            assert upstream_hits(upstream, upstream_key) == 0
            assert ledger.stored_response(row.id) is None  # no answer exists for this payment
            # The restarted gateway knows all of the above; several resolver rounds later, with no
            # resend, the payer must be owed (or have got back) what it paid for nothing.
            after = poll(
                lambda: (ledger.get(row.id), chain.balance(payer)),
                lambda state: state[0].refund_owed is not None or state[1] == payer_before,
                10,
            )
    finally:
        ledger.close()
    final, balance = after
    assert final.refund_owed == UPFRONT_PRICE or balance == payer_before, (
        f"payer charged {payer_before - balance} for an upfront call whose upstream never ran and whose "
        f"request died with the gateway; the ledger row is {final.state} with refund_owed={final.refund_owed}, "
        f"upstream_status={final.upstream_status}: no refund is owed unless the payer resends"
    )


def test_upfront_settlement_pending_when_its_request_answered_owes_the_refund_once_it_lands(
    chain: Devchain, upstream: str, tmp_path: Path, start_gateway: GatewayFactory, request: pytest.FixtureRequest,
) -> None:
    """No crash: the receipt did not come before the request answered 503 ``settlement_pending`` (the
    upstream not called: it waits for the settlement). The background resolver settles the row once
    the transaction lands; the payer, who may never resend, is owed the refund then."""
    path = "/paid-first/reports/6"
    gateway = start_gateway(upfront_catalog(tmp_path, upstream), deployment_file=chain.deployment_file,
                            receipt_timeout_seconds=0.5, resolve_pending_seconds=0.2)
    payer = Account.from_key(chain.key(6)).address
    payer_before = chain.balance(payer)
    with gateway.client() as client:
        header = sign_for(client, chain, path, 6)
        mine: Callable[[], None] = request.getfixturevalue("manual_mining")
        pending = client.get(path, headers={"PAYMENT-SIGNATURE": header})
    assert pending.status_code == 503 and pending.json()["error"] == "settlement_pending", pending.text
    row = row_of(gateway.ledger, path)
    assert row is not None
    mine()
    final = poll(lambda: gateway.ledger.get(row.id), lambda r: r is not None and r.refund_owed is not None, 10)
    assert final.state == PaymentState.SETTLED and final.refund_owed == UPFRONT_PRICE, (final.state, final.refund_owed)
    assert payer_before - chain.balance(payer) == UPFRONT_PRICE  # charged on chain, owed back on the ledger
    assert upstream_hits(upstream, "GET /reports/6") == 0
