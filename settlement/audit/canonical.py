"""The canonical form of a record and its hash, and the redaction every record passes through.

    hash(n) = sha256(canonical({v, seq, at, requestId, event, payer, tool, data, prev: hash(n-1)}))

Pure functions: the store (``trail``), the verifier (``chain``) and exports all compute the same text.
"""

from __future__ import annotations

import enum
import hashlib
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "HASH_VERSION",
    "REDACTED",
    "SECRET_FIELDS",
    "canonical_json",
    "clean_fields",
    "iso_utc",
    "plain_text",
    "record_hash",
    "redact_url",
]

HASH_VERSION = 1

# Field names whose values are credentials wherever they appear: replaced, never stored.
SECRET_FIELDS = frozenset(
    {"authorization", "signature", "headers", "header", "cookie", "cookies", "password", "secret",
     "token", "apikey", "api_key", "privatekey", "private_key", "payment", "paymentsignature"}
)
REDACTED = "[redacted]"


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return iso_utc(value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# One encoder for every canonical document: ``json.dumps`` with options builds a new one per call.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_jsonable
)
# How the encoder above writes a str (ensure_ascii=False): used to write the hash document directly.
_json_string = json.encoder.encode_basestring


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def iso_utc(value: datetime) -> str:
    """Microsecond ISO-8601 in UTC; naive values (SQLite gives them back) are UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    elif value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    if value.year >= 1000:  # isoformat pads the year to 4 digits, strftime's %Y does not: same text
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_hash(
    seq: int, at: datetime | str, request_id: str, event: str, payer: str | None, tool: str | None,
    data: str, prev_hash: str,
) -> str:
    at_text = at if isinstance(at, str) else iso_utc(at)
    if (type(seq) is int and type(at_text) is str and type(request_id) is str and type(event) is str
            and type(data) is str and type(prev_hash) is str and (payer is None or type(payer) is str)
            and (tool is None or type(tool) is str)):
        # canonical_json(document) written out: keys in sorted order, the same escaping, no dict
        # to build and sort per record (this runs for every record appended and verified).
        text = (
            f'{{"at":{_json_string(at_text)},"data":{_json_string(data)},"event":{_json_string(event)},'
            f'"payer":{"null" if payer is None else _json_string(payer)},"prev":{_json_string(prev_hash)},'
            f'"requestId":{_json_string(request_id)},"seq":{int.__repr__(seq)},'
            f'"tool":{"null" if tool is None else _json_string(tool)},"v":{HASH_VERSION}}}'
        )
    else:
        text = canonical_json({
            "v": HASH_VERSION, "seq": seq, "at": at_text, "requestId": request_id,
            "event": event, "payer": payer, "tool": tool, "data": data, "prev": prev_hash,
        })
    # A lone surrogate cannot be stored (append cleans it: ``plain_text``); one read from an export
    # is hashed as its escape, so a record carrying it is named (hash_mismatch), never a crash.
    return hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()


def plain_text(value: Any) -> Any:
    """``value`` with every string (keys too, in dicts and lists) encodable as UTF-8: a lone surrogate
    (``"\\udc80"``, from a path or header decoded with ``surrogateescape``) becomes its backslash
    escape as text. Neither SQLite nor PostgreSQL stores a lone surrogate and it has no UTF-8 form to
    hash, so ``AuditTrail.append`` cleans an event with this before hashing and storing it; the record
    then holds ordinary text and verifies like any other. Used only when encoding failed: no cost
    on the hot path."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {plain_text(key): plain_text(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_text(item) for item in value]
    return value


def redact_url(url: str) -> str:
    """Scheme, host, port and path only: userinfo, query and fragment can carry credentials."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return REDACTED
    if not parts.scheme or not host:
        return url.split("?", 1)[0].split("#", 1)[0]
    netloc = f"[{host}]" if ":" in host else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# Field name → (is a secret, names a URL). Names come from the stages' code: a small vocabulary,
# classified once each (bounded, in case a caller ever passes data-derived names).
_FIELD_KINDS: dict[str, tuple[bool, bool]] = {}


def _field_kind(key: str) -> tuple[bool, bool]:
    kind = _FIELD_KINDS.get(key)
    if kind is None:
        name = key.lower().replace("-", "").replace("_", "")
        kind = (name in SECRET_FIELDS or key.lower() in SECRET_FIELDS, name.endswith("url"))
        if len(_FIELD_KINDS) < 4096:
            _FIELD_KINDS[key] = kind
    return kind


def clean_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The last line of defence: credential-named fields are redacted, URLs lose their secrets."""
    cleaned: dict[str, Any] = {}
    for key, value in fields.items():
        secret, url_named = _field_kind(key)
        if secret:
            cleaned[key] = REDACTED
        elif isinstance(value, str) and (url_named or value.startswith(("http://", "https://"))):
            cleaned[key] = redact_url(value)
        elif isinstance(value, dict):
            cleaned[key] = clean_fields(value)
        else:
            cleaned[key] = value
    return cleaned

