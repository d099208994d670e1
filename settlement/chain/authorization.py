"""What the chain needs to encode a ``transferWithAuthorization`` call, without importing the schemes.

``Eip3009Authorization`` is the shape of ``settlement.schemes.eip712.TransferAuthorization``; the
chain reads its fields and nothing else, so chain access stays below the schemes that use it.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Eip3009Authorization", "split_signature"]


class Eip3009Authorization(Protocol):
    """An EIP-3009 authorization with integer fields."""

    @property
    def from_(self) -> str: ...

    @property
    def to(self) -> str: ...

    @property
    def value(self) -> int: ...

    @property
    def valid_after(self) -> int: ...

    @property
    def valid_before(self) -> int: ...

    @property
    def nonce(self) -> bytes: ...


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """65-byte r‖s‖v → (v as 27/28, r, s); ValueError for anything else.

    The one rule for every 65-byte signature (settlement.schemes imports it from here)."""
    if len(signature) != 65:
        raise ValueError("signature must be 65 bytes")
    r, s, v = signature[:32], signature[32:64], signature[64]
    if v in (0, 1):
        v += 27
    if v not in (27, 28):
        raise ValueError("signature v must be 27 or 28")
    return v, r, s
