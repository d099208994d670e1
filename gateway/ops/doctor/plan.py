"""What the doctor examines, read from the settings and the catalogs without touching anything:
per network, its RPC URLs, its facilitators ("local" or URLs), the settlement key that pays gas
and the offers the catalog makes on it; beside them the database, the store, the admin token.

The plan mirrors how the gateway wires itself (``gateway.wiring``): the settings' own readers give
each network's RPC URLs (``rpc_urls_for``, every one checked) and facilitators
(``facilitators_for``: ``X402GW_FACILITATORS[network]``, else ``X402_FACILITATOR_URL``, else local);
the local chain's RPC and key come from the deployment file when not set, and so do a rehearsal's
(``x402gw devchain --rehearse``: a real network's chain id on a loopback anvil, as
``rehearsal_deployment`` decides for the gateway; its dev key is then allowed). ``headers_for`` gives the headers a request to
a facilitator carries (its credentials); ``facilitator_headers`` is the one place that knows them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from catalog import Catalogs
from gateway.ops.doctor.findings import Finding, fail, warn
from gateway.settings import BatchSettlement, Settings
from settlement.chain.deployment import LOCAL_CHAIN_ID, Deployment, rehearsal_deployment
from settlement.x402.digits import is_digits

__all__ = ["DoctorPlan", "HeadersFor", "NetworkPlan", "Offer", "facilitator_headers", "no_headers", "plan_from_settings"]

# (method, url) → the headers a request to that facilitator URL carries (credentials included).
HeadersFor = Callable[[str, str], Mapping[str, str]]


def no_headers(method: str, url: str) -> Mapping[str, str]:
    return {}


def facilitator_headers(settings: Settings) -> HeadersFor:
    """The credentials the gateway sends to its facilitators, per request, as the gateway picks them
    (``Settings.facilitator_auth_for``: X402GW_FACILITATOR_AUTH, or a CDP JWT for CDP's host). The
    request URL is the facilitator's URL and one path segment (``/supported``, ``/verify``).
    Unusable credentials raise ``ValueError`` naming the setting, never the secret."""

    def headers(method: str, url: str) -> Mapping[str, str]:
        auth = settings.facilitator_auth_for(url.rsplit("/", 1)[0])
        return auth.headers(method, url) if auth is not None else {}

    return headers


@dataclass(frozen=True, slots=True)
class Offer:
    """Payment terms that one or more tools share (the token facts the doctor checks on chain)."""

    network: str
    asset: str
    asset_name: str
    asset_version: str | None  # None: a token paid through Permit2, without an EIP-712 domain
    decimals: int
    tools: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NetworkPlan:
    network: str
    chain_id: int | None  # None: not an eip155 network
    rpc_urls: tuple[str, ...]
    facilitators: tuple[str, ...]  # "local" or a remote facilitator's URL
    settlement_key: str | None = field(default=None, repr=False)  # a secret: never rendered
    key_source: str = ""
    offers: tuple[Offer, ...] = ()
    schemes: tuple[str, ...] = ("exact",)
    problems: tuple[Finding, ...] = ()  # found while planning (no RPC URL, no deployment file)
    rehearsal: bool = False  # a rehearsal chain of this network (anvil): its dev key is allowed
    # X402GW_BATCH_SETTLEMENT on this network: the BatchSettlers listed (on the local chain, none
    # listed: the dev chain deployment's), each read for its settler.
    batched: bool = False
    batch_settlers: tuple[str, ...] = ()

    @property
    def local(self) -> bool:
        return "local" in self.facilitators

    @property
    def is_local_chain(self) -> bool:
        return self.chain_id == LOCAL_CHAIN_ID


@dataclass(frozen=True, slots=True)
class DoctorPlan:
    networks: tuple[NetworkPlan, ...]
    database_url: str = field(repr=False)
    redis_url: str | None = field(default=None, repr=False)
    redis_prefix: str = "x402gw:"
    admin_token: str | None = field(default=None, repr=False)
    refund_key: str | None = field(default=None, repr=False)
    headers_for: HeadersFor = no_headers
    receipt_key: str | None = field(default=None, repr=False)  # signs payers' receipts (gateway.surfaces.receipts)
    jwks_urls: tuple[str, ...] = ()  # the token issuers' keys of tools with user_auth

    @property
    def public_networks(self) -> list[str]:
        return [n.network for n in self.networks if not n.is_local_chain]


def _chain_id(network: str) -> int | None:
    namespace, _, reference = network.partition(":")
    return int(reference) if namespace == "eip155" and is_digits(reference) else None


def _offers(catalogs: Catalogs, network: str) -> tuple[Offer, ...]:
    grouped: dict[tuple[str, str, str | None, int], list[str]] = {}
    for tool in catalogs.tools:
        for offer in tool.offers:  # every way to pay, not only the first offer
            terms = offer.terms
            if terms.network == network:
                names = grouped.setdefault((terms.asset, terms.asset_name, terms.asset_version, terms.decimals), [])
                if tool.name not in names:
                    names.append(tool.name)
    return tuple(Offer(network, a, n, v, d, tuple(tools)) for (a, n, v, d), tools in sorted(grouped.items()))


def _network(settings: Settings, catalogs: Catalogs, network: str, deployment: list[Deployment | None]) -> NetworkPlan:
    chain_id = _chain_id(network)
    facilitators = tuple(settings.facilitators_for(network))
    local = "local" in facilitators
    rpc_urls = tuple(settings.rpc_urls_for(network))
    key = settings.settlement_key.get_secret_value() if settings.settlement_key else None
    source = ("X402GW_SETTLEMENT_KEY_FILE" if settings.settlement_key_file else "X402GW_SETTLEMENT_KEY") if key else ""
    problems: list[Finding] = []
    if chain_id == LOCAL_CHAIN_ID and (not rpc_urls or (key is None and local)):
        if deployment[0] is None:
            try:
                deployment[0] = Deployment.read(settings.deployment_file)
            except Exception:  # noqa: BLE001 -- DevchainError or a broken file: both mean "no deployment"
                problems.append(fail(
                    "rpc", network, "deployment_missing",
                    f"no RPC URL for {network} and no dev chain deployment at {settings.deployment_file}",
                    "start the local chain with `x402gw devchain` (or set X402GW_DEPLOYMENT_FILE, or "
                    f"X402GW_RPC_URLS='{{\"{network}\": \"http://...\"}}' and X402GW_SETTLEMENT_KEY)",
                ))
        found = deployment[0]
        if found is not None:
            rpc_urls = rpc_urls or (found.rpc_url,)
            if key is None and local:
                key, source = found.settlement_key, f"deployment file {settings.deployment_file}"
    rehearsal = None
    if chain_id is not None and chain_id != LOCAL_CHAIN_ID:  # as gateway.wiring.build_chains decides it
        rehearsal = rehearsal_deployment(settings.deployment_file, network, rpc_urls)
        if rehearsal is not None:
            rpc_urls = rpc_urls or (rehearsal.rpc_url,)
            if key is None and local:
                key, source = rehearsal.settlement_key, f"rehearsal deployment file {settings.deployment_file}"
    if not rpc_urls and not problems and chain_id is not None:
        # Settled locally, nothing works without it; settled remotely, the token facts go unchecked
        # and open payments cannot be resolved on chain.
        verdict = fail if local else warn
        problems.append(verdict(
            "rpc", network, "rpc_url_missing", f"no RPC URL for {network}",
            f"set X402GW_RPC_URLS='{{\"{network}\": \"https://...\"}}' (your node or an RPC provider's URL)",
        ))
    schemes = tuple(sorted({o.terms.scheme for t in catalogs.tools for o in t.offers if o.terms.network == network}))
    batch = settings.batch_settlement.get(network) if local else None
    return NetworkPlan(
        network, chain_id, rpc_urls, facilitators, key, source,
        _offers(catalogs, network), schemes, tuple(problems), rehearsal is not None,
        batched=batch is not None, batch_settlers=_batch_settlers(settings, batch, chain_id, deployment),
    )


def _batch_settlers(settings: Settings, batch: BatchSettlement | None, chain_id: int | None,
                    deployment: list[Deployment | None]) -> tuple[str, ...]:
    if batch is None:
        return ()
    if batch.candidates or chain_id != LOCAL_CHAIN_ID:
        return tuple(batch.candidates)
    if deployment[0] is None:
        try:
            deployment[0] = Deployment.read(settings.deployment_file)
        except Exception:  # noqa: BLE001 -- no deployment: no contract to check (batch_settler_missing)
            return ()
    found = deployment[0]
    return (found.batch_settler,) if found is not None and found.batch_settler else ()


def plan_from_settings(settings: Settings, catalogs: Catalogs, *, headers_for: HeadersFor | None = None) -> DoctorPlan:
    """The doctor's plan for this configuration: every network the catalogs sell on."""
    deployment: list[Deployment | None] = [None]  # read once, for the local chain only
    networks = tuple(_network(settings, catalogs, n, deployment) for n in sorted({o.terms.network for t in catalogs.tools for o in t.offers}))
    return DoctorPlan(
        networks,
        settings.database_url,
        settings.redis_url,
        settings.redis_prefix,
        settings.admin_token.get_secret_value() if settings.admin_token else None,
        settings.refund_key.get_secret_value() if settings.refund_key else None,
        headers_for or facilitator_headers(settings),
        receipt_key=settings.receipt_key.get_secret_value() if settings.receipt_key else None,
        jwks_urls=tuple(sorted({t.user_auth.jwks_url for t in catalogs.tools if t.user_auth is not None})),
    )
