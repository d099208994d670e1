"""RemoteFacilitator against a facilitator double on loopback: good answers are used, every broken
answer fails closed (verify raises, settle reports an unknown outcome, never a success)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.devkit.devchain import ANVIL_KEYS
from gateway.devkit.payer import Payer
from settlement.errors import FacilitatorUnavailable
from settlement.schemes.remote import RemoteFacilitator, settlement_outcome_unknown
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse
from tests.support.facilitator_double import NETWORK, PENDING_TX_HASH, SUPPORTED, TX_HASH, FacilitatorDouble, closed_port_url

REQUIREMENTS = PaymentRequirements(
    scheme="exact",
    network=NETWORK,
    amount="2000",
    asset="0x5FbDB2315678afecb367f032d93F642f64180aa3",
    pay_to="0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
    max_timeout_seconds=60,
    extra={"name": "USD Coin", "version": "2"},
)
PAYER = Payer(ANVIL_KEYS[2])


@pytest.fixture
def double() -> Iterator[FacilitatorDouble]:
    fake = FacilitatorDouble().start()
    yield fake
    fake.stop()


def payment() -> PaymentPayload:
    return PAYER.sign(REQUIREMENTS)


def call(url: str, method: str, **options: Any) -> Any:
    """Run one facilitator call on a fresh client (short timeouts: the timeout mode never answers)."""
    options.setdefault("verify_timeout", 0.5)
    options.setdefault("settle_timeout", 0.5)

    async def run() -> Any:
        facilitator = RemoteFacilitator(url, **options)
        try:
            if method == "fetch_supported":
                return await facilitator.fetch_supported(), facilitator.supported()
            return await getattr(facilitator, method)(payment(), REQUIREMENTS)
        finally:
            await facilitator.close()

    return asyncio.run(run())


# ---------------------------------------------------------------------------------------- supported


def test_supported_is_fetched_and_kept(double: FacilitatorDouble) -> None:
    fetched, kept = call(double.url, "fetch_supported")
    assert fetched == kept == SUPPORTED


def test_supported_from_nowhere_raises() -> None:
    with pytest.raises(FacilitatorUnavailable):
        call(closed_port_url(), "fetch_supported")


# ------------------------------------------------------------------------------------------- verify


def test_verify_sends_the_standard_body_and_uses_a_good_answer(double: FacilitatorDouble) -> None:
    result = call(double.url, "verify", headers={"Authorization": "Bearer t0ken"})
    assert result == VerifyResponse(is_valid=True, payer=PAYER.address)
    [body] = double.bodies("/verify")
    assert set(body) == {"x402Version", "paymentPayload", "paymentRequirements"}
    assert body["x402Version"] == 2
    assert body["paymentRequirements"] == REQUIREMENTS.to_wire()
    assert body["paymentRequirements"]["payTo"] == REQUIREMENTS.pay_to
    assert body["paymentRequirements"]["maxTimeoutSeconds"] == 60
    assert body["paymentPayload"]["x402Version"] == 2
    assert body["paymentPayload"]["accepted"] == REQUIREMENTS.to_wire()
    assert set(body["paymentPayload"]["payload"]["authorization"]) == {
        "from", "to", "value", "validAfter", "validBefore", "nonce"
    }


def test_verify_refusal_with_http_400_is_used(double: FacilitatorDouble) -> None:
    double.verify_mode = "verify_invalid_400"
    result = call(double.url, "verify")
    assert result.is_valid is False
    assert result.invalid_reason == "invalid_exact_evm_payload_signature"


@pytest.mark.parametrize("mode", ["timeout", "html_502", "non_json", "truncated_json", "missing_is_valid", "json_503_valid"])
def test_verify_without_a_usable_answer_raises_unavailable(double: FacilitatorDouble, mode: str) -> None:
    double.verify_mode = mode
    with pytest.raises(FacilitatorUnavailable) as caught:
        call(double.url, "verify")
    assert caught.value.code == "facilitator_unavailable"
    assert double.url not in caught.value.message and "Error" not in caught.value.message
    assert len(double.bodies("/verify")) == 1


def test_verify_against_a_closed_port_raises_unavailable() -> None:
    with pytest.raises(FacilitatorUnavailable) as caught:
        call(closed_port_url(), "verify")
    assert caught.value.code == "facilitator_unavailable"


# ------------------------------------------------------------------------------------------- settle


def test_settle_sends_the_standard_body_and_uses_a_good_answer(double: FacilitatorDouble) -> None:
    result = call(double.url, "settle")
    assert result == SettleResponse(success=True, transaction=TX_HASH, network=NETWORK, payer=PAYER.address)
    assert not settlement_outcome_unknown(result)
    [body] = double.bodies("/settle")
    assert body["x402Version"] == 2
    assert body["paymentRequirements"] == REQUIREMENTS.to_wire()
    assert body["paymentPayload"]["payload"]["authorization"]["from"] == PAYER.address


@pytest.mark.parametrize(
    ("mode", "reason", "transaction"),
    [
        ("timeout", "facilitator_timeout", ""),
        ("html_502", "facilitator_bad_response", ""),
        ("json_503_success", "facilitator_error_status", TX_HASH),
        ("non_json", "facilitator_bad_response", ""),
        ("truncated_json", "facilitator_bad_response", TX_HASH),
        ("success_without_tx", "facilitator_bad_response", ""),
        ("pending", "settlement_pending", PENDING_TX_HASH),
        ("invalid_transaction_state", "invalid_transaction_state", ""),
    ],
)
def test_settle_without_a_usable_answer_is_an_unknown_outcome(
    double: FacilitatorDouble, mode: str, reason: str, transaction: str
) -> None:
    double.settle_mode = mode
    result = call(double.url, "settle")
    assert result.success is False
    assert result.error_reason == reason
    assert result.transaction == transaction
    assert result.network == NETWORK
    assert settlement_outcome_unknown(result)
    assert len(double.bodies("/settle")) == 1


def test_settle_against_a_closed_port_is_an_unknown_outcome() -> None:
    result = call(closed_port_url(), "settle")
    assert (result.success, result.error_reason, result.transaction) == (False, "facilitator_unreachable", "")
    assert settlement_outcome_unknown(result)


@pytest.mark.parametrize(
    ("mode", "reason", "transaction"),
    [
        ("nonce_already_used", "invalid_exact_evm_nonce_already_used", ""),  # answered with HTTP 400
        ("transaction_failed", "transaction_failed", PENDING_TX_HASH),
    ],
)
def test_definite_settle_refusals_pass_through(double: FacilitatorDouble, mode: str, reason: str, transaction: str) -> None:
    double.settle_mode = mode
    result = call(double.url, "settle")
    assert (result.success, result.error_reason, result.transaction) == (False, reason, transaction)
    assert not settlement_outcome_unknown(result)


@pytest.mark.parametrize(
    ("reason", "unknown"),
    [
        ("settlement_pending", True),
        ("invalid_transaction_state", True),
        ("unexpected_settle_error", True),
        ("facilitator_timeout", True),
        ("facilitator_unreachable", True),
        ("facilitator_bad_response", True),
        ("facilitator_error_status", True),
        (None, True),
        ("invalid_exact_evm_nonce_already_used", False),
        ("invalid_exact_evm_insufficient_balance", False),
        ("transaction_failed", False),
    ],
)
def test_settlement_outcome_unknown(reason: str | None, unknown: bool) -> None:
    failed = SettleResponse(success=False, error_reason=reason, network=NETWORK)
    assert settlement_outcome_unknown(failed) is unknown
    assert settlement_outcome_unknown(SettleResponse(success=True, transaction=TX_HASH, network=NETWORK)) is False


# ------------------------------------------------------------------------------- whole-call deadlines


async def _trickling_facilitator(stop: asyncio.Event) -> tuple[asyncio.AbstractServer, str]:
    """Answers every request with headers at once, then one body byte every 0.1 s for minutes:
    each read is quick, so only a whole-call deadline ends the wait."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n")
            for _ in range(4096):
                writer.write(b" ")
                await writer.drain()
                try:
                    await asyncio.wait_for(stop.wait(), 0.1)
                    break
                except TimeoutError:
                    pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("method", ["settle", "verify", "fetch_supported"])
def test_a_trickling_facilitator_is_cut_off_at_the_whole_call_timeout(method: str) -> None:
    async def run() -> tuple[Any, float]:
        stop = asyncio.Event()
        server, url = await _trickling_facilitator(stop)
        facilitator = RemoteFacilitator(url, verify_timeout=0.5, settle_timeout=0.5, supported_timeout=0.5)
        started = asyncio.get_running_loop().time()
        try:
            if method == "fetch_supported":
                outcome: Any = await facilitator.fetch_supported()
            else:
                outcome = await getattr(facilitator, method)(payment(), REQUIREMENTS)
        except FacilitatorUnavailable as exc:
            outcome = exc
        finally:
            elapsed = asyncio.get_running_loop().time() - started
            stop.set()
            await facilitator.close()
            server.close()
            await server.wait_closed()
        return outcome, elapsed

    outcome, elapsed = asyncio.run(run())
    assert elapsed < 5  # the body would take 400 s at this pace; per-read timeouts never fire
    if method == "settle":
        assert isinstance(outcome, SettleResponse)
        assert not outcome.success and outcome.error_reason == "facilitator_timeout"
        assert settlement_outcome_unknown(outcome)
    else:
        assert isinstance(outcome, FacilitatorUnavailable)


def test_timeouts_are_positive_and_exposed() -> None:
    facilitator = RemoteFacilitator("http://127.0.0.1:9", settle_timeout=90, verify_timeout=7)
    assert (facilitator.settle_timeout_seconds, facilitator.verify_timeout_seconds) == (90.0, 7.0)
    asyncio.run(facilitator.close())
    with pytest.raises(ValueError):
        RemoteFacilitator("http://127.0.0.1:9", settle_timeout=0)
