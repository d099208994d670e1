"""The app's start-up checks against the outside world, run in its lifespan before it serves:
each chain is the one we think and its tokens what the catalog says, each batched network's
BatchSettler takes this process's account, each remote facilitator serves its networks. Every
refusal is a ``GatewayConfigError`` with a code (``x402gw serve`` tells it in one line, exit 2:
``gateway.cli.startup``)."""

from __future__ import annotations

from collections.abc import Mapping

from catalog import Catalogs
from gateway.errors import GatewayConfigError
from settlement.chain.client import JsonRpcChain
from settlement.errors import ChainUnavailable, FacilitatorUnavailable, SettlementError
from settlement.schemes import Schemes
from settlement.schemes.batch import BatchingFacilitator
from settlement.schemes.exact_permit2 import ExactWithPermit2, token_problem
from settlement.schemes.failover import FailoverFacilitator

__all__ = ["bind_batch_settlers", "check_chains", "check_remote_facilitators"]


async def check_chains(chains: dict[str, JsonRpcChain], catalogs: Catalogs, schemes: Schemes | None = None) -> None:
    """Start-up checks against each chain: it is the chain we think, and the tokens are what the
    catalog says (a wrong asset_name/version would make every signature fail on chain; a token
    without EIP-3009 is paid through Permit2 or not at all: ``token_problem``)."""
    for network, chain in chains.items():
        try:
            remote_id = await chain.remote_chain_id()
        except ChainUnavailable as exc:
            raise GatewayConfigError(f"chain RPC for {network} is not reachable: {exc.message}", code="chain_unreachable") from None
        if remote_id != chain.chain_id:
            raise GatewayConfigError(f"RPC for {network} serves chain id {remote_id}", code="chain_id_mismatch")
        await chain.head_clock.read_ahead()  # the chain's clock, known before the first paid call is judged by it
        checked: set[str] = set()
        for terms in (offer.terms for tool in catalogs.tools for offer in tool.offers):
            if terms.network != network or terms.asset in checked:
                continue
            checked.add(terms.asset)
            exact = schemes.get("exact", network) if schemes is not None else None
            permit2_path = isinstance(exact, ExactWithPermit2) and exact.permit2_serves(network)
            if problem := await token_problem(chain, terms, permit2_path):
                raise GatewayConfigError(problem[1], code=problem[0])


async def bind_batch_settlers(batching: BatchingFacilitator | None) -> None:
    """Each batched network's BatchSettler takes settlements from this process's account (read on
    chain): the one of several listed that does, or a start-up refusal with its code."""
    if batching is None:
        return
    try:
        await batching.bind()
    except ChainUnavailable as exc:
        raise GatewayConfigError(f"chain RPC is not reachable to read the BatchSettler: {exc.message}",
                                 code="chain_unreachable") from None
    except SettlementError as exc:
        raise GatewayConfigError(exc.message, code=exc.code) from None


async def check_remote_facilitators(remotes: Mapping[str, FailoverFacilitator]) -> None:
    """The remote facilitators of each network must say (GET /supported) that they serve exact on
    it: at least one must answer, and every one that answers must list it (a backup that cannot
    serve the network is a configuration error, found now rather than at failover). Facilitators
    are named by scheme and host only (their URLs may hold keys)."""
    for network, remotes_of_network in remotes.items():
        answered = 0
        for remote in remotes_of_network.facilitators:
            try:
                supported = await remote.fetch_supported()
            except FacilitatorUnavailable:
                continue
            answered += 1
            kinds = supported.get("kinds", []) if isinstance(supported, dict) else []
            if not any(
                isinstance(k, dict) and k.get("scheme") == "exact" and k.get("network") == network and k.get("x402Version") == 2
                for k in kinds
            ):
                raise GatewayConfigError(
                    f"facilitator {remote.label} does not support exact on {network} (x402 v2); "
                    "the routes on that network cannot be served",
                    code="facilitator_unsupported_network",
                )
        if not answered:
            raise GatewayConfigError(
                f"facilitator {remotes_of_network.label} for {network} did not answer /supported "
                "(unreachable, or it refused this gateway's credentials: see the log)",
                code="facilitator_unreachable",
            )
