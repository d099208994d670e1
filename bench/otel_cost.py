"""What OpenTelemetry costs per request: the chain off (no OTEL_* environment) against on.

    python -m bench.otel_cost [--requests 20000]

Runs the gateway's own ``Chain`` (gateway.pipeline.chain) in-process with the declared stages'
names and finalizers replaced by ones that do nothing, plus one upstream attempt through the
bridge's recording seam, so what is measured is the chain's bookkeeping alone: off (the chain as
built without tracing), and on (the SDK's TracerProvider with a BatchSpanProcessor; the exporter
drops the spans, so no network time is counted). Prints microseconds per request (median of five
rounds) and spans per request. The spans of a real paid call are the same (one per stage and
finalizer, one per attempt); its other costs (chain RPC, ledger, upstream) dwarf either figure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from starlette.responses import Response

from gateway.pipeline.chain import Chain
from gateway.pipeline.context import RequestContext
from gateway.pipeline.stages.audit import RecordingUpstream
from gateway.pipeline.stages.challenge import Challenge
from gateway.pipeline.tracing import Tracing
from gateway.upstream.bridge import UpstreamResponse

# The declared order (tests/gateway/pipeline/test_chain.py holds the real one).
STAGES = (
    "route", "header_limits", "body", "arguments", "offer", "pre_challenge_safety", "challenge", "decode_and_bind",
    "wallet_check", "payer_checks", "in_flight", "exactly_once", "payment_window", "verify", "reserve", "record",
    "settle_upfront", "bridge", "settle", "respond",
)
FINALIZERS = ("release_holds", "audit", "observers", "access_log")
ANSWER = Response(b"{}", media_type="application/json")


class _Upstream:
    async def send(self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float,
                   max_bytes: int) -> UpstreamResponse:
        return UpstreamResponse(200, [], b"{}")

    async def open(self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float,
                   max_bytes: int) -> UpstreamResponse:
        return await self.send(method, url, headers, body, timeout, max_bytes)

    async def close(self) -> None:
        return None


class _Stage:
    shape_only = False

    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, ctx: RequestContext) -> Response | None:
        if self.name == "bridge":  # one upstream attempt, through the seam that traces it
            await RecordingUpstream(_Upstream(), ctx).send("GET", "http://127.0.0.1:9/u", {}, b"", 1.0, 1024)
        return ANSWER if self.name == "respond" else None


class _Challenge(Challenge):
    """The chain needs its ``challenge`` stage (the fast path's split); here a paid request passes it."""

    async def __call__(self, ctx: RequestContext) -> Response | None:
        return None


class _Finalizer:
    def __init__(self, name: str) -> None:
        self.name = name

    async def __call__(self, ctx: RequestContext) -> None:
        return None


class _Drop(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def build(tracing: Tracing | None) -> Chain:
    stages = [_Challenge() if name == "challenge" else _Stage(name) for name in STAGES]
    return Chain(stages, [_Finalizer(name) for name in FINALIZERS], tracing)


async def per_request_us(chain: Chain, requests: int) -> float:
    start = time.perf_counter()
    for _ in range(requests):
        ctx = RequestContext(method="GET", path="/quotes/AAPL", query="", client="127.0.0.1")
        await chain.answer(ctx, chain.run(ctx))
    return (time.perf_counter() - start) / requests * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args(argv)
    exporter = _Drop()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 20))
    chains = {"off": build(None), "on": build(Tracing.from_provider(provider))}
    rounds: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(5):
        for label, chain in chains.items():
            rounds[label].append(asyncio.run(per_request_us(chain, args.requests)))
    provider.force_flush()
    traced_requests = 5 * args.requests
    off, on = statistics.median(rounds["off"]), statistics.median(rounds["on"])
    print(f"requests per round: {args.requests}, rounds: 5 (median)")
    print(f"off  {off:8.1f} us/request  (no OTEL_* environment: the chain as declared)")
    print(f"on   {on:8.1f} us/request  ({exporter.spans / traced_requests:.0f} spans/request, BatchSpanProcessor)")
    print(f"cost {on - off:8.1f} us/request with tracing on")
    provider.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
