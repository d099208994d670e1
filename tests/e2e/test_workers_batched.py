"""``x402gw serve --workers 2`` with batched settlement (``X402GW_BATCH_SETTLEMENT``): each worker
settles from its own account through the BatchSettler that names it (two listed in ``contracts``,
chosen on chain at start). Distinct payments spread over both workers all settle, each batch sent by
its contract's own settler; duplicates of one payment raced over both settle once. After each test
the ledger and the chain agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from gateway.devkit.devchain import LOCAL_NETWORK, deploy_batch_settler
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, Devchain, demo_catalog, upstream_hits
from tests.e2e.test_exactly_once import PRICE, assert_ledger_matches_chain, signed, wait_for
from tests.e2e.test_exactly_once import chain as chain
from tests.e2e.test_workers import (
    REDIS_URL,
    assert_duplicates_settle_once,
    assert_killed_mid_settlement_settles_once,
    worker_pids,
)
from tests.e2e.test_workers import database as database
from tests.support.processes import GatewayProcess


def worker_accounts(chain: Devchain, tmp_path: Path) -> tuple[list[LocalAccount], Path]:
    """Two fresh settlement accounts holding gas, and the keys file naming them."""
    accounts = [Account.create() for _ in range(2)]
    for account in accounts:
        chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])  # type: ignore[arg-type]
    keys_file = tmp_path / "worker-keys.txt"
    keys_file.write_text("".join(f"0x{account.key.hex().removeprefix('0x')}\n" for account in accounts))
    return accounts, keys_file


def worker_env(chain: Devchain, upstream: str, tmp_path: Path, database: str, policy: dict[str, object],
               **extra: str) -> dict[str, str]:
    return {
        "X402GW_CATALOG": str(demo_catalog(tmp_path, upstream)),
        "X402GW_DEPLOYMENT_FILE": str(chain.deployment_file),
        "X402GW_DATABASE_URL": database,
        "X402GW_REDIS_URL": REDIS_URL,
        "X402GW_REDIS_PREFIX": f"x402gw-workers-batch-{uuid.uuid4().hex}:",
        "X402GW_BATCH_SETTLEMENT": json.dumps({LOCAL_NETWORK: policy}),
        **extra,
    }


@pytest.fixture
def batched_workers(
    chain: Devchain, upstream: str, tmp_path: Path, database: str
) -> Iterator[tuple[GatewayProcess, Ledger, dict[str, str], dict[str, str]]]:
    """Two workers settling in batches; then each BatchSettler's settler account, and each settlement
    account's worker index."""
    accounts, keys_file = worker_accounts(chain, tmp_path)
    settlers = {deploy_batch_settler(chain.anvil.rpc_url, a.address).lower(): a.address.lower() for a in accounts}
    policy = {"contracts": list(settlers), "max_wait_ms": 100, "max_payments": 10, "flush_when_idle": True}
    env = worker_env(chain, upstream, tmp_path, database, policy, X402GW_RECEIPT_TIMEOUT_SECONDS="60")
    ledger = open_ledger(database)
    supervisor = GatewayProcess(env, tmp_path, tmp_path / "supervisor.log",
                                args=("--workers", "2", "--settlement-keys-file", str(keys_file)))
    try:
        supervisor.start(timeout=120)
        wait_for(lambda: len(worker_pids(supervisor)) == 2, "two workers")
        yield supervisor, ledger, settlers, {a.address.lower(): str(i) for i, a in enumerate(accounts)}
    finally:
        supervisor.stop()
        ledger.close()


def test_payments_over_two_batching_workers_settle_through_each_ones_own_contract(
    batched_workers: tuple[GatewayProcess, Ledger, dict[str, str], dict[str, str]], chain: Devchain, upstream: str
) -> None:
    supervisor, ledger, settlers, _ = batched_workers
    before = chain.balance(PAY_TO)
    symbols = [f"WB{chr(65 + n)}" for n in range(16)]
    with httpx.Client(base_url=supervisor.url, timeout=30) as client:
        headers = {symbol: signed(client, chain, f"/quotes/{symbol}") for symbol in symbols}

    def call(symbol: str) -> httpx.Response:  # a connection each: the kernel spreads them over the workers
        return httpx.get(f"{supervisor.url}/quotes/{symbol}", headers={"PAYMENT-SIGNATURE": headers[symbol]}, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, symbols))
    assert [a.status_code for a in answers] == [200] * len(symbols), [a.text[:120] for a in answers]
    assert sorted(a.json()["symbol"] for a in answers) == symbols
    rows = ledger.all()
    assert len(rows) == len(symbols) and {r.state for r in rows} == {PaymentState.SETTLED}
    for tx_hash in {r.tx_hash for r in rows}:
        sent = chain.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
        contract = str(sent["to"]).lower()
        assert contract in settlers, "settled outside the listed BatchSettlers"
        assert str(sent["from"]).lower() == settlers[contract], "a worker sent through another worker's contract"
        assert chain.w3.eth.get_transaction_receipt(tx_hash)["status"] == 1  # type: ignore[arg-type]
    assert chain.balance(PAY_TO) - before == PRICE * len(symbols)
    assert all(upstream_hits(upstream, f"GET /api/v1/quote/{symbol}") == 1 for symbol in symbols)
    assert_ledger_matches_chain(ledger, chain, before)


def test_duplicates_of_one_payment_over_two_batching_workers_settle_once(
    batched_workers: tuple[GatewayProcess, Ledger, dict[str, str], dict[str, str]], chain: Devchain, upstream: str
) -> None:
    supervisor, ledger, _, _ = batched_workers
    assert_duplicates_settle_once(supervisor.url, ledger, chain, upstream, "WBDUP")


def test_a_batching_worker_killed_mid_settlement_is_restarted_and_the_payment_settles_once(
    batched_workers: tuple[GatewayProcess, Ledger, dict[str, str], dict[str, str]], chain: Devchain, upstream: str,
    manual_mining: Callable[[], None],
) -> None:
    """kill -9 between the batch's broadcast and its receipt: resolved from the batch transaction."""
    supervisor, ledger, settlers, index_of = batched_workers
    assert_killed_mid_settlement_settles_once(supervisor, ledger, index_of, chain, upstream, manual_mining, "WBKIL")
    [row] = [r for r in ledger.all() if r.tool == "get_quote"]
    assert str(chain.w3.eth.get_transaction(row.tx_hash)["to"]).lower() in settlers  # type: ignore[arg-type]


def test_a_worker_whose_account_no_listed_batch_settler_names_stops_them_all(
    chain: Devchain, upstream: str, tmp_path: Path, database: str
) -> None:
    """Two contracts listed, but one names a stranger: the second worker refuses at its first start
    (exit 2, one line), and the supervisor stops the other and exits 2 instead of restarting it."""
    accounts, keys_file = worker_accounts(chain, tmp_path)
    contracts = [deploy_batch_settler(chain.anvil.rpc_url, accounts[0].address),
                 deploy_batch_settler(chain.anvil.rpc_url, Account.create().address)]
    env = {**os.environ, **worker_env(chain, upstream, tmp_path, database, {"contracts": contracts}, X402GW_PORT="0")}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", "serve", "--workers", "2", "--settlement-keys-file", str(keys_file)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "[batch_settler_not_ours]" in output and accounts[1].address in output
    assert "[worker_start_failed]" in output and "restarting" not in output and "Traceback" not in output
