"""Composition root: settings → catalog, chain, facilitator, ledger, upstream client → Starlette app.

``create_app`` is the only place that knows every part; tests pass their own seams (a facilitator,
an upstream client, a ledger) through its keyword arguments. What it builds from settings, and
the start-up checks, are in ``gateway.wiring`` (re-exported here where other modules import them).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from catalog import Catalogs, load_catalogs
from gateway.errors import GatewayConfigError, GatewayError
from gateway.headers import (
    ACCEPT,
    CONTENT_TYPE,
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    REQUEST_ID,
    X402GW_RECEIPT,
    X402GW_RECEIPT_SIGNATURE,
    X402GW_RECEIPT_TIME,
    X_PAYMENT,
    X_PAYMENT_RESPONSE,
)
from gateway.ops.admin import Dashboard, admin_routes
from gateway.ops.doctor import plan_from_settings
from gateway.ops.health import Readiness, doctor_detail, gateway_checks, healthz
from gateway.ops.metrics import GatewayMetrics
from gateway.ops.webhooks import Webhooks
from gateway.pipeline.fastpath import UnpaidFastPath
from gateway.pipeline.pipeline import Pipeline
from gateway.pipeline.refunds import Refunds
from gateway.pipeline.stages.relay import drain_stream_settlements
from gateway.pipeline.tracing import Tracing, tracing_from_env
from gateway.safety.checks import Safety
from gateway.safety.policy import policy_routes
from gateway.settings import Settings
from gateway.start_checks import bind_batch_settlers, check_chains, check_remote_facilitators
from gateway.store import RedisStore, StateStore, StoreUnavailable, create_store, taking_turns
from gateway.surfaces.discovery import Discovery
from gateway.surfaces.facilitator_api import facilitator_routes
from gateway.surfaces.mcp import McpEndpoint
from gateway.surfaces.receipt_evidence import SettlementEvidence
from gateway.surfaces.receipts import ReceiptEndpoint, receipt_signer, receipts_discovery
from gateway.surfaces.search import ToolSearch
from gateway.upstream.bridge import AiohttpUpstreamClient, UpstreamClient
from gateway.wiring import (
    SchemeWiring,
    build_bridge,
    build_chains,
    build_refunder,
    build_safety,
    facilitator_plan,
    lock_ttl_ms,
    wire_schemes,
    write_ahead_networks,
)
from settlement.audit import AuditSink
from settlement.chain.deployment import local_tokens
from settlement.chain.refunds import Refunder
from settlement.finance.receipts import ReceiptSigner
from settlement.ledger import Ledger
from settlement.ledger.resolve import keep_resolving, resolve_open_payments
from settlement.schema import open_ledger
from settlement.schemes import Facilitator, Schemes
from settlement.schemes.channels_claims import start_claims

__all__ = [
    "ALL_METHODS",
    "GatewayConfigError",
    "build_chains",
    "create_app",
    "describe",
    "facilitator_plan",
    "write_ahead_networks",
]

log = logging.getLogger("x402gw")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class _Gateway(Starlette):
    """Starlette, with an optional front (the unpaid fast path) around its whole middleware stack."""

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


def _cors() -> dict[str, Any]:
    return dict(
        allow_origins=["*"],
        allow_methods=ALL_METHODS,
        allow_headers=[CONTENT_TYPE, PAYMENT_SIGNATURE, X_PAYMENT, ACCEPT, X402GW_RECEIPT_TIME, X402GW_RECEIPT_SIGNATURE],
        expose_headers=[PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE, REQUEST_ID, X402GW_RECEIPT],
    )


async def _not_found(request: Request, exc: Exception) -> Response:
    return GatewayError("not_found", "no tool is exposed at this path").to_response()


def _paid_route(pipeline: Pipeline) -> Route:
    """Every other path: the paid path, through the pipeline."""

    async def paid(request: Request) -> Response:
        return await pipeline.handle(request)

    return Route("/{path:path}", paid, methods=ALL_METHODS)


def _reaccess_needs_public_url(settings: Settings, catalogs: Catalogs) -> None:
    """A sign-in (re-access) is bound to the gateway's origin: taken from the client's Host header,
    a sign-in made on another site (its Host sent along) would pass for one made here."""
    if settings.public_url is None and any(tool.reaccess is not None for tool in catalogs.tools):
        raise GatewayConfigError("a tool with reaccess needs X402GW_PUBLIC_URL: sign-ins are bound to the gateway's "
                                 "public origin, which a request's Host header cannot be trusted to name",
                                 code="reaccess_needs_public_url")


def _lifespan(
    wiring: SchemeWiring,
    catalogs: Catalogs,
    ledger: Ledger,
    store: StateStore,
    upstream: UpstreamClient,
    pipeline: Pipeline,
    mcp_endpoint: McpEndpoint,
    refunder: Refunder | None,
    resolve_pending_seconds: float,
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """Start-up checks and the start-up reconcile before serving, then pending payments followed
    (``keep_resolving``); every client closed after."""
    chains, remotes = wiring.chains, wiring.remotes

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await check_chains(chains, catalogs, wiring.schemes)
        await bind_batch_settlers(wiring.batching)
        await check_remote_facilitators(remotes)
        try:
            await store.ping()
        except StoreUnavailable:
            raise GatewayConfigError("the state store (Redis) is not reachable", code="store_unavailable") from None
        if wiring.local is not None and isinstance(store, RedisStore):
            # Workers and replicas count each other's settlements in flight on a payer's balance.
            wiring.local.in_flight.share(store)
        # Payments left open by a crash are resolved against the chain before serving.
        # Per network, as on the request path: a remote facilitator's open row stays open.
        resolved = await resolve_open_payments(ledger, wiring.schemes)
        for resolution in resolved:
            log.info("start-up reconcile: %s", resolution.to_json())
        refunds = Refunds(ledger, refunder, pipeline.audit)  # an upfront payment settled whose answer died with its request
        await refunds.owe_lost_answers(store)  # every such row: `x402gw reconcile` may have settled some
        # batch-settlement: bound to the store and ledger; what a crash left accrued is claimed now.
        claims = await start_claims(wiring.channels, ledger, store)
        every = resolve_pending_seconds  # workers and replicas take turns (one reads the chain each round)
        turns = taking_turns(store, "resolve-pending", every) if every and isinstance(store, RedisStore) else None
        follower = asyncio.ensure_future(keep_resolving(
            ledger, wiring.schemes, every, turns, lambda rows, turn: refunds.owe_lost_answers(store, rows, sweep=turn),
            orphaned=lambda row: refunds.orphaned(store, row))) if every else None
        try:
            async with mcp_endpoint.running():  # MCP's session manager lives as long as the app
                yield
        finally:
            if follower is not None:  # stopped, and awaited: never mid-write when the ledger closes
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            # Settlements of streams whose payer left run on no connection: waited for first, while
            # the ledger and the chain clients they need are still open.
            await drain_stream_settlements()
            if claims is not None:
                await claims.stop()
            await upstream.close()
            await pipeline.audit.close()  # writes what is queued before the process goes
            await store.close()
            for remote in set(remotes.values()):
                await remote.close()
            for chain in chains.values():
                await chain.close()
            if refunder is not None:
                await refunder.close()
            if pipeline.tracing is not None:
                pipeline.tracing.shutdown()  # the spans still queued are exported

    return lifespan


def _operations(
    settings: Settings,
    catalogs: Catalogs,
    wiring: SchemeWiring,
    pipeline: Pipeline,
    ledger: Ledger,
    store: StateStore,
    safety: Safety,
) -> tuple[GatewayMetrics, Dashboard, list[Route]]:
    """Operations: metrics observe every request; readiness checks each dependency; the dashboard;
    the policy API (with an admin token) and the /facilitator API (when served)."""
    chains, local = wiring.chains, wiring.local
    metrics = GatewayMetrics()
    metrics.watch_dependencies(wiring.health)  # per RPC URL and per facilitator
    pipeline.observers.append(metrics)
    readiness = Readiness(
        gateway_checks(
            engine=ledger.engine, store=store, chains=chains, remote_facilitators=wiring.remotes,
            local_networks={n for n in chains if local is not None and local.chain_for(n) is not None},
        ),
        timeout=settings.readiness_timeout_seconds,
        # /readyz?detail=1: the x402gw doctor's report of this configuration, with this app's ledger and store
        detail=doctor_detail(plan_from_settings(settings, catalogs), engine=ledger.engine, store=store,
                             timeout=settings.readiness_timeout_seconds),
        dependencies=wiring.health,
    )
    dashboard = Dashboard(ledger.engine, catalogs, metrics, breakers=safety.breakers.states,
                          native_usd_rates=settings.native_usd_rate)
    routes: list[Route] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readiness.endpoint, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        *admin_routes(dashboard, settings.admin_token),
    ]
    if settings.admin_token is not None and settings.admin_token.get_secret_value():
        routes.extend(policy_routes(safety.policy, settings.admin_token.get_secret_value(),
                                      [t.name for t in catalogs.tools], {t.owner for t in catalogs.tools}))
    if local is not None and settings.serve_facilitator:
        # Served for this gateway's own payees and assets (its catalog's) unless configured otherwise.
        terms = [offer.terms for tool in catalogs.tools for offer in tool.offers]
        pay_to, assets = settings.facilitator.allowed({t.pay_to for t in terms}, {(t.network, t.asset) for t in terms})
        routes.extend(facilitator_routes(local, rate_limit=settings.facilitator_rate_limit, store=store,
                                         pay_to=pay_to, assets=assets))
    return metrics, dashboard, routes


def create_app(
    settings: Settings,
    *,
    catalogs: Catalogs | None = None,
    facilitator: Facilitator | None = None,
    schemes: Schemes | None = None,
    upstream: UpstreamClient | None = None,
    ledger: Ledger | None = None,
    store: StateStore | None = None,
    audit: AuditSink | None = None,
    fast_path: bool = True,
    tracing: Tracing | None = None,
) -> Starlette:
    """The gateway app. Schemes are built from settings unless handed in (``schemes``, or one
    ``facilitator`` serving exact on every network); the other keywords are seams as well."""
    # asset: USDC on the local chain is the token of the dev chain's deployment file, when there is one.
    # ${NAME} in the catalog's values reads this process's environment (catalog.interpolation).
    catalogs = catalogs if catalogs is not None else load_catalogs(
        settings.catalog, local=local_tokens(settings.deployment_file), env=os.environ
    )
    _reaccess_needs_public_url(settings, catalogs)
    wiring = wire_schemes(settings, catalogs, facilitator=facilitator, schemes=schemes)
    bridge = build_bridge(catalogs)
    refunder = build_refunder(settings, wiring.chains)
    ledger = ledger or open_ledger(settings.database_url)
    webhooks = Webhooks.from_settings(settings, ledger)  # the ledger writes their events from now on
    store = store or create_store(settings.redis_url, settings.redis_prefix)
    upstream = upstream or AiohttpUpstreamClient()
    safety = build_safety(settings, catalogs, store)
    webhooks.watch(safety)  # breaker.opened, budget.exhausted
    receipts = receipt_signer(settings, {offer.terms.network for tool in catalogs.tools for offer in tool.offers})
    pipeline = Pipeline(
        catalogs, wiring.schemes, ledger, upstream,
        public_url=settings.public_url, max_body_bytes=settings.max_body_bytes,
        max_upstream_response_bytes=settings.max_upstream_response_bytes,
        challenge_body_version=1 if settings.challenge_body == "v1" else 2,
        identifier_required=settings.payment_identifier == "required",
        store=store, refunder=refunder, audit=audit, safety=safety,
        lock_ttl_ms=lock_ttl_ms(settings, catalogs, bridge, wiring, facilitator), bridge=bridge,
        wallets=wiring.wallets, receipts=receipts,
        tracing=tracing if tracing is not None else tracing_from_env(),  # OTEL_* asks for traces, or off
        chain_clocks={network: chain.head_clock for network, chain in wiring.chains.items()},
    )
    metrics, dashboard, routes = _operations(settings, catalogs, wiring, pipeline, ledger, store, safety)
    evidence = SettlementEvidence(pipeline.audit, wiring.chains)  # a receipt only for a settlement borne out
    mcp_endpoint, agent_routes = _agent_interface(settings, pipeline, ledger, store, receipts, evidence)
    routes.extend([*agent_routes, *webhooks.routes(settings), _paid_route(pipeline)])
    cors = _cors()
    lifespan = _lifespan(wiring, catalogs, ledger, store, upstream, pipeline, mcp_endpoint, refunder, settings.resolve_pending_seconds)
    app = _Gateway(routes=routes, middleware=[Middleware(CORSMiddleware, **cors)], exception_handlers={404: _not_found},
                   lifespan=webhooks.around(lifespan))
    if fast_path:
        # Unpaid calls to a tool get their 402 before the middleware stack (gateway.pipeline.fastpath),
        # with the CORS headers this app's CORSMiddleware would add.
        app.front = lambda stack: UnpaidFastPath(
            stack, pipeline=pipeline, cors=CORSMiddleware(stack, **cors), routes=routes[:-1]
        )
    for name, part in {
        "pipeline": pipeline, "ledger": ledger, "webhooks": webhooks, "audit": pipeline.audit, "settings": settings,
        "dependency_health": wiring.health,  # per RPC URL and per facilitator (metrics, readiness)
        "metrics": metrics, "dashboard": dashboard,
    }.items():
        setattr(app.state, name, part)
    mcp_endpoint.attach(app)  # tools/call goes through this app's own paid path
    return app


def _agent_interface(
    settings: Settings, pipeline: Pipeline, ledger: Ledger, store: StateStore, receipts: ReceiptSigner | None,
    evidence: SettlementEvidence,
) -> tuple[McpEndpoint, list[Route]]:
    """Every discovery format and MCP, all generated from the pipeline's catalog, with one search
    index for /tools?q= and MCP's search_tools (built on the first search); the payer's receipts."""
    search = ToolSearch(lambda: [compiled.tool for compiled in pipeline.tools.values()])
    mcp_endpoint = McpEndpoint(pipeline, settings.public_url, search=search, max_body_bytes=settings.max_body_bytes)
    discovery = Discovery(pipeline, settings.public_url, search=search, receipts=lambda base: receipts_discovery(receipts, base))
    routes = [*discovery.routes(), mcp_endpoint.route(), *ReceiptEndpoint(receipts, ledger, store, settings.public_url,
                                                                                 evidence=evidence).routes()]
    return mcp_endpoint, routes


def describe(app: Any) -> list[str]:
    """Lines naming each tool on sale, for the CLI's start-up banner."""
    pipeline: Pipeline = app.state.pipeline
    return [
        f"  {t.tool.method:6} {t.tool.path:32} {t.tool.name:20} {t.price_text}"
        for t in pipeline.tools.values()
    ]
