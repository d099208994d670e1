"""``exact`` for ERC-20 tokens without EIP-3009: a Permit2 witness transfer settled through the x402
exact proxy (x402 spec ``scheme_exact_evm``, ``assetTransferMethod: permit2``; the SDK's
``mechanisms.evm.exact.permit2_utils`` is the reference for payloads, checks and reason codes).

``ExactWithPermit2`` is the ``exact`` scheme of its networks: it wraps the EIP-3009 one (``inner``)
and takes over what is paid through Permit2, so the registry keeps one ``exact`` per network.

* ``requirements``: terms with ``asset_transfer_method: permit2`` get an offer with
  ``extra.assetTransferMethod: permit2`` (and the token's name; its EIP-712 version only if it has
  one); any other terms are the inner scheme's.
* ``verify``: offline (spender = the exact proxy, token, witness.to = payTo, deadline, validAfter,
  permitted.amount = the offer's amount, the payer's ECDSA signature when it has no code), then the
  chain: the nonce unused in Permit2's bitmap, the payer's allowance of Permit2 and balance ≥ the
  amount, and the proxy's ``settle`` simulated from our settlement account.
* ``settle``: the same checks, then the proxy's ``settle`` sent with the hash written ahead
  (``before_send``) and judged by its receipt: a Transfer of exactly the amount from payer to payTo.
* ``resolve``: the ledger row's ``authorization`` is the signed payload: settled (our receipt),
  used elsewhere (nonce spent without it), reverted, pending or never sent.

``no_payment_path`` (``permit2_problems``, at start) is a tool priced in a token paid through Permit2
on a network where no Permit2 path is served; ``token_problem`` reads a token at start and says
when it lacks what its transfer method needs (EIP-3009, or plain ERC-20 ``name``/``decimals``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Set
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from x402.mechanisms.evm.constants import (
    ERR_NETWORK_MISMATCH,
    ERR_PERMIT2_ALLOWANCE_REQUIRED,
    ERR_PERMIT2_AMOUNT_MISMATCH,
    ERR_PERMIT2_DEADLINE_EXPIRED,
    ERR_PERMIT2_INSUFFICIENT_BALANCE,
    ERR_PERMIT2_INVALID_SIGNATURE,
    ERR_PERMIT2_INVALID_SPENDER,
    ERR_PERMIT2_NOT_YET_VALID,
    ERR_PERMIT2_RECIPIENT_MISMATCH,
    ERR_PERMIT2_TOKEN_MISMATCH,
    PERMIT2_DEADLINE_BUFFER,
)

from catalog import PaymentTerms, Tool
from settlement.chain.client import (
    SEL_DECIMALS,
    SEL_NAME,
    SEL_VERSION,
    BeforeSend,
    JsonRpcChain,
    RpcError,
    selector,
)
from settlement.chain.deployment import LOCAL_CHAIN_ID, Deployment, DevchainError
from settlement.errors import ChainUnavailable
from settlement.ledger import Payment
from settlement.ledger.resolve import Resolution
from settlement.schemes.base import Scheme, Supported
from settlement.schemes.eip712 import recover_signer
from settlement.schemes.exact import exact_resolvers
from settlement.schemes.exact_guards import PAYER_CODE_REVERTED, STRUCK_MESSAGE, InFlight
from settlement.schemes.exact_permit2_payload import (
    EXACT_PROXY_ADDRESS,
    PERMIT2,
    ExactPermit,
    is_permit2_offer,
    parse_exact_permit2,
)
from settlement.schemes.registry import Schemes
from settlement.schemes.upto import UptoChain, resolve_upto, send_permit2_settlement
from settlement.schemes.upto_permit import PERMIT2_ADDRESS
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

__all__ = [
    "NO_PAYMENT_PATH", "ExactWithPermit2", "permit2_problems", "permit2_requirements", "permit2_resolvers", "token_problem",
    "with_permit2",
]

EXACT = "exact"
NO_PAYMENT_PATH = "no_payment_path"
SETTLE_GAS = 200_000  # the proxy, Permit2's checks and a token transfer (~80k), with room
_SEL_AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")
# Custom errors of Permit2 and the exact proxy, as the node reports them (hex selectors), to reason codes.
_REVERTS = {
    "0x756688fe": "permit2_nonce_used",  # InvalidNonce()
    "0xcd21db4f": ERR_PERMIT2_DEADLINE_EXPIRED,  # SignatureExpired(uint256)
    "0x815e1d64": ERR_PERMIT2_INVALID_SIGNATURE,  # InvalidSigner()
    "0x8baa579f": ERR_PERMIT2_INVALID_SIGNATURE,  # InvalidSignature()
    "0xb0669cbc": ERR_PERMIT2_INVALID_SIGNATURE,  # InvalidContractSignature()
    "0x4be6321b": ERR_PERMIT2_INVALID_SIGNATURE,  # InvalidSignatureLength()
    "0x90b8ec18": "permit2_transfer_failed",  # TransferFailed(): allowance or balance
    "0x2c5211c6": "invalid_permit2_amount",  # InvalidAmount()
    "0xa65539fa": ERR_PERMIT2_NOT_YET_VALID,  # PaymentTooEarly()
}


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason)
        self.reason, self.message = reason, message


def permit2_requirements(terms: PaymentTerms, amount: int) -> PaymentRequirements:
    """An exact offer paid through Permit2: this amount of this ERC-20 to ``pay_to``. ``extra``
    says so (``assetTransferMethod``) and names the token; a token without an EIP-712 domain has
    no version to name."""
    extra: dict[str, Any] = {"name": terms.asset_name, "assetTransferMethod": PERMIT2}
    if terms.asset_version:
        extra["version"] = terms.asset_version
    return PaymentRequirements(
        scheme=EXACT, network=terms.network, amount=str(amount), asset=terms.asset, pay_to=terms.pay_to,
        max_timeout_seconds=terms.max_timeout_seconds, extra=extra,
    )


class ExactWithPermit2:
    """``exact`` on ``inner``'s networks, with the Permit2 path on the networks of ``chains`` (each
    with a settlement key, Permit2 and the exact proxy at their canonical addresses, and ``inner``
    writing the transaction hash ahead there, as this path does)."""

    name = EXACT

    def __init__(
        self, inner: Scheme, chains: Mapping[str, UptoChain], *, receipt_timeout: float = 30.0,
        clock: Callable[[], float] = time.time, in_flight: InFlight | None = None,
    ) -> None:
        self.inner = inner
        self._chains = {n: c for n, c in chains.items() if inner.writes_ahead(n)}
        self._receipt_timeout = receipt_timeout
        self._clock = clock
        self.in_flight = in_flight if in_flight is not None else InFlight()  # one balance: shared with inner's

    def serves(self, network: str) -> bool:
        return self.inner.serves(network)

    def permit2_serves(self, network: str) -> bool:
        return network in self._chains

    def requirements(self, terms: PaymentTerms, amount: int) -> PaymentRequirements:
        if terms.asset_transfer_method == PERMIT2:
            return permit2_requirements(terms, amount)
        return self.inner.requirements(terms, amount)

    def writes_ahead(self, network: str) -> bool:
        return self.inner.writes_ahead(network)

    def describe(self) -> Supported:
        return self.inner.describe()

    # ------------------------------------------------------------------------------ verify

    def _offline(self, payload: PaymentPayload, requirements: PaymentRequirements) -> ExactPermit:
        """The checks that need no chain; ``_Refused`` names the first that fails."""
        permit = parse_exact_permit2(payload.payload)
        if permit is None:
            raise _Refused("invalid_permit2_payload_format", "the payload is not an exact Permit2 authorization")
        if payload.accepted.network != requirements.network or not self.permit2_serves(requirements.network):
            raise _Refused(ERR_NETWORK_MISMATCH, f"exact through Permit2 is not settled on {payload.accepted.network}")
        now = int(self._clock())
        checks = (
            (permit.spender == EXACT_PROXY_ADDRESS, ERR_PERMIT2_INVALID_SPENDER, "the spender must be the x402 exact proxy"),
            (permit.token.lower() == requirements.asset.lower(), ERR_PERMIT2_TOKEN_MISMATCH, "another token"),
            (permit.to.lower() == requirements.pay_to.lower(), ERR_PERMIT2_RECIPIENT_MISMATCH, "witness.to is not payTo"),
            (permit.amount == int(requirements.amount), ERR_PERMIT2_AMOUNT_MISMATCH, "permitted.amount is not the offer's amount"),
            (permit.deadline >= now + PERMIT2_DEADLINE_BUFFER, ERR_PERMIT2_DEADLINE_EXPIRED, "the deadline has passed"),
            (permit.valid_after <= now, ERR_PERMIT2_NOT_YET_VALID, "validAfter is in the future"),
        )
        for ok, reason, message in checks:
            if not ok:
                raise _Refused(reason, message)
        return permit

    async def _chain_checks(self, chain: UptoChain, permit: ExactPermit) -> None:
        """Signature (an account without code must have signed with ECDSA; a contract wallet's is
        left to the simulation: Permit2 asks the wallet), nonce, allowance, balance, simulation."""
        if recover_signer(permit.digest(chain.chain_id), permit.signature) != permit.payer and not await chain.get_code(permit.payer):
            raise _Refused(ERR_PERMIT2_INVALID_SIGNATURE, "the signature is not the payer's over this authorization")
        if permit.nonce_used(await chain.eth_call(PERMIT2_ADDRESS, permit.nonce_bitmap_call())):
            raise _Refused("permit2_nonce_used", "this authorization's nonce was already used")
        if int.from_bytes((await chain.eth_call(permit.token, permit.allowance_call()))[:32], "big") < permit.amount:
            raise _Refused(ERR_PERMIT2_ALLOWANCE_REQUIRED, "the payer has not approved Permit2 for this amount")
        if await chain.balance_of(permit.token, permit.payer) < permit.amount:
            raise _Refused(ERR_PERMIT2_INSUFFICIENT_BALANCE, "the payer's balance is below the amount")
        try:
            await chain.eth_call(EXACT_PROXY_ADDRESS, permit.settle_calldata(), gas=SETTLE_GAS, sender=chain.settlement_address)
        except RpcError as exc:
            raise _Refused(_revert_reason(exc.rpc_message), "the settlement would revert") from None

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        if not is_permit2_offer(requirements):
            return await self.inner.verify(payload, requirements)
        payer = str((payload.payload.get("permit2Authorization") or {}).get("from") or "")
        try:
            permit = self._offline(payload, requirements)
            payer = permit.payer
            if await self.in_flight.struck(requirements.network, payer):
                raise _Refused(PAYER_CODE_REVERTED, STRUCK_MESSAGE)
            await self._chain_checks(self._chains[requirements.network], permit)
        except _Refused as refused:
            return VerifyResponse(is_valid=False, invalid_reason=refused.reason, invalid_message=refused.message, payer=payer)
        return VerifyResponse(is_valid=True, payer=payer)

    # ------------------------------------------------------------------------------ settle

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        if not is_permit2_offer(requirements):
            return await self.inner.settle(payload, requirements, before_send=before_send)
        network = requirements.network
        try:
            permit = self._offline(payload, requirements)
            chain = self._chains[network]
            await self._chain_checks(chain, permit)
        except _Refused as refused:
            return SettleResponse(success=False, error_reason=refused.reason, error_message=refused.message, network=network)
        return await send_permit2_settlement(
            chain, EXACT_PROXY_ADDRESS, permit.settle_calldata(), before_send,
            transfer=(permit.token, permit.payer, permit.to, permit.amount), network=network,
            receipt_timeout=self._receipt_timeout, revert_reason=_revert_reason, reverted="permit2_settlement_reverted",
            permit=permit, in_flight=self.in_flight,
        )

    # ------------------------------------------------------------------------------ resolve

    async def resolve(self, row: Payment) -> Resolution | None:
        try:
            payload = json.loads(row.authorization)
        except ValueError:
            payload = None
        permit = parse_exact_permit2(payload) if isinstance(payload, dict) else None
        if permit is None:
            return await self.inner.resolve(row)
        chain = self._chains.get(row.network)
        settle_call = (EXACT_PROXY_ADDRESS, permit.settle_calldata())  # a copy of it settles this payment too
        return None if chain is None else await resolve_upto(row, permit, chain, self._clock, settle_call)


def _revert_reason(message: str) -> str:
    lowered = message.lower()
    return next((code for sel, code in _REVERTS.items() if sel in lowered), "permit2_settlement_would_revert")


# ---------------------------------------------------------------------------------- start-up


def permit2_problems(schemes: Schemes, tools: Iterable[Tool]) -> list[str]:
    """Tools priced in a token paid through Permit2 (``asset_transfer_method: permit2``) on a network
    where this gateway serves no Permit2 path (Permit2 and the x402 exact proxy, settled by its own
    key): one line per (token, network), for ``no_payment_path``."""
    missing: set[tuple[str, str]] = set()
    for terms in (offer.terms for tool in tools for offer in tool.offers):
        if terms.scheme != EXACT or terms.asset_transfer_method != PERMIT2:
            continue
        scheme = schemes.get(EXACT, terms.network)
        if not (isinstance(scheme, ExactWithPermit2) and scheme.permit2_serves(terms.network)):
            missing.add((terms.asset, terms.network))
    return [f"token {asset} on {network} has no EIP-3009 (the catalog pays it through Permit2) and {network} has no "
            "Permit2 path here (Permit2 and the x402 exact proxy, settled by this gateway's key)"
            for asset, network in sorted(missing)]


async def token_problem(chain: UptoChain, terms: PaymentTerms, permit2_path: bool) -> tuple[str, str] | None:
    """What a token lacks for its transfer method, read from the chain at start, as (code, message):
    for EIP-3009 (exact's default), ``authorizationState`` must answer; a token with an EIP-712
    version declared must have the catalog's name, version and decimals
    (a wrong domain makes every signature fail on chain); for Permit2, an ERC-20's ``name`` and
    ``decimals``. A token without EIP-3009 is paid through Permit2 or, without that path, not at
    all (``no_payment_path``). None: nothing lacking."""
    where = f"asset {terms.asset} on {terms.network}"
    try:
        if terms.asset_transfer_method == PERMIT2 or terms.asset_version is None:
            return await _erc20_problem(chain, terms, where)
        # Only exact moves the token by EIP-3009 (upto always goes through Permit2).
        needs_3009 = terms.scheme == EXACT
        answer = await chain.eth_call(terms.asset, _SEL_AUTHORIZATION_STATE + bytes(64)) if needs_3009 else bytes(32)
    except RpcError:
        answer = b""  # reverted: no such function
    except ChainUnavailable as exc:
        return "chain_unreachable", f"chain RPC for {terms.network} is not reachable: {exc.message}"
    if len(answer) < 32 and permit2_path:
        return "asset_not_eip3009", (f"{where} has no EIP-3009 (authorizationState); set asset_transfer_method: "
                                     "permit2 in its payment terms to take it through Permit2")
    if len(answer) < 32:
        return NO_PAYMENT_PATH, (f"{where} has no EIP-3009 (authorizationState) and {terms.network} has no Permit2 "
                                 "path here (Permit2 and the x402 exact proxy): it cannot be paid in x402 exact")
    try:
        name = str(abi_decode(["string"], await chain.eth_call(terms.asset, SEL_NAME))[0])
        version = str(abi_decode(["string"], await chain.eth_call(terms.asset, SEL_VERSION))[0])
        decimals = int.from_bytes((await chain.eth_call(terms.asset, SEL_DECIMALS))[:32], "big")
    except (ChainUnavailable, DecodingError):
        return "asset_not_eip3009", (f"{where} does not answer name()/version()/decimals(); is it an EIP-3009 token, "
                                     "and is the dev chain the one in the deployment file?")
    if (name, version, decimals) != (terms.asset_name, terms.asset_version, terms.decimals):
        return "asset_mismatch", (f"{where} is ({name!r}, {version!r}, {decimals} decimals) but the catalog says "
                                  f"({terms.asset_name!r}, {terms.asset_version!r}, {terms.decimals})")
    return None


async def _erc20_problem(chain: UptoChain, terms: PaymentTerms, where: str) -> tuple[str, str] | None:
    try:
        raw = await chain.eth_call(terms.asset, SEL_DECIMALS)
        abi_decode(["string"], await chain.eth_call(terms.asset, SEL_NAME))
    except (RpcError, ValueError, OverflowError, DecodingError):
        raw = b""
    if len(raw) < 32:
        return "asset_not_erc20", f"{where} does not answer name()/decimals(): is it an ERC-20 token?"
    decimals = int.from_bytes(raw[:32], "big")
    if decimals != terms.decimals:
        return "asset_mismatch", f"{where} has {decimals} decimals but the catalog says {terms.decimals}"
    return None


def with_permit2(
    inner: Scheme, chains: Mapping[str, UptoChain], deployment_file: str | os.PathLike[str], *, receipt_timeout: float = 30.0,
    in_flight: InFlight | None = None,
) -> Scheme:
    """``inner`` (exact by EIP-3009) with the Permit2 path on the chains that have its contracts:
    today the local dev chain whose deployment file lists the exact proxy (``x402gw devchain``
    places Permit2 and the proxy at their canonical addresses). ``inner`` itself when none has."""
    try:
        has_contracts = Deployment.read(deployment_file).exact_proxy is not None
    except (DevchainError, UnicodeDecodeError):
        has_contracts = False
    served = {n: c for n, c in chains.items() if has_contracts and c.chain_id == LOCAL_CHAIN_ID}
    return ExactWithPermit2(inner, served, receipt_timeout=receipt_timeout, in_flight=in_flight) if served else inner


def permit2_resolvers(chains: Mapping[str, JsonRpcChain], write_ahead: Set[str]) -> list[Scheme]:
    """``exact_resolvers`` (for ``x402gw reconcile``), with the rows paid through Permit2 resolved on
    the write-ahead networks (this gateway settled them itself, hash written ahead)."""
    first, *rest = exact_resolvers(chains, write_ahead)
    return [ExactWithPermit2(first, {n: c for n, c in chains.items() if n in write_ahead}), *rest]
