"""Checks against each network's chain: the RPC serves the catalog's chain id, each offer's token
answers the name, EIP-712 version and decimals the catalog says, and the settlement account holds
gas for enough settlements.

Codes: ``rpc_unreachable``, ``chain_id_mismatch``; ``asset_not_deployed``, ``asset_not_eip3009``,
``asset_name_mismatch``, ``asset_version_mismatch``, ``asset_decimals_mismatch``;
``settlement_key_missing``, ``settlement_key_invalid``, ``gas_insufficient`` (fail),
``gas_low`` (warn).
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from eth_account import Account

from gateway.ops.doctor.findings import Finding, fail, ok, redact_url, warn
from gateway.ops.doctor.plan import NetworkPlan, Offer
from gateway.ops.doctor.rpc import SEL_DECIMALS, SEL_NAME, SEL_VERSION, RpcProblem, RpcReader

__all__ = ["GAS_PER_SETTLEMENT", "GasThresholds", "check_gas", "check_rpc", "check_token"]

# Gas of one settlement: a transferWithAuthorization in a transaction of its own (bench, README).
GAS_PER_SETTLEMENT = 65_454


@dataclass(frozen=True, slots=True)
class GasThresholds:
    """Settlements the settlement account must be able to pay for: below ``fail_below`` a failure,
    below ``warn_below`` a warning."""

    warn_below: int = 1000
    fail_below: int = 10

    def __post_init__(self) -> None:
        if self.fail_below < 0 or self.warn_below < self.fail_below:
            raise ValueError("gas thresholds: need 0 <= fail_below <= warn_below")


def _tools(offer: Offer) -> str:
    names = ", ".join(offer.tools[:5])
    return names + (f" and {len(offer.tools) - 5} more" if len(offer.tools) > 5 else "")


async def check_rpc(plan: NetworkPlan, rpc: RpcReader) -> Finding:
    where = redact_url(rpc.url, keep_path=False)
    try:
        served = await rpc.chain_id()
    except RpcProblem as exc:
        return fail("rpc", plan.network, "rpc_unreachable", f"the RPC {where} did not answer: {exc.message}",
                    f"check the node at {where} is up and reachable from here, or set another URL in "
                    f"X402GW_RPC_URLS for {plan.network}")
    if served != plan.chain_id:
        return fail("rpc", plan.network, "chain_id_mismatch",
                    f"the RPC {where} serves chain id {served} (eip155:{served}), the catalog sells on {plan.network}",
                    f"point X402GW_RPC_URLS[\"{plan.network}\"] at a node of chain {plan.chain_id}, or set the "
                    f"catalog's payment.network to eip155:{served} if that is the chain you mean")
    return ok("rpc", plan.network, f"{where} serves chain id {served}")


async def _domain(rpc: RpcReader, asset: str) -> tuple[str, str] | None:
    """The token's EIP-712 (name, version): ``eip712Domain()`` when it has one (EIP-5267), else
    ``name()`` and ``version()`` (USDC's FiatToken). None when neither answers."""
    try:
        return await rpc.eip712_domain(asset)
    except RpcProblem as exc:
        if not exc.reverted:
            raise
    try:
        return await rpc.string(asset, SEL_NAME), await rpc.string(asset, SEL_VERSION)
    except RpcProblem as exc:
        if not exc.reverted:
            raise
    return None


async def check_token(plan: NetworkPlan, offer: Offer, rpc: RpcReader) -> list[Finding]:
    subject = f"{plan.network} {offer.asset}"
    tools = _tools(offer)
    try:
        if await rpc.code_size(offer.asset) == 0:
            return [fail("asset", subject, "asset_not_deployed",
                         f"no contract at {offer.asset} on {plan.network} (tools {tools})",
                         "set payment.asset in the catalog to the token's address on this network "
                         "(or, on the local chain, restart `x402gw devchain` so the deployment matches)")]
        if offer.asset_version is None:  # an ERC-20 paid through Permit2: no EIP-712 domain, its decimals only
            plain = await rpc.uint(offer.asset, SEL_DECIMALS)
            return [ok("asset", subject, f"paid through Permit2, {plain} decimals, as the catalog says")
                    if plain == offer.decimals else
                    fail("asset", subject, "asset_decimals_mismatch",
                         f"the token has {plain} decimals, the catalog says {offer.decimals} (tools {tools})",
                         f"set decimals: {plain} in the catalog's payment terms and check its prices")]
        domain = await _domain(rpc, offer.asset)
        decimals = await rpc.uint(offer.asset, SEL_DECIMALS) if domain is not None else None
    except RpcProblem as exc:
        if not exc.reverted:
            return [fail("asset", subject, "rpc_unreachable", f"reading the token failed: {exc.message}",
                         f"check the RPC for {plan.network}")]
        domain, decimals = None, None
    if domain is None or decimals is None:
        return [fail("asset", subject, "asset_not_eip3009",
                     f"{offer.asset} answers neither eip712Domain() nor name()/version()/decimals() (tools {tools})",
                     "sell an EIP-3009 token (USDC): set payment.asset to its address on this network")]
    name, version = domain
    found: list[Finding] = []
    if name != offer.asset_name:
        found.append(fail("asset", subject, "asset_name_mismatch",
                          f"the token's EIP-712 name is {name!r}, the catalog says {offer.asset_name!r} (tools {tools})",
                          f"set asset_name: \"{name}\" in the catalog's payment terms (every signature would fail on chain)"))
    if version != offer.asset_version:
        found.append(fail("asset", subject, "asset_version_mismatch",
                          f"the token's EIP-712 version is {version!r}, the catalog says {offer.asset_version!r} (tools {tools})",
                          f"set asset_version: \"{version}\" in the catalog's payment terms"))
    if decimals != offer.decimals:
        found.append(fail("asset", subject, "asset_decimals_mismatch",
                          f"the token has {decimals} decimals, the catalog says {offer.decimals} (tools {tools})",
                          f"set decimals: {decimals} in the catalog's payment terms and check its prices"))
    return found or [ok("asset", subject, f"{name!r} version {version!r}, {decimals} decimals, as the catalog says")]


def _eth(wei: int) -> str:
    return f"{Decimal(wei) / Decimal(10**18):.6f}".rstrip("0").rstrip(".") or "0"


async def check_gas(plan: NetworkPlan, rpc: RpcReader, thresholds: GasThresholds) -> Finding:
    """The settlement account's balance in settlements at today's gas price (only where this
    gateway settles itself; a remote facilitator pays its own gas)."""
    if plan.settlement_key is None:
        return fail("gas", plan.network, "settlement_key_missing", f"no settlement key for {plan.network} (settled locally)",
                    "set X402GW_SETTLEMENT_KEY to the key of an account of your own that holds gas on this chain")
    try:
        address = Account.from_key(plan.settlement_key).address
    except Exception:  # noqa: BLE001 -- any malformed key; the message must not echo it
        return fail("gas", plan.network, "settlement_key_invalid", f"the settlement key ({plan.key_source}) is not a valid private key",
                    "set X402GW_SETTLEMENT_KEY to a 32-byte hex private key")
    try:
        balance, price = await rpc.balance(address), await rpc.gas_price()
    except RpcProblem as exc:
        return fail("gas", plan.network, "rpc_unreachable", f"reading the settlement account's balance failed: {exc.message}",
                    f"check the RPC for {plan.network}")
    per_settlement = GAS_PER_SETTLEMENT * max(price, 1)
    settlements = balance // per_settlement
    facts = (f"settlement account {address} holds {_eth(balance)} ETH: {settlements} settlements at "
             f"{_eth(price * 10**9)} gwei ({GAS_PER_SETTLEMENT:,} gas each)")
    wanted = _eth(per_settlement * thresholds.warn_below)
    fix = f"send at least {wanted} ETH (the chain's gas token) to {address} ({thresholds.warn_below} settlements)"
    if settlements < thresholds.fail_below:
        return fail("gas", plan.network, "gas_insufficient", f"{facts}; fewer than {thresholds.fail_below}", fix)
    if settlements < thresholds.warn_below:
        return warn("gas", plan.network, "gas_low", f"{facts}; fewer than {thresholds.warn_below}", fix)
    return ok("gas", plan.network, facts)
