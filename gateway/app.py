"""Composition root: settings → catalog, chain, facilitator, ledger, upstream client → Starlette app.

``create_app`` is the only place that knows every part; tests pass their own seams (a facilitator,
an upstream client, a ledger) through its keyword arguments.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from catalog import Catalogs, load_catalogs
from gateway.errors import GatewayError
from gateway.pipeline import Pipeline
from gateway.settings import Settings
from gateway.stages.bridge import AiohttpUpstreamClient, UpstreamClient
from settlement.chain import Web3Chain
from settlement.devchain import ANVIL_KEYS, LOCAL_CHAIN_ID, Deployment
from settlement.errors import ChainUnavailable
from settlement.facilitator import Facilitator, LocalFacilitator
from settlement.ledger import Ledger

log = logging.getLogger("x402gw")

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ANVIL_KEYS = frozenset(key.lower().removeprefix("0x") for key in ANVIL_KEYS)


class GatewayConfigError(Exception):
    """The gateway refuses to start: the message says what to fix."""

    def __init__(self, message: str, code: str = "invalid_configuration") -> None:
        super().__init__(message)
        self.code = code


def is_dev_key(key: str) -> bool:
    return key.lower().removeprefix("0x") in _ANVIL_KEYS


def build_chains(settings: Settings, catalogs: Catalogs) -> dict[str, Web3Chain]:
    """One chain client per network the catalog sells on; refuse dev keys off the local chain."""
    networks = sorted({tool.payment.network for tool in catalogs.tools})
    deployment: Deployment | None = None
    chains: dict[str, Web3Chain] = {}
    for network in networks:
        chain_id = int(network.split(":", 1)[1])
        rpc_url = settings.rpc_urls.get(network)
        key = settings.settlement_key.get_secret_value() if settings.settlement_key else None
        if chain_id == LOCAL_CHAIN_ID and (rpc_url is None or key is None):
            if deployment is None:
                try:
                    deployment = Deployment.read(settings.deployment_file)
                except Exception as exc:  # DevchainError: message says to run `x402gw devchain`
                    raise GatewayConfigError(str(exc), code="deployment_missing") from None
            rpc_url = rpc_url or deployment.rpc_url
            key = key or deployment.settlement_key
        if rpc_url is None:
            raise GatewayConfigError(
                f"no RPC URL for {network}: set X402GW_RPC_URLS='{{\"{network}\": \"https://...\"}}'",
                code="rpc_url_missing",
            )
        if key is None:
            raise GatewayConfigError(
                f"no settlement key for {network}: set X402GW_SETTLEMENT_KEY", code="settlement_key_missing"
            )
        if chain_id != LOCAL_CHAIN_ID and is_dev_key(key):
            raise GatewayConfigError(
                f"refusing to start: the settlement key for {network} is a public anvil dev key; "
                "anyone can spend from it. Use a key of your own.",
                code="dev_key_on_public_chain",
            )
        chains[network] = Web3Chain(rpc_url, chain_id, key)
    return chains


async def check_chains(chains: dict[str, Web3Chain], catalogs: Catalogs) -> None:
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


def create_app(
    settings: Settings,
    *,
    catalogs: Catalogs | None = None,
    facilitator: Facilitator | None = None,
    upstream: UpstreamClient | None = None,
    ledger: Ledger | None = None,
) -> Starlette:
    catalogs = catalogs if catalogs is not None else load_catalogs(settings.catalog)
    chains: dict[str, Web3Chain] = {}
    if facilitator is None:
        chains = build_chains(settings, catalogs)
        facilitator = LocalFacilitator(dict(chains), receipt_timeout=settings.receipt_timeout_seconds)
    ledger = ledger or Ledger(settings.database_url)
    upstream = upstream or AiohttpUpstreamClient()
    pipeline = Pipeline(
        catalogs,
        facilitator,
        ledger,
        upstream,
        public_url=settings.public_url,
        max_body_bytes=settings.max_body_bytes,
        max_upstream_response_bytes=settings.max_upstream_response_bytes,
        challenge_body_version=1 if settings.challenge_body == "v1" else 2,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await check_chains(chains, catalogs)
        try:
            yield
        finally:
            await upstream.close()
            for chain in chains.values():
                await chain.close()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def paid(request: Request) -> Response:
        return await pipeline.handle(request)

    async def not_found(request: Request, exc: Exception) -> Response:
        return GatewayError("not_found", "no tool is exposed at this path").to_response()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/{path:path}", paid, methods=ALL_METHODS),
        ],
        middleware=[
            Middleware(
                CORSMiddleware,
                allow_origins=["*"],
                allow_methods=ALL_METHODS,
                allow_headers=["Content-Type", "PAYMENT-SIGNATURE", "X-PAYMENT", "Accept"],
                expose_headers=["PAYMENT-REQUIRED", "PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE", "X-Request-Id"],
            )
        ],
        exception_handlers={404: not_found},
        lifespan=lifespan,
    )
    app.state.pipeline = pipeline
    app.state.ledger = ledger
    app.state.settings = settings
    return app


def describe(app: Any) -> list[str]:
    """Lines naming each tool on sale, for the CLI's start-up banner."""
    pipeline: Pipeline = app.state.pipeline
    return [
        f"  {t.offer.tool.method:6} {t.offer.tool.path:32} {t.offer.tool.name:20} {t.price_text}"
        for t in pipeline.tools.values()
    ]
