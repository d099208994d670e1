"""Security review of finance and operations: ``x402gw reconcile`` beside the gateway's own
resolvers, and ``x402gw ledger refunds --pay`` fed by an insider's edit of the ledger. Real anvil
(a private one where automining must be switched off), the sample upstream, gateways on loopback,
the CLI as an operator runs it.

Each test asserts the invariant (``/work/shared/THREATS.md``) on the ledger row and on chain
balances, not only an exit code:

* never a charge without the answer it paid for: an ``upfront`` payment whose answer never came
  owes its refund, whichever reconcile (the gateway's, or the operator's command) settled its row;
* money leaves the refund account only back to whoever paid, and never more than was charged: a
  row an insider edited in the database is not a licence for ``--pay`` to send the refund key's
  funds elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from eth_account import Account

from settlement.ledger import Payment, PaymentState
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, running_devchain, upstream_hits
from tests.e2e.test_attacks_crash_upfront import UPFRONT_PRICE, poll, row_of, sign_for, upfront_catalog
from tests.e2e.test_ledger_refunds import REFUND, run_refunds
from tests.e2e.test_ledger_refunds import owed as owed  # the fixture: a refund left owed
from tests.e2e.test_reconcile import run_reconcile
from tests.support.ledger_rows import force_row

pytestmark = pytest.mark.e2e

ACCOMPLICE = 7  # never paid the gateway anything
REFUND_ACCOUNT = 9  # the payee's account, holding the revenue: X402GW_REFUND_KEY in these tests


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: the first test switches automining off (``manual_mining``)."""
    with running_devchain(tmp_path_factory.mktemp("review-finance")) as private:
        yield private


# -- reconcile: the operator's command settles a row whose answer never came ----------------------


def test_an_upfront_answer_never_given_owes_its_refund_when_the_reconcile_command_settles_it(
    chain: Devchain, upstream: str, tmp_path: Path, start_gateway: GatewayFactory, request: pytest.FixtureRequest,
) -> None:
    """An ``upfront`` call whose settlement receipt did not come before the request answered (503
    ``settlement_pending``; the upstream, which waits for the settlement, never ran). The README's
    promise: "once a reconcile settles such a row ... the refund is owed", without a resend. The
    operator's ``x402gw reconcile`` (documented as resolving every open row, like start-up) gets
    there before the gateway's background resolver: it settles the row and owes nothing; the
    gateway's resolvers, at their next round and at a restart, only owe refunds for rows *they*
    settle, so they find nothing open and the payer stays charged for an answer that never existed."""
    path = "/paid-first/reports/7"
    catalog = upfront_catalog(tmp_path, upstream)
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=0.5,
                            resolve_pending_seconds=600)  # the operator's reconcile runs before its next round
    payer = Account.from_key(chain.key(3)).address
    payer_before, pay_to_before = chain.balance(payer), chain.balance(PAY_TO)
    start = chain.w3.eth.block_number + 1
    with gateway.client() as client:
        header = sign_for(client, chain, path, 3)
        mine: Callable[[], None] = request.getfixturevalue("manual_mining")
        pending = client.get(path, headers={"PAYMENT-SIGNATURE": header})
    assert pending.status_code == 503 and pending.json()["error"] == "settlement_pending", pending.text
    row = row_of(gateway.ledger, path)
    assert row is not None and row.state == PaymentState.PENDING and row.tx_hash is not None
    mine()  # the settlement lands

    code, report = run_reconcile(gateway, start)  # the operator's `x402gw reconcile`
    assert [(r["payment_id"], r["after"]) for r in report["resolved"]] == [(row.id, "settled")], report
    assert code == 0 and report["matched"] == 1, report
    # A restart on the same ledger: its start-up reconcile is where a lost answer's refund is owed.
    start_gateway(catalog, deployment_file=chain.deployment_file, database_url=gateway.settings.database_url,
                  resolve_pending_seconds=600)

    # Charged on chain, for an upfront call whose upstream never ran and whose request answered 503.
    assert payer_before - chain.balance(payer) == UPFRONT_PRICE
    assert chain.balance(PAY_TO) - pay_to_before == UPFRONT_PRICE
    assert upstream_hits(upstream, "GET /reports/7") == 0
    assert gateway.ledger.stored_response(row.id) is None
    final = poll(lambda: gateway.ledger.get(row.id), lambda r: r is not None and r.refund_owed is not None, 5)
    assert final is not None and final.state == PaymentState.SETTLED
    assert final.refund_owed == UPFRONT_PRICE or chain.balance(payer) == payer_before, (
        f"payment {row.id} settled by `x402gw reconcile` with no answer ever given: refund_owed="
        f"{final.refund_owed}, upstream_status={final.upstream_status}; neither the command nor the "
        f"gateway (running, or restarted) owes its refund: the payer stays charged unless it resends"
    )
    code, listed = run_refunds(gateway)  # and the operator's list of what is owed names it
    assert [line["payment"] for line in listed["refunds"]] == [row.id], listed


# -- ledger refunds --pay: an insider's edit of the row directs the refund key's money -------------


@pytest.mark.parametrize("edit", ["amount_above_the_charge", "payer_rewritten"])
def test_refunds_pay_sends_no_more_than_was_charged_and_only_to_whoever_paid(
    owed: tuple[RunningGateway, Payment], devchain: Devchain, edit: str,
) -> None:
    """A refund left owed (an ``upfront`` call whose upstream failed; no refund key at the gateway).
    An insider with database access (``THREATS.md``: may edit ledger rows; holds no key) raises its
    ``refund_owed`` a thousandfold, or points its ``payer`` at an accomplice. The operator's routine
    ``x402gw ledger refunds --pay`` pays whatever the row says: nothing holds it to the chain (the
    row's own settlement transaction moved 4000 from the real payer), nor to the row's amount. So
    write access to the database becomes spending of the refund account, and no check names it
    (``--pay`` trusts the row; ``reconcile`` does not look at refunds; the audit chain covers no
    ledger column)."""
    gateway, row = owed
    payer, accomplice = devchain.address(5), devchain.address(ACCOMPLICE)
    assert row.payer == payer and row.amount == REFUND and row.state == PaymentState.SETTLED
    if edit == "amount_above_the_charge":
        force_row(gateway.ledger, row.id, refund_owed=REFUND * 1000)
    else:
        force_row(gateway.ledger, row.id, payer=accomplice)
    payer_before, accomplice_before = devchain.balance(payer), devchain.balance(accomplice)
    account_before = devchain.balance(devchain.address(REFUND_ACCOUNT))

    code, report = run_refunds(gateway, "--pay", refund_key=devchain.key(REFUND_ACCOUNT))

    paid_out = account_before - devchain.balance(devchain.address(REFUND_ACCOUNT))
    [line] = report["refunds"]
    assert devchain.balance(accomplice) == accomplice_before, (
        f"--pay sent {devchain.balance(accomplice) - accomplice_before} to {accomplice}, who never paid "
        f"(outcome {line['outcome']!r})"
    )
    assert paid_out <= REFUND and devchain.balance(payer) - payer_before <= REFUND, (
        f"--pay sent {paid_out} atomic units of the refund account for a payment that charged {REFUND} "
        f"(outcome {line['outcome']!r}, exit {code})"
    )
