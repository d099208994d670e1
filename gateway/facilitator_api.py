"""The local facilitator served over the standard x402 facilitator HTTP API.

    GET  {prefix}/supported   kinds, extensions, signers
    POST {prefix}/verify      {"x402Version", "paymentPayload", "paymentRequirements"} → VerifyResponse
    POST {prefix}/settle      same body → SettleResponse

Valid and invalid results are both HTTP 200 (the reason is in the body); a body that cannot be a
request is a 400 with a code; a well-formed request never gets a 5xx. ``/verify`` changes nothing.
``/settle`` broadcasts an authorization at most once per process: concurrent settles of the same
payload share one settlement, and a retried settle of a settled payload gets the stored success.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from settlement.codec import parse_exact_evm, parse_payment_payload
from settlement.errors import PaymentDecodeError, SettlementError
from settlement.facilitator import LocalFacilitator
from settlement.wire import X402_VERSION, PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

log = logging.getLogger("x402gw.facilitator_api")

MAX_REQUEST_BYTES = 65_536
REMEMBERED_SETTLEMENTS = 10_000

SettlementKey = tuple[str, str, str]  # (network, payer, nonce), lower-case


class BadRequest(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def to_response(self) -> Response:
        return JSONResponse({"error": self.code, "message": self.message}, status_code=self.status)


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

    def __init__(self, facilitator: LocalFacilitator, remembered: int = REMEMBERED_SETTLEMENTS) -> None:
        self._facilitator = facilitator
        self._remembered = remembered
        self._running: dict[SettlementKey, tuple[str, asyncio.Task[SettleResponse]]] = {}
        self._settled: OrderedDict[SettlementKey, tuple[str, SettleResponse]] = OrderedDict()

    async def settle(self, payload: PaymentPayload, requirements: PaymentRequirements) -> SettleResponse:
        key = settlement_key(payload, requirements)
        if key is None:
            return await self._facilitator.settle(payload, requirements)
        mark = fingerprint(payload, requirements)
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
        try:
            result = await self._facilitator.settle(payload, requirements)
        finally:
            del self._running[key]
        if result.success:
            self._settled[key] = (mark, result)
            while len(self._settled) > self._remembered:
                self._settled.popitem(last=False)
        return result


def facilitator_routes(facilitator: LocalFacilitator, prefix: str = "/facilitator") -> list[Route]:
    once = SettleOnce(facilitator)

    async def supported(request: Request) -> Response:
        return JSONResponse(facilitator.supported())

    async def verify(request: Request) -> Response:
        try:
            payload, requirements = await read_request(request)
        except BadRequest as bad:
            return bad.to_response()
        failed = VerifyResponse(
            is_valid=False, invalid_reason="unexpected_verify_error", invalid_message="verification is unavailable; retry later"
        )
        try:
            result = await facilitator.verify(payload, requirements)
        except SettlementError as exc:
            log.warning("verify on %s failed: %s (%s)", requirements.network, exc.code, exc.message)
            result = failed
        except Exception:
            log.exception("verify on %s failed unexpectedly", requirements.network)
            result = failed
        return JSONResponse(result.to_wire())

    async def settle(request: Request) -> Response:
        try:
            payload, requirements = await read_request(request)
        except BadRequest as bad:
            return bad.to_response()
        failed = SettleResponse(
            success=False,
            error_reason="unexpected_settle_error",
            error_message="settlement is unavailable; retry the same payment later",
            network=requirements.network,
        )
        # Never a 5xx for a well-formed request: the outcome is reported, the detail is logged.
        try:
            result = await once.settle(payload, requirements)
        except SettlementError as exc:  # the chain did not answer before anything was broadcast
            log.warning("settle on %s failed: %s (%s)", requirements.network, exc.code, exc.message)
            result = failed
        except Exception:
            log.exception("settle on %s failed unexpectedly", requirements.network)
            result = failed
        return JSONResponse(result.to_wire())

    prefix = prefix.rstrip("/")
    return [
        Route(f"{prefix}/supported", supported, methods=["GET"]),
        Route(f"{prefix}/verify", verify, methods=["POST"]),
        Route(f"{prefix}/settle", settle, methods=["POST"]),
    ]
