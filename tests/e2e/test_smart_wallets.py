"""Smart-wallet payers on exact (issue 16 item 1), on a private anvil, with the attack suite's stack.

The official x402 SDK client pays from an EOA, a deployed ERC-1271 wallet, an undeployed ERC-6492
wallet (deployed by the gateway through the dev chain's factory at settlement) and an EIP-7702
delegated EOA; each settles once, a resend is a replay, and the ledger equals the chain
(``InvariantChecker``). Then the attacks: one field of a valid wallet payment mutated at a time,
junk and oversized signatures, a 6492 wrapper naming a factory not on the allow-list, wallets whose
``isValidSignature`` reverts or lies, and junk naming a wallet that must not spend its limits.
"""

from __future__ import annotations

import asyncio
import copy
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402AsyncTransport
from x402.mechanisms.evm.constants import ERC6492_MAGIC_VALUE
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.mechanisms.evm.signers import EthAccountSigner

from gateway.devkit.devchain import load_artifact
from settlement.chain.client import selector
from settlement.ledger import PaymentState
from settlement.schemes.wallets import MAX_WALLET_SIGNATURE_BYTES
from settlement.x402.codec import decode_header_json, encode_header
from tests.conftest import PAY_TO
from tests.support.attack_stack import Gateway, Stack, attack_stack
from tests.support.chain_actions import balance_of, set_eth, transfer
from tests.support.invariant import InvariantChecker

PRICE = 2000  # /q/{symbol}: 0.002 USDC
FUNDER = 2  # anvil account holding the test USDC that funds the wallets
SEL_CREATE_ACCOUNT = selector("createAccount(address,uint256)")
SEL_GET_ADDRESS = selector("getAddress(address,uint256)")


class WalletSigner:
    """An SDK client signer for a contract wallet: ``address`` is the wallet (authorization.from),
    the signature its owner's ECDSA over the EIP-712 digest, optionally wrapped (ERC-6492)."""

    def __init__(self, owner: LocalAccount, wallet: str, wrap: tuple[str, bytes] | None = None) -> None:
        self._owner = EthAccountSigner(owner)
        self._wallet = wallet
        self._wrap = wrap

    @property
    def address(self) -> str:
        return self._wallet

    def sign_typed_data(self, domain: Any, types: Any, primary_type: str, message: dict[str, Any]) -> bytes:
        inner = self._owner.sign_typed_data(domain, types, primary_type, message)
        if self._wrap is None:
            return inner
        factory, calldata = self._wrap
        return abi_encode(["address", "bytes", "bytes"], [factory, calldata, inner]) + ERC6492_MAGIC_VALUE


@dataclass
class Wallets:
    stack: Stack
    gateway: Gateway
    checker: InvariantChecker
    w3: Web3
    sponsor: str  # a funded key that sends the test's own transactions

    def send(self, to: str | None, data: bytes, **extra: Any) -> dict[str, Any]:
        account = Account.from_key(self.sponsor)
        tx: dict[str, Any] = {
            "from": account.address, "data": data, "nonce": self.w3.eth.get_transaction_count(account.address, "pending"),
            "gas": 3_000_000, "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**9, "chainId": 31337, **extra,
        }
        if to is not None:
            tx["to"] = Web3.to_checksum_address(to)
        receipt = dict(self.w3.eth.wait_for_transaction_receipt(
            self.w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction), timeout=30))
        assert receipt["status"] == 1, receipt
        return receipt

    def deploy(self, contract: str) -> str:
        receipt = self.send(None, bytes.fromhex(load_artifact(contract)["bytecode"][2:]))
        return Web3.to_checksum_address(receipt["contractAddress"])

    def fund(self, address: str, amount: int = 10 * PRICE) -> None:
        transfer(self.w3, self.stack.chain.token, self.stack.chain.key(FUNDER), address, amount)

    def balance(self, address: str) -> int:
        return balance_of(self.w3, self.stack.chain.token, address)

    def counterfactual(self, owner: str, salt: int, factory: str | None = None) -> tuple[str, bytes]:
        """The wallet address the factory would deploy, and the calldata that deploys it."""
        factory = factory or self.factory
        args = abi_encode(["address", "uint256"], [owner, salt])
        out = self.w3.eth.call({"to": Web3.to_checksum_address(factory), "data": SEL_GET_ADDRESS + args})
        return Web3.to_checksum_address("0x" + bytes(out)[-20:].hex()), SEL_CREATE_ACCOUNT + args

    @property
    def factory(self) -> str:
        factory = self.stack.chain.deployment.wallet_factory
        assert factory is not None
        return factory

    def code(self, address: str) -> bytes:
        return bytes(self.w3.eth.get_code(Web3.to_checksum_address(address)))

    def deployed_wallet(self, owner: LocalAccount) -> str:
        wallet, calldata = self.counterfactual(owner.address, secrets.randbits(64))
        self.send(self.factory, calldata)
        assert self.code(wallet)
        self.fund(wallet)
        return wallet

    def header(self, signer: Any, path: str) -> dict[str, str]:
        """The PAYMENT-SIGNATURE header the official SDK client makes for this route's 402."""
        with self.gateway.client() as client:
            response = client.get(path)
        assert response.status_code == 402, response.text
        sdk = x402Client()
        sdk.register("eip155:31337", ExactEvmScheme(signer=signer))
        sdk.set_spend_controls(False)
        http = x402HTTPClient(sdk)
        required = http.get_payment_required_response(response.headers.get, response.json())
        payload = asyncio.run(sdk.create_payment_payload(required))
        return dict(http.encode_payment_signature_header(payload))


@pytest.fixture(scope="module")
def wallets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Wallets]:
    with attack_stack(tmp_path_factory.mktemp("wallets")) as stack:
        gateway = stack.gateway("memory")
        yield Wallets(stack, gateway, stack.checker(gateway), stack.chain.w3, stack.chain.key(3))


def sdk_pays(wallets: Wallets, signer: Any, path: str) -> tuple[httpx.Response, dict[str, str]]:
    """The SDK's httpx client pays ``path``; returns its answer and the payment header it sent."""
    sdk = x402Client()
    sdk.register("eip155:31337", ExactEvmScheme(signer=signer))
    sdk.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": wallets.stack.chain.token}]})

    sent: dict[str, str] = {}

    class Recording(httpx.AsyncHTTPTransport):
        """Under the SDK's payment transport: sees the paid request it sends."""

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if "payment-signature" in request.headers:
                sent["PAYMENT-SIGNATURE"] = request.headers["payment-signature"]
            return await super().handle_async_request(request)

    async def call() -> httpx.Response:
        transport = x402AsyncTransport(sdk, transport=Recording())
        async with httpx.AsyncClient(transport=transport, timeout=30) as http:
            response = await http.get(f"{wallets.gateway.url}{path}")
            await response.aread()
            return response

    response = asyncio.run(call())
    # As sent: the paid request (``response.request`` is the SDK's first, unpaid one).
    paid = httpx.Request("GET", f"{wallets.gateway.url}{path}", headers=sent)
    return httpx.Response(response.status_code, headers=response.headers, content=response.content, request=paid), sent


def pays_exactly_once(wallets: Wallets, signer: Any, payer: str, path: str) -> None:
    before = wallets.balance(payer), wallets.balance(PAY_TO)
    response, header = sdk_pays(wallets, signer, path)
    wallets.checker.record(response, f"sdk pays {path}")
    assert response.status_code == 200, response.text
    settle = x402HTTPClient(x402Client()).get_payment_settle_response(response.headers.get)
    assert settle.success is True and settle.payer == payer
    assert (wallets.balance(payer), wallets.balance(PAY_TO)) == (before[0] - PRICE, before[1] + PRICE)
    [row] = [r for r in wallets.gateway.ledger.all() if r.tx_hash == settle.transaction]
    assert row.state == PaymentState.SETTLED and row.payer == payer
    # The same signed payload again, for the same request: the stored answer, no second charge.
    with wallets.gateway.client() as client:
        again = wallets.checker.send(client, "GET", path, headers=header, label=f"resend {path}")
    assert again.status_code == 200 and again.headers.get("x402gw-replay") == "true", again.text
    assert (wallets.balance(payer), wallets.balance(PAY_TO)) == (before[0] - PRICE, before[1] + PRICE)
    wallets.checker.check()


def test_the_sdk_client_pays_from_an_eoa(wallets: Wallets) -> None:
    eoa = Account.create()
    wallets.fund(eoa.address)
    pays_exactly_once(wallets, eoa, eoa.address, "/q/EOA")


def test_the_sdk_client_pays_from_a_deployed_erc1271_wallet(wallets: Wallets) -> None:
    owner = Account.create()
    wallet = wallets.deployed_wallet(owner)
    pays_exactly_once(wallets, WalletSigner(owner, wallet), wallet, "/q/WALL")


def test_the_sdk_client_pays_from_an_undeployed_erc6492_wallet(wallets: Wallets) -> None:
    owner = Account.create()
    wallet, calldata = wallets.counterfactual(owner.address, secrets.randbits(64))
    wallets.fund(wallet)  # funds may sit at the counterfactual address before the wallet exists
    assert not wallets.code(wallet)
    pays_exactly_once(wallets, WalletSigner(owner, wallet, (wallets.factory, calldata)), wallet, "/q/CFW")
    assert wallets.code(wallet)  # deployed by the gateway, through the allow-listed factory


def test_the_sdk_client_pays_from_an_eip7702_delegated_eoa(wallets: Wallets) -> None:
    eoa = Account.create()
    delegate = wallets.stack.chain.deployment.eip7702_delegate
    assert delegate is not None
    authorization = Account.sign_authorization(
        {"chainId": 31337, "address": delegate, "nonce": wallets.w3.eth.get_transaction_count(eoa.address)}, eoa.key
    )
    # Sent by another account (the sponsor), to nowhere in particular: the delegation is what counts.
    wallets.send("0x000000000000000000000000000000000000dEaD", b"", type=4, authorizationList=[authorization])
    assert wallets.code(eoa.address) == bytes.fromhex("ef0100") + bytes.fromhex(delegate[2:])
    wallets.fund(eoa.address)
    # An EOA signature, recovered offline; the token sees code and asks the delegate (ERC-1271),
    # which accepts the account's own key: the v,r,s overload settles it.
    pays_exactly_once(wallets, eoa, eoa.address, "/q/SEVN")


# -- attacks ---------------------------------------------------------------------------------------


def wire_of(header: dict[str, str]) -> dict[str, Any]:
    return decode_header_json(header["PAYMENT-SIGNATURE"])


def refused(wallets: Wallets, path: str, wire: dict[str, Any], label: str) -> httpx.Response:
    with wallets.gateway.client() as client:
        response = wallets.checker.send(client, "GET", path, headers={"PAYMENT-SIGNATURE": encode_header(wire)},
                                        label=label)
    assert response.status_code in (400, 402, 409), (label, response.status_code, response.text)
    return response


def test_one_field_of_a_wallet_payment_mutated_at_a_time(wallets: Wallets) -> None:
    owner, other_owner = Account.create(), Account.create()
    wallet, other = wallets.deployed_wallet(owner), wallets.deployed_wallet(other_owner)
    path = "/q/MUTA"
    wallets.checker.begin()
    before = wallets.balance(wallet), wallets.balance(other), wallets.balance(PAY_TO)
    wire = wire_of(wallets.header(WalletSigner(owner, wallet), path))
    signature = wire["payload"]["signature"]
    flipped = signature[:-4] + format(int(signature[-4:-2], 16) ^ 1, "02x") + signature[-2:]
    mutations = {
        "from: another wallet": ("authorization", "from", other),
        "from: the owner's EOA": ("authorization", "from", owner.address),
        "to": ("authorization", "to", wallets.stack.chain.address(5)),
        "value": ("authorization", "value", str(PRICE + 1)),
        "validAfter": ("authorization", "validAfter", "1"),
        "validBefore": ("authorization", "validBefore", str(int(wire["payload"]["authorization"]["validBefore"]) - 1)),
        "nonce": ("authorization", "nonce", "0x" + secrets.token_hex(32)),
        "signature: one bit": ("signature", None, flipped),
        "signature: another owner's": ("signature", None, wire_of(wallets.header(WalletSigner(other_owner, wallet),
                                                                                  path))["payload"]["signature"]),
    }
    for label, (field, name, value) in mutations.items():
        mutated = copy.deepcopy(wire)
        if name is None:
            mutated["payload"][field] = value
        else:
            mutated["payload"][field][name] = value
        refused(wallets, path, mutated, label)
    assert (wallets.balance(wallet), wallets.balance(other), wallets.balance(PAY_TO)) == before
    # The unmutated payment still pays, once.
    with wallets.gateway.client() as client:
        paid = wallets.checker.send(client, "GET", path, headers={"PAYMENT-SIGNATURE": encode_header(wire)})
    assert paid.status_code == 200, paid.text
    wallets.checker.check()


def test_junk_and_oversized_signatures_naming_a_wallet_are_refused(wallets: Wallets) -> None:
    owner = Account.create()
    wallet = wallets.deployed_wallet(owner)
    wire = wire_of(wallets.header(WalletSigner(owner, wallet), "/q/JUNK"))
    # (label, junk hex, eth_calls it may cost): shaped like a wallet signature, one capped
    # isValidSignature call; empty or over the cap, none (refused offline).
    cases = (("empty", "", 0), ("7 bytes", "00" * 7, 1), ("130 bytes", secrets.token_hex(130), 1),
             ("oversized", "ab" * (MAX_WALLET_SIGNATURE_BYTES + 1), 0))
    for label, junk, calls in cases:
        before_rpc = wallets.stack.rpc.snapshot()
        mutated = copy.deepcopy(wire)
        mutated["payload"]["signature"] = "0x" + junk
        response = refused(wallets, "/q/JUNK", mutated, label)
        if response.status_code == 402:
            assert response.json()["error"] == "invalid_exact_evm_payload_signature", (label, response.text)
        assert wallets.stack.rpc.since(before_rpc)["eth_call"] <= calls, label
    wallets.checker.check()


def test_a_6492_wrapper_from_a_factory_not_allowed_costs_no_rpc_and_deploys_nothing(wallets: Wallets) -> None:
    rogue = wallets.deploy("SmartWalletFactory")  # the same code, not on the allow-list
    owner = Account.create()
    wallet, calldata = wallets.counterfactual(owner.address, 7, factory=rogue)
    wallets.fund(wallet)
    header = wallets.header(WalletSigner(owner, wallet, (rogue, calldata)), "/q/ROGU")
    before_rpc = wallets.stack.rpc.snapshot()
    response = refused(wallets, "/q/ROGU", wire_of(header), "factory not allowed")
    assert response.status_code == 402 and response.json()["error"] == "eip6492_factory_not_allowed", response.text
    assert wallets.stack.rpc.since(before_rpc)["eth_call"] == 0
    assert not wallets.code(wallet) and wallets.balance(wallet) == 10 * PRICE
    wallets.checker.check()


def test_a_wallet_whose_isvalidsignature_reverts_pays_nothing(wallets: Wallets) -> None:
    wallet = wallets.deploy("RevertingWallet")
    wallets.fund(wallet)
    owner = Account.create()
    response = refused(wallets, "/q/REVT", wire_of(wallets.header(WalletSigner(owner, wallet), "/q/REVT")), "reverts")
    assert response.json()["error"] == "invalid_exact_evm_payload_signature", response.text
    assert wallets.balance(wallet) == 10 * PRICE
    wallets.checker.check()


def test_a_lying_wallet_can_only_spend_its_own_funds_once_per_authorization(wallets: Wallets) -> None:
    liar = wallets.deploy("LyingWallet")  # isValidSignature: magic for anything
    wallets.fund(liar)
    victim = Account.create()
    wallets.fund(victim.address)
    wallets.checker.begin()
    before = wallets.balance(liar), wallets.balance(victim.address), wallets.balance(PAY_TO)
    wire = wire_of(wallets.header(WalletSigner(Account.create(), liar), "/q/LIAR"))
    wire["payload"]["signature"] = "0x" + secrets.token_hex(100)  # junk: the liar accepts it anyway
    with wallets.gateway.client() as client:
        paid = wallets.checker.send(client, "GET", "/q/LIAR", headers={"PAYMENT-SIGNATURE": encode_header(wire)})
        assert paid.status_code == 200, paid.text
        # Other junk over the same authorization, same request: the stored answer, no second charge.
        again = copy.deepcopy(wire)
        again["payload"]["signature"] = "0x" + secrets.token_hex(90)
        replay = wallets.checker.send(client, "GET", "/q/LIAR", headers={"PAYMENT-SIGNATURE": encode_header(again)})
        assert replay.status_code == 200 and replay.headers.get("x402gw-replay") == "true", replay.text
        # The same authorization on another route: its nonce is spent.
        refused(wallets, "/q2/LIAR", again, "another route")
    # Junk naming an EOA (the liar cannot vouch for anyone else): refused, nothing moves.
    stolen = copy.deepcopy(wire)
    stolen["payload"]["authorization"]["from"] = victim.address
    stolen["payload"]["authorization"]["nonce"] = "0x" + secrets.token_hex(32)
    refused(wallets, "/q/VICT", stolen, "junk naming an EOA")
    assert wallets.balance(liar) == before[0] - PRICE
    assert wallets.balance(victim.address) == before[1]
    assert wallets.balance(PAY_TO) == before[2] + PRICE
    wallets.checker.check()


def test_junk_naming_a_wallet_spends_none_of_its_limits(wallets: Wallets) -> None:
    """limited_read allows a payer 3 requests a minute: junk signatures naming a wallet are refused
    by wallet_check before payer_checks, so they cannot use up the wallet's own allowance."""
    owner = Account.create()
    wallet = wallets.deployed_wallet(owner)
    set_eth(wallets.w3, wallet)
    header = wallets.header(WalletSigner(owner, wallet), "/limited/ITEM")
    for attempt in range(3):
        junk = wire_of(header)
        junk["payload"]["signature"] = "0x" + secrets.token_hex(100)
        with wallets.gateway.client(source=f"127.0.0.{71 + attempt}") as client:
            response = wallets.checker.send(client, "GET", "/limited/ITEM",
                                            headers={"PAYMENT-SIGNATURE": encode_header(junk)})
        assert response.status_code == 402, response.text
    with wallets.gateway.client(source="127.0.0.75") as client:
        paid = wallets.checker.send(client, "GET", "/limited/ITEM", headers=header)
    assert paid.status_code == 200, paid.text
    wallets.checker.check()
