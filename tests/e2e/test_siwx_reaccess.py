"""Re-access by sign-in-with-x on anvil: a payer who paid for a tool's answer gets it again, free,
within the tool's window, by signing the 402's challenge (EIP-4361); every other sign-in is a 402
with its own code that still offers payment. The official SDK signs: its client extension on the
happy path, its message and signing functions for the mutated sign-ins."""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.datastructures import SignedMessage
from eth_account.messages import SignableMessage
from eth_account.signers.local import LocalAccount
from sqlalchemy import update
from web3 import Web3
from x402 import x402Client
from x402.extensions.sign_in_with_x import (
    CreateSIWxClientExtensionOptions,
    SIWxPayload,
    create_siwx_client_extension,
    create_siwx_message,
    encode_siwx_header,
    sign_evm_message,
)
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.signers import EthAccountSigner

from catalog import load_catalogs
from gateway.app import create_app
from gateway.devkit.payer import Payer
from gateway.errors import GatewayConfigError
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.audit import AuditTrail, AuditWriter
from settlement.chain.client import selector
from settlement.ledger import Payment, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import decode_header_json, encode_header
from tests.conftest import PAY_TO, Devchain, RunningGateway, demo_catalog, offer_of, upstream_hits
from tests.gateway.conftest import REDIS_URL, delete_prefixed, redis_test_prefix
from tests.support.chain_actions import fresh_payer

PAYER, OTHER, FUNDER = 5, 6, 7
WEATHER = {"city": "Oslo", "units": "metric"}
WEATHER_HITS = "GET /weather"


def reaccess_catalog(tmp_path: Path, upstream: str) -> Path:
    """The demo catalog with re-access on get_weather (same request, 1h; a per-tool budget of one
    call) and on get_quote (any call of the tool, 1h)."""
    path = demo_catalog(tmp_path, upstream)
    text = path.read_text()
    text = text.replace("    path: /weather\n    price: 0.001\n",
                        "    path: /weather\n    price: 0.001\n    reaccess: {window: 1h}\n"
                        '    budgets:\n      per_payer_per_tool: {amount: "0.001", window: 1d}\n', 1)
    text = text.replace("    upstream_path: /api/v1/quote/{symbol}\n",
                        "    upstream_path: /api/v1/quote/{symbol}\n    reaccess: {window: 1h, match: tool}\n", 1)
    path.write_text(text)
    return path


def reaccess_settings(tmp_path: Path, devchain: Devchain, upstream: str, **values: Any) -> Settings:
    return Settings(catalog=[reaccess_catalog(tmp_path, upstream)], deployment_file=devchain.deployment_file,
                    database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", receipt_timeout_seconds=10, **values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(settings: Settings, port: int) -> Iterator[tuple[RunningGateway, AuditWriter]]:
    """A gateway on loopback ``port`` with ``settings``, and its audit writer."""
    catalogs, ledger = load_catalogs(settings.catalog), open_ledger(settings.database_url)
    writer = AuditWriter(AuditTrail(settings.database_url))
    try:
        with ThreadServer(create_app(settings, catalogs=catalogs, ledger=ledger, audit=writer), port=port) as server:
            yield RunningGateway(server.url, settings, ledger, catalogs), writer
    finally:
        ledger.close()


@pytest.fixture
def audited(tmp_path: Path, devchain: Devchain, upstream: str) -> Iterator[tuple[RunningGateway, AuditWriter]]:
    """A gateway whose public URL is its own (re-access needs one), with its audit writer."""
    port = free_port()
    with serving(reaccess_settings(tmp_path, devchain, upstream, public_url=f"http://127.0.0.1:{port}"), port) as served:
        yield served


def test_without_a_public_url_the_gateway_refuses_to_start(tmp_path: Path, devchain: Devchain, upstream: str) -> None:
    """The origin a sign-in is bound to would otherwise come from the client's Host header."""
    with pytest.raises(GatewayConfigError) as refused:
        create_app(reaccess_settings(tmp_path, devchain, upstream))
    assert refused.value.code == "reaccess_needs_public_url"


def sign_in_challenge(response: httpx.Response) -> dict[str, Any]:
    """The 402's sign-in-with-x extension, with its one chain picked (as the SDK client does)."""
    extension = decode_header_json(response.headers["payment-required"])["extensions"]["sign-in-with-x"]
    return {**extension["info"], **extension["supportedChains"][0]}


def signed(info: dict[str, Any], account: LocalAccount, *, signer: LocalAccount | None = None, **changes: Any) -> str:
    """A SIGN-IN-WITH-X header for ``account`` over ``info`` with ``changes``, signed by ``signer``
    (default: ``account``) with the SDK's EIP-4361 text and EIP-191 signing."""
    fields = {**info, **changes}
    message = create_siwx_message(fields, account.address)
    signature = asyncio.run(sign_evm_message(message, signer or account))
    return encode_siwx_header(SIWxPayload.model_validate({**fields, "address": account.address, "signature": signature}))


def pay(client: httpx.Client, devchain: Devchain, path: str, params: dict[str, str]) -> httpx.Response:
    offer = offer_of(client.get(path, params=params))
    payment = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource)
    paid = client.get(path, params=params, headers={"PAYMENT-SIGNATURE": encode_header(payment)})
    assert paid.status_code == 200, paid.text
    return paid


def sdk_client(devchain: Devchain, signer: Any) -> Any:
    """The official SDK's client paying with ``signer`` (exact) and signing in with it (its SIWX
    extension): given a 402 with a sign-in challenge, it signs in first and pays if refused."""
    client = x402Client()
    client.register("eip155:31337", ExactEvmScheme(signer=signer))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.token}]})
    client.register_extension(create_siwx_client_extension(CreateSIWxClientExtensionOptions(signers=[signer])))

    def call(url: str) -> httpx.Response:
        async def get() -> httpx.Response:
            async with x402HttpxClient(client, timeout=30) as http:
                response = await http.get(url, params=WEATHER)
                await response.aread()
                return response

        return asyncio.run(get())

    return call


def test_paid_once_then_the_sdk_client_signs_in_and_gets_it_again_free(
    audited: tuple[RunningGateway, AuditWriter], devchain: Devchain, upstream: str
) -> None:
    gateway, writer = audited
    payer = Account.from_key(devchain.key(PAYER))
    call = sdk_client(devchain, payer)

    # The first call: the SDK signs in, is refused (nothing paid yet), pays.
    paid = call(f"{gateway.url}/weather")
    assert paid.status_code == 200, paid.text
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.payer == payer.address and row.amount == 1000
    payee, payer_balance, hits = devchain.balance(PAY_TO), devchain.balance(payer.address), upstream_hits(upstream, WEATHER_HITS)

    # Again: the SDK signs the challenge and gets the answer that payment bought, without paying.
    again = call(f"{gateway.url}/weather")
    assert again.status_code == 200, again.text
    assert again.content == paid.content and again.headers["x402gw-reaccess"] == str(row.id)
    assert "payment-response" not in again.headers and again.headers["cache-control"] == "private, no-store"
    assert (devchain.balance(PAY_TO), devchain.balance(payer.address)) == (payee, payer_balance)
    assert upstream_hits(upstream, WEATHER_HITS) == hits  # the stored answer: the upstream is not called
    assert [(r.id, r.state) for r in gateway.ledger.all()] == [(row.id, PaymentState.SETTLED)]
    assert writer.drain(30)
    [granted] = [r for r in writer.trail.for_request(again.headers["x-request-id"]) if r.event == "reaccess_granted"]
    assert f'"paymentId":{row.id}' in granted.data and payer.address in granted.data

    # The per-tool budget (one call) is spent by the payment, not by the re-access: a paid call for
    # other arguments is refused by it, nothing charged.
    with gateway.client() as http:
        offer = offer_of(http.get("/weather", params={"city": "Rome"}))
        payment = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource)
        refused = http.get("/weather", params={"city": "Rome"}, headers={"PAYMENT-SIGNATURE": encode_header(payment)})
    assert refused.status_code == 403 and refused.json()["error"] == "budget_exceeded"
    assert devchain.balance(PAY_TO) == payee


def test_match_tool_calls_the_upstream_afresh_for_any_arguments(
    audited: tuple[RunningGateway, AuditWriter], devchain: Devchain, upstream: str
) -> None:
    gateway, _ = audited
    payer = Account.from_key(devchain.key(PAYER))
    with gateway.client() as http:
        pay(http, devchain, "/quotes/ACME", {})
        payee, hits = devchain.balance(PAY_TO), upstream_hits(upstream, "GET /api/v1/quote/ZZZ")
        first, second = (sign_in_challenge(http.get("/quotes/ZZZ")) for _ in range(2))
        assert first["nonce"] != second["nonce"]  # each 402 its own challenge: the fast path keeps none
        assert "sign-in-with-x" not in (offer_of(http.get("/reports/17")).extensions or {})  # no reaccess there
        listed = {t["function"]["name"]: t for t in http.get("/tools").json()["tools"]}  # agents can tell
        assert listed["get_quote"]["reaccess"]["match"] == "tool" and "reaccess" not in listed["get_report"]
        header = signed(first, payer)
        again = http.get("/quotes/ZZZ", headers={"SIGN-IN-WITH-X": header})
    assert again.status_code == 200 and again.json()["symbol"] == "ZZZ", again.text
    assert upstream_hits(upstream, "GET /api/v1/quote/ZZZ") == hits + 1
    assert devchain.balance(PAY_TO) == payee and len(gateway.ledger.all()) == 1


class OwnedWallet:
    """A deployed ERC-1271 wallet of the dev chain's factory, as an SDK signer: ``address`` is the
    wallet; payments and sign-ins are its owner's ECDSA signatures, which the wallet accepts."""

    def __init__(self, owner: LocalAccount, wallet: str) -> None:
        self._owner = owner
        self.address = wallet

    def sign_typed_data(self, domain: Any, types: Any, primary_type: str, message: dict[str, Any]) -> bytes:
        return EthAccountSigner(self._owner).sign_typed_data(domain, types, primary_type, message)

    def sign_message(self, message: SignableMessage) -> SignedMessage:
        return self._owner.sign_message(message)


def test_a_contract_wallet_that_paid_signs_in_through_erc1271(
    audited: tuple[RunningGateway, AuditWriter], devchain: Devchain
) -> None:
    gateway, _ = audited
    owner, factory, w3 = Account.create(), devchain.deployment.wallet_factory, devchain.w3
    assert factory is not None
    args = abi_encode(["address", "uint256"], [owner.address, secrets.randbits(64)])
    predicted = w3.eth.call({"to": Web3.to_checksum_address(factory), "data": selector("getAddress(address,uint256)") + args})
    wallet = Web3.to_checksum_address("0x" + bytes(predicted)[-20:].hex())
    deployed = w3.eth.send_transaction({"from": devchain.address(FUNDER), "to": Web3.to_checksum_address(factory),
                                        "data": selector("createAccount(address,uint256)") + args, "gas": 3_000_000})
    assert w3.eth.wait_for_transaction_receipt(deployed)["status"] == 1
    funded = w3.eth.send_transaction({"from": devchain.address(FUNDER), "to": devchain.token, "gas": 100_000,
                                      "data": selector("transfer(address,uint256)") + abi_encode(["address", "uint256"], [wallet, 5000])})
    assert w3.eth.wait_for_transaction_receipt(funded)["status"] == 1
    call = sdk_client(devchain, OwnedWallet(owner, wallet))

    paid = call(f"{gateway.url}/weather")
    assert paid.status_code == 200, paid.text
    [row] = gateway.ledger.all()
    assert row.payer == wallet and devchain.balance(wallet) == 4000
    again = call(f"{gateway.url}/weather")
    assert again.status_code == 200 and again.headers["x402gw-reaccess"] == str(row.id), again.text
    assert devchain.balance(wallet) == 4000 and len(gateway.ledger.all()) == 1


def refusal(response: httpx.Response, code: str) -> None:
    """A 402 with ``code`` that still offers payment, and a fresh sign-in challenge."""
    assert response.status_code == 402, response.text
    assert response.json()["error"] == code, response.text
    offer = offer_of(response)
    assert offer.accepts and offer.accepts[0].amount and "sign-in-with-x" in (offer.extensions or {})


def test_every_other_sign_in_is_refused_with_its_code_and_charges_nothing(
    audited: tuple[RunningGateway, AuditWriter], devchain: Devchain, upstream: str
) -> None:
    """Longer than the 60-line rule on purpose: one paid call, then each attack in turn against it,
    with the ledger, the payee's balance and the upstream's calls checked once for all of them."""
    gateway, writer = audited
    payer, other = Account.from_key(devchain.key(PAYER)), Account.from_key(devchain.key(OTHER))
    with gateway.client() as http:
        pay(http, devchain, "/weather", WEATHER)
        payee, hits = devchain.balance(PAY_TO), upstream_hits(upstream, WEATHER_HITS)

        def challenge(path: str = "/weather", params: dict[str, str] | None = None) -> dict[str, Any]:
            return sign_in_challenge(http.get(path, params=WEATHER if params is None else params))

        def attempt(header: str, path: str = "/weather", params: dict[str, str] | None = None) -> httpx.Response:
            return http.get(path, params=WEATHER if params is None else params, headers={"SIGN-IN-WITH-X": header})

        stale = (datetime.now(UTC) - timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        info = challenge()
        cases = {
            "reaccess_not_paid (other arguments)": (signed(challenge(params={"city": "Rome"}), payer), {"city": "Rome"}),
            "reaccess_not_paid (a different address)": (signed(info, other), None),
            "invalid_siwx_signature": (signed(challenge(), payer, signer=other), None),
            "invalid_siwx_domain_mismatch": (signed(challenge(), payer, domain="evil.example"), None),
            "invalid_siwx_uri_mismatch": (signed(challenge(), payer, uri="https://evil.example/weather"), None),
            "invalid_siwx_issued_at_too_old": (signed(challenge(), payer, issuedAt=stale, expirationTime=None), None),
            "invalid_siwx_chain_id": (signed(challenge(), payer, chainId="eip155:1"), None),
            "invalid_siwx_payload": ("not base64!", None),
        }
        for label, (header, params) in cases.items():
            refusal(attempt(header, params=params), label.split(" ")[0])

        # A sign-in for another site sent with that site's Host: the origin is the configured one.
        spoofed = signed(challenge(), payer, domain="evil.example", uri="http://evil.example/weather?city=Oslo&units=metric")
        refusal(http.get("/weather", params=WEATHER, headers={"SIGN-IN-WITH-X": spoofed, "Host": "evil.example"}),
                "invalid_siwx_domain_mismatch")

        # Another tool (with re-access too) than the one paid for.
        refusal(attempt(signed(challenge("/quotes/ACME", {}), payer), "/quotes/ACME", {}), "reaccess_not_paid")

        # A good sign-in works once; the same one again is a replay.
        header = signed(challenge(), payer)
        assert attempt(header).status_code == 200
        refusal(attempt(header), "invalid_siwx_nonce")

        # A payment owed back (an upfront call whose answer failed) stands on nothing.
        with gateway.ledger.engine.begin() as connection:
            connection.execute(update(Payment).values(refund_owed=1000))
        refusal(attempt(signed(challenge(), payer)), "reaccess_not_paid")
        with gateway.ledger.engine.begin() as connection:
            connection.execute(update(Payment).values(refund_owed=None))

        # After the window: the payment made two hours ago (its row's time moved back) stands on nothing.
        with gateway.ledger.engine.begin() as connection:
            connection.execute(update(Payment).values(created_at=datetime.now(UTC) - timedelta(hours=2)))
        refusal(attempt(signed(challenge(), payer)), "reaccess_window_expired")

    assert devchain.balance(PAY_TO) == payee and upstream_hits(upstream, WEATHER_HITS) == hits
    assert [r.state for r in gateway.ledger.all()] == [PaymentState.SETTLED]
    assert writer.drain(30)



def test_a_sign_in_is_good_once_across_replicas_sharing_redis_and_the_ledger(
    tmp_path: Path, devchain: Devchain, upstream: str
) -> None:
    """Two replicas behind one public URL: the payment made through one is re-accessed through the
    other, and a sign-in used on one is a replay on the other (its nonce taken in Redis)."""
    prefix = redis_test_prefix()
    public, other_port = free_port(), free_port()
    settings = reaccess_settings(tmp_path, devchain, upstream, public_url=f"http://127.0.0.1:{public}",
                                 redis_url=REDIS_URL, redis_prefix=prefix)
    payer = Account.from_key(fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 5000))
    try:
        with serving(settings, public) as (one, _), serving(settings, other_port) as (two, _), \
                httpx.Client(timeout=30) as http:
            offer = offer_of(http.get(f"{one.url}/weather", params=WEATHER))
            payment = Payer("0x" + bytes(payer.key).hex()).sign(offer.accepts[0], resource=offer.resource)
            assert http.get(f"{one.url}/weather", params=WEATHER, headers={"PAYMENT-SIGNATURE": encode_header(payment)}).status_code == 200
            payee = devchain.balance(PAY_TO)
            header = signed(sign_in_challenge(http.get(f"{two.url}/weather", params=WEATHER)), payer)
            again = http.get(f"{two.url}/weather", params=WEATHER, headers={"SIGN-IN-WITH-X": header})
            assert again.status_code == 200, again.text
            refusal(http.get(f"{one.url}/weather", params=WEATHER, headers={"SIGN-IN-WITH-X": header}), "invalid_siwx_nonce")
            assert devchain.balance(PAY_TO) == payee and len(two.ledger.all()) == 1
    finally:
        delete_prefixed(prefix)
