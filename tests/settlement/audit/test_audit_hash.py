"""The audit trail's hashes and timestamps are written without json.dumps and strftime on the hot
path; they must be the very text the chain was defined with, or every stored chain would break."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from settlement.audit import HASH_VERSION, canonical_json, clean_fields, iso_utc, record_hash


def reference_canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                      default=str)


def reference_iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def reference_hash(seq: int, at: str, request_id: str, event: str, payer: str | None, tool: str | None,
                   data: str, prev: str) -> str:
    document = {"v": HASH_VERSION, "seq": seq, "at": at, "requestId": request_id, "event": event,
                "payer": payer, "tool": tool, "data": data, "prev": prev}
    # A lone surrogate has no UTF-8 form: hashed as its backslash escape (never stored: append cleans
    # it first; one read from an export is then named, not a crash).
    return hashlib.sha256(reference_canonical(document).encode("utf-8", "backslashreplace")).hexdigest()


ALPHABET = ['a', 'Z', '0', ' ', '"', '\\', '/', '\n', '\t', '\x00', '\x1f', '\x7f', 'é', 'ß', '€', '😀', '\u2028',
            '{', '}', ':', ',']


def text(rng: random.Random, longest: int = 12) -> str:
    # now and then a lone surrogate, which both forms hash as its escape
    return "".join(rng.choice(ALPHABET) if rng.random() > 0.0005 else "\ud800" for _ in range(rng.randint(0, longest)))


def outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except Exception as exc:  # whatever fails, it fails the same way in both
        return "error", type(exc)


def test_record_hash_is_the_canonical_document_hash() -> None:
    rng = random.Random(402)
    results = []
    for _ in range(3000):
        at = iso_utc(datetime(2020, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randint(0, 10**15)))
        args = (rng.choice([0, 1, 7, 2**40, 2**70]), at if rng.random() < 0.8 else text(rng), text(rng, 40),
                text(rng), rng.choice([None, text(rng)]), rng.choice([None, text(rng)]),
                canonical_json({text(rng): text(rng), "n": rng.randint(-5, 5), "x": None}), text(rng, 64))
        result = outcome(record_hash, *args)
        assert result == outcome(reference_hash, *args)
        results.append(result[0])
    assert results.count("ok") == 3000  # lone surrogates included (the generator makes some)


def test_record_hash_of_a_datetime_and_of_odd_types_falls_back_to_the_same_document() -> None:
    at = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert record_hash(3, at, "r", "e", None, "t", "{}", "0" * 64) == reference_hash(
        3, "2024-05-06T07:08:09.123456Z", "r", "e", None, "t", "{}", "0" * 64)
    assert record_hash(True, "x", "r", "e", None, None, "{}", "p") == reference_hash(True, "x", "r", "e", None, None, "{}", "p")


def test_iso_utc_is_strftime_in_utc() -> None:
    rng = random.Random(7)
    zones = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30)), None]
    for _ in range(2000):
        value = datetime(rng.randint(1, 9998), rng.randint(1, 12), rng.randint(1, 28), rng.randint(0, 23),
                         rng.randint(0, 59), rng.randint(0, 59), rng.choice([0, rng.randint(0, 999_999)]),
                         tzinfo=rng.choice(zones))
        assert iso_utc(value) == reference_iso(value)


def test_canonical_json_and_clean_fields_are_unchanged() -> None:
    fields = {"url": "https://u:p@h.example:8443/p?q=1#f", "Authorization": "Bearer x", "api-key": "k",
              "nested": {"callbackUrl": "http://h/x?y", "ok": 1}, "text": "http://a/b?c", "n": 1.5, "none": None}
    cleaned = clean_fields(fields)
    assert cleaned == {"url": "https://h.example:8443/p", "Authorization": "[redacted]", "api-key": "[redacted]",
                       "nested": {"callbackUrl": "http://h/x", "ok": 1}, "text": "http://a/b", "n": 1.5, "none": None}
    assert canonical_json(cleaned) == reference_canonical(cleaned)
