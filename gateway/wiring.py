"""The composition root's wiring: what ``gateway.app.create_app`` builds from settings, and checks.

Chain clients, the schemes and the facilitators behind them, safety, refunds, the bridge and the
in-flight lock's lifetime; and the checks of settings against the catalog (every refusal is a
``GatewayConfigError`` with a code). The checks against chains and facilitators, once the server
runs, are ``gateway.start_checks``. Same room as ``gateway.app``, which re-exports
the names other modules import from it (``build_chains``, ``facilitator_plan``, ...).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog import CatalogError, Catalogs
from catalog.loader import price_ceiling_issues
from gateway.errors import GatewayConfigError
from gateway.safety.checks import Limits, Safety
from gateway.safety.policy import Policy
from gateway.settings import Settings
from gateway.store import StateStore
from gateway.upstream.bridge import Bridge, BridgeConfigError
from settlement.chain.client import JsonRpcChain
from settlement.chain.deployment import ANVIL_KEYS, LOCAL_CHAIN_ID, Deployment, DevchainError, rehearsal_deployment
from settlement.chain.refunds import Refunder
from settlement.errors import SettlementError
from settlement.schemes import ANY_NETWORK, ExactEvm, Facilitator, LocalFacilitator, Schemes, WalletSignatures
from settlement.schemes.batch import BatchingFacilitator, BatchPolicy, build_batching
from settlement.schemes.channels import ChannelPolicy, ChannelsEvm, build_channels
from settlement.schemes.exact_permit2 import NO_PAYMENT_PATH, permit2_problems, with_permit2
from settlement.schemes.failover import FailoverFacilitator
from settlement.schemes.remote import RemoteFacilitator
from settlement.schemes.upto import build_upto

__all__ = [
    "CHAIN_STEP_SECONDS",
    "LOCK_MARGIN_SECONDS",
    "SchemeWiring",
    "build_batching_facilitator",
    "build_bridge",
    "build_chains",
    "build_refunder",
    "build_safety",
    "build_schemes",
    "check_schemes",
    "facilitator_plan",
    "in_flight_lock_ttl_ms",
    "is_dev_key",
    "lock_ttl_ms",
    "wire_schemes",
    "write_ahead_networks",
]

_ANVIL_KEYS = frozenset(key.lower().removeprefix("0x") for key in ANVIL_KEYS)


def is_dev_key(key: str) -> bool:
    return key.lower().removeprefix("0x") in _ANVIL_KEYS


def _key_for(settings: Settings, network: str, chain_id: int, deployment: Deployment | None) -> str | None:
    key = settings.settlement_key.get_secret_value() if settings.settlement_key else None
    if key is None and deployment is not None and deployment.chain_id == chain_id:
        key = deployment.settlement_key
    return key


SECPK1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141  # secp256k1's order: a key is below it
_PRIVATE_KEY = re.compile(r"(0x)?[0-9a-fA-F]{64}")


def _check_key(key: str | None, setting: str) -> None:
    """A key that is not 32 bytes of hex, or not a key of the curve (0, n and above: the signing
    library's error would quote it as a number), is named by its setting, never quoted (a secret)."""
    if key is not None and (_PRIVATE_KEY.fullmatch(key.strip()) is None or not 0 < int(key.strip(), 16) < SECPK1_N):
        raise GatewayConfigError(f"{setting} is not a private key (32 bytes, hex, below the curve order)", code="invalid_key")


def _refuse_dev_key(key: str | None, network: str, chain_id: int, what: str) -> None:
    if key is not None and chain_id != LOCAL_CHAIN_ID and is_dev_key(key):
        raise GatewayConfigError(
            f"refusing to start: the {what} for {network} is a public anvil dev key; "
            "anyone can spend from it. Use a key of your own.",
            code="dev_key_on_public_chain",
        )


def facilitator_plan(settings: Settings, networks: set[str]) -> dict[str, list[str]]:
    """network → ["local"], or the URLs of the remote facilitators that serve it, in order."""
    return {network: settings.facilitators_for(network) for network in sorted(networks)}


def write_ahead_networks(plan: Mapping[str, Sequence[str]]) -> set[str]:
    """The networks whose facilitator records the transaction hash before it broadcasts: those
    settled by this gateway's local facilitator. On the others (a remote facilitator) a payment
    left ``settling`` without a hash may have been broadcast, so it is unknown, never "not sent".
    The request path, the start-up reconcile and ``x402gw reconcile`` all use this set."""
    return {network for network, where in plan.items() if list(where) == ["local"]}


def build_chains(settings: Settings, catalogs: Catalogs, local_networks: set[str] | None = None) -> dict[str, JsonRpcChain]:
    """One chain client per network the catalog sells on. Networks settled locally need an RPC URL
    and a settlement key; others get a read-only client when an RPC URL is configured (used to
    resolve open payments). Dev keys are refused off the local chain."""
    networks = sorted({offer.terms.network for tool in catalogs.tools for offer in tool.offers})
    local = set(networks) if local_networks is None else local_networks
    deployment: Deployment | None = None
    chains: dict[str, JsonRpcChain] = {}
    for network in networks:
        chain_id = int(network.split(":", 1)[1])
        rpc_urls = settings.rpc_urls_for(network)  # several: failover, in order
        if chain_id == LOCAL_CHAIN_ID and deployment is None and (not rpc_urls or settings.settlement_key is None):
            try:
                deployment = Deployment.read(settings.deployment_file)
            # DevchainError: its message says to run `x402gw devchain`. UnicodeDecodeError: a file
            # that is not UTF-8 (Deployment.read turns every other failure into a DevchainError).
            except (DevchainError, UnicodeDecodeError) as exc:
                if network in local:
                    raise GatewayConfigError(str(exc), code="deployment_missing") from None
        if not rpc_urls and chain_id == LOCAL_CHAIN_ID and deployment is not None:
            rpc_urls = [deployment.rpc_url]
        # A rehearsal (x402gw devchain --rehearse): this network's chain id on a local anvil, as
        # the deployment file says, every RPC URL on loopback and answering as anvil.
        rehearsal = rehearsal_deployment(settings.deployment_file, network, rpc_urls) if chain_id != LOCAL_CHAIN_ID else None
        if rehearsal is not None:
            rpc_urls = rpc_urls or [rehearsal.rpc_url]
        key = _key_for(settings, network, chain_id, rehearsal or deployment) if network in local else None
        if not rpc_urls:
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
        _check_key(key, "X402GW_SETTLEMENT_KEY")
        if rehearsal is None:
            _refuse_dev_key(key, network, chain_id, "settlement key")
        chains[network] = JsonRpcChain(rpc_urls, chain_id, key)
    return chains


def build_batching_facilitator(settings: Settings, local: LocalFacilitator, chains: dict[str, JsonRpcChain]) -> BatchingFacilitator:
    policies = {n: BatchPolicy(p.max_wait_ms, p.max_payments, p.flush_when_idle) for n, p in settings.batch_settlement.items()}
    try:
        return build_batching(
            local, dict(chains), policies, {n: p.candidates for n, p in settings.batch_settlement.items()},
            deployment_file=settings.deployment_file, receipt_timeout=settings.receipt_timeout_seconds,
        )
    except SettlementError as exc:
        raise GatewayConfigError(exc.message, code=exc.code) from None


@dataclass
class SchemeWiring:
    """The schemes this gateway offers, and the parts behind them that the app also needs: chain
    clients (start-up checks, refunds, readiness), the local facilitator (the /facilitator API)
    and the remote ones, each network's list in order (their /supported at start-up, readiness,
    lock lifetime, closing)."""

    schemes: Schemes
    chains: dict[str, JsonRpcChain] = field(default_factory=dict)
    local: LocalFacilitator | None = None
    remotes: dict[str, FailoverFacilitator] = field(default_factory=dict)
    wallets: WalletSignatures | None = None  # contract-wallet signature checks, on ``chains``
    channels: ChannelsEvm | None = None  # batch-settlement: the app binds its store and runs its claims
    batching: BatchingFacilitator | None = None  # X402GW_BATCH_SETTLEMENT: binds its BatchSettlers at start-up

    def health(self) -> dict[str, dict[str, Any]]:
        """Per network, each RPC URL's and each remote facilitator's state as the last call left
        it (``unknown``, ``up``, ``down``; URLs redacted to scheme and host), for metrics and
        readiness: ``{"rpc": {network: [...]}, "facilitators": {network: [...]}}``."""
        return {
            "rpc": {network: chain.rpc_health() for network, chain in sorted(self.chains.items())},
            "facilitators": {network: remote.health() for network, remote in sorted(self.remotes.items())},
        }


def build_schemes(settings: Settings, catalogs: Catalogs) -> SchemeWiring:
    """``exact`` on every network the catalog sells on: settled by this gateway's local facilitator
    (batched where X402GW_BATCH_SETTLEMENT says so; it writes the transaction hash ahead), or by
    the remote facilitator configured for the network (read-only chain access, where configured,
    resolves its open payments). A scheme to come is one more ``Scheme`` in this list."""
    plan = facilitator_plan(settings, {offer.terms.network for tool in catalogs.tools for offer in tool.offers})
    local_networks = write_ahead_networks(plan)
    wiring = SchemeWiring(Schemes(), build_chains(settings, catalogs, local_networks))
    wiring.wallets = build_wallets(settings, wiring.chains)
    if local_networks:
        local_chains = {n: c for n, c in wiring.chains.items() if n in local_networks}
        wiring.local = LocalFacilitator(
            local_chains, receipt_timeout=settings.receipt_timeout_seconds, wallets=wiring.wallets,
            chain_clocks={n: c.head_clock for n, c in local_chains.items()},  # windows by the chain's clock too
        )
        batching = build_batching_facilitator(settings, wiring.local, wiring.chains) if settings.batch_settlement else None
        wiring.batching = batching
        # The batching facilitator settles its networks in batches and the others as ``local`` does.
        settler: Facilitator = batching if batching is not None else wiring.local
        exact = ExactEvm(settler, local_networks, chains=wiring.chains, writes_ahead=True)
        # Permit2 takes ERC-20s without EIP-3009 on the chains with its contracts (the dev chain's).
        # One balance, one count of what its settlements in flight take, whichever scheme moves it.
        in_flight = wiring.local.in_flight
        wiring.schemes.register(with_permit2(exact, local_chains, settings.deployment_file,
                                             receipt_timeout=settings.receipt_timeout_seconds, in_flight=in_flight))
        upto = build_upto(local_chains, settings.deployment_file, receipt_timeout=settings.receipt_timeout_seconds,
                          in_flight=in_flight)
        if upto is not None:  # Permit2 and the upto proxy are there (the dev chain places them)
            wiring.schemes.register(upto)
        wiring.channels = build_channels(local_chains, settings.deployment_file, ChannelPolicy(
            settings.channel_claim_every_calls, settings.channel_claim_every_seconds, settings.channel_deposit_calls,
            min_deposit_calls=settings.channel_min_deposit_calls,
        ), receipt_timeout=settings.receipt_timeout_seconds, in_flight=in_flight)  # a deposit spends that balance too
        if wiring.channels is not None:  # the escrow is there (the dev chain places it)
            wiring.schemes.register(wiring.channels)
    by_urls: dict[tuple[str, ...], list[str]] = {}
    for network, where in plan.items():
        if network not in local_networks:
            by_urls.setdefault(tuple(where), []).append(network)
    for urls, served in by_urls.items():
        # Tried in order; a settle moves on only when it was never sent (settlement.schemes.failover).
        remote = FailoverFacilitator([remote_facilitator(settings, url) for url in urls])
        wiring.remotes.update((network, remote) for network in served)
        wiring.schemes.register(ExactEvm(remote, served, chains=wiring.chains, writes_ahead=False, confirms=True))
    return wiring


def build_wallets(settings: Settings, chains: Mapping[str, JsonRpcChain]) -> WalletSignatures:
    """Contract-wallet checks on every network with a chain client. ERC-6492 factories: those of
    X402GW_EIP6492_ALLOWED_FACTORIES on any network, and on the local chain the dev chain
    deployment's own factory (the demo and devchain configuration)."""
    allowed: dict[str, list[str]] = {ANY_NETWORK: list(settings.eip6492_allowed_factories)}
    for network, chain in chains.items():
        if chain.chain_id != LOCAL_CHAIN_ID:
            continue
        try:
            factory = Deployment.read(settings.deployment_file).wallet_factory
        except (DevchainError, UnicodeDecodeError):
            factory = None  # no dev chain deployment: only the setting's factories
        if factory is not None:
            allowed[network] = [factory]
    return WalletSignatures(chains, allowed)


def remote_facilitator(settings: Settings, url: str) -> RemoteFacilitator:
    """The facilitator at ``url`` with its own credentials (X402GW_FACILITATOR_AUTH, CDP)."""
    try:
        auth = settings.facilitator_auth_for(url)
    except ValueError as exc:  # names the setting and the problem, never the secret
        raise GatewayConfigError(str(exc), code="facilitator_credentials_invalid") from None
    return RemoteFacilitator(url, auth=auth, settle_timeout=settings.facilitator_settle_timeout_seconds)


def check_schemes(schemes: Schemes, catalogs: Catalogs) -> None:
    """Every tool's ``payment.scheme`` must be served on its network by a registered scheme, and a
    token paid through Permit2 needs a Permit2 path there (``no_payment_path``)."""
    unserved = schemes.unserved(catalogs.tools)
    if unserved:
        raise GatewayConfigError("; ".join(unserved), code="scheme_not_served")
    if no_path := permit2_problems(schemes, catalogs.tools):
        raise GatewayConfigError("; ".join(no_path), code=NO_PAYMENT_PATH)


def wire_schemes(
    settings: Settings, catalogs: Catalogs, *, facilitator: Facilitator | None = None, schemes: Schemes | None = None
) -> SchemeWiring:
    """The schemes on offer: built from settings, or handed in (tests, embedding). A facilitator
    handed in serves exact on every network, without chain access or write-ahead. Refuses to
    start when a tool's scheme is not served."""
    if schemes is not None:
        wiring = SchemeWiring(schemes)
    elif facilitator is not None:
        remote = isinstance(facilitator, RemoteFacilitator | FailoverFacilitator)
        wiring = SchemeWiring(Schemes([ExactEvm(facilitator, confirms=remote)]))
    else:
        wiring = build_schemes(settings, catalogs)
    check_schemes(wiring.schemes, catalogs)
    return wiring


def build_bridge(catalogs: Catalogs) -> Bridge:
    """Every tool's upstream call. Upstream credentials and WSDLs are read now: a missing one
    stops the start, named."""
    try:
        return Bridge(catalogs.tools)
    except BridgeConfigError as exc:
        raise GatewayConfigError(exc.message, code=exc.code) from None


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
    _check_key(key, "X402GW_REFUND_KEY")
    refund_chains: dict[str, JsonRpcChain] = {}
    for network, chain in chains.items():
        if chain.chain_id == LOCAL_CHAIN_ID or rehearsal_deployment(settings.deployment_file, network, chain.rpc_urls) is None:
            _refuse_dev_key(key, network, chain.chain_id, "refund key")
        refund_chains[network] = JsonRpcChain(chain.rpc_urls, chain.chain_id, key)
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
    remotes: Iterable[RemoteFacilitator | FailoverFacilitator] = (),
    local: bool = True,
) -> int:
    """How long a payment's in-flight lock lives: longer than any request can hold it, or it lapses
    under a live request and a resend of the same payment runs beside it. The longest path is an
    open payment resolved against the chain, verify, the slowest tool's upstream call (every try,
    failover and backoff), settlement (a remote facilitator's settle timeout, or a local broadcast,
    batch wait and receipt wait), and a refund of a settle-first tool; plus a margin. Chain steps
    count once per RPC URL of the network with the most (each may be tried in turn).
    ``remotes``: the remote facilitators in use; ``local``: whether any network settles locally."""
    remotes = list(remotes)
    # A chain request may be tried at each of its network's RPC URLs in turn (settlement.chain.rpc).
    urls = max((len(settings.rpc_urls_for(tool.payment.network)) for tool in catalogs.tools), default=1)
    chain_step = CHAIN_STEP_SECONDS * max(urls, 1)
    upstream = max((bridge.max_call_seconds(tool) for tool in catalogs.tools), default=0.0)
    batch_wait = max((p.max_wait_ms / 1000 for p in settings.batch_settlement.values()), default=0.0)
    local_settle = chain_step + batch_wait + settings.receipt_timeout_seconds
    verify = max([r.verify_timeout_seconds for r in remotes] + ([chain_step] if local else []), default=0.0)
    settle = max([r.settle_timeout_seconds for r in remotes] + ([local_settle] if local else []), default=0.0)
    refunds = settings.refund_key is not None and any(tool.settle == "upfront" for tool in catalogs.tools)
    refund = chain_step + settings.receipt_timeout_seconds if refunds else 0.0
    seconds = chain_step + verify + upstream + settle + refund + LOCK_MARGIN_SECONDS
    return math.ceil(1000 * seconds)


def lock_ttl_ms(
    settings: Settings, catalogs: Catalogs, bridge: Bridge, wiring: SchemeWiring, facilitator: Facilitator | None
) -> int:
    """``in_flight_lock_ttl_ms`` for these schemes; an injected facilitator (tests, embedding) is
    timed as what it is."""
    remotes = wiring.remotes
    injected: list[RemoteFacilitator | FailoverFacilitator] = (
        [facilitator] if isinstance(facilitator, RemoteFacilitator | FailoverFacilitator) else []
    )
    return in_flight_lock_ttl_ms(
        settings, catalogs, bridge,
        remotes=set(remotes.values()) or injected,
        local=wiring.local is not None or not (remotes or injected),
    )
