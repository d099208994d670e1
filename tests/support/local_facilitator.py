"""Our facilitator API over the local facilitator on the test anvil, as a Starlette app to serve."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from gateway.devkit.devchain import Deployment
from gateway.surfaces.facilitator_api import facilitator_routes
from settlement.chain.client import JsonRpcChain
from settlement.schemes.exact_local import LocalFacilitator


def local_facilitator_app(deployment: Deployment, prefix: str = "/facilitator") -> Starlette:
    chain = JsonRpcChain(deployment.rpc_url, deployment.chain_id, deployment.settlement_key)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await chain.close()  # on the server's own loop, where the RPC session lives

    return Starlette(routes=facilitator_routes(LocalFacilitator({deployment.network: chain}), prefix), lifespan=lifespan)
