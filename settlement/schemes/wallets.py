"""Contract-wallet signatures on ``exact`` (EIP-3009): ERC-1271 wallets and ERC-6492 counterfactual ones.

An EOA's signature is recovered offline (``signatures.SignerCheck``). Any other signature is a claim
that ``authorization.from`` is a contract wallet that accepts it, which only the chain can confirm:

* ``parse`` (offline, no I/O): at most ``MAX_WALLET_SIGNATURE_BYTES``; an ERC-6492 wrapper
  (``abi.encode(factory, factoryCalldata, innerSignature) ‖ 0x6492…6492``, parsed by the x402 SDK)
  must name a factory on the allow-list (``eip6492_factory_not_allowed`` otherwise: no RPC spent).
* ``check`` (one ``eth_call``, gas-capped at ``WALLET_CHECK_GAS``): ``isValidSignature(digest,
  signature)`` on the wallet, valid iff the call succeeds and returns at least 32 bytes whose first
  word is the magic 0x1626ba7e (USDC v2.2's rule, so the token agrees at settlement). A 6492
  signature is checked by simulating the deployment: Multicall3 ``tryAggregate`` runs the factory
  call, then ``isValidSignature`` with the inner signature on the account it deployed, in the same
  ``eth_call``. Only valid verdicts are remembered (bounded), so verify and settle of one payment
  cost one call, and junk fills nothing.

What a valid verdict proves: the wallet accepts this signature over this authorization now. The
token asks the wallet again when the transfer runs, so a wallet that changes its mind (or lies:
magic for anything) can only make its own transfer fail or spend its own funds.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from x402.mechanisms.evm.constants import (
    EIP1271_MAGIC_VALUE,
    ERR_FACTORY_NOT_ALLOWED,
    MULTICALL3_ADDRESS,
)
from x402.mechanisms.evm.erc6492 import has_deployment_info, is_erc6492_signature, parse_erc6492_signature

from settlement.chain.addresses import checksum_address
from settlement.chain.authorization import Eip3009Authorization
from settlement.chain.client import BeforeSend, Receipt, RpcError, selector
from settlement.errors import ChainUnavailable
from settlement.schemes.exact_guards import is_revert

__all__ = [
    "ANY_NETWORK",
    "MAX_WALLET_SIGNATURE_BYTES",
    "MULTICALL3_ADDRESS",
    "WALLET_CHECK_GAS",
    "WalletChain",
    "WalletRefused",
    "WalletSignature",
    "WalletSignatures",
    "deploy_wallet",
]

# A wallet signature longer than this is refused unread: real ones (a passkey assertion wrapped in
# 6492 with a factory call) stay well under 2 KB, and the payment header is capped at 8 KB anyway.
MAX_WALLET_SIGNATURE_BYTES = 2048
# Gas cap of the check's eth_call: a factory deployment plus a signature check, not a CPU sink.
WALLET_CHECK_GAS = 1_500_000
# Gas of the deployment transaction an undeployed (6492) wallet's settlement sends first.
WALLET_DEPLOY_GAS = 1_000_000
VERDICT_CACHE_SIZE = 4096
# Allow-list key for factories allowed on every network.
ANY_NETWORK = "*"

SEL_IS_VALID_SIGNATURE = selector("isValidSignature(bytes32,bytes)")
SEL_TRY_AGGREGATE = selector("tryAggregate(bool,(address,bytes)[])")
_MAGIC_WORD = EIP1271_MAGIC_VALUE.ljust(32, b"\x00")

INVALID_SIGNATURE = "invalid_exact_evm_payload_signature"
UNDEPLOYED_WALLET = "invalid_exact_evm_payload_undeployed_smart_wallet"
DEPLOYMENT_FAILED = "smart_wallet_deployment_failed"


class WalletChain(Protocol):
    """What a contract-wallet check and settlement need from a chain (``JsonRpcChain`` has it)."""

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None) -> bytes: ...

    async def get_code(self, address: str) -> bytes: ...

    async def send_call(self, to: str, calldata: bytes, before_send: BeforeSend | None = None, *, gas: int = ...) -> str: ...

    async def send_transfer_with_signature_bytes(
        self, token: str, auth: Eip3009Authorization, signature: bytes, before_send: BeforeSend | None = None
    ) -> str: ...

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None: ...


class WalletRefused(Exception):
    """A signature no contract wallet check accepts; ``reason`` is the x402 code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class WalletSignature:
    """A contract wallet's signature: what ``isValidSignature`` and the token get (``inner``), and for
    ERC-6492 the factory call that deploys the wallet."""

    inner: bytes
    factory: str | None = None
    factory_calldata: bytes = b""


def is_valid_magic(result: bytes) -> bool:
    """USDC v2.2's reading of an ``isValidSignature`` answer: ≥ 32 bytes, first word the magic."""
    return len(result) >= 32 and result[:32] == _MAGIC_WORD


def is_valid_signature_call(digest: bytes, signature: bytes) -> bytes:
    return SEL_IS_VALID_SIGNATURE + abi_encode(["bytes32", "bytes"], [digest, signature])


class WalletSignatures:
    """Contract-wallet signature checks on the networks of ``chains``. ``allowed_factories``:
    per network (``ANY_NETWORK`` for all), the ERC-6492 factories allowed; none: 6492 refused."""

    def __init__(
        self, chains: Mapping[str, WalletChain], allowed_factories: Mapping[str, Collection[str]] | None = None
    ) -> None:
        self._chains = chains
        self._factories = {
            network: frozenset(address.lower() for address in addresses)
            for network, addresses in (allowed_factories or {}).items()
        }
        self._valid: OrderedDict[tuple[str, str, bytes, bytes], WalletSignature] = OrderedDict()

    def serves(self, network: str) -> bool:
        return network in self._chains

    def chain(self, network: str) -> WalletChain | None:
        return self._chains.get(network)

    def factory_allowed(self, network: str, factory: str) -> bool:
        lowered = factory.lower()
        return any(lowered in self._factories.get(key, frozenset()) for key in (network, ANY_NETWORK))

    def parse(self, network: str, signature: bytes) -> WalletSignature:
        """The offline part: length cap, the 6492 wrapper, its factory on the allow-list."""
        if not signature or len(signature) > MAX_WALLET_SIGNATURE_BYTES:
            raise WalletRefused(
                INVALID_SIGNATURE, f"a contract-wallet signature is 1 to {MAX_WALLET_SIGNATURE_BYTES} bytes"
            )
        if not is_erc6492_signature(signature):
            return WalletSignature(inner=signature)
        try:
            data = parse_erc6492_signature(signature)
        except ValueError:
            raise WalletRefused(INVALID_SIGNATURE, "the ERC-6492 wrapper does not decode") from None
        if not has_deployment_info(data):
            raise WalletRefused(INVALID_SIGNATURE, "the ERC-6492 wrapper names no factory call")
        factory = checksum_address("0x" + bytes(data.factory).hex())
        if not self.factory_allowed(network, factory):
            raise WalletRefused(
                ERR_FACTORY_NOT_ALLOWED, f"wallet factory {factory} is not on this gateway's ERC-6492 allow-list"
            )
        return WalletSignature(inner=bytes(data.inner_signature), factory=factory,
                               factory_calldata=bytes(data.factory_calldata))

    async def check(self, network: str, wallet: str, digest: bytes, signature: bytes) -> WalletSignature:
        """The parsed signature when ``wallet`` accepts it over ``digest`` (one eth_call unless a
        valid verdict is remembered); ``WalletRefused`` otherwise; ``ChainUnavailable`` when the
        chain cannot say."""
        parsed = self.parse(network, signature)
        key = (network, wallet.lower(), digest, signature)
        cached = self._valid.get(key)
        if cached is not None:
            self._valid.move_to_end(key)
            return cached
        chain = self._chains.get(network)
        if chain is None:
            raise WalletRefused(INVALID_SIGNATURE, f"contract-wallet signatures are not checked on {network}")
        if parsed.factory is None:
            valid = await self._is_valid(chain, wallet, digest, parsed.inner)
        else:
            valid = await self._is_valid_after_deploy(chain, wallet, digest, parsed)
        if not valid:
            raise WalletRefused(
                INVALID_SIGNATURE, "the signature is not an EOA signature of authorization.from, and "
                "authorization.from does not accept it (ERC-1271 isValidSignature)"
            )
        self._valid[key] = parsed
        while len(self._valid) > VERDICT_CACHE_SIZE:
            self._valid.popitem(last=False)
        return parsed

    async def _is_valid(self, chain: WalletChain, wallet: str, digest: bytes, signature: bytes) -> bool:
        try:
            result = await chain.eth_call(wallet, is_valid_signature_call(digest, signature), gas=WALLET_CHECK_GAS)
        except RpcError as exc:
            if is_revert(exc.rpc_message):
                return False  # the wallet reverted (or ran out of the capped gas): not valid
            raise
        return is_valid_magic(result)

    async def _is_valid_after_deploy(
        self, chain: WalletChain, wallet: str, digest: bytes, parsed: WalletSignature
    ) -> bool:
        """ERC-6492: the factory call, then ``isValidSignature`` on ``wallet``, in one simulated call
        (Multicall3 ``tryAggregate(false, …)``: a factory that reverts for an existing account is
        tolerated; the wallet's answer is what counts)."""
        assert parsed.factory is not None
        calls = [
            (parsed.factory, parsed.factory_calldata),
            (wallet, is_valid_signature_call(digest, parsed.inner)),
        ]
        data = SEL_TRY_AGGREGATE + abi_encode(["bool", "(address,bytes)[]"], [False, calls])
        try:
            out = await chain.eth_call(MULTICALL3_ADDRESS, data, gas=WALLET_CHECK_GAS)
        except RpcError as exc:
            if is_revert(exc.rpc_message):
                return False
            raise
        if not out:
            raise WalletRefused(UNDEPLOYED_WALLET, "ERC-6492 wallets cannot be checked here: no Multicall3 on this chain")
        try:
            (results,) = abi_decode(["(bool,bytes)[]"], out)
        except Exception:  # noqa: BLE001 - eth_abi raises several decoding errors; any is "not valid"
            return False
        if len(results) != 2:
            return False
        success, answer = results[1]
        return bool(success) and is_valid_magic(bytes(answer))


async def deploy_wallet(chain: WalletChain, wallet: str, signature: WalletSignature, receipt_timeout: float) -> None:
    """Before an ERC-6492 wallet's transfer: if ``wallet`` has no code, send its factory call (the
    settlement account pays the gas) and wait for it; ``WalletRefused`` (``smart_wallet_deployment_
    failed``) when it reverts, cannot be confirmed, or leaves no code at ``wallet``. Nothing of the
    payer's moves here, so a failure is certain: the payment fails and may be signed again."""
    if signature.factory is None or await chain.get_code(wallet):
        return
    try:
        tx_hash = await chain.send_call(signature.factory, signature.factory_calldata, gas=WALLET_DEPLOY_GAS)
        receipt = await chain.wait_for_receipt(tx_hash, receipt_timeout)
    except ChainUnavailable:
        receipt = None
    if receipt is None or receipt.status != 1 or not await chain.get_code(wallet):
        raise WalletRefused(DEPLOYMENT_FAILED, f"the wallet factory did not deploy {wallet}")
