"""x402 wire models (protocol v2, with the v1 fields the gateway reads).

camelCase on the wire, snake_case in Python. Amounts and EIP-3009 integers stay decimal strings
here; callers convert to ``int`` where they compute.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic.alias_generators import to_camel

X402_VERSION = 2
UINT256_MAX = 2**256 - 1

_ADDRESS = re.compile(r"^0x[0-9a-fA-F]{40}$")
_BYTES32 = re.compile(r"^0x[0-9a-fA-F]{64}$")
_UINT = re.compile(r"^[0-9]{1,78}$")
_HEX = re.compile(r"^0x[0-9a-fA-F]*$")


def _address(value: str) -> str:
    if not _ADDRESS.fullmatch(value):
        raise ValueError("must be a 0x-prefixed 20-byte hex address")
    return value


def _bytes32(value: str) -> str:
    if not _BYTES32.fullmatch(value):
        raise ValueError("must be a 0x-prefixed 32-byte hex string")
    return value


def _uint256(value: str) -> str:
    if not _UINT.fullmatch(value) or int(value) > UINT256_MAX:
        raise ValueError("must be a decimal string of an unsigned 256-bit integer")
    return value


def _hex(value: str) -> str:
    if not _HEX.fullmatch(value) or len(value) % 2:
        raise ValueError("must be 0x-prefixed hex")
    return value


Address = Annotated[StrictStr, AfterValidator(_address)]
Bytes32 = Annotated[StrictStr, AfterValidator(_bytes32)]
UintString = Annotated[StrictStr, AfterValidator(_uint256)]
HexString = Annotated[StrictStr, Field(max_length=4096), AfterValidator(_hex)]
ShortStr = Annotated[StrictStr, Field(max_length=2048)]


class WireModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ResourceInfo(WireModel):
    url: ShortStr
    description: ShortStr | None = None
    mime_type: ShortStr | None = None


class PaymentRequirements(WireModel):
    scheme: ShortStr
    network: ShortStr
    amount: UintString
    asset: ShortStr
    pay_to: ShortStr
    max_timeout_seconds: StrictInt
    extra: dict[str, Any] | None = None


class PaymentRequired(WireModel):
    x402_version: StrictInt = X402_VERSION
    error: ShortStr | None = None
    resource: ResourceInfo
    accepts: list[PaymentRequirements]
    extensions: dict[str, Any] | None = None


class Authorization(WireModel):
    from_: Address = Field(alias="from")
    to: Address
    value: UintString
    valid_after: UintString
    valid_before: UintString
    nonce: Bytes32


class ExactEvmPayload(WireModel):
    signature: HexString
    authorization: Authorization


class PaymentPayload(WireModel):
    x402_version: StrictInt
    resource: ResourceInfo | None = None
    accepted: PaymentRequirements
    payload: dict[str, Any]
    extensions: dict[str, Any] | None = None


class VerifyResponse(WireModel):
    is_valid: StrictBool
    invalid_reason: ShortStr | None = None
    invalid_message: ShortStr | None = None
    payer: ShortStr | None = None


class SettleResponse(WireModel):
    success: StrictBool
    error_reason: ShortStr | None = None
    error_message: ShortStr | None = None
    payer: ShortStr | None = None
    transaction: ShortStr = ""
    network: ShortStr
    amount: ShortStr | None = None
    extra: dict[str, Any] | None = None


class PaymentPayloadV1(WireModel):
    """x402 v1 payment (the ``X-PAYMENT`` header): scheme and network at the top, no ``accepted``."""

    x402_version: StrictInt
    scheme: ShortStr
    network: ShortStr
    payload: dict[str, Any]


class PaymentRequirementsV1(WireModel):
    scheme: ShortStr
    network: ShortStr
    max_amount_required: UintString
    asset: ShortStr
    pay_to: ShortStr
    resource: ShortStr
    description: ShortStr = ""
    mime_type: ShortStr | None = None
    max_timeout_seconds: StrictInt
    extra: dict[str, Any] | None = None


class PaymentRequiredV1(WireModel):
    x402_version: StrictInt = 1
    error: ShortStr | None = None
    accepts: list[PaymentRequirementsV1]


class SettlementResponseV1(WireModel):
    success: StrictBool
    error_reason: ShortStr | None = None
    transaction: ShortStr = ""
    network: ShortStr
    payer: ShortStr = ""
