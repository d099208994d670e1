"""``x402gw catalog validate``: the resolved offers of catalog files, and with ``--check-chain RPC``
the tokens they name read from the chain (``eip712Domain()`` when the token has it, else
``name()`` and ``version()``; ``decimals()``; code at the address). A token that is not what the
catalog says is refused: ``asset_not_deployed``, ``asset_not_eip3009``, ``asset_name_mismatch``,
``asset_version_mismatch``, ``asset_decimals_mismatch``; an RPC that cannot be read is
``rpc_unreachable``, and one that serves a network no offer is on, ``rpc_network_unused``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import httpx
from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak

from catalog import Catalogs, PaymentTerms, Tool, format_amount
from catalog.registry import Stablecoin, find_network, stablecoin_at
from gateway.ops.doctor.findings import redact_url

__all__ = ["check_chain", "describe_offers"]

Local = Mapping[str, Iterable[Stablecoin]] | None


def _network_label(network: str) -> str:
    info = find_network(network)
    return f"{network} ({info.name})" if info is not None else network


def _asset_label(terms: PaymentTerms, local: Local) -> str:
    coin = stablecoin_at(terms.network, terms.asset, local)
    symbol = f"{coin.symbol} " if coin is not None else ""
    return f"{symbol}{terms.asset} (EIP-712 {terms.asset_name!r} version {terms.asset_version!r}, {terms.decimals} decimals)"


def _price(tool: Tool, local: Local) -> str:
    coin = stablecoin_at(tool.payment.network, tool.payment.asset, local)
    amount = format_amount(tool.price_atomic, tool.payment.decimals)
    unit = coin.symbol if coin is not None else "tokens"
    dollars = f"${amount} = " if coin is not None and coin.currency == "USD" else ""
    if tool.price_rule is not None:  # each call's price is the rule's, for its arguments
        return f"{tool.price_rule.sentence(unit)} (a count of 1: {dollars}{amount} {unit}, {tool.price_atomic} atomic)"
    return f"{dollars}{amount} {unit} ({tool.price_atomic} atomic)"


def describe_offers(catalogs: Catalogs, local: Local = None) -> list[str]:
    """Per catalog: its tools' offers as the gateway will make them (network, token, payee, price)."""
    lines: list[str] = []
    for cat in catalogs.catalogs:
        lines.append(f"{cat.source}: ok, owner {cat.owner}, {len(cat.tools)} tools")
        seen: list[PaymentTerms] = []
        for tool in cat.tools:
            terms = tool.payment
            if terms not in seen:
                seen.append(terms)
                lines.append(f"  offer {len(seen)}: {terms.scheme} on {_network_label(terms.network)}, "
                             f"asset {_asset_label(terms, local)}, pay to {terms.pay_to}")
            lines.append(f"    {tool.method:6} {tool.path:32} {tool.name:20} {_price(tool, local)}"
                         + (f"  [offer {seen.index(terms) + 1}]" if len(seen) > 1 else ""))
    return lines


def _selector(signature: str) -> str:
    return "0x" + keccak(text=signature)[:4].hex()


class _Rpc:
    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client, self.url = client, url

    async def call(self, method: str, params: list[Any]) -> Any:
        reply = await self.client.post(self.url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        reply.raise_for_status()
        data = reply.json()
        if not isinstance(data, dict) or "error" in data:
            raise LookupError(str(data.get("error") if isinstance(data, dict) else data)[:200])
        return data.get("result")

    async def eth_call(self, to: str, signature: str) -> bytes:
        out = bytes.fromhex(str(await self.call("eth_call", [{"to": to, "data": _selector(signature)}, "latest"]) or "0x")[2:])
        if not out:
            raise LookupError(f"{signature} returned nothing")
        return out


async def _token_facts(rpc: _Rpc, asset: str) -> tuple[str, str, int] | str:
    """(name, version, decimals), or the code of why the token cannot be read as EIP-3009."""
    code = str(await rpc.call("eth_getCode", [asset, "latest"]) or "0x")
    if code in ("0x", "0x0"):
        return "asset_not_deployed"
    try:
        try:
            domain = abi_decode(["bytes1", "string", "string", "uint256", "address", "bytes32", "uint256[]"],
                                await rpc.eth_call(asset, "eip712Domain()"))
            name, version = str(domain[1]), str(domain[2])
        except (LookupError, DecodingError):
            name = str(abi_decode(["string"], await rpc.eth_call(asset, "name()"))[0])
            version = str(abi_decode(["string"], await rpc.eth_call(asset, "version()"))[0])
        decimals = int.from_bytes((await rpc.eth_call(asset, "decimals()"))[:32], "big")
    except (LookupError, DecodingError):
        return "asset_not_eip3009"
    return name, version, decimals


async def _check(catalogs: Catalogs, rpc_urls: Sequence[str], echo: Callable[[str], object]) -> bool:
    offers: dict[tuple[str, str], PaymentTerms] = {}
    for tool in catalogs.tools:
        offers.setdefault((tool.payment.network, tool.payment.asset), tool.payment)
    checked: set[str] = set()
    ok = True
    async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
        for url in rpc_urls:
            rpc = _Rpc(client, url)
            where = redact_url(url, keep_path=False)  # RPC providers put the API key in the path or query
            try:
                network = f"eip155:{int(str(await rpc.call('eth_chainId', [])), 16)}"
            except (httpx.HTTPError, httpx.InvalidURL, LookupError, ValueError) as exc:  # str(exc) may quote the URL
                echo(f"chain {where}: rpc_unreachable: {type(exc).__name__}")
                ok = False
                continue
            mine = [terms for (net, _), terms in offers.items() if net == network]
            if not mine:
                echo(f"chain {where}: rpc_network_unused: it serves {network}; no offer is on that network")
                ok = False
            for terms in mine:
                checked.add(terms.network)
                try:
                    facts = await _token_facts(rpc, terms.asset)
                except (httpx.HTTPError, LookupError, ValueError) as exc:
                    facts = f"rpc_unreachable ({type(exc).__name__})"
                ok = _report(terms, facts, echo) and ok
    for (network, asset) in offers:
        if network not in checked:
            echo(f"chain {network}: {asset} not checked (no --check-chain RPC serves {network})")
    return ok


def _report(terms: PaymentTerms, facts: tuple[str, str, int] | str, echo: Callable[[str], object]) -> bool:
    where = f"chain {terms.network} {terms.asset}"
    if isinstance(facts, str):
        echo(f"{where}: {facts}: no EIP-3009 token answers there as the catalog says")
        return False
    wrong = [
        f"{code}: the chain says {found!r}, the catalog {said!r}"
        for code, found, said in (
            ("asset_name_mismatch", facts[0], terms.asset_name),
            ("asset_version_mismatch", facts[1], terms.asset_version),
            ("asset_decimals_mismatch", facts[2], terms.decimals),
        )
        if found != said
    ]
    for problem in wrong:
        echo(f"{where}: {problem}")
    if not wrong:
        echo(f"{where}: ok, {facts[0]!r} version {facts[1]!r}, {facts[2]} decimals, as the catalog says")
    return not wrong


def check_chain(catalogs: Catalogs, rpc_urls: Sequence[str], echo: Callable[[str], object]) -> bool:
    """Read every offered token on the chains the RPCs serve; False when any is not as the catalog says."""
    return asyncio.run(_check(catalogs, rpc_urls, echo))
