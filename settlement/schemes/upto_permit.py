"""An ``upto`` payment's Permit2 authorization: parsed, hashed and encoded, offline.

The payload is the x402 SDK's (``permit2Authorization`` {from, permitted {token, amount}, spender,
nonce, deadline, witness {to, facilitator, validAfter}} and ``signature``), read with the SDK's
``UptoPermit2Payload``. The digest is Permit2's EIP-712 hash of ``PermitWitnessTransferFrom`` under
the domain ("Permit2", chainId, Permit2) with the upto witness, built by hand (as the exact scheme's
is) so checking a signature costs a keccak and a recovery. ``settle_calldata`` is the x402 upto
proxy's ``settle(permit, amount, owner, witness, signature)`` (selector 0xff11e7b4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import encode as abi_encode
from eth_hash.auto import keccak
from x402.mechanisms.evm.constants import PERMIT2_ADDRESS, X402_UPTO_PERMIT2_PROXY_ADDRESS
from x402.mechanisms.evm.types import UptoPermit2Payload, is_upto_permit2_payload

from settlement.chain.addresses import checksum_address
from settlement.chain.client import selector
from settlement.errors import PaymentDecodeError
from settlement.schemes.eip712 import recover_signer
from settlement.x402.digits import is_digits
from settlement.x402.wire import ExactEvmPayload

__all__ = [
    "PERMIT2_ADDRESS",
    "UPTO_PROXY_ADDRESS",
    "UptoPermit",
    "exact_view",
    "parse_upto",
    "payment_view",
    "upto_payment",
    "upto_signer",
    "permit2_domain_separator",
]

UPTO_PROXY_ADDRESS = checksum_address(X402_UPTO_PERMIT2_PROXY_ADDRESS)

_DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,uint256 chainId,address verifyingContract)")
_TOKEN_PERMISSIONS_TYPEHASH = keccak(b"TokenPermissions(address token,uint256 amount)")
_WITNESS_TYPE = b"Witness(address to,address facilitator,uint256 validAfter)"
_WITNESS_TYPEHASH = keccak(_WITNESS_TYPE)
_PERMIT_TYPEHASH = keccak(
    b"PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,uint256 deadline,"
    b"Witness witness)TokenPermissions(address token,uint256 amount)" + _WITNESS_TYPE
)
SEL_UPTO_SETTLE = selector("settle(((address,uint256),uint256,uint256),uint256,address,(address,address,uint256),bytes)")
SEL_NONCE_BITMAP = selector("nonceBitmap(address,uint256)")
SEL_ALLOWANCE = selector("allowance(address,address)")
_UINT256_MAX = 2**256 - 1


def _word(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _address_word(address: str) -> bytes:
    return bytes.fromhex(address[2:]).rjust(32, b"\x00")


def permit2_domain_separator(chain_id: int, permit2: str = PERMIT2_ADDRESS) -> bytes:
    return keccak(_DOMAIN_TYPEHASH + keccak(b"Permit2") + _word(chain_id) + _address_word(permit2))


@dataclass(frozen=True, slots=True)
class UptoPermit:
    """The signed authorization, addresses checksummed and numbers as ints."""

    payer: str
    token: str
    maximum: int  # permitted.amount: the most the payee may ever take with it
    spender: str
    nonce: int
    deadline: int
    to: str
    facilitator: str
    valid_after: int
    signature: bytes

    @property
    def nonce_key(self) -> str:
        """The nonce as the ledger keys payments: 0x + 64 lower-case hex digits."""
        return "0x" + _word(self.nonce).hex()

    def digest(self, chain_id: int) -> bytes:
        witness = keccak(_WITNESS_TYPEHASH + _address_word(self.to) + _address_word(self.facilitator) + _word(self.valid_after))
        permitted = keccak(_TOKEN_PERMISSIONS_TYPEHASH + _address_word(self.token) + _word(self.maximum))
        struct = keccak(
            _PERMIT_TYPEHASH + permitted + _address_word(self.spender) + _word(self.nonce) + _word(self.deadline) + witness
        )
        return keccak(b"\x19\x01" + permit2_domain_separator(chain_id) + struct)

    def settle_calldata(self, amount: int) -> bytes:
        return SEL_UPTO_SETTLE + abi_encode(
            ["((address,uint256),uint256,uint256)", "uint256", "address", "(address,address,uint256)", "bytes"],
            [((self.token, self.maximum), self.nonce, self.deadline), amount, self.payer,
             (self.to, self.facilitator, self.valid_after), self.signature],
        )

    def nonce_bitmap_call(self) -> bytes:
        return SEL_NONCE_BITMAP + abi_encode(["address", "uint256"], [self.payer, self.nonce >> 8])

    def nonce_used(self, bitmap: bytes) -> bool:
        return bool(int.from_bytes(bitmap[:32], "big") >> (self.nonce & 0xFF) & 1)

    def allowance_call(self) -> bytes:
        return SEL_ALLOWANCE + abi_encode(["address", "address"], [self.payer, PERMIT2_ADDRESS])


def parse_upto(payload: dict[str, Any]) -> UptoPermit | None:
    """The payload's authorization, or None when it is not a well-formed upto Permit2 payload
    (decimal uint256 numbers, 20-byte addresses, a hex signature)."""
    if not is_upto_permit2_payload(payload):
        return None
    parsed = UptoPermit2Payload.from_dict(payload)
    auth = parsed.permit2_authorization
    try:
        numbers = [int(str(v), 10) for v in (auth.permitted.amount, auth.nonce, auth.deadline, auth.witness.valid_after)]
        addresses = [checksum_address(a) for a in
                     (auth.from_address, auth.permitted.token, auth.spender, auth.witness.to, auth.witness.facilitator)]
        signature = bytes.fromhex((parsed.signature or "")[2:]) if (parsed.signature or "").startswith("0x") else b""
    except (ValueError, TypeError):
        return None
    if not signature or any(n < 0 or n > _UINT256_MAX for n in numbers):
        return None
    maximum, nonce, deadline, valid_after = numbers
    payer, token, spender, to, facilitator = addresses
    return UptoPermit(payer, token, maximum, spender, nonce, deadline, to, facilitator, valid_after, signature)


def exact_view(permit: UptoPermit) -> ExactEvmPayload:
    """The authorization as the pipeline keys every payment: from, to, value (the maximum),
    validAfter, validBefore (the deadline), nonce (``nonce_key``), signature. Payer and nonce are
    what the ledger, the in-flight lock and a resend's lookup key on; nothing settles from it."""
    return ExactEvmPayload.model_validate({
        "signature": "0x" + permit.signature.hex(),
        "authorization": {
            "from": permit.payer, "to": permit.to, "value": str(permit.maximum),
            "validAfter": str(permit.valid_after), "validBefore": str(permit.deadline), "nonce": permit.nonce_key,
        },
    })


def payment_view(payload: dict[str, Any]) -> ExactEvmPayload:
    """An exact payload as it is, an upto one as ``exact_view``; ``ValueError`` for anything else."""
    permit = parse_upto(payload)
    if permit is not None:
        return exact_view(permit)
    return ExactEvmPayload.model_validate(payload)


def upto_payment(payload: dict[str, Any]) -> ExactEvmPayload:
    """An upto payment header's payload as the pipeline keys it (``exact_view``);
    ``PaymentDecodeError`` (invalid_permit2_payload_format) when it is not one."""
    permit = parse_upto(payload)
    if permit is None:
        raise PaymentDecodeError("invalid upto Permit2 payload", code="invalid_permit2_payload_format")
    return exact_view(permit)


def upto_signer(network: str, payload: dict[str, Any]) -> str | None:
    """``from`` when the signature is its ECDSA one over this Permit2 authorization on ``network``
    (offline); None otherwise (contract-wallet signatures are not taken on upto yet)."""
    permit = parse_upto(payload)
    if permit is None or not network.startswith("eip155:") or not is_digits(network[7:]):
        return None
    signer = recover_signer(permit.digest(int(network[7:])), permit.signature)
    return signer if signer == permit.payer else None
