"""Retries and error answers of an upstream call: when and how long to wait, and the common error
model ``{"error", "message", "retryable", "upstreamStatus"}`` the agent gets for a failed call."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

from catalog.bridge import RetryPolicy
from gateway.headers import CONTENT_TYPE, RETRY_AFTER, lower
from gateway.upstream.credentials import Credentials
from gateway.upstream.documents import dumps
from gateway.upstream.transport import UpstreamResponse

__all__ = [
    "IDEMPOTENT_METHODS",
    "RETRYABLE_STATUS",
    "backoff_seconds",
    "error_response",
    "retry_after_seconds",
    "upstream_message",
]

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_MESSAGE_LIMIT = 300
MAX_RETRY_AFTER_SECONDS = 365 * 86_400.0


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """An upstream's ``Retry-After`` in seconds (delta-seconds or an HTTP-date), at most a year; None
    when it is absent or not one of those (an upstream's header is not trusted to be well formed)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() says yes to "²" too
        return min(float(value), MAX_RETRY_AFTER_SECONDS)  # 400 digits: inf, capped
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max(0.0, (when - (now or datetime.now(UTC))).total_seconds()), MAX_RETRY_AFTER_SECONDS)


def backoff_seconds(policy: RetryPolicy, retry: int, draw: Callable[[], float]) -> float:
    """Exponential with "equal jitter": half the step is fixed, half random, so retries of many
    requests do not arrive together yet never come back at once."""
    step = float(min(policy.max_backoff_seconds, policy.backoff_seconds * (2 ** (retry - 1))))
    return step / 2 + draw() * step / 2


def upstream_message(body: bytes, credentials: Credentials) -> tuple[str | None, str | None]:
    """(code, message) the upstream gave in a JSON error body, if any; redacted and cut short."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None
    code = message = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
        elif isinstance(error, str):
            code = error
        message = message or data.get("message") or data.get("detail")

    def clean(value: Any) -> str | None:
        return credentials.redact(str(value))[:_MESSAGE_LIMIT] if isinstance(value, (str, int)) else None

    return clean(code), clean(message)


def error_response(
    code: str, message: str, status: int, *, retryable: bool, upstream_status: int | None,
    retry_after: float | None = None, **fields: Any,
) -> UpstreamResponse:
    body: dict[str, Any] = {"error": code, "message": message, "retryable": retryable, "upstreamStatus": upstream_status}
    headers = [(lower(CONTENT_TYPE), "application/json")]
    if retry_after is not None:
        body["retryAfter"] = int(retry_after + 0.999)
        headers.append((lower(RETRY_AFTER), str(body["retryAfter"])))
    body.update({k: v for k, v in fields.items() if v is not None})
    return UpstreamResponse(status, headers, dumps(body))
