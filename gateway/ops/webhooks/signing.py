"""The signature on every webhook delivery, and how a receiver checks it.

    X402GW-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

The receiver recomputes ``v1`` over the timestamp, a dot and the raw body bytes exactly as
received, with the endpoint's secret, compares it in constant time, and refuses a ``t`` too far
from its own clock (``verify``'s ``tolerance``, 300 s by default) so a captured delivery cannot be
replayed later. The body's ``id`` (also sent as ``X402GW-Event-Id``, which the signature does not
cover) is the idempotency key: the same event is delivered at least once, always with the same id
and body, so a receiver that has seen the signed body's id acknowledges it again and does nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import re

__all__ = ["SIGNATURE_HEADER", "sign", "signature_header", "verify"]

SIGNATURE_HEADER = "X402GW-Signature"
_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # unix seconds, ASCII digits only


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def signature_header(secret: bytes, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def verify(secret: bytes, header: str, body: bytes, now: int, tolerance: int = 300) -> bool:
    """What a receiver runs: the header's ``v1`` is this body's signature, made within ``tolerance``."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    timestamp, given = parts.get("t", ""), parts.get("v1", "")
    if not _TIMESTAMP.fullmatch(timestamp) or abs(now - int(timestamp)) > tolerance:  # not str.isdigit: "²"
        return False
    return hmac.compare_digest(sign(secret, int(timestamp), body), given)
