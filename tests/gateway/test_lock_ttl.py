"""The in-flight lock of a payment outlives the longest a request can hold it: verify, the slowest
tool's upstream call with every try and wait, the settle timeout actually used (a remote
facilitator's, or the local receipt wait), a refund. A lock that lapsed under a live request would
let a resend of the same payment run beside it."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog import load_catalogs
from catalog.models import Upstream
from gateway.app import create_app
from gateway.settings import Settings
from gateway.store import MemoryStore
from settlement.schema import open_ledger
from settlement.schemes.remote import RemoteFacilitator

HEAD = """\
catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
"""

SLOW = HEAD + """\
  max_timeout_seconds: 600
upstreams:
  slow:
    base_url: "http://127.0.0.1:9"
    timeout_seconds: 45
    failover: ["http://127.0.0.1:10"]
    retry: {attempts: 3, backoff_seconds: 1, max_backoff_seconds: 4, max_retry_after_seconds: 8}
  fast:
    base_url: "http://127.0.0.1:11"
    timeout_seconds: 2
tools:
  - {name: slow_tool, description: S, method: GET, path: /slow, upstream: slow, price: "0.01"}
  - {name: fast_tool, description: F, method: GET, path: /fast, upstream: fast, price: "0.01"}
"""

DEFAULT = HEAD + """\
upstreams:
  legacy:
    base_url: "http://127.0.0.1:9"
tools:
  - {name: quote, description: Q, method: GET, path: /q, price: "0.002"}
"""


def worst_upstream_seconds(upstream: Upstream) -> float:
    """Every try at its timeout, and the longest wait before each retry."""
    tries = max(upstream.retry.attempts, 1 + len(upstream.failover))
    wait = max(upstream.retry.max_backoff_seconds, upstream.retry.max_retry_after_seconds)
    return tries * upstream.timeout_seconds + (tries - 1) * wait


def lock_ttl_seconds(tmp_path: Path, catalog: str, **overrides: object) -> tuple[float, Settings, list[float]]:
    path = tmp_path / "catalog.yaml"
    path.write_text(catalog)
    settings = Settings(
        catalog=[path], database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        deployment_file=tmp_path / "absent.json", **overrides,
    )
    catalogs = load_catalogs(settings.catalog)
    ledger = open_ledger(settings.database_url)
    try:
        app = create_app(settings, catalogs=catalogs, ledger=ledger, store=MemoryStore())
        worst = [worst_upstream_seconds(tool.upstream) for tool in catalogs.tools]
        return app.state.pipeline.lock_ttl_ms / 1000, settings, worst
    finally:
        ledger.close()


@pytest.mark.parametrize("catalog", [SLOW, DEFAULT], ids=["slow_upstreams", "default_upstream"])
@pytest.mark.parametrize("settle_timeout", [None, 180.0])
def test_lock_outlives_verify_the_slowest_upstream_and_a_remote_settle(
    tmp_path: Path, catalog: str, settle_timeout: float | None
) -> None:
    overrides: dict[str, object] = {"X402_FACILITATOR_URL": "http://127.0.0.1:9", "receipt_timeout_seconds": 5}
    if settle_timeout is not None:
        overrides["facilitator_settle_timeout_seconds"] = settle_timeout
    ttl, settings, worst = lock_ttl_seconds(tmp_path, catalog, **overrides)
    remote = RemoteFacilitator(settings.facilitator_url or "", settle_timeout=settings.facilitator_settle_timeout_seconds)
    assert remote.settle_timeout_seconds == (settle_timeout or 60.0)
    held = remote.verify_timeout_seconds + max(worst) + remote.settle_timeout_seconds
    assert ttl > held + 10  # and a margin for ledger writes and scheduling
    if catalog == DEFAULT:
        # what the lock lived before: 2 x receipt timeout + 2 x upstream + 30 s, shorter than the hold
        assert 2 * settings.receipt_timeout_seconds + 2 * max(worst) + 30 < held


def test_slow_upstream_arithmetic(tmp_path: Path) -> None:
    _, _, worst = lock_ttl_seconds(tmp_path, SLOW, X402_FACILITATOR_URL="http://127.0.0.1:9")
    assert max(worst) == 3 * 45 + 2 * 8


def test_local_settlement_lock_outlives_the_receipt_wait_and_a_refund(tmp_path: Path) -> None:
    upfront = SLOW.replace('path: /fast, upstream: fast, price: "0.01"}', 'path: /fast, upstream: fast, price: "0.01", settle: upfront}')
    chain = {"rpc_urls": {"eip155:31337": "http://127.0.0.1:9"}, "settlement_key": "0x" + "22" * 32}
    base, settings, worst = lock_ttl_seconds(tmp_path, upfront, receipt_timeout_seconds=90, **chain)
    # local settle: broadcast and the receipt wait; then the slowest upstream
    assert base > settings.receipt_timeout_seconds + max(worst) + 20
    # with a refund key, a settle-first tool whose upstream fails waits for the refund's receipt too
    with_refunds, _, _ = lock_ttl_seconds(
        tmp_path, upfront, receipt_timeout_seconds=90, refund_key="0x" + "11" * 32, **chain
    )
    assert with_refunds >= base + settings.receipt_timeout_seconds


def test_the_settle_timeout_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("X402GW_FACILITATOR_SETTLE_TIMEOUT_SECONDS", "150")
    assert Settings().facilitator_settle_timeout_seconds == 150.0
    monkeypatch.setenv("X402GW_FACILITATOR_SETTLE_TIMEOUT_SECONDS", "0")
    with pytest.raises(ValueError):
        Settings()
