"""``x402gw doctor`` on batched settlement (``X402GW_BATCH_SETTLEMENT``), against the session's real
anvil: each listed BatchSettler is read for its settler; one contract must name the settlement
account, several (one per worker) are reported each with its settler; an address that is no
BatchSettler, or none at all, is a named failure with its fix."""

from __future__ import annotations

import json
from pathlib import Path

from eth_account import Account

from gateway.devkit.devchain import ANVIL_ADDRESSES, deploy_batch_settler
from tests.conftest import Devchain
from tests.e2e.test_doctor import LOCAL, doctor, environment, failures
from tests.e2e.test_doctor import ledger_url as ledger_url


def batched(tmp_path: Path, devchain: Devchain, ledger_url: str, network: str = LOCAL, **policy: object) -> dict[str, str | None]:
    return environment(tmp_path, devchain, ledger_url, X402GW_BATCH_SETTLEMENT=json.dumps({network: policy}))


def batch_findings(report: dict[str, object]) -> list[dict[str, str]]:
    return [f for f in report["findings"] if f["check"] == "batch_settler"]  # type: ignore[attr-defined, index]


def test_the_dev_chain_batch_settler_of_the_settlement_account_passes(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    status, report = doctor(batched(tmp_path, devchain, ledger_url, max_payments=10))
    assert status == 0, report
    [finding] = batch_findings(report)
    assert finding["status"] == "ok" and str(devchain.deployment.batch_settler) in finding["message"]
    assert ANVIL_ADDRESSES[0] in finding["message"]  # the deployment's settlement account


def test_a_batch_settler_of_another_account_fails(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    contract = deploy_batch_settler(devchain.anvil.rpc_url, ANVIL_ADDRESSES[3])
    status, report = doctor(batched(tmp_path, devchain, ledger_url, contract=contract))
    assert status == 1
    found = failures(report)["batch_settler_not_ours"]
    assert contract in found["message"] and ANVIL_ADDRESSES[3] in found["message"] and ANVIL_ADDRESSES[0] in found["message"]
    assert "BatchSettler.sol" in found["fix"]


def test_one_per_worker_is_reported_each_with_its_settler(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    workers = [Account.create().address for _ in range(2)]
    contracts = [deploy_batch_settler(devchain.anvil.rpc_url, worker) for worker in workers]
    status, report = doctor(batched(tmp_path, devchain, ledger_url, contracts=contracts))
    assert status == 2, report  # the environment's own key (account 0's) is none of the workers': a warning
    [finding] = batch_findings(report)
    assert finding["status"] == "warn" and finding["code"] == "batch_settler_not_this_key"
    assert all(c in finding["message"] and w in finding["message"] for c, w in zip(contracts, workers, strict=True))
    # with the dev deployment's own BatchSettler among them, the environment's key has one: ok
    status, report = doctor(batched(tmp_path, devchain, ledger_url, contracts=[*contracts, devchain.deployment.batch_settler]))
    assert status == 0 and [f["status"] for f in batch_findings(report)] == ["ok"]


def test_an_address_that_is_no_batch_settler_fails(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    nobody = Account.create().address
    status, report = doctor(batched(tmp_path, devchain, ledger_url, contracts=[nobody, devchain.token]))
    assert status == 1
    invalid = [f for f in batch_findings(report) if f["code"] == "batch_settler_invalid"]
    assert [nobody in invalid[0]["message"], devchain.token in invalid[1]["message"]] == [True, True]
