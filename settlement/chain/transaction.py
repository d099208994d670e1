"""EIP-1559 (type 2) transactions of the settlement account, encoded and signed without eth_account.

eth_account's ``sign_transaction`` validates and normalises a dict through several layers and costs
≈3.5 ms here; a settlement transaction always has the same shape (no access list, value 0), so its
RLP is built directly and its keccak signed with coincurve: ≈0.1 ms. ``tests/settlement/
test_transaction.py`` checks the bytes against eth_account's.
"""

from __future__ import annotations

from dataclasses import dataclass

from coincurve import PrivateKey
from eth_hash.auto import keccak

TYPE_2 = b"\x02"

RlpItem = bytes | int | list["RlpItem"]


def _length_prefix(length: int, offset: int) -> bytes:
    if length < 56:
        return bytes((offset + length,))
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((offset + 55 + len(encoded),)) + encoded


def rlp_encode(item: RlpItem) -> bytes:
    """RLP of bytes, non-negative ints (big-endian, no leading zeros) and lists of those."""
    if isinstance(item, list):
        body = b"".join(rlp_encode(x) for x in item)
        return _length_prefix(len(body), 0xC0) + body
    if isinstance(item, int):
        if item < 0:
            raise ValueError("RLP integers are non-negative")
        item = item.to_bytes((item.bit_length() + 7) // 8, "big")
    if len(item) == 1 and item[0] < 0x80:
        return item
    return _length_prefix(len(item), 0x80) + item


@dataclass(frozen=True, slots=True)
class SignedTransaction:
    raw: bytes  # the type-2 envelope, as sent with eth_sendRawTransaction
    hash: bytes  # keccak of ``raw``: the hash the node reports


class TransactionSigner:
    """Signs type-2 transactions with one private key."""

    def __init__(self, private_key: str | bytes) -> None:
        key = bytes.fromhex(private_key[2:] if private_key.startswith("0x") else private_key) if isinstance(
            private_key, str
        ) else private_key
        self._key = PrivateKey(key)

    def sign_digest(self, digest: bytes) -> bytes:
        """r ‖ s ‖ v (v = 27 or 28, low s) over a 32-byte digest, as ecrecover takes it."""
        signature = self._key.sign_recoverable(digest, hasher=None)
        return signature[:64] + bytes([signature[64] + 27])

    def sign(
        self,
        *,
        chain_id: int,
        nonce: int,
        to: str,
        data: bytes,
        gas: int,
        max_fee_per_gas: int,
        max_priority_fee_per_gas: int,
        value: int = 0,
    ) -> SignedTransaction:
        recipient = bytes.fromhex(to[2:])
        if len(recipient) != 20:
            raise ValueError(f"not an address: {to!r}")
        fields: list[RlpItem] = [
            chain_id,
            nonce,
            max_priority_fee_per_gas,
            max_fee_per_gas,
            gas,
            recipient,
            value,
            data,
            [],  # access list
        ]
        signature = self._key.sign_recoverable(keccak(TYPE_2 + rlp_encode(fields)), hasher=None)
        r, s, y_parity = signature[:32], signature[32:64], signature[64]
        # r and s are RLP integers: no leading zero bytes.
        raw = TYPE_2 + rlp_encode([*fields, y_parity, int.from_bytes(r, "big"), int.from_bytes(s, "big")])
        return SignedTransaction(raw=raw, hash=keccak(raw))
