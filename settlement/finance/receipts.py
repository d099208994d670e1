"""Signed receipts: a settled payment's facts, signed by the gateway's receipt key (EIP-712).

The shape follows the x402 offer-receipt extension (``{"format": "eip712", "payload", "signature"}``,
domain ``{name, version: "1", chainId}`` with the chain id from ``payload.network``) and keeps its
field names (``network``, ``resourceUrl``, ``payer``, ``issuedAt``, ``transaction``); it adds what a
dispute needs (who was paid, what, how much, for which call), so its type is this gateway's own:
domain name ``x402gw receipt``, primary type ``Receipt`` as in ``RECEIPT_TYPES`` (normative, never
sent). A receipt is derived from the ledger row and the key alone (ECDSA signatures here are
deterministic, RFC 6979): the same row gives the same bytes today and next year, so nothing is
stored. ``issuedAt`` is the payment's ``created_at`` (when the gateway accepted it), not the time
the receipt was signed.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from typing import Any

from coincurve import PrivateKey
from eth_abi.exceptions import EncodingError
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_hash.auto import keccak
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from settlement.errors import SettlementError
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.x402.digits import is_digits

__all__ = [
    "RECEIPT_DOMAIN_NAME",
    "RECEIPT_DOMAIN_VERSION",
    "RECEIPT_FORMAT",
    "RECEIPT_TYPES",
    "ReceiptInvalid",
    "ReceiptSigner",
    "receipt_payload",
    "recover_receipt_signer",
    "settled_payments",
]

RECEIPT_FORMAT = "eip712"
RECEIPT_DOMAIN_NAME = "x402gw receipt"
RECEIPT_DOMAIN_VERSION = "1"
# Normative: a change here is a new domain version, or every receipt already given out stops verifying.
RECEIPT_TYPES: dict[str, list[dict[str, str]]] = {
    "Receipt": [
        {"name": "network", "type": "string"},
        {"name": "resourceUrl", "type": "string"},
        {"name": "payer", "type": "address"},
        {"name": "issuedAt", "type": "uint256"},
        {"name": "transaction", "type": "string"},
        {"name": "blockNumber", "type": "uint256"},
        {"name": "payTo", "type": "address"},
        {"name": "asset", "type": "address"},
        {"name": "amount", "type": "uint256"},
        {"name": "maxAmount", "type": "uint256"},
        {"name": "tool", "type": "string"},
        {"name": "method", "type": "string"},
        {"name": "argumentsDigest", "type": "string"},
        {"name": "paymentId", "type": "uint256"},
        {"name": "requestId", "type": "string"},
    ],
}
_FIELDS = tuple(item["name"] for item in RECEIPT_TYPES["Receipt"])
_UINTS = frozenset(item["name"] for item in RECEIPT_TYPES["Receipt"] if item["type"] == "uint256")


class ReceiptInvalid(SettlementError):
    """A receipt that is malformed or whose signature does not hold."""

    code = "receipt_invalid"


def _chain_id(network: Any) -> int:
    if not isinstance(network, str) or not network.startswith("eip155:") or not is_digits(network[7:]):
        raise ReceiptInvalid(f"network must be eip155:<chainId>, not {network!r}")
    return int(network[7:])


def receipt_payload(payment: Payment, public_url: str | None = None) -> dict[str, Any]:
    """The signed fields of a settled payment's receipt (camelCase, amounts as decimal strings on
    the wire as in x402; uint256 fields as JSON numbers)."""
    if payment.state != PaymentState.SETTLED or not payment.tx_hash:
        raise ReceiptInvalid(f"payment {payment.id} is {payment.state}: only a settled payment has a receipt")
    created = payment.created_at if payment.created_at.tzinfo else payment.created_at.replace(tzinfo=UTC)
    signed = json.loads(payment.authorization)
    authorization = signed.get("authorization") or {}
    permitted = (signed.get("permit2Authorization") or {}).get("permitted") or {}  # upto: the signed maximum
    if "value" not in authorization and is_digits(str(permitted.get("amount", ""))):
        authorization = {"value": permitted["amount"]}
    return {
        "network": payment.network,
        "resourceUrl": f"{public_url.rstrip('/')}{payment.path}" if public_url else payment.path,
        "payer": payment.payer,
        "issuedAt": int(created.timestamp()),
        "transaction": payment.tx_hash,
        "blockNumber": payment.block_number or 0,
        "payTo": payment.pay_to,
        "asset": payment.asset,
        "amount": str(payment.amount),
        "maxAmount": str(authorization.get("value", payment.amount)),
        "tool": payment.tool,
        "method": payment.method,
        "argumentsDigest": payment.fingerprint or "",
        "paymentId": payment.id,
        "requestId": payment.request_id,
    }


def _typed_fields(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload's fields as the types want them; ``ReceiptInvalid`` for a field missing, extra or
    of the wrong kind."""
    if not isinstance(payload, Mapping) or set(payload) != set(_FIELDS):
        raise ReceiptInvalid(f"a receipt payload has exactly these fields: {', '.join(_FIELDS)}")
    message: dict[str, Any] = {}
    for name in _FIELDS:
        value = payload[name]
        if name in _UINTS:
            if name in ("amount", "maxAmount") and is_digits(value):
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ReceiptInvalid(f"{name} must be an unsigned integer")
        elif not isinstance(value, str):
            raise ReceiptInvalid(f"{name} must be a string")
        message[name] = value
    return message


def _typed(payload: Mapping[str, Any]) -> Any:
    """The payload as eth-account's signable message (the reference ``receipt_digest`` is held to)."""
    message = _typed_fields(payload)
    domain = {"name": RECEIPT_DOMAIN_NAME, "version": RECEIPT_DOMAIN_VERSION, "chainId": _chain_id(payload["network"])}
    try:
        return encode_typed_data(domain_data=domain, message_types=RECEIPT_TYPES, message_data=message)
    except (ValueError, TypeError, EncodingError) as exc:  # a malformed address, an integer out of range
        raise ReceiptInvalid(f"the receipt payload cannot be encoded: {type(exc).__name__}") from None


_RECEIPT_TYPE = "Receipt(" + ",".join(f"{f['type']} {f['name']}" for f in RECEIPT_TYPES["Receipt"]) + ")"
_RECEIPT_TYPEHASH = keccak(_RECEIPT_TYPE.encode())
_DOMAIN_TYPEHASH = keccak(b"EIP712Domain(string name,string version,uint256 chainId)")
_KINDS = tuple(item["type"] for item in RECEIPT_TYPES["Receipt"])
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


@functools.lru_cache(maxsize=64)
def _domain_separator(chain_id: int) -> bytes:
    return keccak(_DOMAIN_TYPEHASH + keccak(RECEIPT_DOMAIN_NAME.encode()) + keccak(RECEIPT_DOMAIN_VERSION.encode())
                  + chain_id.to_bytes(32, "big"))


def receipt_digest(payload: Mapping[str, Any]) -> bytes:
    """The EIP-712 digest of a receipt payload, written out for ``RECEIPT_TYPES`` (what eth-account's
    ``encode_typed_data`` hashes, a test holds them equal) at a tenth of its cost: a receipt is
    signed on every paid answer. ``ReceiptInvalid`` for what ``_typed`` refuses."""
    _typed_fields(payload)
    words = [_RECEIPT_TYPEHASH]
    for name, kind in zip(_FIELDS, _KINDS, strict=True):
        value = payload[name]
        if kind == "string":
            words.append(keccak(value.encode("utf-8")))
        elif kind == "address":
            if not _ADDRESS.fullmatch(value):
                raise ReceiptInvalid(f"the receipt payload cannot be encoded: {name} is not an address")
            words.append(bytes.fromhex(value[2:]).rjust(32, b"\x00"))
        else:
            number = int(value)
            if number >= 2**256:
                raise ReceiptInvalid(f"the receipt payload cannot be encoded: {name} is out of range")
            words.append(number.to_bytes(32, "big"))
    return keccak(b"\x19\x01" + _domain_separator(_chain_id(payload["network"])) + keccak(b"".join(words)))


def recover_receipt_signer(receipt: Mapping[str, Any]) -> str:
    """The address that signed ``receipt`` (checksummed); ``ReceiptInvalid`` when malformed."""
    if not isinstance(receipt, Mapping) or receipt.get("format") != RECEIPT_FORMAT:
        raise ReceiptInvalid(f'a receipt is {{"format": "{RECEIPT_FORMAT}", "payload": ..., "signature": ...}}')
    signature = receipt.get("signature")
    if not isinstance(signature, str) or len(signature) != 132 or not signature.startswith("0x"):
        raise ReceiptInvalid("signature must be 0x and 65 bytes in hex")
    signable = _typed(receipt.get("payload"))  # type: ignore[arg-type]  # checked in _typed
    try:
        return str(Account.recover_message(signable, signature=signature))
    except Exception:  # noqa: BLE001 - eth-keys raises several types for a bad signature; all mean invalid
        raise ReceiptInvalid("the signature does not recover to any address") from None


@dataclass(frozen=True)
class ReceiptSigner:
    """The gateway's receipt key and what it signs with. The key never leaves the account object
    (no repr of it), and only ``address`` is published."""

    account: LocalAccount

    @classmethod
    def from_key(cls, key: str) -> ReceiptSigner:
        return cls(Account.from_key(key))

    @property
    def address(self) -> str:
        return str(self.account.address)

    def __repr__(self) -> str:
        return f"ReceiptSigner({self.address})"

    @functools.cached_property
    def _key(self) -> PrivateKey:
        return PrivateKey(bytes(self.account.key))

    def sign(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Deterministic (RFC 6979, low s): the bytes eth-account's ``sign_message`` gives."""
        signature = self._key.sign_recoverable(receipt_digest(payload), hasher=None)
        signature = signature[:64] + bytes([signature[64] + 27])
        return {"format": RECEIPT_FORMAT, "payload": dict(payload), "signature": "0x" + signature.hex()}

    def receipt(self, payment: Payment, public_url: str | None = None) -> dict[str, Any]:
        return self.sign(receipt_payload(payment, public_url))


def settled_payments(
    ledger: Ledger, *, payers: Sequence[str] = (), payment_ids: Sequence[int] = (), transaction: str | None = None,
    batch_rows: int = 1000,
) -> Iterator[Payment]:
    """Settled payments in id order, read-only and streamed (receipts are derived from these):
    only these payers (any case), ids or settlement transaction, when given."""
    query = select(Payment).where(Payment.state == PaymentState.SETTLED.value, Payment.tx_hash.is_not(None))
    if payers:
        query = query.where(func.lower(Payment.payer).in_([payer.lower() for payer in payers]))
    if payment_ids:
        query = query.where(Payment.id.in_(list(payment_ids)))
    if transaction is not None:
        query = query.where(func.lower(Payment.tx_hash) == transaction.lower())
    with Session(ledger.engine) as session:
        yield from session.scalars(query.order_by(Payment.id).execution_options(yield_per=batch_rows))
