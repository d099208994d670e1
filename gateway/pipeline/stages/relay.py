"""Stage ``relay``: a ``stream: true`` tool's answer relayed as it arrives, then settled per its rule.

The upstream's good answer (a ``StreamedResponse``) goes to the payer chunk by chunk, pulled only as
fast as the payer reads (backpressure), never buffered beyond one chunk, and cut off at the size
limit and at its deadline (``stream_time_limit``): the tool's upstream time budget (``timeout_seconds``
x tries, counted from the upstream call: what the in-flight lock and the payment's validity were
sized for) and, for a stream settled at its end, the payment's deadline less the settle margin. The
deadline bounds the waits on the payer too: a payer who stops reading does not hold the settlement
back past its window. What was delivered (sent) is counted as it goes
(``gateway.upstream.usage.StreamMeter``). When the stream ends, however it ends, the call is settled once:

* ``upto`` (a usage rule): the units delivered (``events``, ``bytes``) or reported
  (``event_field``) are priced and capped at the maximum; a stream cut short (the payer gone, the
  upstream broken, the size limit) is charged what was delivered, or nothing (``partial:
  nothing``); an unreadable usage takes the rule's default, or nothing is charged and the reason
  is recorded (the content already went out: failing closed here means not charging).
* ``exact`` streams settle before the upstream is called (``settle: upfront``), so nothing is left
  to settle: the end of the stream is recorded.

An SSE stream (``text/event-stream``) gets the outcome as its final event (``event:
x402-settlement``, data: the settlement receipt, as ``PAYMENT-RESPONSE`` would carry it, and
``streamEnded``: ``complete``, or why the stream stopped). What was
delivered is stored for a resend of the same payment. The finalizers (locks, budgets, audit,
metrics, access log) run once the stream is over (``Chain.answer`` hands them to the response).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import Response, StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from catalog.models import SETTLE_MARGIN_SECONDS
from catalog.usage import UsageError
from gateway.errors import GatewayError
from gateway.headers import REQUEST_ID
from gateway.pipeline.context import RequestContext
from gateway.pipeline.stages.meter import charge_of, with_charge
from gateway.pipeline.stages.settle import settle, settled
from gateway.protocol.receipts import receipt_headers
from gateway.upstream.bridge import DROPPED_RESPONSE_HEADERS
from gateway.upstream.transport import StreamedResponse, wire_value
from gateway.upstream.usage import StreamMeter
from settlement.ledger import Ledger
from settlement.schemes import Schemes

__all__ = ["SETTLEMENT_EVENT", "STREAM_END_GRACE_SECONDS", "PaidStream", "Relay"]

log = logging.getLogger("x402gw.pipeline")
SETTLEMENT_EVENT = "x402-settlement"
_FINISHING: set[asyncio.Task[dict[str, Any] | None]] = set()  # settlements of streams whose payer left: kept alive
STREAM_DRAIN_SECONDS = 60.0  # how long a stopping server waits for them (a broadcast and its receipt)
# How long a stream already cut and settled waits for a payer who stopped reading to take its
# outcome and its end, before the connection is closed (nothing is held for it meanwhile).
STREAM_END_GRACE_SECONDS = 30.0


async def drain_stream_settlements(timeout: float = STREAM_DRAIN_SECONDS) -> int:
    """Wait, at most ``timeout`` seconds, for the settlements of streams whose payer has left (no
    connection holds them, so the server's graceful stop does not wait for them): the app's
    shutdown calls this before it closes the ledger and the chain clients, so content already
    streamed is still charged. Returns how many were still running (each logged): a row whose
    write-ahead was made is resolved at the next start; one still ``verified`` was not charged."""
    loop = asyncio.get_running_loop()
    pending = {task for task in _FINISHING if not task.done() and task.get_loop() is loop}
    if not pending:
        return 0
    log.info("waiting for %d stream settlement(s) before stopping", len(pending))
    _, still = await asyncio.wait(pending, timeout=timeout)
    for _task in still:
        log.error("a stream's settlement was still running after %.0f s at shutdown: it is resolved at the next "
                  "start if its write-ahead was made, and not charged if not", timeout)
    return len(still)


class Relay:
    name = "relay"
    shape_only = False

    def __init__(self, schemes: Schemes, ledger: Ledger, max_response_bytes: int) -> None:
        self.schemes = schemes
        self.ledger = ledger
        self.max_response_bytes = max_response_bytes

    async def __call__(self, ctx: RequestContext) -> Response | None:
        paid = ctx.paid
        assert paid is not None
        upstream = paid.upstream
        if not isinstance(upstream, StreamedResponse):
            return None
        ctx.outcome = "streaming"
        return PaidStream(ctx, upstream, self)


class PaidStream(StreamingResponse):
    """The relayed stream; settles once when it ends, then runs the deferred finalizers."""

    def __init__(self, ctx: RequestContext, upstream: StreamedResponse, relay: Relay) -> None:
        tool, quote = ctx.tool, ctx.quote
        assert tool is not None and quote is not None
        self.ctx, self.upstream, self.relay = ctx, upstream, relay
        self.meter = StreamMeter(tool.usage) if tool.usage is not None else None
        content_type = next((v for k, v in upstream.headers if k.lower() == "content-type"), "")
        self.sse = content_type.lower().startswith("text/event-stream")
        self.delivered = bytearray()
        self.size = 0
        self.ending: str | None = None  # None until it ends: "complete", or why it stopped
        self._finalize: Callable[[], Awaitable[None]] | None = None
        self._finish: asyncio.Task[dict[str, Any] | None] | None = None
        headers = {k: w for k, v in upstream.headers if k.lower() not in DROPPED_RESPONSE_HEADERS and (w := wire_value(v)) is not None}
        headers.update({"Cache-Control": "private, no-store", REQUEST_ID: ctx.request_id, "X-Accel-Buffering": "no"})
        if ctx.settlement is not None:  # settled upfront: the receipt goes out first, in the headers
            headers.update(receipt_headers(ctx.settlement, quote.version))
        self._head_sent = False
        # Sent by ``stream_response`` from the upstream itself, not through ``body_iterator``.
        super().__init__((), status_code=upstream.status, headers=headers)

    def defer_finalizers(self, finalize: Callable[[], Awaitable[None]]) -> None:
        """``Chain.answer`` hands over the finalizers: they run when the stream is over."""
        self._finalize = finalize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.ending is None:
                self.ending = "client_disconnected"
            self._finish_once()  # the payer left, or the server stopped: settle anyway, off this task

    async def stream_response(self, send: Send) -> None:
        """The answer: relayed until the stream ends or its deadline passes (``_relay``), settled,
        then its outcome and its end. Whether or not the payer reads: a send waiting on a payer who
        stopped reading is cut at the deadline like a chunk waiting on the upstream, and what it
        took is settled then, within the payment's window. The outcome and the end wait for it at
        most ``STREAM_END_GRACE_SECONDS`` more; then the server closes the connection."""
        await self._relay(send)
        outcome = await asyncio.shield(self._finish_once())
        tail: list[Message] = [] if self._head_sent else [self._head()]
        if self.sse and outcome is not None:
            event = b"event: " + SETTLEMENT_EVENT.encode() + b"\ndata: " + json.dumps(outcome, separators=(",", ":")).encode()
            tail.append({"type": "http.response.body", "body": event + b"\n\n", "more_body": True})
        tail.append({"type": "http.response.body", "body": b"", "more_body": False})
        try:
            async with asyncio.timeout(STREAM_END_GRACE_SECONDS):
                for message in tail:
                    await send(message)
        except TimeoutError:
            log.warning("request %s: the payer read nothing for %.0f s after its stream was cut (%s); its connection "
                        "is closed", self.ctx.request_id, STREAM_END_GRACE_SECONDS, self.ending)

    def _head(self) -> Message:
        return {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}

    async def _relay(self, send: Send) -> None:
        """The head, then each chunk as the upstream gives it and the payer takes it (backpressure:
        never more than one chunk held), until the stream ends, breaks, outgrows the size limit or
        reaches its deadline (``stream_time_limit``): one timer over both waits, the upstream's and
        the payer's. A chunk is delivered once its send returned: the server wrote it out (a send
        cut at the deadline waited for the payer to drain and wrote nothing)."""
        limit = self.relay.max_response_bytes
        try:
            async with asyncio.timeout_at(self._deadline()):
                await send(self._head())
                self._head_sent = True
                async for chunk in self.upstream.chunks:
                    self.size += len(chunk)
                    if self.size > limit:
                        self.ending = "upstream_response_too_large"
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self.delivered += chunk
                    if self.meter is not None:
                        self.meter.feed(chunk)
                self.ending = "complete"
        except TimeoutError:
            self.ending = "stream_time_limit"
        except GatewayError as err:
            self.ending = err.code  # the upstream broke off or stalled mid-stream
        finally:
            self.upstream.close()

    def _deadline(self) -> float:
        """When the stream is cut, on the loop's clock: the tool's upstream budget (every try at its
        timeout: what the in-flight lock and the payment's window were sized for), counted from the
        upstream call (the wait for its headers included); and for a stream settled when it ends,
        the payment's deadline less the settle margin, so that its settlement is still taken."""
        tool, paid = self.ctx.tool, self.ctx.paid
        assert tool is not None
        left = tool.max_call_seconds - self.ctx.timings.get("upstream", 0.0)
        if tool.settles_streamed and paid is not None:
            left = min(left, int(paid.exact.authorization.valid_before) - SETTLE_MARGIN_SECONDS - time.time())
        return asyncio.get_running_loop().time() + max(left, 0.0)

    def _finish_once(self) -> asyncio.Task[dict[str, Any] | None]:
        if self._finish is None:
            self._finish = asyncio.get_running_loop().create_task(self._settle_and_finalize())
            _FINISHING.add(self._finish)
            self._finish.add_done_callback(_FINISHING.discard)
        return self._finish

    async def _settle_and_finalize(self) -> dict[str, Any] | None:
        try:
            return await self._settle()
        except Exception:  # a stream's settlement never takes the server down; it is logged
            log.exception("settling the stream of request %s failed", self.ctx.request_id)
            return {"success": False, "error": "internal_error"}
        finally:
            if self._finalize is not None:
                await self._finalize()

    async def _settle(self) -> dict[str, Any] | None:
        ctx, relay = self.ctx, self.relay
        tool, quote, paid, payment_id = ctx.tool, ctx.quote, ctx.paid, ctx.payment_id
        assert tool is not None and quote is not None and paid is not None and payment_id is not None
        complete = self.ending == "complete"
        ctx.record("stream_ended", paymentId=payment_id, ending=self.ending, deliveredBytes=len(self.delivered))
        answer = (self.upstream.status, [(k, v) for k, v in self.upstream.headers if k.lower() not in DROPPED_RESPONSE_HEADERS],
                  bytes(self.delivered))
        if not tool.settles_streamed:  # settled before the call (exact): the answer is stored, nothing more
            await relay.ledger.run(relay.ledger.store_response, payment_id, answer)
            return None
        assert self.meter is not None  # a usage rule: metered
        rule = self.meter.rule
        try:
            units = self.meter.units() if complete or rule.partial == "delivered" else 0
        except UsageError as err:
            if rule.default is None or not complete:
                ctx.record("usage_unreadable", paymentId=payment_id, reason=err.code, detail=str(err))
                units = 0  # the content is out: failing closed means charging nothing
            else:
                units = rule.default
                ctx.record("usage_defaulted", paymentId=payment_id, reason=err.code, units=units)
        charge = charge_of(rule, quote, units)
        ctx.quote = charged = with_charge(quote, charge)
        ctx.record("usage_counted", paymentId=payment_id, ending=self.ending, **charge.describe())
        ctx.outcome = "settling"
        try:
            receipt = await settle(relay.schemes, relay.ledger, payment_id, charged, paid.payload, answer,
                                   hook_writes_ahead=relay.schemes.writes_ahead(charged.requirements),
                                   request_id=ctx.request_id)
        except GatewayError as err:
            ctx.reason = err.code
            return {"success": False, "error": err.code, "message": err.message, "paymentId": payment_id,
                    "streamEnded": self.ending}
        settled(ctx, receipt)
        return {**receipt.model_dump(mode="json", by_alias=True, exclude_none=True), "paymentId": payment_id,
                "streamEnded": self.ending}
