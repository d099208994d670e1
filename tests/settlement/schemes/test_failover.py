"""FailoverFacilitator against facilitator doubles and closed ports on loopback: verify moves on
after any failure, settle only when the request never left; a settle whose outcome is unknown at
the first facilitator is never sent to the second."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from settlement.errors import FacilitatorUnavailable
from settlement.schemes.failover import FailoverFacilitator
from settlement.schemes.remote import RemoteFacilitator, settlement_outcome_unknown
from tests.settlement.schemes.test_remote_facilitator import REQUIREMENTS, payment
from tests.support.facilitator_double import NETWORK, TX_HASH, FacilitatorDouble, closed_port_url


@pytest.fixture
def doubles() -> Iterator[tuple[FacilitatorDouble, FacilitatorDouble]]:
    first, second = FacilitatorDouble().start(), FacilitatorDouble().start()
    yield first, second
    first.stop()
    second.stop()


def run(urls: list[str], method: str) -> tuple[Any, FailoverFacilitator]:
    async def go() -> tuple[Any, FailoverFacilitator]:
        failover = FailoverFacilitator([RemoteFacilitator(u, verify_timeout=0.5, settle_timeout=0.5) for u in urls])
        try:
            if method == "fetch_supported":
                return await failover.fetch_supported(), failover
            return await getattr(failover, method)(payment(), REQUIREMENTS), failover
        finally:
            await failover.close()

    return asyncio.run(go())


def states(failover: FailoverFacilitator) -> list[str | None]:
    return [h["state"] for h in failover.health()]


def test_verify_moves_past_a_dead_facilitator(doubles: tuple[FacilitatorDouble, FacilitatorDouble]) -> None:
    _, second = doubles
    result, failover = run([closed_port_url(), second.url], "verify")
    assert result.is_valid
    assert states(failover) == ["down", "up"]
    assert failover.health()[0]["lastError"] == "ConnectError"


@pytest.mark.parametrize("mode", ["html_502", "timeout", "json_503_valid"])
def test_verify_moves_past_an_unusable_answer(doubles: tuple[FacilitatorDouble, FacilitatorDouble], mode: str) -> None:
    first, second = doubles
    first.verify_mode = mode
    result, _ = run([first.url, second.url], "verify")
    assert result.is_valid and len(second.bodies("/verify")) == 1


def test_a_verify_refusal_is_final(doubles: tuple[FacilitatorDouble, FacilitatorDouble]) -> None:
    first, second = doubles
    first.verify_mode = "verify_invalid_400"
    result, _ = run([first.url, second.url], "verify")
    assert not result.is_valid and result.invalid_reason == "invalid_exact_evm_payload_signature"
    assert second.bodies("/verify") == []  # a refusal is not shopped around


def test_verify_with_every_facilitator_dead_fails_closed() -> None:
    with pytest.raises(FacilitatorUnavailable):
        run([closed_port_url(), closed_port_url()], "verify")


def test_settle_moves_on_only_when_nothing_was_sent(doubles: tuple[FacilitatorDouble, FacilitatorDouble]) -> None:
    _, second = doubles
    result, failover = run([closed_port_url(), second.url], "settle")
    assert result.success and result.transaction == TX_HASH and result.network == NETWORK
    assert len(second.bodies("/settle")) == 1
    assert states(failover) == ["down", "up"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("timeout", "facilitator_timeout"),
        ("html_502", "facilitator_bad_response"),
        ("json_503_success", "facilitator_error_status"),
        ("pending", "settlement_pending"),
    ],
)
def test_an_unknown_settle_outcome_is_never_sent_to_the_next(
    doubles: tuple[FacilitatorDouble, FacilitatorDouble], mode: str, reason: str
) -> None:
    first, second = doubles
    first.settle_mode = mode
    result, _ = run([first.url, second.url], "settle")
    assert not result.success and result.error_reason == reason and settlement_outcome_unknown(result)
    assert len(first.bodies("/settle")) == 1
    assert second.bodies("/settle") == []  # the first may have broadcast it: resolved from the chain


def test_a_definite_settle_refusal_is_final(doubles: tuple[FacilitatorDouble, FacilitatorDouble]) -> None:
    first, second = doubles
    first.settle_mode = "nonce_already_used"
    result, _ = run([first.url, second.url], "settle")
    assert result.error_reason == "invalid_exact_evm_nonce_already_used" and not settlement_outcome_unknown(result)
    assert second.bodies("/settle") == []


def test_settle_with_no_facilitator_reachable_raises_nothing_sent() -> None:
    with pytest.raises(FacilitatorUnavailable, match="nothing was sent"):
        run([closed_port_url(), closed_port_url()], "settle")


def test_a_single_unreachable_facilitator_still_reports_an_unknown_outcome() -> None:
    """``RemoteFacilitator.settle`` alone keeps its answer (only the failover reads SettleNotSent)."""
    remote = RemoteFacilitator(closed_port_url(), settle_timeout=0.5)

    async def go() -> Any:
        try:
            return await remote.settle(payment(), REQUIREMENTS)
        finally:
            await remote.close()

    result = asyncio.run(go())
    assert result.error_reason == "facilitator_unreachable" and settlement_outcome_unknown(result)


def test_supported_merges_what_answers_and_fails_only_when_none_does(
    doubles: tuple[FacilitatorDouble, FacilitatorDouble],
) -> None:
    _, second = doubles
    supported, failover = run([closed_port_url(), second.url], "fetch_supported")
    assert supported["kinds"] == [{"x402Version": 2, "scheme": "exact", "network": NETWORK}]
    assert states(failover) == ["down", "up"]
    with pytest.raises(FacilitatorUnavailable):
        run([closed_port_url()], "fetch_supported")


def test_timeouts_for_the_lock_cover_every_facilitator() -> None:
    failover = FailoverFacilitator([RemoteFacilitator("http://a.invalid", settle_timeout=7, verify_timeout=2),
                                    RemoteFacilitator("http://b.invalid/key/abc", settle_timeout=5, verify_timeout=3)])
    assert (failover.settle_timeout_seconds, failover.verify_timeout_seconds) == (12, 5)
    assert failover.url == "http://a.invalid, http://b.invalid"  # paths (keys) never shown
    asyncio.run(failover.close())
