"""kill -9 between counting an upto call's usage and knowing its settlement: the charge counted from
the answer is written ahead with the transaction, so a restart reconciles that very amount (not the
maximum) and a resend gets the stored answer, never a second charge. A private anvil: automining is
switched off to hold the settlement in the pool while the gateway dies."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from gateway.cli.main import main
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, Devchain, running_devchain
from tests.e2e.test_exactly_once import process_env, raw_request, row_for, wait_for
from tests.e2e.test_upto_paid_call import _header
from tests.e2e.test_upto_usage import CATALOG, EACH
from tests.support.processes import gateway_processes
from tests.support.usage_upstream import UsageUpstream

PAYER = 3


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("usage-crash")) as private:
        yield private


def test_kill_9_after_the_usage_was_counted_settles_that_amount_once(
    chain: Devchain, upstream: str, tmp_path: Path, manual_mining: Callable[[], None],
) -> None:
    lying = UsageUpstream()
    with ThreadServer(lying.app()) as lying_server:
        catalog = tmp_path / "usage.yaml"
        catalog.write_text(CATALOG.format(token=chain.token, pay_to=PAY_TO, lying=lying_server.url, legacy=upstream))
        database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        env = process_env(chain, catalog, database_url, X402GW_RECEIPT_TIMEOUT_SECONDS="60")
        ledger = open_ledger(database_url)
        before = (chain.balance(chain.address(PAYER)), chain.balance(PAY_TO))
        with gateway_processes([env], tmp_path) as [gateway]:
            offer = httpx.get(f"{gateway.url}/metered/json-3", timeout=30)
            header = _header(chain, PAYER, json.loads(base64.b64decode(offer.headers["PAYMENT-REQUIRED"])))
            sock = raw_request(gateway.port, "/metered/json-3", header)
            row = wait_for(lambda: row_for(ledger, lambda r: r.tx_hash is not None), "the settlement broadcast")
            # Counted and written ahead: the row already holds the charge (3 units), not the maximum.
            assert row.state == PaymentState.SETTLING and row.amount == 3 * EACH
            gateway.kill9()
            sock.close()
        manual_mining()  # the broadcast settlement lands while no gateway runs
        with gateway_processes([env], tmp_path) as [restarted]:
            [row] = ledger.all()  # start-up reconcile resolved it against the chain
            assert row.state == PaymentState.SETTLED and row.amount == 3 * EACH
            resend = httpx.get(f"{restarted.url}/metered/json-3", headers={"PAYMENT-SIGNATURE": header}, timeout=30)
        ledger.close()
    assert resend.status_code == 200, resend.text
    assert resend.json()["usage"] == {"units": 3}  # the answer that was bought, stored before the broadcast
    assert (before[0] - chain.balance(chain.address(PAYER)), chain.balance(PAY_TO) - before[1]) == (3 * EACH, 3 * EACH)
    assert lying.calls["json-3"] == 1  # the upstream ran once for the one payment


def test_x402gw_reconcile_resolves_an_open_upto_row_to_its_counted_charge(
    chain: Devchain, upstream: str, tmp_path: Path, manual_mining: Callable[[], None],
) -> None:
    """The same crash, resolved by ``x402gw reconcile`` (no gateway running): the open row becomes
    settled for the charge its transaction moved, and the books agree."""
    lying = UsageUpstream()
    with ThreadServer(lying.app()) as lying_server:
        catalog = tmp_path / "usage.yaml"
        catalog.write_text(CATALOG.format(token=chain.token, pay_to=PAY_TO, lying=lying_server.url, legacy=upstream))
        database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
        env = process_env(chain, catalog, database_url, X402GW_RECEIPT_TIMEOUT_SECONDS="60")
        ledger = open_ledger(database_url)
        start = chain.w3.eth.block_number + 1
        with gateway_processes([env], tmp_path) as [gateway]:
            offer = httpx.get(f"{gateway.url}/metered/json-5", timeout=30)
            header = _header(chain, PAYER + 1, json.loads(base64.b64decode(offer.headers["PAYMENT-REQUIRED"])))
            sock = raw_request(gateway.port, "/metered/json-5", header)
            row = wait_for(lambda: row_for(ledger, lambda r: r.tx_hash is not None), "the settlement broadcast")
            gateway.kill9()
            sock.close()
        manual_mining()
        result = CliRunner().invoke(main, ["reconcile", "--json", "--from-block", str(start)], env=env)
        [after] = ledger.all()
        ledger.close()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(r["payment_id"], r["after"]) for r in report["resolved"]] == [(row.id, PaymentState.SETTLED.value)]
    assert after.state == PaymentState.SETTLED and after.amount == 5 * EACH
    assert report["matched"] == 1 and report["amount_mismatch"] == []
