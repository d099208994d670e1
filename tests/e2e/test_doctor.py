"""``x402gw doctor`` against a real anvil (the session's dev chain, read only), real facilitator
doubles on loopback ports of their own, Redis and a migrated SQLite ledger: each broken setup is a
named failure with its fix, and a correct one passes with exit status 0."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from eth_account import Account

from catalog import load_catalogs
from gateway.cli.main import main
from gateway.ops.doctor import GAS_PER_SETTLEMENT, Report, plan_from_settings, run_doctor
from gateway.settings import Settings
from settlement.chain.deployment import ANVIL_KEYS
from settlement.schema import open_ledger
from settlement.schemes import CdpJwtAuth
from tests.conftest import Devchain, demo_catalog
from tests.support.facilitator_auth_double import AuthFacilitatorDouble
from tests.support.facilitator_double import closed_port_url

LOCAL = "eip155:31337"
ADMIN_TOKEN = "doctor-test-admin-token-0123456789"
AMBIENT = ("X402_FACILITATOR_URL", "X402GW_FACILITATORS", "X402GW_RPC_URLS", "X402GW_SETTLEMENT_KEY", "X402GW_REFUND_KEY",
           "X402GW_REDIS_URL", "X402GW_ADMIN_TOKEN", "X402GW_DATABASE_URL", "X402GW_CATALOG", "X402GW_DEPLOYMENT_FILE",
           "X402GW_FACILITATOR_AUTH", "X402GW_FACILITATOR_AUTH_FILE", "CDP_API_KEY_ID", "CDP_API_KEY_SECRET",
           "X402GW_CDP_API_KEY_SECRET_FILE", "X402GW_SETTLEMENT_KEY_FILE", "X402GW_REFUND_KEY_FILE")
KINDS = [{"x402Version": 2, "scheme": "exact", "network": LOCAL}]


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    open_ledger(url).close()  # migrated to head, as the gateway leaves it
    return url


def catalog(tmp_path: Path, **replace: str) -> Path:
    text = demo_catalog(tmp_path, "http://127.0.0.1:9").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"catalog-{len(list(tmp_path.glob('catalog-*.yaml')))}.yaml"  # one file per variant
    path.write_text(text)
    return path


def environment(tmp_path: Path, devchain: Devchain, ledger_url: str, **values: str) -> dict[str, str | None]:
    env: dict[str, str | None] = dict.fromkeys(AMBIENT)
    env.update({
        "X402GW_CATALOG": str(catalog(tmp_path)),
        "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
        "X402GW_DATABASE_URL": ledger_url,
        "X402GW_REDIS_URL": "redis://127.0.0.1:6379/0",
        "X402GW_ADMIN_TOKEN": ADMIN_TOKEN,
    })
    env.update(values)
    return env


def doctor(env: dict[str, str | None], *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(main, ["doctor", "--format", "json", *args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def failures(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {f["code"]: f for f in report["findings"] if f["status"] == "fail"}


def fresh_key() -> str:
    return "0x" + bytes(Account.create().key).hex()


def test_a_correct_setup_passes(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    status, report = doctor(environment(tmp_path, devchain, ledger_url))
    assert status == 0, report
    assert report["status"] == "ok" and report["counts"]["fail"] == report["counts"]["warn"] == 0
    checks = {f["check"] for f in report["findings"]}
    assert {"rpc", "asset", "gas", "facilitator", "database", "store", "admin_token", "keys"} <= checks
    text = CliRunner().invoke(main, ["doctor"], env=environment(tmp_path, devchain, ledger_url))
    assert text.exit_code == 0 and text.stdout.startswith("x402gw doctor: all checks passed")


def test_wrong_chain_id(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    # The catalog sells on Base Sepolia; the RPC configured for it is the local anvil (31337).
    # An API key in the RPC URL (query or path) never reaches the report.
    rpc_url = devchain.anvil.rpc_url + "/?apikey=PROVIDER-API-KEY"
    env = environment(tmp_path, devchain, ledger_url, X402GW_CATALOG=str(catalog(tmp_path, **{LOCAL: "eip155:84532"})),
                      X402GW_RPC_URLS=json.dumps({"eip155:84532": rpc_url}), X402GW_SETTLEMENT_KEY=fresh_key())
    status, report = doctor(env)
    assert status == 1
    assert "PROVIDER-API-KEY" not in json.dumps(report)
    found = failures(report)["chain_id_mismatch"]
    assert "serves chain id 31337" in found["message"] and "eip155:84532" in found["message"]
    assert "X402GW_RPC_URLS" in found["fix"]
    assert not any(f["check"] in ("asset", "gas") for f in report["findings"])  # nothing read from the wrong chain


def test_every_rpc_url_of_a_network_is_checked(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    dead = closed_port_url()
    # A dead URL beside a working one: the gateway fails over, so a warning (exit 2).
    status, report = doctor(environment(tmp_path, devchain, ledger_url, X402GW_RPC_URLS=json.dumps({LOCAL: [devchain.anvil.rpc_url, dead]})))
    assert status == 2, report
    assert [(f["code"], f["status"], dead in f["message"]) for f in report["findings"] if f["status"] != "ok"] == [
        ("rpc_unreachable", "warn", True)]
    # Every URL dead: a failure.
    status, report = doctor(environment(tmp_path, devchain, ledger_url, X402GW_RPC_URLS=json.dumps({LOCAL: [dead, closed_port_url()]})))
    assert status == 1 and [f["code"] for f in report["findings"] if f["status"] == "fail"] == ["rpc_unreachable"] * 2


def test_wrong_token_name(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    env = environment(tmp_path, devchain, ledger_url, X402GW_CATALOG=str(catalog(tmp_path, **{'"USD Coin"': '"USDC"'})))
    status, report = doctor(env)
    assert status == 1
    found = failures(report)["asset_name_mismatch"]
    assert "'USD Coin'" in found["message"] and "'USDC'" in found["message"] and "get_quote" in found["message"]
    assert found["fix"].startswith('set asset_name: "USD Coin"')
    assert set(failures(report)) == {"asset_name_mismatch"}


def test_every_offer_is_checked_not_only_the_first(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    """A second offer (same token, another payee) naming the token wrongly fails, though the first is right."""
    second = (
        'max_timeout_seconds: 120\noffers:\n  - asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"\n'
        '    asset_name: "Wrong Coin"\n    asset_version: "2"\n    decimals: 6\n'
        '    pay_to: "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955"\n'
    )
    path = catalog(tmp_path, **{"max_timeout_seconds: 120\n": second})
    status, report = doctor(environment(tmp_path, devchain, ledger_url, X402GW_CATALOG=str(path)))
    assert status == 1
    found = failures(report)["asset_name_mismatch"]
    assert "'Wrong Coin'" in found["message"] and "'USD Coin'" in found["message"]
    assert set(failures(report)) == {"asset_name_mismatch"}


def test_wrong_version_and_decimals(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    path = catalog(tmp_path, **{'asset_version: "2"': 'asset_version: "1"', "decimals: 6": "decimals: 18"})
    status, report = doctor(environment(tmp_path, devchain, ledger_url, X402GW_CATALOG=str(path)))
    assert status == 1
    assert {"asset_version_mismatch", "asset_decimals_mismatch"} <= set(failures(report))
    assert failures(report)["asset_decimals_mismatch"]["fix"].startswith("set decimals: 6")


def test_a_key_without_gas(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    key = fresh_key()
    status, report = doctor(environment(tmp_path, devchain, ledger_url, X402GW_SETTLEMENT_KEY=key))
    assert status == 1
    found = failures(report)["gas_insufficient"]
    address = Account.from_key(key).address
    assert f"{address} holds 0 ETH: 0 settlements" in found["message"] and f"{GAS_PER_SETTLEMENT:,} gas" in found["message"]
    assert address in found["fix"] and "send at least" in found["fix"]
    assert key.removeprefix("0x") not in json.dumps(report)  # never the key itself


def test_gas_thresholds_are_options(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    # The dev settlement account holds ~10,000 ETH: far fewer settlements than 10**12, so a warning
    # when only the warning threshold is above it, a failure when both are.
    env = environment(tmp_path, devchain, ledger_url)
    status, report = doctor(env, "--gas-warn", str(10**12), "--gas-fail", "1")
    assert status == 2 and report["status"] == "warn"
    assert [f["code"] for f in report["findings"] if f["status"] == "warn"] == ["gas_low"]
    status, report = doctor(env, "--gas-warn", str(10**12), "--gas-fail", str(10**12))
    assert status == 1 and "gas_insufficient" in failures(report)


def test_a_dead_facilitator(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    dead = closed_port_url()
    status, report = doctor(environment(tmp_path, devchain, ledger_url, X402GW_FACILITATORS=json.dumps({LOCAL: dead})))
    assert status == 1
    found = failures(report)["facilitator_unreachable"]
    assert found["subject"] == f"{LOCAL} {dead}" and "X402GW_FACILITATORS" in found["fix"]
    assert not any(f["check"] == "gas" for f in report["findings"])  # a remote facilitator pays its own gas


def test_a_facilitator_that_does_not_serve_the_network(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    other = [{"x402Version": 2, "scheme": "exact", "network": "eip155:84532"}]
    with AuthFacilitatorDouble(other, bearer="unused") as double:
        settings = Settings(**settings_values(tmp_path, devchain, ledger_url, facilitators={LOCAL: double.url}))
        report = run(settings, lambda method, url: {"Authorization": "Bearer unused"})
    found = {f.code: f for f in report.findings}["facilitator_unsupported"]
    assert "does not support exact on eip155:31337" in found.message and "exact on eip155:84532" in found.message


def settings_values(tmp_path: Path, devchain: Devchain, ledger_url: str, **values: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(catalog=[catalog(tmp_path)], deployment_file=devchain.deployment_file, database_url=ledger_url,
                                admin_token=ADMIN_TOKEN)
    return base | values


def run(settings: Settings, headers_for: Any) -> Report:
    plan = plan_from_settings(settings, load_catalogs(settings.catalog), headers_for=headers_for)
    return asyncio.run(run_doctor(plan, timeout=5))


def test_a_facilitator_that_demands_a_bearer_token(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    with AuthFacilitatorDouble(KINDS, bearer="s3cret-bearer") as double:
        def env(auth: dict[str, Any] | None) -> dict[str, str | None]:
            return environment(tmp_path, devchain, ledger_url, X402GW_FACILITATORS=json.dumps({LOCAL: double.url}),
                               X402GW_FACILITATOR_AUTH=None if auth is None else json.dumps({double.url: auth}))

        missing = doctor(env(None))
        wrong = doctor(env({"Authorization": "Bearer wrong"}))
        right = doctor(env({"Authorization": "Bearer s3cret-bearer"}))
    for (status, report), answered in ((missing, 401), (wrong, 403)):
        assert status == 1
        found = failures(report)["facilitator_unauthorized"]
        assert f"refused our credentials: GET /supported answered {answered}" in found["message"]
        assert "X402GW_FACILITATOR_AUTH" in found["fix"]
    assert right[0] == 0, right[1]
    assert "s3cret-bearer" not in json.dumps([missing, wrong, right])
    assert {(m, p) for m, p, auth in double.seen if auth == "Bearer s3cret-bearer"} == {("GET", "/supported"), ("POST", "/verify")}


def test_unusable_facilitator_credentials_are_named(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    with AuthFacilitatorDouble(KINDS, bearer="unused") as double:
        status, report = doctor(environment(
            tmp_path, devchain, ledger_url, X402GW_FACILITATORS=json.dumps({LOCAL: double.url}),
            X402GW_FACILITATOR_AUTH=json.dumps({double.url: "cdp"}), CDP_API_KEY_ID="organizations/o/apiKeys/k",
            CDP_API_KEY_SECRET="not-a-key-at-all"))
    assert status == 1
    found = failures(report)["facilitator_credentials_invalid"]
    assert "CDP API key secret" in found["message"] and "not-a-key-at-all" not in json.dumps(report)
    assert double.seen == []  # nothing sent with credentials that cannot be right


def pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def test_a_facilitator_that_demands_a_valid_cdp_jwt(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    stranger = ec.generate_private_key(ec.SECP256R1())
    with AuthFacilitatorDouble(KINDS, jwt_key=key.public_key()) as double:
        def env(secret: str) -> dict[str, str | None]:
            return environment(tmp_path, devchain, ledger_url, X402GW_FACILITATORS=json.dumps({LOCAL: double.url}),
                               X402GW_FACILITATOR_AUTH=json.dumps({double.url: "cdp"}),
                               CDP_API_KEY_ID="organizations/o/apiKeys/k", CDP_API_KEY_SECRET=secret)

        valid = doctor(env(pem(key)))
        forged = doctor(env(pem(stranger)))
        settings = Settings(**settings_values(tmp_path, devchain, ledger_url, facilitators={LOCAL: double.url}))
        expired = run(settings, CdpJwtAuth("organizations/o/apiKeys/k", pem(key), clock=lambda: time.time() - 600).headers)
    assert valid[0] == 0, valid[1]
    assert forged[0] == 1 and [f["code"] for f in forged[1]["findings"] if f["status"] != "ok"] == ["facilitator_unauthorized"]
    assert expired.codes() == ["facilitator_unauthorized"], expired.render_text()
    assert "PRIVATE KEY" not in json.dumps([valid, forged])


def test_dev_keys_are_refused_off_the_local_chain(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    env = environment(tmp_path, devchain, ledger_url, X402GW_CATALOG=str(catalog(tmp_path, **{LOCAL: "eip155:84532"})),
                      X402GW_RPC_URLS=json.dumps({"eip155:84532": closed_port_url()}),
                      X402GW_SETTLEMENT_KEY=ANVIL_KEYS[0], X402GW_REFUND_KEY=ANVIL_KEYS[1])
    status, report = doctor(env)
    assert status == 1
    dev = [f for f in report["findings"] if f["code"] == "dev_key_on_public_chain"]
    assert {("settlement key" in f["message"], "refund key" in f["message"]) for f in dev} == {(True, False), (False, True)}
    assert "rpc_unreachable" in failures(report)
    assert ANVIL_KEYS[0].removeprefix("0x") not in json.dumps(report)


def test_database_store_and_admin_token(tmp_path: Path, devchain: Devchain, ledger_url: str) -> None:
    unmigrated = f"sqlite:///{tmp_path / 'never-created.sqlite3'}"
    env = environment(tmp_path, devchain, ledger_url, X402GW_DATABASE_URL=unmigrated,
                      X402GW_REDIS_URL=closed_port_url().replace("http", "redis") + "/0")
    status, report = doctor(env)
    assert status == 1
    assert {"database_not_migrated", "store_unreachable"} == set(failures(report))
    assert "x402gw db upgrade" in failures(report)["database_not_migrated"]["fix"]
    assert not (tmp_path / "never-created.sqlite3").exists()  # the doctor never writes
    # Only warnings (no admin token on the local chain): exit status 2.
    status, report = doctor(environment(tmp_path, devchain, ledger_url, X402GW_ADMIN_TOKEN=None))
    assert status == 2 and [f["code"] for f in report["findings"] if f["status"] != "ok"] == ["admin_token_missing"]


def test_postgres_at_head_passes(tmp_path: Path, devchain: Devchain, postgres_database: str) -> None:
    open_ledger(postgres_database).close()
    status, report = doctor(environment(tmp_path, devchain, postgres_database))
    assert status == 0, report
    database = next(f for f in report["findings"] if f["check"] == "database")
    assert database["message"].startswith("postgresql 127.0.0.1:5432/") and "postgres@" not in json.dumps(report)
