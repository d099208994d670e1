"""What happens to a request: the chain of stages (``gateway.pipeline.chain``), run with its finalizers.

``Pipeline`` holds what the stages share (catalog, schemes, ledger, state store, safety, audit
trail) and builds the chain once; ``handle`` runs it for a request. The order of the stages, and
what becomes of a refusal, is in ``gateway.pipeline.chain``, and only there.
"""

from __future__ import annotations

from collections.abc import Coroutine, Mapping
from typing import Any

from jsonschema import Draft202012Validator
from starlette.requests import Request
from starlette.responses import Response

from catalog import Catalogs, Router
from gateway.headers import REQUEST_ID
from gateway.pipeline.chain import Chain, build_chain
from gateway.pipeline.compiled import CompiledTool
from gateway.pipeline.context import Observer, RequestContext
from gateway.pipeline.refunds import Refunds
from gateway.pipeline.tracing import Tracing
from gateway.safety.checks import Safety
from gateway.store import MemoryStore, StateStore
from gateway.upstream.bridge import Bridge, UpstreamClient
from settlement.audit import AuditSink, AuditTrail, AuditWriter
from settlement.chain.head_clock import HeadClock
from settlement.chain.refunds import Refunder
from settlement.finance.receipts import ReceiptSigner
from settlement.ledger import Ledger
from settlement.schemes import Schemes
from settlement.schemes.signatures import SignerCheck
from settlement.schemes.wallets import WalletSignatures

__all__ = ["CompiledTool", "Pipeline"]

class Pipeline:
    def __init__(
        self,
        catalogs: Catalogs,
        schemes: Schemes,
        ledger: Ledger,
        upstream: UpstreamClient,
        *,
        public_url: str | None = None,
        max_body_bytes: int = 1_048_576,
        max_upstream_response_bytes: int = 10 * 1_048_576,
        challenge_body_version: int = 2,
        store: StateStore | None = None,
        refunder: Refunder | None = None,
        lock_ttl_ms: int = 180_000,
        bridge: Bridge | None = None,
        audit: AuditSink | None = None,
        safety: Safety | None = None,
        wallets: WalletSignatures | None = None,
        receipts: ReceiptSigner | None = None,
        tracing: Tracing | None = None,
        identifier_required: bool = False,
        chain_clocks: Mapping[str, HeadClock] | None = None,
    ) -> None:
        """Every seam of the request path, one assignment each with its why, then the chain built
        from them. Longer than the ~60-line rule on purpose: splitting a list of seams hides none."""
        self.catalogs = catalogs
        self.router = Router(catalogs.tools)
        validators: dict[str, Draft202012Validator] = {}
        self.tools: dict[str, CompiledTool] = {
            # identifier_required: every offer declares the payment-identifier extension required
            tool.name: CompiledTool(tool, validators, schemes.requirements, identifier_required=identifier_required)
            for tool in catalogs.tools
        }
        self.schemes = schemes  # verify, settle, resolve: by the requirements' scheme and network
        self.ledger = ledger
        self.upstream = upstream
        # Upstream calls prepared once (credentials, SOAP definitions); create_app passes its own.
        self.bridge = bridge or Bridge(catalogs.tools)
        self.public_url = public_url.rstrip("/") if public_url else None
        self.max_body_bytes = max_body_bytes
        self.max_upstream_response_bytes = max_upstream_response_bytes
        self.challenge_body_version = challenge_body_version
        self.store: StateStore = store or MemoryStore()
        self.refunder = refunder
        self.lock_ttl_ms = lock_ttl_ms
        # Limits, policy and circuit breakers (gateway.safety.checks), sharing the state store.
        self.safety = safety or Safety(self.store, catalogs)
        # Offline signature recovery over this gateway's own offers (before any lookup or limit).
        self.signers = SignerCheck()
        # Contract-wallet signatures (ERC-1271 / ERC-6492), checked on chain after the per-client limit.
        self.wallets = wallets
        # The receipt key: a settled payment's answer carries its signed receipt (X402GW-Receipt).
        self.receipts = receipts
        # OpenTelemetry spans (gateway.pipeline.tracing), when the OTEL_* environment asks for them.
        self.tracing = tracing
        # The hash-chained audit trail, in the ledger's database unless told otherwise.
        self.audit: AuditSink = (
            audit if audit is not None else AuditWriter(AuditTrail(ledger.url), executor=ledger.shared_executor)
        )
        # Told of every finished request, by the ``observers`` finalizer (metrics): cheap, never raising.
        self.observers: list[Observer] = []
        self.chain: Chain = build_chain(
            router=self.router, tools=self.tools, safety=self.safety, store=self.store, ledger=ledger,
            schemes=schemes, signers=self.signers, refunds=Refunds(ledger, refunder), bridge=self.bridge,
            upstream=upstream, audit=self.audit, observers=self.observers, public_url=public_url,
            challenge_body_version=challenge_body_version, max_body_bytes=max_body_bytes,
            max_upstream_response_bytes=max_upstream_response_bytes, lock_ttl_ms=lock_ttl_ms, wallets=wallets,
            receipts=receipts, tracing=tracing, clocks=chain_clocks,  # payment windows by each chain's clock too
        )

    async def handle(self, request: Request) -> Response:
        url = request.url
        scope = request.scope
        client = scope.get("client")
        ctx = RequestContext(
            method=request.method, path=url.path, query=url.query, client=client[0] if client else None,
            raw_headers=scope["headers"], request=request,
        )
        response = await self.answer(ctx, self.chain.run(ctx))
        response.headers[REQUEST_ID] = ctx.request_id
        return response

    async def answer(self, ctx: RequestContext, stages: Coroutine[Any, Any, Response]) -> Response:
        """Run a request's stages (the whole chain, or the fast path's cached prefix of it): a
        refusal becomes its answer; then, always, the finalizers run (``Chain.answer``)."""
        return await self.chain.answer(ctx, stages)
