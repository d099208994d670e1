"""The facilitator HTTP API over the local facilitator, on a real anvil: verify is read-only,
settle moves the money once however often and however concurrently it is asked."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from web3 import Web3

from catalog.limits import parse_rate_limit
from gateway.devkit.payer import Payer
from gateway.errors import GatewayConfigError
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from gateway.surfaces.facilitator_api import facilitator_routes
from settlement.chain.client import JsonRpcChain
from settlement.schemes.exact_local import LocalFacilitator
from settlement.x402.wire import PaymentPayload, PaymentRequirements
from tests.conftest import PAY_TO, Devchain, GatewayFactory
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


# -- griefing: gas, memory, floods ------------------------------------------------------------------


@contextmanager
def serving(devchain: Devchain, rpc_url: str | None = None, **options: Any) -> Iterator[tuple[str, LocalFacilitator]]:
    """The facilitator API with ``options`` (rate_limit, store, pay_to), and its LocalFacilitator
    to look inside. ``rpc_url`` replaces the devchain's (a dead one proves no RPC was made)."""
    deployment = devchain.deployment
    chain = JsonRpcChain(rpc_url or deployment.rpc_url, deployment.chain_id, deployment.settlement_key)
    local = LocalFacilitator({NETWORK: chain})

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await chain.close()

    app = Starlette(routes=facilitator_routes(local, **options), lifespan=lifespan)
    with ThreadServer(app) as server:
        yield f"{server.url}/facilitator", local


def dead_rpc_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed again: connections are refused


def settlement_nonce(devchain: Devchain) -> int:
    return devchain.w3.eth.get_transaction_count(Web3.to_checksum_address(devchain.deployment.deployer))


@pytest.mark.parametrize("case", ["amount-0", "self-transfer"])
def test_zero_amount_and_self_transfer_are_refused_and_move_nothing(
    facilitator_url: str, devchain: Devchain, case: str
) -> None:
    """Both would be valid signatures the token contract accepts; settling them only burns the
    settlement account's gas. Refused offline: no transaction, no balance change."""
    payer = devchain.address(PAYER)
    if case == "amount-0":
        reqs, code = requirements(devchain, amount="0"), "invalid_exact_evm_payload_zero_amount"
    else:
        reqs, code = requirements(devchain, pay_to=payer), "invalid_exact_evm_payload_self_transfer"
    payload = Payer(devchain.key(PAYER)).sign(reqs)
    nonce, before = settlement_nonce(devchain), (devchain.balance(payer), devchain.balance(PAY_TO))

    verified = httpx.post(f"{facilitator_url}/verify", json=request_body(payload, reqs))
    assert verified.status_code == 200
    assert (verified.json()["isValid"], verified.json()["invalidReason"]) == (False, code)
    for _ in range(2):
        settled = httpx.post(f"{facilitator_url}/settle", json=request_body(payload, reqs), timeout=30)
        assert settled.status_code == 200
        assert (settled.json()["success"], settled.json()["errorReason"]) == (False, code)
        assert "transaction" not in settled.json() or not settled.json()["transaction"]

    assert settlement_nonce(devchain) == nonce
    assert (devchain.balance(payer), devchain.balance(PAY_TO)) == before
    assert devchain.authorization_state(payer, payload.payload["authorization"]["nonce"]) is False


def test_junk_signatures_with_huge_domain_names_fill_no_cache(devchain: Devchain) -> None:
    """300 requests, each with its own ~60 KB extra.name (the body limit is 64 KB) and a junk
    signature: refused for the name, and the domain cache stays empty (it held ~18 MB before)."""
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs)
    body = request_body(payload, reqs)
    body["paymentPayload"]["payload"]["signature"] = "0x" + "11" * 65
    with serving(devchain) as (url, local), httpx.Client(timeout=30) as client:
        for i in range(300):
            body["paymentRequirements"]["extra"] = {"name": f"{i:06d}" + "x" * 60_000, "version": "2"}
            answer = client.post(f"{url}/verify", json=body)
            assert answer.status_code == 200
            assert answer.json()["invalidReason"] == "invalid_eip712_domain"
        # Short distinct names pass the length check and reach the signature check: still nothing kept.
        for i in range(50):
            body["paymentRequirements"]["extra"] = {"name": f"Token {i}", "version": "2"}
            for path in ("verify", "settle"):
                answer = client.post(f"{url}/{path}", json=body).json()
                assert answer.get("invalidReason", answer.get("errorReason")) == "invalid_exact_evm_payload_signature"
        assert len(local._domains) == 0 and len(local._signers) == 0
        # An honest payment is remembered once.
        assert client.post(f"{url}/verify", json=request_body(payload, reqs)).json()["isValid"] is True
        assert len(local._domains) == 1 and len(local._signers) == 1


def test_verify_and_settle_are_rate_limited_per_client(devchain: Devchain) -> None:
    reqs = requirements(devchain)
    payload = Payer(devchain.key(PAYER)).sign(reqs, overrides={"value": PRICE - 1})  # refused offline
    with serving(devchain, rate_limit=parse_rate_limit("3/1m")) as (url, _), httpx.Client(timeout=30) as client:
        answers = [client.post(f"{url}/{path}", json=request_body(payload, reqs))
                   for path in ("verify", "settle", "verify", "settle", "verify")]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        limited = answers[3]
        assert limited.json()["error"] == "rate_limited"
        assert isinstance(limited.json()["message"], str)
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json()["retryAfter"] == int(limited.headers["Retry-After"])
        # Even a body that is not a request counts: the limit comes before the body is read.
        assert client.post(f"{url}/verify", content=b"not json").status_code == 429
        assert client.get(f"{url}/supported").status_code == 200  # read-only and cheap: not limited


def test_pay_to_allow_list_refuses_other_recipients_without_any_rpc(devchain: Devchain) -> None:
    other = devchain.address(PAYER + 1)
    reqs = requirements(devchain, pay_to=other)
    payload = Payer(devchain.key(PAYER)).sign(reqs)  # valid, funded: would settle without the list
    nonce, before = settlement_nonce(devchain), balances(devchain)
    with serving(devchain, rpc_url=dead_rpc_url(), pay_to=[PAY_TO.lower()]) as (url, _):
        verified = httpx.post(f"{url}/verify", json=request_body(payload, reqs), timeout=30)
        assert verified.status_code == 200
        assert (verified.json()["isValid"], verified.json()["invalidReason"]) == (False, "pay_to_not_allowed")
        settled = httpx.post(f"{url}/settle", json=request_body(payload, reqs), timeout=30)
        assert settled.status_code == 200
        assert (settled.json()["success"], settled.json()["errorReason"]) == (False, "pay_to_not_allowed")
        # An allowed payTo reaches the (dead) chain: a reason, and no exception text or trace.
        allowed = requirements(devchain)
        ok_payload = Payer(devchain.key(PAYER)).sign(allowed)
        failed = httpx.post(f"{url}/verify", json=request_body(ok_payload, allowed), timeout=30)
        assert failed.status_code == 200
        assert failed.json()["invalidReason"] == "unexpected_verify_error"
        assert "127.0.0.1" not in failed.text and "Traceback" not in failed.text and "Error" not in failed.text
    assert settlement_nonce(devchain) == nonce
    assert balances(devchain) == before

    with serving(devchain, pay_to=[PAY_TO]) as (url, _):
        refused = httpx.post(f"{url}/settle", json=request_body(payload, reqs), timeout=30).json()
        assert refused["errorReason"] == "pay_to_not_allowed"
        assert settlement_nonce(devchain) == nonce
        allowed = requirements(devchain)
        settled = httpx.post(f"{url}/settle", json=request_body(Payer(devchain.key(PAYER)).sign(allowed), allowed),
                             timeout=30).json()
        assert settled["success"] is True
        assert settlement_nonce(devchain) == nonce + 1


def test_settings_configure_the_served_facilitator(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    assert Settings().facilitator_rate_limit == parse_rate_limit("60/1m")  # on by default
    assert Settings(facilitator_rate_limit="").facilitator_rate_limit is None
    with pytest.raises(GatewayConfigError) as bad:
        Settings(facilitator_pay_to="0x1234")
    assert bad.value.code == "invalid_facilitator_pay_to"

    gateway = start_gateway(serve_facilitator=True, facilitator_rate_limit="2/1m", facilitator_pay_to=PAY_TO)
    other = requirements(devchain, pay_to=devchain.address(PAYER + 1))
    payload = Payer(devchain.key(PAYER)).sign(other)
    with gateway.client() as client:
        first = client.post("/facilitator/verify", json=request_body(payload, other))
        assert first.json()["invalidReason"] == "pay_to_not_allowed"
        assert client.post("/facilitator/settle", json=request_body(payload, other)).json()["errorReason"] == (
            "pay_to_not_allowed"
        )
        third = client.post("/facilitator/verify", json=request_body(payload, other))
        assert third.status_code == 429 and third.json()["error"] == "rate_limited"
        assert "Retry-After" in third.headers
