"""EIP-712 digest of an EIP-3009 ``TransferWithAuthorization`` and signer recovery with coincurve.

The domain separator depends only on the token, so callers compute it once (at catalog load) and
reuse it; per payment this costs one keccak of the struct, one of the digest, and one recovery.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from coincurve import PublicKey
from eth_hash.auto import keccak

from settlement.chain.addresses import checksum_address
from settlement.chain.authorization import split_signature  # 65-byte r‖s‖v → (v as 27/28, r, s)

DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")
TRANSFER_WITH_AUTHORIZATION_TYPEHASH = keccak(
    b"TransferWithAuthorization(address from,address to,uint256 value,"
    b"uint256 validAfter,uint256 validBefore,bytes32 nonce)"
)
# secp256k1 group order; signatures with s above half of it are malleable and refused (as USDC does).
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2


def _word_uint(value: int) -> bytes:
    return value.to_bytes(32, "big")


def _word_address(address: str) -> bytes:
    return bytes.fromhex(address[2:]).rjust(32, b"\x00")


def domain_separator(name: str, version: str, chain_id: int, verifying_contract: str) -> bytes:
    return keccak(
        DOMAIN_TYPEHASH
        + keccak(name.encode("utf-8"))
        + keccak(version.encode("utf-8"))
        + _word_uint(chain_id)
        + _word_address(verifying_contract)
    )


@dataclass(frozen=True, slots=True)
class TransferAuthorization:
    """An EIP-3009 authorization with integer fields (wire strings converted by the caller)."""

    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes

    def struct_hash(self) -> bytes:
        return keccak(
            TRANSFER_WITH_AUTHORIZATION_TYPEHASH
            + _word_address(self.from_)
            + _word_address(self.to)
            + _word_uint(self.value)
            + _word_uint(self.valid_after)
            + _word_uint(self.valid_before)
            + self.nonce
        )


def authorization_digest(domain_sep: bytes, auth: TransferAuthorization) -> bytes:
    return keccak(b"\x19\x01" + domain_sep + auth.struct_hash())


def recover_signer(digest: bytes, signature: bytes) -> str | None:
    """The checksum address that signed ``digest``, or None when the signature is malformed,
    malleable (high s) or does not recover.

    Remembered for the last few thousand (digest, signature) pairs: a pure function of its two
    inputs, and a paid call asks twice (``decode_and_bind`` to know the payer before any lookup,
    the facilitator's verify), each ask a secp256k1 recovery. A flood of junk signatures only
    evicts entries."""
    if type(digest) is not bytes or type(signature) is not bytes:
        return _recover_signer(bytes(digest), bytes(signature))
    return _recover_signer(digest, signature)


@functools.lru_cache(maxsize=4096)
def _recover_signer(digest: bytes, signature: bytes) -> str | None:
    try:
        v, r, s = split_signature(signature)
    except ValueError:
        return None
    s_int = int.from_bytes(s, "big")
    r_int = int.from_bytes(r, "big")
    if not (0 < r_int < SECP256K1_N) or not (0 < s_int <= SECP256K1_HALF_N):
        return None
    try:
        public = PublicKey.from_signature_and_message(r + s + bytes([v - 27]), digest, hasher=None)
    except Exception:  # noqa: BLE001 - coincurve raises plain Exception for points that do not recover
        return None
    address = keccak(public.format(compressed=False)[1:])[-20:]
    return checksum_address("0x" + address.hex())
