"""An ``exact`` payment through Permit2: its authorization parsed, hashed and encoded, offline.

``exact`` pays an ERC-20 token without EIP-3009 through Permit2 (the offer's
``extra.assetTransferMethod`` is ``"permit2"``): the payer approves Permit2 once, then signs per
payment a ``PermitWitnessTransferFrom`` with the x402 exact proxy as spender, ``permitted.amount`` =
the offer's amount, and the witness ``Witness(address to,uint256 validAfter)``. The proxy's
``settle(permit, owner, witness, signature)`` (selector 0x13cd3b53) always moves the whole permitted
amount, and only to ``witness.to``.

The payload is the x402 SDK's (``permit2Authorization`` {from, permitted {token, amount}, spender,
nonce, deadline, witness {to, validAfter}} and ``signature``); an ``upto`` payload (its witness
names a facilitator) is not one. The digest is built by hand as the upto one is
(``upto_permit``), so checking a signature costs a keccak and a recovery.

Also here, because they know both kinds: ``payment_view`` (any payload as the pipeline keys it)
and ``moved_by_permit2`` (a ledger row whose money moved through Permit2, not EIP-3009).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak
from x402.mechanisms.evm.constants import X402_EXACT_PERMIT2_PROXY_ADDRESS

from settlement.chain.addresses import checksum_address
from settlement.chain.client import selector
from settlement.errors import PaymentDecodeError
from settlement.ledger import Payment
from settlement.schemes.eip712 import recover_signer
from settlement.schemes.upto_permit import (
    PERMIT2_ADDRESS,
    SEL_ALLOWANCE,
    SEL_NONCE_BITMAP,
    exact_view,
    parse_upto,
    permit2_domain_separator,
    upto_payment,
)
from settlement.x402.digits import is_digits
from settlement.x402.wire import ExactEvmPayload, PaymentRequirements

__all__ = [
    "EXACT_PROXY_ADDRESS",
    "PERMIT2",
    "ExactPermit",
    "is_permit2_offer",
    "moved_by_permit2",
    "parse_exact_permit2",
    "payment_view",
    "permit2_payment",
    "permit2_signer",
]

EXACT_PROXY_ADDRESS = checksum_address(X402_EXACT_PERMIT2_PROXY_ADDRESS)
PERMIT2 = "permit2"  # requirements.extra.assetTransferMethod

_TOKEN_PERMISSIONS_TYPEHASH = keccak(b"TokenPermissions(address token,uint256 amount)")
_WITNESS_TYPE = b"Witness(address to,uint256 validAfter)"
_WITNESS_TYPEHASH = keccak(_WITNESS_TYPE)
_PERMIT_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    b"Witness witness)TokenPermissions(address token,uint256 amount)" + _WITNESS_TYPE
)
SEL_EXACT_SETTLE = selector("settle(((address,uint256),uint256,uint256),address,(address,uint256),bytes)")
_UINT256_MAX = 2**256 - 1


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: str) -> bytes:
    return bytes.fromhex(address[2:]).rjust(32, b"\x00")


@dataclass(frozen=True, slots=True)
class ExactPermit:
    """The signed authorization, addresses checksummed and numbers as ints."""

    payer: str
    token: str
    amount: int  # permitted.amount: what the proxy moves, all of it
    spender: str
    nonce: int
    deadline: int
    to: str
    valid_after: int
    signature: bytes

    @property
    def nonce_key(self) -> str:
        """The nonce as the ledger keys payments: 0x + 64 lower-case hex digits."""
        return "0x" + _word(self.nonce).hex()

    def digest(self, chain_id: int) -> bytes:
        witness = keccak(_WITNESS_TYPEHASH + _address_word(self.to) + _word(self.valid_after))
        permitted = keccak(_TOKEN_PERMISSIONS_TYPEHASH + _address_word(self.token) + _word(self.amount))
        struct = keccak(
            _PERMIT_TYPEHASH + permitted + _address_word(self.spender) + _word(self.nonce) + _word(self.deadline) + witness
        )
        return keccak(b"\x19\x01" + permit2_domain_separator(chain_id) + struct)

    def settle_calldata(self) -> bytes:
        return SEL_EXACT_SETTLE + abi_encode(
            ["((address,uint256),uint256,uint256)", "address", "(address,uint256)", "bytes"],
            [((self.token, self.amount), self.nonce, self.deadline), self.payer, (self.to, self.valid_after), self.signature],
        )

    def nonce_bitmap_call(self) -> bytes:
        return SEL_NONCE_BITMAP + abi_encode(["address", "uint256"], [self.payer, self.nonce >> 8])

    def nonce_used(self, bitmap: bytes) -> bool:
        return bool(int.from_bytes(bitmap[:32], "big") >> (self.nonce & 0xFF) & 1)

    def allowance_call(self) -> bytes:
        return SEL_ALLOWANCE + abi_encode(["address", "address"], [self.payer, PERMIT2_ADDRESS])

    def view(self) -> ExactEvmPayload:
        """The authorization as the pipeline keys every payment (as ``upto_permit.exact_view``):
        payer and nonce key the ledger row, the in-flight lock and a resend's lookup."""
        return ExactEvmPayload.model_validate({
            "signature": "0x" + self.signature.hex(),
            "authorization": {
                "from": self.payer, "to": self.to, "value": str(self.amount),
                "validAfter": str(self.valid_after), "validBefore": str(self.deadline), "nonce": self.nonce_key,
            },
        })


def _fields(payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    auth = payload.get("permit2Authorization")
    if not isinstance(auth, dict):
        return None
    permitted, witness = auth.get("permitted"), auth.get("witness")
    if not isinstance(permitted, dict) or not isinstance(witness, dict) or "facilitator" in witness:
        return None  # not a Permit2 authorization, or an upto one
    return auth, permitted, witness


def parse_exact_permit2(payload: dict[str, Any]) -> ExactPermit | None:
    """The payload's authorization, or None when it is not a well-formed exact Permit2 payload
    (decimal uint256 numbers, 20-byte addresses, a hex signature)."""
    fields = _fields(payload)
    if fields is None:
        return None
    auth, permitted, witness = fields
    raw_signature = payload.get("signature")
    try:
        numbers = [int(str(v), 10) for v in (permitted["amount"], auth["nonce"], auth["deadline"], witness["validAfter"])]
        addresses = [checksum_address(str(a)) for a in
                     (auth["from"], permitted["token"], auth["spender"], witness["to"])]
        signature = bytes.fromhex(raw_signature[2:]) if isinstance(raw_signature, str) and raw_signature.startswith("0x") else b""
    except (KeyError, ValueError, TypeError):
        return None
    if not signature or any(n < 0 or n > _UINT256_MAX for n in numbers):
        return None
    amount, nonce, deadline, valid_after = numbers
    payer, token, spender, to = addresses
    return ExactPermit(payer, token, amount, spender, nonce, deadline, to, valid_after, signature)


def is_permit2_offer(requirements: PaymentRequirements) -> bool:
    """An ``exact`` offer paid through Permit2 (``extra.assetTransferMethod: permit2``)."""
    return requirements.scheme == "exact" and (requirements.extra or {}).get("assetTransferMethod") == PERMIT2


def permit2_payment(requirements: PaymentRequirements, payload: dict[str, Any]) -> ExactEvmPayload:
    """A Permit2 payment's payload (upto, or exact through Permit2) as the pipeline keys it;
    ``PaymentDecodeError`` (invalid_permit2_payload_format) when it is not one."""
    if requirements.scheme != "exact":
        return upto_payment(payload)
    permit = parse_exact_permit2(payload)
    if permit is None:
        raise PaymentDecodeError("invalid exact Permit2 payload", code="invalid_permit2_payload_format")
    return permit.view()


def permit2_signer(network: str, payload: dict[str, Any]) -> str | None:
    """``from`` when the signature is its ECDSA one over this exact Permit2 authorization on
    ``network`` (offline); None otherwise (contract-wallet signatures are not taken here yet)."""
    permit = parse_exact_permit2(payload)
    if permit is None or not network.startswith("eip155:") or not is_digits(network[7:]):
        return None
    signer = recover_signer(permit.digest(int(network[7:])), permit.signature)
    return signer if signer == permit.payer else None


def payment_view(payload: dict[str, Any]) -> ExactEvmPayload:
    """Any payload the gateway takes as the pipeline keys it: an EIP-3009 one as it is, a Permit2
    one (upto, exact) as its ``view``; ``ValueError`` for anything else."""
    upto = parse_upto(payload)
    if upto is not None:
        return exact_view(upto)
    permit = parse_exact_permit2(payload)
    if permit is not None:
        return permit.view()
    return ExactEvmPayload.model_validate(payload)


def moved_by_permit2(row: Payment) -> bool:
    """Whether a ledger row's money moved through Permit2 (upto, or exact through Permit2): no
    EIP-3009 ``AuthorizationUsed``, so reconcile matches it by its own settlement transaction."""
    if '"permit2Authorization"' not in row.authorization:
        return False
    try:
        payload = json.loads(row.authorization)
    except ValueError:
        return False
    return isinstance(payload, dict) and (parse_upto(payload) is not None or parse_exact_permit2(payload) is not None)
