"""X402GW_BATCH_SETTLEMENT's ``flush_when_idle``: read from the environment into the batch policy
the gateway builds; anything but a JSON boolean is a settings error with its stable code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.cli.settings_errors import describe_settings_error
from gateway.settings import Settings
from gateway.wiring import build_batching_facilitator
from settlement.chain.client import JsonRpcChain
from settlement.schemes.batch import BATCH_BASE_GAS, BATCH_ITEM_GAS, BatchPolicy
from settlement.schemes.exact_local import LocalFacilitator
from tests.gateway.cli.test_serve_settings import LIVE, refused

NETWORK = "eip155:84532"
CONTRACT = "0x" + "11" * 20  # never called: building the facilitator reads no chain


def policies(monkeypatch: pytest.MonkeyPatch, batch: dict[str, object]) -> dict[str, BatchPolicy]:
    monkeypatch.setenv("X402GW_BATCH_SETTLEMENT", json.dumps({NETWORK: {"contract": CONTRACT, **batch}}))
    chain = JsonRpcChain("http://127.0.0.1:9", 84532, None)
    batching = build_batching_facilitator(Settings(), LocalFacilitator({NETWORK: chain}), {NETWORK: chain})
    return {network: batcher.policy for network, batcher in batching._batchers.items()}


def test_flush_when_idle_reaches_the_batch_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    assert policies(monkeypatch, {"flush_when_idle": True, "max_wait_ms": 500, "max_payments": 7}) == {
        NETWORK: BatchPolicy(500, 7, flush_when_idle=True)
    }
    assert policies(monkeypatch, {"flush_when_idle": False}) == {NETWORK: BatchPolicy(20.0, 50, flush_when_idle=False)}
    assert policies(monkeypatch, {}) == {NETWORK: BatchPolicy(20.0, 50, flush_when_idle=False)}  # off unless asked


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, [True], {"on": True}])
def test_a_flush_when_idle_that_is_not_a_boolean_is_refused(monkeypatch: pytest.MonkeyPatch, value: object) -> None:
    monkeypatch.setenv("X402GW_BATCH_SETTLEMENT", json.dumps({NETWORK: {"flush_when_idle": value}}))
    with pytest.raises(ValidationError) as refusal:
        Settings()
    message, code = describe_settings_error(refusal.value)
    assert code == "invalid_setting"
    assert f"X402GW_BATCH_SETTLEMENT['{NETWORK}']['flush_when_idle']: Input should be a valid boolean" in message


def test_serve_refuses_a_flush_when_idle_that_is_not_a_boolean(tmp_path: Path) -> None:
    batch = json.dumps({NETWORK: {"flush_when_idle": "sometimes"}})
    output = refused(tmp_path, "invalid_setting", **LIVE, X402GW_BATCH_SETTLEMENT=batch)
    assert "flush_when_idle" in output and "sometimes" not in output


def test_the_largest_batch_fits_under_the_per_transaction_gas_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """EIP-7825 caps a transaction at 2**24 gas: the most items a batch may hold must fit, at the gas
    the batcher asks per item; one more is a settings error, not a batch every chain refuses."""
    assert policies(monkeypatch, {"max_payments": 150})[NETWORK].max_payments == 150
    assert BATCH_BASE_GAS + BATCH_ITEM_GAS * 150 <= 2**24
    monkeypatch.setenv("X402GW_BATCH_SETTLEMENT", json.dumps({NETWORK: {"contract": CONTRACT, "max_payments": 151}}))
    with pytest.raises(ValidationError):
        Settings()


def test_a_channel_claim_interval_past_the_escrows_withdraw_delay_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """A payer may withdraw its channel 900 s (the escrow's least withdrawDelay) after asking: with
    claims further apart than that, calls it owes could be withdrawn before they are claimed."""
    monkeypatch.setenv("X402GW_CHANNEL_CLAIM_EVERY_SECONDS", "600")
    assert Settings().channel_claim_every_seconds == 600
    monkeypatch.setenv("X402GW_CHANNEL_CLAIM_EVERY_SECONDS", "3600")
    with pytest.raises(ValidationError) as refusal:
        Settings()
    message, code = describe_settings_error(refusal.value)
    assert code == "invalid_setting" and "X402GW_CHANNEL_CLAIM_EVERY_SECONDS" in message and "600" in message
    monkeypatch.delenv("X402GW_CHANNEL_CLAIM_EVERY_SECONDS")
    assert "X402GW_CHANNEL_CLAIM_EVERY_SECONDS" in refused(tmp_path, "invalid_setting", **LIVE, X402GW_CHANNEL_CLAIM_EVERY_SECONDS="901")
