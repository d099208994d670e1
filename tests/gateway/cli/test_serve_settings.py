"""`x402gw serve` with settings it cannot start with: one line on standard error with a stable code,
exit status 2, no traceback, and never the offending value (it may be a key, a token or a
password). Run as a real process, as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import catalog

SECRET = "s3cr3t-4b7e19d2c0"
GOING_LIVE = str(Path(catalog.__file__).parent / "examples" / "going-live.yaml")
PAY_TO = "0x14dC79964da2C08b23698B3D3cc7Ca32193d9955"
KEY = "0x" + "5e" * 32  # a well-formed key of nobody's

# A configuration that gets as far as the settlement key and the ledger without any network call:
# the going-live catalog on Base Sepolia, settled by this gateway through an RPC URL never reached.
LIVE = {"X402GW_CATALOG": GOING_LIVE, "X402GW_PAY_TO": PAY_TO,
        "X402GW_RPC_URLS": json.dumps({"eip155:84532": "http://127.0.0.1:9"})}


def serve(tmp_path: Path, **env: str) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("X402GW_", "X402_", "CDP_"))}
    clean["X402GW_DATABASE_URL"] = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    clean["X402GW_PORT"] = "0"  # should a case start after all: a free port, and the timeout fails it
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve"], cwd=tmp_path,
        env={**clean, **env}, capture_output=True, text=True, timeout=120,
    )
    return result.returncode, result.stdout + result.stderr


def refused(tmp_path: Path, code: str, **env: str) -> str:
    status, output = serve(tmp_path, **env)
    assert status == 2, output
    assert "Traceback" not in output and SECRET not in output, output
    assert output.strip().count("\n") == 0 and output.startswith("error: ") and output.strip().endswith(f"[{code}]"), output
    return output


def test_an_unreadable_key_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()  # a directory: cannot be read as a file, whoever runs the test
    output = refused(tmp_path, "secret_file_unreadable", X402GW_SETTLEMENT_KEY_FILE=str(tmp_path / "keys"))
    assert "X402GW_SETTLEMENT_KEY_FILE" in output
    refused(tmp_path, "secret_file_unreadable", X402GW_REFUND_KEY_FILE=str(tmp_path / "absent"))
    (tmp_path / "empty").write_text("\n")
    refused(tmp_path, "secret_file_empty", X402GW_SETTLEMENT_KEY_FILE=str(tmp_path / "empty"))


def test_a_key_and_its_file_both_set(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(KEY)
    refused(tmp_path, "secret_set_twice", X402GW_SETTLEMENT_KEY=SECRET, X402GW_SETTLEMENT_KEY_FILE=str(tmp_path / "key"))


@pytest.mark.parametrize(("name", "value", "code"), [
    ("X402GW_PORT", SECRET, "invalid_setting"),
    ("X402GW_MAX_BODY_BYTES", SECRET, "invalid_setting"),
    ("X402GW_BATCH_SETTLEMENT", json.dumps({"eip155:84532": {"max_wait_ms": SECRET}}), "invalid_setting"),
    ("X402GW_RPC_URLS", f"{{not json {SECRET}", "invalid_setting_json"),
])
def test_a_malformed_value_is_named_not_echoed(tmp_path: Path, name: str, value: str, code: str) -> None:
    env = {name: value} if name == "X402GW_RPC_URLS" else {**LIVE, name: value}
    assert name in refused(tmp_path, code, **env)


def test_a_settlement_key_that_is_not_a_key(tmp_path: Path) -> None:
    output = refused(tmp_path, "invalid_key", **LIVE, X402GW_SETTLEMENT_KEY=SECRET)
    assert "X402GW_SETTLEMENT_KEY" in output


def test_a_database_url_that_cannot_be_opened_is_not_quoted(tmp_path: Path) -> None:
    refused(tmp_path, "ledger_unavailable", **LIVE, X402GW_SETTLEMENT_KEY=KEY,
            X402GW_DATABASE_URL=f"nosuchdialect://user:{SECRET}@db.example/ledger")


def test_reconcile_reads_the_catalog_with_this_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from gateway.cli.main import main

    for name in ("X402GW_RPC_URLS", "X402GW_NETWORK", "X402GW_PAY_TO", "X402_FACILITATOR_URL", "X402GW_FACILITATORS"):
        monkeypatch.delenv(name, raising=False)
    database = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    args = ["reconcile", "--catalog", GOING_LIVE, "--database-url", database]
    unset = CliRunner().invoke(main, args)
    assert unset.exit_code == 2 and "payment.pay_to: ${X402GW_PAY_TO} is not set" in unset.output, unset.output
    monkeypatch.setenv("X402GW_PAY_TO", PAY_TO)
    monkeypatch.setenv("X402GW_NETWORK", "base")
    resolved = CliRunner().invoke(main, args)  # past the catalog: on to the chain of the network it resolved to
    assert resolved.exit_code == 2 and "no chain access for eip155:8453" in resolved.output, resolved.output


def test_ledger_commands_refuse_bad_settings_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from gateway.cli.main import main

    monkeypatch.setenv("X402GW_NATIVE_USD_RATE", json.dumps({"eip155:8453": SECRET}))
    result = CliRunner().invoke(main, ["ledger", "summary", "--database-url", f"sqlite:///{tmp_path / 'l.sqlite3'}"])
    assert result.exit_code == 2 and SECRET not in result.output and "Traceback" not in result.output, result.output
    assert result.output.strip().startswith("error: ") and result.output.strip().endswith("[invalid_setting]"), result.output
    assert result.output.strip().count("\n") == 0, result.output
