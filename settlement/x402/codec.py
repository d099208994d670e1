"""Header codec: standard base64 (with padding) of UTF-8 JSON, as x402 v2 headers carry it.

Decoding is defensive: every way a header can be broken maps to one ``PaymentDecodeError`` code,
so the gateway can answer 400 with a stable reason instead of a 5xx.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pydantic import ValidationError

from settlement.errors import PaymentDecodeError
from settlement.x402.wire import ExactEvmPayload, PaymentPayload, PaymentPayloadV1, WireModel

MAX_HEADER_BYTES = 8192


def encode_header(model: WireModel | dict[str, Any]) -> str:
    data = model.to_wire() if isinstance(model, WireModel) else model
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode_header_json(header: str) -> dict[str, Any]:
    """base64 → UTF-8 → JSON object, or a PaymentDecodeError naming what was wrong."""
    if len(header) > MAX_HEADER_BYTES:
        raise PaymentDecodeError(
            f"payment header is larger than {MAX_HEADER_BYTES} bytes", code="payment_header_too_large"
        )
    try:
        raw = base64.b64decode(header.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise PaymentDecodeError("payment header is not standard base64", code="payment_header_not_base64") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise PaymentDecodeError("payment header is not base64 of UTF-8 JSON", code="payment_header_not_json") from None
    if not isinstance(data, dict):
        raise PaymentDecodeError("payment header JSON must be an object", code="payment_header_not_object")
    return data


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "payload"
    return f"{where}: {first['msg']}"


def parse_payment_payload(data: dict[str, Any]) -> PaymentPayload:
    try:
        return PaymentPayload.model_validate(data)
    except ValidationError as exc:
        raise PaymentDecodeError(f"invalid payment payload ({_describe(exc)})", code="invalid_payload") from None


def parse_exact_evm(payload: PaymentPayload) -> ExactEvmPayload:
    try:
        return ExactEvmPayload.model_validate(payload.payload)
    except ValidationError as exc:
        raise PaymentDecodeError(
            f"invalid exact EVM payload ({_describe(exc)})", code="invalid_exact_evm_payload"
        ) from None


def decode_payment_header(header: str) -> PaymentPayload:
    return parse_payment_payload(decode_header_json(header))


def decode_payment_header_v1(header: str) -> PaymentPayloadV1:
    """The v1 ``X-PAYMENT`` header: same encoding, the v1 payload shape."""
    data = decode_header_json(header)
    try:
        return PaymentPayloadV1.model_validate(data)
    except ValidationError as exc:
        raise PaymentDecodeError(f"invalid v1 payment payload ({_describe(exc)})", code="invalid_payload") from None
