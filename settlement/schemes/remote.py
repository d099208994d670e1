"""A facilitator reached over HTTP: any standard x402 facilitator (`/supported`, `/verify`, `/settle`).

Liberal in what it accepts: a body that parses as a verify/settle response is used whatever the
HTTP status (some facilitators answer 400 with a valid refusal). Everything else fails closed:

* verify: no usable answer raises ``FacilitatorUnavailable``; the gateway answers 503 and serves
  nothing.
* settle: money may have moved by the time settle is asked, so a broken answer is never an
  exception and never a success. It becomes ``SettleResponse(success=False)`` with one of the
  ``facilitator_*`` reasons below and any transaction hash that could be read from the body;
  ``settlement_outcome_unknown`` tells such outcomes apart from definite refusals.

Credentials (``auth``, a ``FacilitatorAuth``) are asked for fresh headers on every request (a CDP
JWT is bound to its method, host and path and lives two minutes); they are never logged, and log
lines name the facilitator by ``redact_url`` (scheme and host: paths and queries may hold keys).
A 401 or 403 is reported as refused credentials.

``settle_attempt`` tells the one failure after which a settlement provably never reached the
facilitator (the connection could not be made: ``SettleNotSent``); ``FailoverFacilitator``
(``failover.py``) moves to the next facilitator only then.

Each timeout is the whole call's deadline (connect, send, every read), not httpx's per-read
timeout a trickling facilitator could renew forever: ``settle_timeout`` is the longest a request
waits on ``/settle``, which the gateway's in-flight lock lifetime is computed from.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import httpx
from pydantic import ValidationError

from settlement.chain.rpc import redact_url
from settlement.errors import FacilitatorUnavailable
from settlement.schemes.facilitator_auth import FacilitatorAuth
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

log = logging.getLogger("x402gw.facilitator")

# Settle reasons this client produces when the facilitator's answer is unusable.
FACILITATOR_TIMEOUT = "facilitator_timeout"
FACILITATOR_UNREACHABLE = "facilitator_unreachable"
FACILITATOR_BAD_RESPONSE = "facilitator_bad_response"
FACILITATOR_ERROR_STATUS = "facilitator_error_status"
# A settle answer the chain does not bear out (yet): ``remote_confirm``.
FACILITATOR_UNCONFIRMED = "facilitator_settlement_unconfirmed"

# ``success: false`` with one of these means "nobody knows yet whether money moved": the payer
# must not be invited to pay again, and the payment must be reconciled.
UNKNOWN_OUTCOME_REASONS = frozenset(
    {
        "settlement_pending",
        "invalid_transaction_state",
        "unexpected_settle_error",
        "payment_in_flight",  # another settlement of this authorization is under way: it may land
        FACILITATOR_TIMEOUT,
        FACILITATOR_UNREACHABLE,
        FACILITATOR_BAD_RESPONSE,
        FACILITATOR_ERROR_STATUS,
        FACILITATOR_UNCONFIRMED,
    }
)

MAX_RESPONSE_BYTES = 1_048_576
_TX_HASH = re.compile(r'"transaction"\s*:\s*"(0x[0-9a-fA-F]{64})"')


class SettleNotSent(Exception):
    """The settle request never left: the connection to the facilitator could not be made
    (refused, no route, DNS, TLS handshake, connect timeout). Nothing can have been settled."""


def settlement_outcome_unknown(resp: SettleResponse) -> bool:
    """True when a failed settlement may still have moved money (or may yet move it)."""
    if resp.success:
        return False
    return resp.error_reason is None or resp.error_reason in UNKNOWN_OUTCOME_REASONS


class RemoteFacilitator:
    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        auth: FacilitatorAuth | None = None,
        connect_timeout: float = 5.0,
        verify_timeout: float = 10.0,
        settle_timeout: float = 60.0,
        supported_timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        for name, value in (("connect_timeout", connect_timeout), ("verify_timeout", verify_timeout),
                            ("settle_timeout", settle_timeout), ("supported_timeout", supported_timeout)):
            if not 0 < value < float("inf"):
                raise ValueError(f"{name} must be positive and finite")
        self.url = url.rstrip("/")
        self.label = redact_url(self.url)  # what logs and errors may show
        self._auth = auth
        # Health, for readiness and metrics: "unknown" until the first call, then "up" after a
        # usable answer, "down" after none (unreachable, timeout, unusable answer, refused credentials).
        self.health_state = "unknown"
        self.last_error: str | None = None
        # Whole-call deadlines (asyncio.timeout around each request); httpx's own timeouts, per
        # operation, stay as a second bound.
        self.verify_timeout_seconds = float(verify_timeout)
        self.settle_timeout_seconds = float(settle_timeout)
        self.supported_timeout_seconds = float(supported_timeout)
        self._verify_timeout = httpx.Timeout(verify_timeout, connect=min(connect_timeout, verify_timeout))
        self._settle_timeout = httpx.Timeout(settle_timeout, connect=min(connect_timeout, settle_timeout))
        self._supported_timeout = httpx.Timeout(supported_timeout, connect=min(connect_timeout, supported_timeout))
        # No redirects: a facilitator that redirects a POST is misconfigured, and following it
        # could replay a settle body somewhere else.
        self._client = httpx.AsyncClient(
            headers=dict(headers or {}), transport=transport, follow_redirects=False, trust_env=False
        )
        self._supported: dict[str, Any] = {"kinds": [], "extensions": [], "signers": {}}

    def supported(self) -> dict[str, Any]:
        """The last answer of ``fetch_supported`` (empty kinds before the first fetch)."""
        return self._supported

    def health(self) -> dict[str, str | None]:
        """This facilitator's state as the last call left it (no secret: the URL is redacted)."""
        return {"url": self.label, "state": self.health_state, "lastError": self.last_error}

    def _mark(self, error: str | None) -> None:
        self.health_state = "down" if error else "up"
        self.last_error = error

    def _headers(self, method: str, url: str) -> dict[str, str]:
        return self._auth.headers(method, url) if self._auth is not None else {}

    def _refused_credentials(self, status: int, path: str) -> bool:
        if status not in (401, 403):
            return False
        # The operator's problem, said plainly; what was sent is not repeated.
        log.warning(
            "facilitator %s %s answered %s: it refused this gateway's credentials "
            "(check X402GW_FACILITATOR_AUTH or CDP_API_KEY_ID / CDP_API_KEY_SECRET)", self.label, path, status,
        )
        self._mark(f"credentials_refused_{status}")
        return True

    async def fetch_supported(self) -> dict[str, Any]:
        url = f"{self.url}/supported"
        try:
            async with asyncio.timeout(self.supported_timeout_seconds):
                response = await self._client.get(url, headers=self._headers("GET", url), timeout=self._supported_timeout)
        except (httpx.HTTPError, TimeoutError) as exc:
            log.warning("facilitator %s /supported failed: %s", self.label, type(exc).__name__)
            self._mark(type(exc).__name__)
            raise FacilitatorUnavailable("the facilitator did not answer /supported") from exc
        if self._refused_credentials(response.status_code, "/supported"):
            raise FacilitatorUnavailable("the facilitator refused this gateway's credentials")
        data = _json_object(response.content)
        if response.status_code != 200 or data is None or not isinstance(data.get("kinds"), list):
            log.warning("facilitator %s /supported answered %s with an unusable body", self.label, response.status_code)
            self._mark("unusable_answer")
            raise FacilitatorUnavailable("the facilitator's /supported answer is unusable")
        self._mark(None)
        self._supported = data
        return data

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        url = f"{self.url}/verify"
        try:
            async with asyncio.timeout(self.verify_timeout_seconds):
                response = await self._client.post(
                    url, json=_body(payload, requirements), headers=self._headers("POST", url), timeout=self._verify_timeout
                )
        except (httpx.TimeoutException, TimeoutError) as exc:
            log.warning("facilitator %s /verify timed out (%s)", self.label, type(exc).__name__)
            self._mark(type(exc).__name__)
            raise FacilitatorUnavailable("the facilitator did not answer in time") from exc
        except httpx.HTTPError as exc:
            log.warning("facilitator %s /verify failed: %s", self.label, type(exc).__name__)
            self._mark(type(exc).__name__)
            raise FacilitatorUnavailable("the facilitator is unreachable") from exc
        if self._refused_credentials(response.status_code, "/verify"):
            raise FacilitatorUnavailable("the facilitator refused this gateway's credentials")
        data = _json_object(response.content)
        result: VerifyResponse | None = None
        if data is not None:
            try:
                result = VerifyResponse.model_validate(data)
            except ValidationError:
                result = None
        # A 5xx saying "valid" is a broken facilitator, not a verification.
        if result is None or (result.is_valid and response.status_code >= 500):
            log.warning("facilitator %s /verify answered %s with an unusable body", self.label, response.status_code)
            self._mark("unusable_answer")
            raise FacilitatorUnavailable("the facilitator's verify answer is unusable")
        self._mark(None)
        return result

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: Any = None
    ) -> SettleResponse:
        # ``before_send`` is the local facilitator's write-ahead hook; a remote facilitator's
        # transaction hash is only known from its answer.
        try:
            return await self.settle_attempt(payload, requirements)
        except SettleNotSent:
            # Alone, a facilitator that could not be reached is reported as before: an unknown
            # outcome (the failover, which knows more, reads ``SettleNotSent`` itself).
            return _broken(FACILITATOR_UNREACHABLE, "the facilitator could not be reached", requirements.network)

    async def settle_attempt(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        """``settle``, except that a request that provably never left raises ``SettleNotSent``.

        Only a failure to connect qualifies (httpx's ``ConnectError``/``ConnectTimeout``: no byte
        of the request was written). Anything after the connection was made (a write or read
        error, a reset, a timeout of the whole call, an unusable answer, refused credentials) may
        have been acted on, and is an unknown outcome, resolved from the chain."""
        network = requirements.network
        url = f"{self.url}/settle"
        try:
            async with asyncio.timeout(self.settle_timeout_seconds):
                response = await self._client.post(
                    url, json=_body(payload, requirements), headers=self._headers("POST", url), timeout=self._settle_timeout
                )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("facilitator %s /settle: no connection (%s): not sent", self.label, type(exc).__name__)
            self._mark(type(exc).__name__)
            raise SettleNotSent(type(exc).__name__) from exc
        except (httpx.TimeoutException, TimeoutError) as exc:
            log.warning("facilitator %s /settle timed out (%s): outcome unknown", self.label, type(exc).__name__)
            self._mark(type(exc).__name__)
            return _broken(FACILITATOR_TIMEOUT, "the facilitator did not answer in time", network)
        except httpx.HTTPError as exc:
            log.warning("facilitator %s /settle failed (%s): outcome unknown", self.label, type(exc).__name__)
            self._mark(type(exc).__name__)
            return _broken(FACILITATOR_UNREACHABLE, "the facilitator could not be reached", network)
        if self._refused_credentials(response.status_code, "/settle"):
            # Received and refused; whether it acted first cannot be known from here: unknown.
            return _broken(FACILITATOR_ERROR_STATUS, "the facilitator refused this gateway's credentials", network)
        result = _settle_answer(response.status_code, response.content, network, self.label)
        broken = result.error_reason in (FACILITATOR_BAD_RESPONSE, FACILITATOR_ERROR_STATUS)
        self._mark("unusable_answer" if broken else None)
        return result

    async def close(self) -> None:
        await self._client.aclose()


def _body(payload: PaymentPayload, requirements: PaymentRequirements) -> dict[str, Any]:
    return {
        "x402Version": payload.x402_version,
        "paymentPayload": payload.to_wire(),
        "paymentRequirements": requirements.to_wire(),
    }


def _json_object(content: bytes) -> dict[str, Any] | None:
    if len(content) > MAX_RESPONSE_BYTES:
        return None
    try:
        data = json.loads(content)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _salvage_tx(content: bytes, data: dict[str, Any] | None) -> str:
    """A transaction hash named in an otherwise unusable body: what a reconcile will need."""
    if data is not None:
        tx = data.get("transaction")
        return tx if isinstance(tx, str) and re.fullmatch(r"0x[0-9a-fA-F]{64}", tx) else ""
    match = _TX_HASH.search(content[:MAX_RESPONSE_BYTES].decode("utf-8", "replace"))
    return match.group(1) if match else ""


def _broken(reason: str, message: str, network: str, transaction: str = "") -> SettleResponse:
    return SettleResponse(
        success=False, error_reason=reason, error_message=message, transaction=transaction, network=network
    )


def _settle_answer(status: int, content: bytes, network: str, url: str) -> SettleResponse:
    data = _json_object(content)
    tx = _salvage_tx(content, data)
    if data is None:
        log.warning("facilitator %s /settle answered %s with a non-JSON body: outcome unknown", url, status)
        return _broken(FACILITATOR_BAD_RESPONSE, "the facilitator's settle answer is not JSON", network, tx)
    data = {**data}
    data.setdefault("network", network)  # redundant with the requirements; some facilitators omit it
    try:
        result = SettleResponse.model_validate(data)
    except ValidationError:
        log.warning("facilitator %s /settle answered %s with an invalid body: outcome unknown", url, status)
        return _broken(FACILITATOR_BAD_RESPONSE, "the facilitator's settle answer is malformed", network, tx)
    if result.network != network:
        log.warning("facilitator %s /settle answered for network %s, not %s", url, result.network, network)
        return _broken(FACILITATOR_BAD_RESPONSE, "the facilitator settled on another network", network, tx)
    if result.success:
        if not 200 <= status < 300:
            # "success" with an error status: trust neither; keep the hash for the reconcile.
            log.warning("facilitator %s /settle answered %s with success: outcome unknown", url, status)
            return _broken(
                FACILITATOR_ERROR_STATUS, "the facilitator answered an error status", network, result.transaction
            )
        if not result.transaction:
            log.warning("facilitator %s /settle claimed success without a transaction", url)
            return _broken(FACILITATOR_BAD_RESPONSE, "the facilitator claimed success without a transaction", network)
        return result
    if result.error_reason is None:
        return _broken(FACILITATOR_BAD_RESPONSE, "the facilitator refused without a reason", network, result.transaction)
    return result
