"""Sign-in-with-x (x402's ``sign-in-with-x`` extension, EIP-4361 on EVM): the challenge a 402 carries
for a tool with re-access, and the checks of the signed answer (header ``SIGN-IN-WITH-X``).

The x402 SDK's extension is the library for what it can do without extra packages: the payload
model and header parsing (``parse_siwx_header``), the field checks (``validate_siwx_message``:
domain, uri origin, issuedAt age, expiry, notBefore, with its stable ``invalid_siwx_*`` codes) and
the client payload schema. Its EIP-4361 text and signature check need ``signinwithethereum``, whose
pins (web3 < 8, eth-account < 0.14) conflict with ours, so ``eip4361_message`` writes the text here
(the EIP's layout, field for field: tests hold it to that package's output) and the EIP-191
signature is recovered with eth-account. A contract wallet's sign-in (ERC-1271 / ERC-6492) is
checked on chain by the caller with ``sign_in_digest``.

Fields that go into the text are checked strictly first (no line breaks, an address, version 1,
an ``eip155`` chain the challenge offered): the server writes the text from the client's fields,
so nothing may make it read differently from what the wallet showed.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from eth_account import Account
from eth_account.messages import defunct_hash_message, encode_defunct
from x402.extensions.sign_in_with_x import (
    SIGN_IN_WITH_X,
    SIWxPayload,
    SIWxValidationOptions,
    build_siwx_schema,
    parse_siwx_header,
    validate_siwx_message,
)

from gateway import codes
from settlement.chain.addresses import checksum_address

__all__ = [
    "MAX_AGE_SECONDS",
    "SIGN_IN_WITH_X",
    "SignInRefused",
    "eip4361_message",
    "origin_of",
    "parse_sign_in",
    "recover_sign_in",
    "require_resource",
    "sign_in_digest",
    "siwx_extension",
    "validate_sign_in",
]

# How long a challenge may be answered: the SDK's default for issuedAt, and the expirationTime offered.
MAX_AGE_SECONDS = 300
MAX_HEADER_CHARS = 8192
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_NONCE = re.compile(r"[A-Za-z0-9]{8,64}")  # EIP-4361: at least 8 alphanumerics
_CHAIN = re.compile(r"eip155:([1-9][0-9]{0,18})")
_SIGNATURE = re.compile(r"0x(?:[0-9a-fA-F]{2}){65,2048}")
_LINE_BREAK = re.compile(r"[\r\n\u0085\u2028\u2029]")


class SignInRefused(Exception):
    """A sign-in that does not hold: ``code`` is stable (``gateway.codes``), ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class SignIn:
    """A sign-in whose fields checked out (its signature not yet)."""

    payload: SIWxPayload
    address: str  # checksummed
    chain_id: int
    network: str  # CAIP-2, one of the challenge's


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def siwx_extension(resource_url: str, networks: Iterable[str], statement: str) -> dict[str, Any]:
    """``extensions["sign-in-with-x"]`` of a 402: a fresh nonce, now as issuedAt, bound to the
    origin of ``resource_url`` (as the SDK's server extension fills it in)."""
    now = datetime.now(UTC)
    info = {
        "domain": urlsplit(resource_url).netloc,
        "uri": resource_url,
        "version": "1",
        "statement": statement,
        "nonce": secrets.token_hex(16),
        "issuedAt": _timestamp(now),
        "expirationTime": _timestamp(now + timedelta(seconds=MAX_AGE_SECONDS)),
        "resources": [resource_url],
    }
    chains = [{"chainId": network, "type": "eip191"} for network in dict.fromkeys(networks) if _CHAIN.fullmatch(network)]
    return {SIGN_IN_WITH_X: {"info": info, "supportedChains": chains, "schema": build_siwx_schema()}}


def parse_sign_in(header: str, networks: Iterable[str]) -> SignIn:
    """The header's payload, each field that goes into the signed text checked. Raises ``SignInRefused``."""
    if len(header) > MAX_HEADER_CHARS:
        raise SignInRefused(codes.INVALID_SIWX_PAYLOAD, f"the sign-in header is longer than {MAX_HEADER_CHARS} characters")
    try:
        payload = parse_siwx_header(header.strip())
    except ValueError:
        raise SignInRefused(codes.INVALID_SIWX_PAYLOAD, "SIGN-IN-WITH-X must be base64 JSON of the signed sign-in fields") from None
    texts = [payload.domain, payload.uri, payload.version, payload.nonce, payload.issued_at, payload.statement or "",
             payload.expiration_time or "", payload.not_before or "", payload.request_id or "", *(payload.resources or [])]
    if any(_LINE_BREAK.search(text) for text in texts):
        raise SignInRefused(codes.INVALID_SIWX_PAYLOAD, "a sign-in field holds a line break")
    if payload.version != "1" or payload.type != "eip191" or not _NONCE.fullmatch(payload.nonce):
        raise SignInRefused(codes.INVALID_SIWX_PAYLOAD, "an EIP-4361 sign-in: version 1, type eip191, an alphanumeric nonce")
    if not _ADDRESS.fullmatch(payload.address) or not _SIGNATURE.fullmatch(payload.signature):
        raise SignInRefused(codes.INVALID_SIWX_PAYLOAD, "address must be 0x and 40 hex digits, signature 0x and hex")
    chain = _CHAIN.fullmatch(payload.chain_id)
    if chain is None or payload.chain_id not in set(networks):
        raise SignInRefused(codes.INVALID_SIWX_CHAIN_ID, f"chainId {payload.chain_id!r} is not one the challenge offered")
    return SignIn(payload, checksum_address(payload.address), int(chain.group(1)), payload.chain_id)


async def validate_sign_in(sign_in: SignIn, origin: str) -> None:
    """The SDK's checks: domain and uri of this gateway's ``origin``, issuedAt at most
    ``MAX_AGE_SECONDS`` old and not ahead, expirationTime and notBefore. Raises ``SignInRefused``."""
    checked = await validate_siwx_message(sign_in.payload, origin, SIWxValidationOptions(maxAge=MAX_AGE_SECONDS * 1000))
    if not checked.is_valid:
        assert checked.invalid_reason is not None
        raise SignInRefused(checked.invalid_reason, checked.invalid_message or "the sign-in does not hold")


def _resource(url: str) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """A URL as a sign-in names a resource: scheme and host (case-insensitive), the exact path,
    and the query's pairs in any order (the challenge's ``uri`` is the request's URL as it came)."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", tuple(sorted(parse_qsl(parts.query, keep_blank_values=True)))


def require_resource(sign_in: SignIn, resource_url: str) -> None:
    """The sign-in was made for this very resource: its ``uri`` is ``resource_url`` and, when it
    lists ``resources``, ``resource_url`` is among them (as the 402's challenge bound them). The
    SDK's check compares only the origin, so a sign-in made for one tool would open another.
    Raises ``SignInRefused`` (``invalid_siwx_uri_mismatch``)."""
    wanted = _resource(resource_url)
    payload = sign_in.payload
    if _resource(payload.uri) != wanted:
        raise SignInRefused(codes.INVALID_SIWX_URI_MISMATCH,
                            f"the sign-in was made for {payload.uri}, not {resource_url}: sign this request's challenge")
    if payload.resources is not None and not any(_resource(r) == wanted for r in payload.resources):
        raise SignInRefused(codes.INVALID_SIWX_URI_MISMATCH,
                            f"the sign-in's resources do not list {resource_url}: sign this request's challenge")


def eip4361_message(payload: SIWxPayload) -> str:
    """The EIP-4361 text the wallet signed, from the payload's fields (the EIP's order and layout)."""
    chain = _CHAIN.fullmatch(payload.chain_id)
    assert chain is not None  # parse_sign_in checked it
    head = f"{payload.domain} wants you to sign in with your Ethereum account:\n{payload.address}"
    head = f"{head}\n\n{payload.statement}" if payload.statement is not None else f"{head}\n"
    lines = [f"URI: {payload.uri}", f"Version: {payload.version}", f"Chain ID: {chain.group(1)}",
             f"Nonce: {payload.nonce}", f"Issued At: {payload.issued_at}"]
    if payload.expiration_time:
        lines.append(f"Expiration Time: {payload.expiration_time}")
    if payload.not_before:
        lines.append(f"Not Before: {payload.not_before}")
    if payload.request_id is not None:
        lines.append(f"Request ID: {payload.request_id}")
    if payload.resources is not None:
        lines.append("\n".join(["Resources:", *(f"- {resource}" for resource in payload.resources)]))
    return f"{head}\n\n" + "\n".join(lines)


def recover_sign_in(sign_in: SignIn) -> bool:
    """Whether the signature is the address's own EIP-191 (personal_sign) signature of the text."""
    signature = sign_in.payload.signature
    if len(signature) != 132:
        return False
    try:
        signer = Account.recover_message(encode_defunct(text=eip4361_message(sign_in.payload)), signature=signature)
    except (ValueError, TypeError):  # eth-keys' BadSignature is a ValueError: junk r, s or v
        return False
    return bool(signer.lower() == sign_in.address.lower())


def sign_in_digest(sign_in: SignIn) -> bytes:
    """The EIP-191 digest a contract wallet is asked about (``isValidSignature``)."""
    return bytes(defunct_hash_message(text=eip4361_message(sign_in.payload)))
