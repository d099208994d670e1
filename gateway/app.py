"""Composition root: settings → catalog, chain, facilitator, ledger, upstream client → Starlette app.

``create_app`` is the only place that knows every part; tests pass their own seams (a facilitator,
an upstream client, a ledger) through its keyword arguments.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from catalog import CatalogError, Catalogs, load_catalogs
from catalog.loader import price_ceiling_issues
from gateway.ops.admin import Dashboard, admin_routes
from gateway.surfaces.discovery import Discovery
from gateway.errors import GatewayConfigError, GatewayError
from gateway.headers import (
    ACCEPT,
    CONTENT_TYPE,
    PAYMENT_REQUIRED,
    PAYMENT_RESPONSE,
    PAYMENT_SIGNATURE,
    REQUEST_ID,
    X_PAYMENT,
    X_PAYMENT_RESPONSE,
)
from gateway.pipeline.fastpath import UnpaidFastPath
from gateway.ops.health import Readiness, gateway_checks, healthz
from gateway.ops.metrics import GatewayMetrics
from gateway.pipeline.pipeline import Pipeline
from gateway.safety.policy import Policy, policy_routes
from gateway.safety.checks import Limits, Safety
from gateway.settings import Settings
from gateway.surfaces.facilitator_api import facilitator_routes
from gateway.surfaces.mcp import McpEndpoint
from gateway.upstream.bridge import AiohttpUpstreamClient, Bridge, BridgeConfigError, UpstreamClient
from gateway.store import StateStore, StoreUnavailable, create_store
from settlement.schemes.batch import BatchingFacilitator, BatchPolicy, build_batching
from settlement.chain.client import JsonRpcChain
from settlement.chain.deployment import ANVIL_KEYS, LOCAL_CHAIN_ID, Deployment
from settlement.errors import ChainUnavailable, FacilitatorUnavailable, SettlementError
from settlement.schemes import ExactEvm, Facilitator, LocalFacilitator, Schemes
from settlement.audit import AuditSink
from settlement.ledger import Ledger
from settlement.schema import open_ledger
from settlement.ledger.resolve import resolve_open_payments
from settlement.chain.refunds import Refunder
from settlement.schemes.remote import RemoteFacilitator

log = logging.getLogger("x402gw")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ANVIL_KEYS = frozenset(key.lower().removeprefix("0x") for key in ANVIL_KEYS)


def is_dev_key(key: str) -> bool:
    return key.lower().removeprefix("0x") in _ANVIL_KEYS


def _key_for(settings: Settings, network: str, chain_id: int, deployment: Deployment | None) -> str | None:
    key = settings.settlement_key.get_secret_value() if settings.settlement_key else None
    if key is None and chain_id == LOCAL_CHAIN_ID and deployment is not None:
        key = deployment.settlement_key
    return key


def _refuse_dev_key(key: str | None, network: str, chain_id: int, what: str) -> None:
    if key is not None and chain_id != LOCAL_CHAIN_ID and is_dev_key(key):
        raise GatewayConfigError(
            f"refusing to start: the {what} for {network} is a public anvil dev key; "
            "anyone can spend from it. Use a key of your own.",
            code="dev_key_on_public_chain",
        )


def facilitator_plan(settings: Settings, networks: set[str]) -> dict[str, str]:
    """network → "local" or the URL of the remote facilitator that serves it."""
    plan: dict[str, str] = {}
    for network in sorted(networks):
        plan[network] = settings.facilitators.get(network) or settings.facilitator_url or "local"
    return plan


def write_ahead_networks(plan: dict[str, str]) -> set[str]:
    """The networks whose facilitator records the transaction hash before it broadcasts: those
    settled by this gateway's local facilitator. On the others (a remote facilitator) a payment
    left ``settling`` without a hash may have been broadcast, so it is unknown, never "not sent".
    The request path, the start-up reconcile and ``x402gw reconcile`` all use this set."""
    return {network for network, where in plan.items() if where == "local"}


def build_chains(settings: Settings, catalogs: Catalogs, local_networks: set[str] | None = None) -> dict[str, JsonRpcChain]:
    """One chain client per network the catalog sells on. Networks settled locally need an RPC URL
    and a settlement key; others get a read-only client when an RPC URL is configured (used to
    resolve open payments). Dev keys are refused off the local chain."""
    networks = sorted({tool.payment.network for tool in catalogs.tools})
    local = set(networks) if local_networks is None else local_networks
    deployment: Deployment | None = None
    chains: dict[str, JsonRpcChain] = {}
    for network in networks:
        chain_id = int(network.split(":", 1)[1])
        rpc_url = settings.rpc_urls.get(network)
        if chain_id == LOCAL_CHAIN_ID and deployment is None and (rpc_url is None or settings.settlement_key is None):
            try:
                deployment = Deployment.read(settings.deployment_file)
            except Exception as exc:  # DevchainError: its message says to run `x402gw devchain`
                if network in local:
                    raise GatewayConfigError(str(exc), code="deployment_missing") from None
        if rpc_url is None and chain_id == LOCAL_CHAIN_ID and deployment is not None:
            rpc_url = deployment.rpc_url
        key = _key_for(settings, network, chain_id, deployment) if network in local else None
        if rpc_url is None:
            if network not in local:
                continue
            raise GatewayConfigError(
                f"no RPC URL for {network}: set X402GW_RPC_URLS='{{\"{network}\": \"https://...\"}}'",
                code="rpc_url_missing",
            )
        if network in local and key is None:
            raise GatewayConfigError(
                f"no settlement key for {network}: set X402GW_SETTLEMENT_KEY", code="settlement_key_missing"
            )
        _refuse_dev_key(key, network, chain_id, "settlement key")
        chains[network] = JsonRpcChain(rpc_url, chain_id, key)
    return chains


def build_batching_facilitator(settings: Settings, local: LocalFacilitator, chains: dict[str, JsonRpcChain]) -> BatchingFacilitator:
    policies = {n: BatchPolicy(p.max_wait_ms, p.max_payments) for n, p in settings.batch_settlement.items()}
    try:
        return build_batching(
            local, dict(chains), policies, {n: p.contract for n, p in settings.batch_settlement.items()},
            deployment_file=settings.deployment_file, receipt_timeout=settings.receipt_timeout_seconds,
        )
    except SettlementError as exc:
        raise GatewayConfigError(exc.message, code=exc.code) from None


@dataclass
class SchemeWiring:
    """The schemes this gateway offers, and the parts behind them that the app also needs: chain
    clients (start-up checks, refunds, readiness), the local facilitator (the /facilitator API)
    and the remote ones (their /supported at start-up, readiness, lock lifetime, closing)."""

    schemes: Schemes
    chains: dict[str, JsonRpcChain] = field(default_factory=dict)
    local: LocalFacilitator | None = None
    remotes: dict[str, RemoteFacilitator] = field(default_factory=dict)


def build_schemes(settings: Settings, catalogs: Catalogs) -> SchemeWiring:
    """``exact`` on every network the catalog sells on: settled by this gateway's local facilitator
    (batched where X402GW_BATCH_SETTLEMENT says so; it writes the transaction hash ahead), or by
    the remote facilitator configured for the network (read-only chain access, where configured,
    resolves its open payments). A scheme to come is one more ``Scheme`` in this list."""
    plan = facilitator_plan(settings, {tool.payment.network for tool in catalogs.tools})
    local_networks = write_ahead_networks(plan)
    wiring = SchemeWiring(Schemes(), build_chains(settings, catalogs, local_networks))
    if local_networks:
        local_chains = {n: c for n, c in wiring.chains.items() if n in local_networks}
        wiring.local = LocalFacilitator(local_chains, receipt_timeout=settings.receipt_timeout_seconds)
        batching = build_batching_facilitator(settings, wiring.local, wiring.chains) if settings.batch_settlement else None
        # The batching facilitator settles its networks in batches and the others as ``local`` does.
        settler: Facilitator = batching if batching is not None else wiring.local
        wiring.schemes.register(ExactEvm(settler, local_networks, chains=wiring.chains, writes_ahead=True))
    by_url: dict[str, list[str]] = {}
    for network, where in plan.items():
        if where != "local":
            by_url.setdefault(where, []).append(network)
    for url, served in by_url.items():
        remote = RemoteFacilitator(url, settle_timeout=settings.facilitator_settle_timeout_seconds)
        wiring.remotes.update((network, remote) for network in served)
        wiring.schemes.register(ExactEvm(remote, served, chains=wiring.chains, writes_ahead=False))
    return wiring


def check_schemes(schemes: Schemes, catalogs: Catalogs) -> None:
    """Every tool's ``payment.scheme`` must be served on its network by a registered scheme."""
    unserved = schemes.unserved(catalogs.tools)
    if unserved:
        raise GatewayConfigError("; ".join(unserved), code="scheme_not_served")


def build_safety(settings: Settings, catalogs: Catalogs, store: StateStore) -> Safety:
    """Limits from settings and catalog, the policy (file and store), breakers; refuses to start on
    a tool priced above X402GW_MAX_PRICE or a budget the token's decimals cannot express."""
    if settings.max_price is not None:
        issues = price_ceiling_issues(catalogs, settings.max_price)
        if issues:
            raise CatalogError(issues)
    try:
        return Safety(store, catalogs, Limits.from_settings(settings), policy=Policy(store, settings.policy_file))
    except ValueError as exc:
        raise GatewayConfigError(str(exc), code="invalid_safety_limits") from None


def build_refunder(settings: Settings, chains: dict[str, JsonRpcChain]) -> Refunder | None:
    if settings.refund_key is None:
        return None
    key = settings.refund_key.get_secret_value()
    refund_chains: dict[str, JsonRpcChain] = {}
    for network, chain in chains.items():
        _refuse_dev_key(key, network, chain.chain_id, "refund key")
        refund_chains[network] = JsonRpcChain(chain.rpc_url, chain.chain_id, key)
    return Refunder(refund_chains, receipt_timeout=settings.receipt_timeout_seconds)


# Allowance for a step bounded by chain RPC calls (each JsonRpcChain request gives up after 10 s):
# a local verify, a broadcast, resolving an open payment against the chain.
CHAIN_STEP_SECONDS = 20.0
LOCK_MARGIN_SECONDS = 30.0


def in_flight_lock_ttl_ms(
    settings: Settings,
    catalogs: Catalogs,
    bridge: Bridge,
    *,
    remotes: Iterable[RemoteFacilitator] = (),
    local: bool = True,
) -> int:
    """How long a payment's in-flight lock lives: longer than any request can hold it, or it lapses
    under a live request and a resend of the same payment runs beside it. The longest path is an
    open payment resolved against the chain, verify, the slowest tool's upstream call (every try,
    failover and backoff), settlement (a remote facilitator's settle timeout, or a local broadcast,
    batch wait and receipt wait), and a refund of a settle-first tool; plus a margin.
    ``remotes``: the remote facilitators in use; ``local``: whether any network settles locally."""
    remotes = list(remotes)
    upstream = max((bridge.max_call_seconds(tool) for tool in catalogs.tools), default=0.0)
    batch_wait = max((p.max_wait_ms / 1000 for p in settings.batch_settlement.values()), default=0.0)
    local_settle = CHAIN_STEP_SECONDS + batch_wait + settings.receipt_timeout_seconds
    verify = max([r.verify_timeout_seconds for r in remotes] + ([CHAIN_STEP_SECONDS] if local else []), default=0.0)
    settle = max([r.settle_timeout_seconds for r in remotes] + ([local_settle] if local else []), default=0.0)
    refunds = settings.refund_key is not None and any(tool.settle == "upfront" for tool in catalogs.tools)
    refund = CHAIN_STEP_SECONDS + settings.receipt_timeout_seconds if refunds else 0.0
    seconds = CHAIN_STEP_SECONDS + verify + upstream + settle + refund + LOCK_MARGIN_SECONDS
    return math.ceil(1000 * seconds)


async def check_chains(chains: dict[str, JsonRpcChain], catalogs: Catalogs) -> None:
    """Start-up checks against each chain: it is the chain we think, and the tokens are what the
    catalog says (a wrong asset_name/version would make every signature fail on chain)."""
    for network, chain in chains.items():
        try:
            remote_id = await chain.remote_chain_id()
        except ChainUnavailable as exc:
            raise GatewayConfigError(f"chain RPC for {network} is not reachable: {exc.message}", code="chain_unreachable") from None
        if remote_id != chain.chain_id:
            raise GatewayConfigError(f"RPC for {network} serves chain id {remote_id}", code="chain_id_mismatch")
        checked: set[str] = set()
        for tool in catalogs.tools:
            terms = tool.payment
            if terms.network != network or terms.asset in checked:
                continue
            checked.add(terms.asset)
            try:
                name, version, decimals = await chain.token_metadata(terms.asset)
            except ChainUnavailable:
                raise GatewayConfigError(
                    f"asset {terms.asset} on {network} does not answer name()/version()/decimals(); "
                    "is it an EIP-3009 token, and is the dev chain the one in the deployment file?",
                    code="asset_not_eip3009",
                ) from None
            if (name, version, decimals) != (terms.asset_name, terms.asset_version, terms.decimals):
                raise GatewayConfigError(
                    f"asset {terms.asset} on {network} is ({name!r}, {version!r}, {decimals} decimals) but the "
                    f"catalog says ({terms.asset_name!r}, {terms.asset_version!r}, {terms.decimals})",
                    code="asset_mismatch",
                )


async def check_remote_facilitators(remotes: dict[str, RemoteFacilitator]) -> None:
    """Each remote facilitator must say (GET /supported) that it serves exact on its network."""
    for network, remote in remotes.items():
        try:
            supported = await remote.fetch_supported()
        except FacilitatorUnavailable as exc:
            raise GatewayConfigError(
                f"facilitator {remote.url} for {network} did not answer /supported: {exc.message}",
                code="facilitator_unreachable",
            ) from None
        kinds = supported.get("kinds", []) if isinstance(supported, dict) else []
        if not any(
            isinstance(k, dict) and k.get("scheme") == "exact" and k.get("network") == network and k.get("x402Version") == 2
            for k in kinds
        ):
            raise GatewayConfigError(
                f"facilitator {remote.url} does not support exact on {network} (x402 v2); "
                "the routes on that network cannot be served",
                code="facilitator_unsupported_network",
            )


class _Gateway(Starlette):
    """Starlette, with an optional front (the unpaid fast path) around its whole middleware stack."""

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


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
) -> Starlette:
    catalogs = catalogs if catalogs is not None else load_catalogs(settings.catalog)
    # The schemes on offer: built from settings, or handed in (tests, embedding). A facilitator
    # handed in serves exact on every network, without chain access or write-ahead.
    if schemes is not None:
        wiring = SchemeWiring(schemes)
    elif facilitator is not None:
        wiring = SchemeWiring(Schemes([ExactEvm(facilitator)]))
    else:
        wiring = build_schemes(settings, catalogs)
    check_schemes(wiring.schemes, catalogs)
    chains, local, remotes = wiring.chains, wiring.local, wiring.remotes
    try:  # upstream credentials and WSDLs are read now: a missing one stops the start, named
        bridge = Bridge(catalogs.tools)
    except BridgeConfigError as exc:
        raise GatewayConfigError(exc.message, code=exc.code) from None
    refunder = build_refunder(settings, chains)
    ledger = ledger or open_ledger(settings.database_url)
    store = store or create_store(settings.redis_url, settings.redis_prefix)
    upstream = upstream or AiohttpUpstreamClient()
    safety = build_safety(settings, catalogs, store)
    pipeline = Pipeline(
        catalogs,
        wiring.schemes,
        ledger,
        upstream,
        public_url=settings.public_url,
        max_body_bytes=settings.max_body_bytes,
        max_upstream_response_bytes=settings.max_upstream_response_bytes,
        challenge_body_version=1 if settings.challenge_body == "v1" else 2,
        store=store,
        refunder=refunder,
        audit=audit,
        safety=safety,
        lock_ttl_ms=in_flight_lock_ttl_ms(
            settings, catalogs, bridge,
            # an injected facilitator (tests, embedding) is timed as what it is
            remotes=set(remotes.values()) or ([facilitator] if isinstance(facilitator, RemoteFacilitator) else []),
            local=local is not None or not (remotes or isinstance(facilitator, RemoteFacilitator)),
        ),
        bridge=bridge,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await check_chains(chains, catalogs)
        await check_remote_facilitators(remotes)
        try:
            await store.ping()
        except StoreUnavailable:
            raise GatewayConfigError("the state store (Redis) is not reachable", code="store_unavailable") from None
        # Payments left open by a crash are resolved against the chain before serving.
        # Per network, as on the request path: a remote facilitator's open row stays open.
        resolved = await resolve_open_payments(ledger, wiring.schemes)
        for resolution in resolved:
            log.info("start-up reconcile: %s", resolution.to_json())
        try:
            async with mcp_endpoint.running():  # MCP's session manager lives as long as the app
                yield
        finally:
            await upstream.close()
            await pipeline.audit.close()  # writes what is queued before the process goes
            await store.close()
            for remote in set(remotes.values()):
                await remote.close()
            for chain in chains.values():
                await chain.close()
            if refunder is not None:
                await refunder.close()

    async def paid(request: Request) -> Response:
        return await pipeline.handle(request)

    async def not_found(request: Request, exc: Exception) -> Response:
        return GatewayError("not_found", "no tool is exposed at this path").to_response()

    # Operations: metrics observe every request; readiness checks each dependency; the dashboard.
    metrics = GatewayMetrics()
    pipeline.observers.append(metrics)
    readiness = Readiness(
        gateway_checks(
            engine=ledger.engine, store=store, chains=chains, remote_facilitators=remotes,
            local_networks={n for n in chains if local is not None and local.chain_for(n) is not None},
        ),
        timeout=settings.readiness_timeout_seconds,
    )
    dashboard = Dashboard(ledger.engine, catalogs, metrics, breakers=safety.breakers.states)
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
        routes.extend(facilitator_routes(local, rate_limit=settings.facilitator_rate_limit, store=store,
                                         pay_to=settings.facilitator_pay_to))
    # Agent interface: every discovery format and MCP, all generated from the pipeline's catalog.
    mcp_endpoint = McpEndpoint(pipeline, settings.public_url)
    routes.extend([*Discovery(pipeline, settings.public_url).routes(), mcp_endpoint.route()])
    routes.append(Route("/{path:path}", paid, methods=ALL_METHODS))
    cors: dict[str, Any] = dict(
        allow_origins=["*"],
        allow_methods=ALL_METHODS,
        allow_headers=[CONTENT_TYPE, PAYMENT_SIGNATURE, X_PAYMENT, ACCEPT],
        expose_headers=[PAYMENT_REQUIRED, PAYMENT_RESPONSE, X_PAYMENT_RESPONSE, REQUEST_ID],
    )
    app = _Gateway(
        routes=routes,
        middleware=[Middleware(CORSMiddleware, **cors)],
        exception_handlers={404: not_found},
        lifespan=lifespan,
    )
    if fast_path:
        # Unpaid calls to a tool get their 402 before the middleware stack (gateway.pipeline.fastpath),
        # with the CORS headers this app's CORSMiddleware would add.
        app.front = lambda stack: UnpaidFastPath(
            stack, pipeline=pipeline, cors=CORSMiddleware(stack, **cors), routes=routes[:-1]
        )
    app.state.pipeline = pipeline
    app.state.ledger = ledger
    app.state.audit = pipeline.audit
    app.state.settings = settings
    mcp_endpoint.attach(app)  # tools/call goes through this app's own paid path
    app.state.metrics = metrics
    app.state.dashboard = dashboard
    return app


def describe(app: Any) -> list[str]:
    """Lines naming each tool on sale, for the CLI's start-up banner."""
    pipeline: Pipeline = app.state.pipeline
    return [
        f"  {t.tool.method:6} {t.tool.path:32} {t.tool.name:20} {t.price_text}"
        for t in pipeline.tools.values()
    ]
