"""The local facilitator served over the standard x402 facilitator HTTP API.

    GET  {prefix}/supported   kinds, extensions, signers
    POST {prefix}/verify      {"x402Version", "paymentPayload", "paymentRequirements"} → VerifyResponse
    POST {prefix}/settle      same body → SettleResponse

Valid and invalid results are both HTTP 200 (the reason is in the body); a body that cannot be a
request is a 400 with a code; a well-formed request never gets a 5xx from the facilitator (only
an unreachable rate-limit store is a 503). ``/verify`` changes nothing.
``/settle`` broadcasts an authorization at most once per process: concurrent settles of the same
payload share one settlement, and a retried settle of a settled payload gets the stored success.

Served publicly, the API is a way to make this gateway pay gas, so (THREATS.md, griefer):

* ``/verify`` and ``/settle`` take a token per client address first (429 ``rate_limited`` with
  ``Retry-After``), before the body is read;
* allow-lists of payTo addresses and of (network, asset) pairs (the gateway passes its catalog's
  own unless configured otherwise): anything else is refused before any RPC (``pay_to_not_allowed``,
  ``asset_not_allowed``), so nobody moves their own token, or pays a stranger, on this gateway's gas;
* the local facilitator refuses zero amounts and self-transfers and bounds its caches
  (``settlement.schemes.exact_local``); a settle is only deduplicated once its signature checked out;
* ``/settle`` runs the full verify first (the authorization's state and the payer's balance, read
  on chain) and broadcasts nothing unless it holds: a settled payment rebuilt from public calldata,
  or an authorization from an empty account, is refused with verify's reason, not reverted on our gas.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from catalog.limits import RateLimit
from gateway.errors import GatewayError
from gateway.store import MemoryStore, StateStore, StoreUnavailable, payment_lock
from settlement.chain.gas import take_gas
from settlement.errors import PaymentDecodeError, SettlementError
from settlement.schemes.exact_local import LocalFacilitator, Rejected
from settlement.x402.codec import parse_exact_evm, parse_payment_payload
from settlement.x402.wire import X402_VERSION, PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

log = logging.getLogger("x402gw.facilitator_api")

MAX_REQUEST_BYTES = 65_536
REMEMBERED_SETTLEMENTS = 10_000

SettlementKey = tuple[str, str, str]  # (network, payer, nonce), lower-case
LOCK_TTL_MS = 180_000  # a settlement's longest (its receipt wait twice over, and a minute)

# Reasons (invalidReason / errorReason) of a request this API refuses to serve at all, before any RPC.
PAY_TO_NOT_ALLOWED = "pay_to_not_allowed"
ASSET_NOT_ALLOWED = "asset_not_allowed"


class BadRequest(GatewayError):
    """A refusal of the served facilitator's API: its own body (no ``next``: callers are facilitator clients)."""

    def __init__(self, code: str, message: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(code, message, status=status)
        self.retry_after = retry_after

    def to_response(self) -> Response:
        body: dict[str, object] = {"error": self.code, "message": self.message}
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            body["retryAfter"] = self.retry_after
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse(body, status_code=self.status, headers=headers)


class ClientLimit:
    """A token bucket per client address (the peer: put the limit at the proxy when there is one),
    in the gateway's state store so replicas share it. Fails closed: no store, no settling."""

    def __init__(self, limit: RateLimit, store: StateStore) -> None:
        self._limit = limit
        self._store = store

    async def take(self, request: Request) -> None:
        client = request.client.host if request.client else "unknown"
        try:
            decision = await self._store.take_token(
                f"facilitator:client:{client}", self._limit.rate_per_second, self._limit.capacity
            )
        except StoreUnavailable:
            raise BadRequest("store_unavailable", "the rate limit cannot be checked; retry later", 503, 2) from None
        if not decision.allowed:
            wait = max(1, math.ceil(decision.retry_after_seconds))
            raise BadRequest(
                "rate_limited",
                f"too many facilitator requests ({self._limit.requests} per {self._limit.window}s); retry in {wait}s",
                429,
                wait,
            )


async def read_request(request: Request) -> tuple[PaymentPayload, PaymentRequirements]:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise BadRequest("request_too_large", f"request bodies are limited to {MAX_REQUEST_BYTES} bytes", 413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BadRequest("invalid_json_body", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("invalid_json_body", "the body must be a JSON object")
    version = body.get("x402Version")
    if version != X402_VERSION or isinstance(version, bool):
        raise BadRequest("invalid_x402_version", f"x402Version must be {X402_VERSION}")
    raw_payload, raw_requirements = body.get("paymentPayload"), body.get("paymentRequirements")
    if not isinstance(raw_payload, dict):
        raise BadRequest("invalid_payload", "paymentPayload must be an object")
    if not isinstance(raw_requirements, dict):
        raise BadRequest("invalid_payment_requirements", "paymentRequirements must be an object")
    try:
        payload = parse_payment_payload(raw_payload)
    except PaymentDecodeError as exc:
        raise BadRequest(exc.code, exc.message) from None
    if payload.x402_version != version:
        raise BadRequest("invalid_x402_version", "paymentPayload.x402Version differs from x402Version")
    try:
        requirements = PaymentRequirements.model_validate(raw_requirements)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "paymentRequirements"
        raise BadRequest("invalid_payment_requirements", f"invalid paymentRequirements ({where}: {first['msg']})") from None
    return payload, requirements


def settlement_key(payload: PaymentPayload, requirements: PaymentRequirements) -> SettlementKey | None:
    try:
        authorization = parse_exact_evm(payload).authorization
    except PaymentDecodeError:
        return None  # not an EIP-3009 payload: the facilitator refuses it, nothing to deduplicate
    return requirements.network.lower(), authorization.from_.lower(), authorization.nonce.lower()


def fingerprint(payload: PaymentPayload, requirements: PaymentRequirements) -> str:
    """What a settlement is of: the signed authorization and the requirements it is settled against.
    A stored success is only ever handed back for the very same pair."""
    text = json.dumps([payload.payload, requirements.to_wire()], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class SettleOnce:
    """At most one settlement per authorization in flight, and settled ones remembered (bounded).

    Single event loop: the check-and-start below has no ``await`` between check and start, so it
    is atomic. The settlement runs as its own task, shielded from the requests waiting on it: a
    client hanging up does not abandon a broadcast half-way.
    """

    def __init__(self, facilitator: LocalFacilitator, remembered: int = REMEMBERED_SETTLEMENTS,
                 store: StateStore | None = None, lock_ttl_ms: int = LOCK_TTL_MS) -> None:
        self._facilitator = facilitator
        self._remembered = remembered
        # The paid path's lock on (network, payer, nonce): a settle of a payment a live request (here
        # or on a replica) is settling or about to settle would make that one revert on our gas.
        self._store = store or MemoryStore()
        self._lock_ttl_ms = max(lock_ttl_ms, facilitator.in_flight.ttl_ms)  # outlives the settlement's receipt wait
        self._running: dict[SettlementKey, tuple[str, asyncio.Task[SettleResponse]]] = {}
        self._settled: OrderedDict[SettlementKey, tuple[str, SettleResponse]] = OrderedDict()

    async def settle(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        key = settlement_key(payload, requirements)
        if key is None:
            return await self._verified_settle(payload, requirements)
        mark = fingerprint(payload, requirements)
        stored = self._settled.get(key)
        if stored is not None and stored[0] == mark:
            return stored[1]
        # Nothing is keyed on (payer, nonce) before the payer's signature checked out: a junk
        # signature naming someone else's nonce neither waits on nor delays their settlement. One
        # that does not recover to the payer is a contract wallet's, perhaps: asked on chain first
        # (offline, it would pass, and hold the payment lock against the payer's own request).
        try:
            await self._facilitator.confirm_wallet(self._facilitator.check_offline(payload, requirements),
                                                   requirements.network)
        except Rejected as rej:
            return SettleResponse(
                success=False, error_reason=rej.reason, error_message=rej.message, network=requirements.network
            )
        while True:
            stored = self._settled.get(key)
            if stored is not None and stored[0] == mark:
                return stored[1]
            running = self._running.get(key)
            if running is None:
                break
            if running[0] == mark:
                return await asyncio.shield(running[1])
            # Another payload claims the same authorization: let the first finish, then this one
            # is settled on its own merits (the chain refuses a used nonce).
            await asyncio.wait({running[1]})
        task = asyncio.create_task(self._settle(key, mark, payload, requirements))
        self._running[key] = (mark, task)
        return await asyncio.shield(task)

    async def _settle(
        self, key: SettlementKey, mark: str, payload: PaymentPayload, requirements: PaymentRequirements
    ) -> SettleResponse:
        lock, owner = payment_lock(*key), f"facilitator-{uuid.uuid4().hex}"
        try:
            if not await self._store.acquire(lock, owner, self._lock_ttl_ms):
                return SettleResponse(success=False, error_reason="payment_in_flight", network=requirements.network,
                                      error_message="a paid request of this gateway is settling this payment")
            try:
                result = await self._verified_settle(payload, requirements)
            finally:
                with contextlib.suppress(StoreUnavailable):  # the lock lapses; the outcome stands
                    await self._store.release(lock, owner)
        except StoreUnavailable:  # taking the lock failed: nothing was broadcast
            return SettleResponse(success=False, error_reason="store_unavailable", network=requirements.network,
                                  error_message="the payment lock cannot be taken; retry later")
        finally:
            del self._running[key]
        if result.success:
            self._settled[key] = (mark, result)
            while len(self._settled) > self._remembered:
                self._settled.popitem(last=False)
        return result

    async def _verified_settle(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        """Verify in full (authorization state and balance, on chain) and only then settle: whatever
        verify refuses would revert, on this gateway's gas. (The gateway's own paid path settles
        right after its own verify and does not come through here.)"""
        verdict = await self._facilitator.verify(payload, requirements)
        if not verdict.is_valid:
            return SettleResponse(
                success=False, error_reason=verdict.invalid_reason or "invalid_payment",
                error_message=verdict.invalid_message, payer=verdict.payer, network=requirements.network,
            )
        return await self._facilitator.settle(payload, requirements)


@dataclass(frozen=True, slots=True)
class Allowed:
    """What this API verifies and settles for: payTo addresses and (network, asset) pairs, both
    lower-case; ``None`` is any (only ever the operator's explicit choice)."""

    pay_to: frozenset[str] | None
    assets: frozenset[tuple[str, str]] | None

    @classmethod
    def of(cls, pay_to: Iterable[str] | None, assets: Iterable[tuple[str, str]] | None) -> Allowed:
        return cls(
            None if pay_to is None else frozenset(address.lower() for address in pay_to),
            None if assets is None else frozenset((network.lower(), asset.lower()) for network, asset in assets),
        )

    def refusal(self, requirements: PaymentRequirements) -> tuple[str, str] | None:
        """(reason, message) when the request is not one to serve; checked before any RPC."""
        if self.pay_to is not None and requirements.pay_to.lower() not in self.pay_to:
            return PAY_TO_NOT_ALLOWED, "this facilitator does not settle payments to that payTo address"
        if self.assets is not None and (requirements.network.lower(), requirements.asset.lower()) not in self.assets:
            return ASSET_NOT_ALLOWED, "this facilitator does not settle payments in that asset on that network"
        return None


def facilitator_routes(
    facilitator: LocalFacilitator,
    prefix: str = "/facilitator",
    *,
    rate_limit: RateLimit | None = None,
    store: StateStore | None = None,
    pay_to: Iterable[str] | None = None,
    assets: Iterable[tuple[str, str]] | None = None,
) -> list[Route]:
    """``rate_limit``: per client address on /verify and /settle (``store``: the gateway's state
    store; a private in-memory one without it). ``pay_to``: the only recipients this API verifies
    or settles for; ``assets``: the only (network, asset) pairs. ``None`` allows any, an empty list
    none. The gateway passes its catalog's payees and assets unless the operator configured others
    (``Settings.facilitator_pay_to``, ``Settings.facilitator_assets``)."""
    once = SettleOnce(facilitator, store=store)
    limit = ClientLimit(rate_limit, store or MemoryStore()) if rate_limit is not None else None
    allowed = Allowed.of(pay_to, assets)

    async def admit(request: Request) -> tuple[PaymentPayload, PaymentRequirements]:
        if limit is not None:
            await limit.take(request)
        return await read_request(request)

    async def supported(request: Request) -> Response:
        return JSONResponse(facilitator.supported())

    async def verify(request: Request) -> Response:
        try:
            payload, requirements = await admit(request)
        except BadRequest as bad:
            return bad.to_response()
        if (refused := allowed.refusal(requirements)) is not None:
            reason, message = refused
            return JSONResponse(VerifyResponse(is_valid=False, invalid_reason=reason, invalid_message=message).to_wire())
        return JSONResponse((await _verify_outcome(facilitator, payload, requirements)).to_wire())

    async def settle(request: Request) -> Response:
        try:
            payload, requirements = await admit(request)
        except BadRequest as bad:
            return bad.to_response()
        if (refused := allowed.refusal(requirements)) is not None:
            reason, message = refused
            return JSONResponse(
                SettleResponse(
                    success=False, error_reason=reason, error_message=message, network=requirements.network
                ).to_wire()
            )
        outcome = await _settle_outcome(once, payload, requirements)
        extra, _ = take_gas(outcome.extra)  # this gateway's own accounting: the caller pays no gas here
        return JSONResponse(outcome.model_copy(update={"extra": extra}).to_wire())

    prefix = prefix.rstrip("/")
    return [
        Route(f"{prefix}/supported", supported, methods=["GET"]),
        Route(f"{prefix}/verify", verify, methods=["POST"]),
        Route(f"{prefix}/settle", settle, methods=["POST"]),
    ]


async def _verify_outcome(
    facilitator: LocalFacilitator, payload: PaymentPayload, requirements: PaymentRequirements
) -> VerifyResponse:
    """The facilitator's verdict; an outage is an invalid outcome, never a 5xx (the log gets the detail)."""
    failed = VerifyResponse(
        is_valid=False, invalid_reason="unexpected_verify_error", invalid_message="verification is unavailable; retry later"
    )
    try:
        return await facilitator.verify(payload, requirements)
    except SettlementError as exc:
        log.warning("verify on %s failed: %s (%s)", requirements.network, exc.code, exc.message)
        return failed
    except Exception:
        log.exception("verify on %s failed unexpectedly", requirements.network)
        return failed


async def _settle_outcome(
    once: SettleOnce, payload: PaymentPayload, requirements: PaymentRequirements
) -> SettleResponse:
    """The settlement's outcome, settled at most once per (network, payer, nonce)."""
    failed = SettleResponse(
        success=False,
        error_reason="unexpected_settle_error",
        error_message="settlement is unavailable; retry the same payment later",
        network=requirements.network,
    )
    # Never a 5xx for a well-formed request: the outcome is reported, the detail is logged.
    try:
        return await once.settle(payload, requirements)
    except SettlementError as exc:  # the chain did not answer before anything was broadcast
        log.warning("settle on %s failed: %s (%s)", requirements.network, exc.code, exc.message)
        return failed
    except Exception:
        log.exception("settle on %s failed unexpectedly", requirements.network)
        return failed
