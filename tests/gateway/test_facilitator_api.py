"""The facilitator HTTP API over the local facilitator, on a real anvil: verify is read-only,
settle moves the money once however often and however concurrently it is asked."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from web3 import Web3

from gateway.serving import ThreadServer
from settlement.payer import Payer
from settlement.wire import PaymentPayload, PaymentRequirements
from tests.conftest import PAY_TO, Devchain
from tests.support.local_facilitator import local_facilitator_app

PAYER = 6
NETWORK = "eip155:31337"
PRICE = 3000


@pytest.fixture(scope="module")
def facilitator_url(devchain: Devchain) -> Iterator[str]:
    with ThreadServer(local_facilitator_app(devchain.deployment)) as server:
        yield f"{server.url}/facilitator"


def requirements(devchain: Devchain, **changes: Any) -> PaymentRequirements:
    fields: dict[str, Any] = {
        "scheme": "exact", "network": NETWORK, "amount": str(PRICE), "asset": devchain.token, "pay_to": PAY_TO,
        "max_timeout_seconds": 60, "extra": {"name": "USD Coin", "version": "2"},
    }
    fields.update(changes)
    return PaymentRequirements(**fields)


def request_body(payload: PaymentPayload, reqs: PaymentRequirements) -> dict[str, Any]:
    return {"x402Version": 2, "paymentPayload": payload.to_wire(), "paymentRequirements": reqs.to_wire()}


def balances(devchain: Devchain) -> tuple[int, int]:
    return devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)


def test_supported_lists_exact_v2_on_the_local_chain(facilitator_url: str, devchain: Devchain) -> None:
    response = httpx.get(f"{facilitator_url}/supported")
    assert response.status_code == 200
    body = response.json()
    assert {"x402Version": 2, "scheme": "exact", "network": NETWORK} in body["kinds"]
    assert body["extensions"] == []
    assert [signer.lower() for signer in body["signers"]["eip155:*"]] == [devchain.deployment.deployer.lower()]


def test_verify_is_read_only(facilitator_url: str, devchain: Devchain) -> None:
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs)
    before = balances(devchain)
    response = httpx.post(f"{facilitator_url}/verify", json=request_body(payload, reqs))
    assert response.status_code == 200
    assert response.json() == {"isValid": True, "payer": devchain.address(PAYER)}
    again = httpx.post(f"{facilitator_url}/verify", json=request_body(payload, reqs))
    assert again.json()["isValid"] is True
    assert balances(devchain) == before
    assert devchain.authorization_state(devchain.address(PAYER), payload.payload["authorization"]["nonce"]) is False


def test_invalid_payment_is_a_200_with_the_reason(facilitator_url: str, devchain: Devchain) -> None:
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs, overrides={"value": PRICE - 1})
    for path, field in (("verify", "invalidReason"), ("settle", "errorReason")):
        response = httpx.post(f"{facilitator_url}/{path}", json=request_body(payload, reqs))
        assert response.status_code == 200
        assert response.json()[field] == "invalid_exact_evm_payload_authorization_value_mismatch"


def test_settle_moves_the_price_once_and_a_retry_gets_the_stored_success(facilitator_url: str, devchain: Devchain) -> None:
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs)
    before_payer, before_pay_to = balances(devchain)
    first = httpx.post(f"{facilitator_url}/settle", json=request_body(payload, reqs), timeout=30)
    assert first.status_code == 200
    settled = first.json()
    assert settled["success"] is True and settled["transaction"].startswith("0x")
    assert settled["network"] == NETWORK and settled["payer"] == devchain.address(PAYER)
    assert devchain.w3.eth.get_transaction_receipt(settled["transaction"])["status"] == 1
    assert balances(devchain) == (before_payer - PRICE, before_pay_to + PRICE)

    retry = httpx.post(f"{facilitator_url}/settle", json=request_body(payload, reqs), timeout=30)
    assert retry.status_code == 200
    assert retry.json() == settled
    assert balances(devchain) == (before_payer - PRICE, before_pay_to + PRICE)


def test_stored_success_is_not_handed_to_other_requirements(facilitator_url: str, devchain: Devchain) -> None:
    """Same (payer, nonce), settled once; presented against another payTo it is refused, not 'paid'."""
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs)
    assert httpx.post(f"{facilitator_url}/settle", json=request_body(payload, reqs), timeout=30).json()["success"]
    after = balances(devchain)
    other = requirements(devchain, pay_to=devchain.address(PAYER + 1))
    response = httpx.post(f"{facilitator_url}/settle", json=request_body(payload, other), timeout=30)
    assert response.status_code == 200
    assert response.json()["success"] is False
    assert response.json()["errorReason"] == "invalid_exact_evm_payload_recipient_mismatch"
    assert balances(devchain) == after


def test_concurrent_settles_of_one_payload_broadcast_once(facilitator_url: str, devchain: Devchain) -> None:
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs)
    before_payer, before_pay_to = balances(devchain)
    deployer = Web3.to_checksum_address(devchain.deployment.deployer)
    sent_before = devchain.w3.eth.get_transaction_count(deployer)

    async def settle_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            return list(await asyncio.gather(
                *(client.post(f"{facilitator_url}/settle", json=request_body(payload, reqs)) for _ in range(8))
            ))

    answers = asyncio.run(settle_all())
    assert [a.status_code for a in answers] == [200] * 8
    assert all(a.json()["success"] is True for a in answers)
    assert len({a.json()["transaction"] for a in answers}) == 1
    assert balances(devchain) == (before_payer - PRICE, before_pay_to + PRICE)
    # One transaction from the settlement account: no second broadcast, not even one that reverted.
    assert devchain.w3.eth.get_transaction_count(deployer) == sent_before + 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "invalid_json_body"),
        (b"[1, 2]", "invalid_json_body"),
        (b'{"x402Version": 1, "paymentPayload": {}, "paymentRequirements": {}}', "invalid_x402_version"),
        (b'{"x402Version": 2, "paymentRequirements": {}}', "invalid_payload"),
        (b'{"x402Version": 2, "paymentPayload": {"x402Version": 2}, "paymentRequirements": {}}', "invalid_payload"),
        ("requirements", "invalid_payment_requirements"),
        ("payload_version", "invalid_x402_version"),
        (b"{" * 100_000, "request_too_large"),
    ],
    ids=["not-json", "array", "v1", "no-payload", "payload-without-accepted", "bad-requirements",
         "payload-version-differs", "too-large"],
)
def test_malformed_requests_are_4xx_with_a_code(facilitator_url: str, devchain: Devchain, body: Any, code: str) -> None:
    if isinstance(body, str):
        reqs = requirements(devchain)
        data = request_body(Payer(devchain.key(PAYER)).sign(reqs), reqs)
        if body == "requirements":
            data["paymentRequirements"]["amount"] = "two thousand"
        else:
            data["paymentPayload"]["x402Version"] = 1
        body = httpx.Request("POST", "http://x", json=data).read()
    for path in ("verify", "settle"):
        response = httpx.post(f"{facilitator_url}/{path}", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == (413 if code == "request_too_large" else 400), response.text
        assert response.json()["error"] == code
        assert isinstance(response.json()["message"], str)
