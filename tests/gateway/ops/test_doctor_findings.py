"""The doctor's report: order, exit status (0 ok, 1 failures, 2 warnings only), both renderings,
URLs without credentials, and the gas thresholds' arithmetic."""

from __future__ import annotations

import json

import pytest

from gateway.ops.doctor import EXIT_FAILURES, EXIT_OK, EXIT_WARNINGS, GasThresholds, Report, redact_url
from gateway.ops.doctor.findings import fail, ok, warn


def test_exit_status_and_order() -> None:
    good = ok("rpc", "eip155:1", "fine")
    low = warn("gas", "eip155:1", "gas_low", "little gas", "send ETH")
    bad = fail("asset", "eip155:1 0xabc", "asset_name_mismatch", "wrong name", "set asset_name")
    assert Report.of([good]).exit_status == EXIT_OK
    assert Report.of([good, low]).exit_status == EXIT_WARNINGS
    report = Report.of([good, low, bad])
    assert report.exit_status == EXIT_FAILURES and report.status == "fail"
    assert [f.status for f in report.findings] == ["fail", "warn", "ok"]
    assert report.codes() == ["asset_name_mismatch", "gas_low"]


def test_renderings() -> None:
    report = Report.of([ok("rpc", "eip155:1", "fine"), fail("keys", "eip155:1", "dev_key_on_public_chain", "anvil key", "use yours")])
    text = report.render_text().splitlines()
    assert text[0] == "x402gw doctor: 1 failure(s), 0 warning(s) (2 checks)"
    assert text[1:] == ["FAIL  keys eip155:1 [dev_key_on_public_chain]: anvil key", "      fix: use yours", "ok    rpc eip155:1: fine"]
    data = json.loads(report.render_json())
    assert data["status"] == "fail" and data["exitStatus"] == 1 and data["counts"] == {"ok": 1, "warn": 0, "fail": 1}
    assert data["findings"][1] == {"check": "rpc", "subject": "eip155:1", "status": "ok", "code": "ok", "message": "fine"}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@rpc.example.com:8443/v2/KEY?apikey=secret#x", "https://rpc.example.com:8443/v2/KEY"),
        ("https://api.cdp.coinbase.com/platform/v2/x402", "https://api.cdp.coinbase.com/platform/v2/x402"),
        ("http://127.0.0.1:9", "http://127.0.0.1:9"),
    ],
)
def test_urls_lose_their_credentials(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_rpc_urls_lose_their_path() -> None:
    assert redact_url("https://base-mainnet.g.alchemy.com/v2/SECRETKEY", keep_path=False) == "https://base-mainnet.g.alchemy.com"


def test_gas_thresholds_must_be_ordered() -> None:
    assert GasThresholds(warn_below=5, fail_below=5).fail_below == 5
    with pytest.raises(ValueError):
        GasThresholds(warn_below=1, fail_below=2)
