"""``x402gw agent``: the reference agent. Discovers a gateway's tools, picks one, pays within its
own limits, prints the result and the receipt.

    x402gw agent --gateway http://127.0.0.1:8402 --key-env AGENT_KEY --max-spend 0.05 \\
        --tool get_quote --args '{"symbol": "ACME"}'

It trusts the chain and its limits, not the gateway: the token it pays in (decimals, EIP-712 name
and version) is read from the chain at ``--rpc-url`` (default: the dev chain's deployment file,
``X402GW_DEPLOYMENT_FILE`` or var/devchain.json) or taken from a pinned list of USDC deployments
(``--network`` without an RPC). Limits are converted with those decimals; every authorization it
signs counts as spent, receipt or not.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from catalog import format_amount, to_atomic

if TYPE_CHECKING:  # imported when the command runs: signing libraries are slow to load for every CLI call
    from gateway.devkit.agent import DiscoveredTool, TokenFacts

EXIT_REFUSED = 3  # the agent would not sign: limits, or an offer it does not trust


def _choose(tools: list[DiscoveredTool], name: str | None, arguments: dict[str, Any] | None) -> tuple[DiscoveredTool, dict[str, Any]]:
    from gateway.devkit.agent import example_arguments

    if name is not None:
        matches = [t for t in tools if t.name == name]
        if not matches:
            raise click.ClickException(f"the gateway sells no tool {name!r}; it sells: {', '.join(t.name for t in tools)}")
        tool = matches[0]
        chosen = arguments if arguments is not None else example_arguments(tool.parameters)
        if chosen is None:
            required = ", ".join(tool.parameters.get("required") or [])
            raise click.ClickException(f"{tool.name} needs arguments ({required}); pass --args JSON")
        return tool, chosen
    for tool in tools:  # the first tool that can be called with what we have
        chosen = arguments if arguments is not None else example_arguments(tool.parameters)
        if chosen is not None:
            return tool, chosen
    raise click.ClickException("no tool can be called without arguments; pass --tool NAME --args JSON")


async def trusted_token(rpc_url: str | None, network: str | None, asset: str | None, deployment_file: Path) -> TokenFacts:
    """The token the agent pays in, from the chain (``rpc_url``, else the dev chain's deployment
    file) or from the pinned list (``network`` without an RPC). Never from the gateway."""
    from gateway.devkit.agent import TokenUnverifiable, chain_network, pinned_token, read_token_facts
    from gateway.devkit.devchain import Deployment, DevchainError
    from settlement.chain.networks import to_caip2

    if network is not None and to_caip2(network) is None:
        raise click.ClickException(f"--network {network!r} is not a CAIP-2 id (eip155:<chain id>) or a known name")
    network = to_caip2(network) if network else None
    deployment = None
    if deployment_file.is_file():
        try:
            deployment = Deployment.read(deployment_file)
        except DevchainError as exc:
            raise click.ClickException(exc.message) from None
    if rpc_url is None and deployment is not None and network in (None, deployment.network):
        rpc_url = deployment.rpc_url
    try:
        if rpc_url is not None:
            served = await chain_network(rpc_url)
            if network is not None and network != served:
                raise TokenUnverifiable(f"the RPC at {rpc_url} serves chain id {served.split(':')[1]} ({served}), not {network}")
            if asset is None and deployment is not None and deployment.network == served:
                asset = deployment.token.address
            if asset is None:
                pinned = pinned_token(served)
                if pinned is None:
                    raise TokenUnverifiable(f"no token is pinned for {served}: pass --asset ADDRESS")
                asset = pinned.address
            return await read_token_facts(rpc_url, asset, network=served)
        if network is None:
            raise TokenUnverifiable(
                "the agent needs token facts it can trust: pass --rpc-url (or start `x402gw devchain`, or set "
                "X402GW_DEPLOYMENT_FILE), or --network for a pinned USDC deployment"
            )
        facts = pinned_token(network, asset)
        if facts is None:
            what = f"{asset} on {network}" if asset else f"no USDC on {network}"
            raise TokenUnverifiable(f"{what} is not in the pinned list: pass --rpc-url to read the token from the chain")
        return facts
    except TokenUnverifiable as exc:
        raise click.ClickException(str(exc)) from None


def _limit(amount: Decimal, decimals: int, option: str) -> int:
    try:
        return to_atomic(amount, decimals)
    except ValueError as exc:
        raise click.ClickException(f"{option}: {exc} (the token has {decimals} decimals)") from None


async def _run(
    gateway: str, key: str, max_spend: Decimal, max_per_call: Decimal | None, token_source: tuple[str | None, str | None, str | None, Path],
    max_valid_seconds: int, name: str | None, arguments: dict[str, Any] | None, user_token: str | None = None,
) -> int:
    import httpx

    from gateway.devkit.agent import PayingAgent, PaymentRefused, call_tool, discover
    from gateway.errors import GatewayError

    token = await trusted_token(*token_source)
    limit = _limit(max_spend, token.decimals, "--max-spend")
    per_call = _limit(max_per_call, token.decimals, "--max-per-call") if max_per_call is not None else limit
    agent = PayingAgent(key, token, max_spend_atomic=limit, max_per_call_atomic=per_call, max_valid_seconds=max_valid_seconds)
    def fmt(atomic: int) -> str:
        return format_amount(atomic, token.decimals)

    click.echo(f"token    {token.name!r} v{token.version}  {token.address} on {token.network}  "
               f"{token.decimals} decimals  ({token.source})")
    async with httpx.AsyncClient(base_url=gateway.rstrip("/"), timeout=60) as client:
        try:
            tools = await discover(client, gateway, query=name)  # a big catalog is searched for the name
            if not tools:
                raise click.ClickException("the gateway lists no tools")
            tool, chosen = _choose(tools, name, arguments)
            if not token.same_token(tool.network, tool.asset):
                raise PaymentRefused(
                    f"{tool.name} is priced in {tool.asset} on {tool.network}, not the agent's token "
                    f"({token.address} on {token.network})"
                )
            if tool.decimals != token.decimals:
                raise PaymentRefused(
                    f"the gateway says {tool.asset} has {tool.decimals} decimals; the chain says {token.decimals} "
                    f"({token.source}): a gateway that misstates its token is not paid"
                )
            price = fmt(tool.price_atomic) if tool.price_atomic is not None else (tool.price_text or "dynamic")
            click.echo(f"tool     {tool.name}  {tool.method} {tool.url}  price {price} "
                       f"(limit {fmt(limit)}, per call {fmt(per_call)})")
            click.echo(f"args     {json.dumps(chosen, sort_keys=True)}")
            result = await call_tool(agent, client, tool, chosen, user_token)
        except PaymentRefused as exc:
            click.echo(f"refused  {exc}", err=True)
            return EXIT_REFUSED
        except GatewayError as exc:  # arguments that cannot make a request (a missing path argument)
            raise click.ClickException(f"{tool.name}: {exc.message}") from None
        except httpx.HTTPError:  # the gateway broke off: what was signed may be cashed, so it is said
            for signed in agent.signed:
                click.echo(f"signed   {fmt(signed.amount)} to {signed.pay_to}  nonce {signed.nonce}  valid until "
                           f"{signed.valid_before}: counts as spent (it can be cashed until then)", err=True)
            click.echo(f"spent    {fmt(agent.spent_atomic)} of {fmt(agent.max_spend_atomic)}", err=True)
            raise
    body = result.body if isinstance(result.body, str) else json.dumps(result.body, indent=2, sort_keys=True)
    click.echo(f"result   HTTP {result.status}")
    click.echo(body)
    receipt = result.receipt
    click.echo(
        f"receipt  tool {tool.name}  price {fmt(result.price_atomic) if result.price_atomic is not None else '-'}"
        f"  status {result.status}  tx {receipt.transaction if receipt and receipt.transaction else '-'}"
        f"  settled {bool(receipt and receipt.success)}  payer {agent.payer.address}"
        f"  spent {fmt(agent.spent_atomic)} of {fmt(agent.max_spend_atomic)}"
    )
    if result.payment is not None and receipt is None:
        click.echo(f"note     the gateway sent no PAYMENT-RESPONSE; the {fmt(result.payment.amount)} signed "
                   f"(valid until {result.payment.valid_before}) counts as spent")
    return 0 if 200 <= result.status < 300 else 1


def _amount(value: str, option: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise click.ClickException(f"{option} {value!r} is not a decimal number") from None
    if not amount.is_finite() or amount < 0:
        raise click.ClickException(f"{option} must be a non-negative number")
    return amount


@click.command("agent")
@click.option("--gateway", required=True, help="Gateway base URL, e.g. http://127.0.0.1:8402")
@click.option("--key", default=None, help="Payer private key (hex). Prefer --key-env.")
@click.option("--key-env", default=None, help="Name of the environment variable holding the payer key.")
@click.option("--max-spend", required=True, help="Most the agent may sign for in total, in token units, e.g. 0.05")
@click.option("--max-per-call", default=None, help="Most the agent may sign for in one payment (default: --max-spend).")
@click.option("--rpc-url", default=None, envvar="X402GW_AGENT_RPC_URL",
              help="JSON-RPC of the chain the agent pays on: token decimals, name and version are read there "
                   "(default: the dev chain's, from the deployment file).")
@click.option("--network", default=None, help="The network the agent pays on (eip155:<chain id>); must be the RPC's. "
                                              "Without an RPC, the pinned USDC of this network is used.")
@click.option("--asset", default=None, help="The token the agent pays in (default: the dev chain's token, else the network's USDC).")
@click.option("--deployment", "deployment_file", default="var/devchain.json", show_default=True, envvar="X402GW_DEPLOYMENT_FILE",
              type=click.Path(path_type=Path), help="Dev chain deployment file, used when no --rpc-url is given.")
@click.option("--max-valid-seconds", default=600, show_default=True, type=click.IntRange(1, 3600),
              help="Longest validity of a signed authorization, whatever the offer asks.")
@click.option("--tool", "tool_name", default=None, help="Tool to call (default: the first one callable).")
@click.option("--args", "args_json", default=None, help="Tool arguments as a JSON object.")
@click.option("--user-token-env", default=None, metavar="VAR",
              help="Environment variable holding the end user's access token, sent only to a tool that acts for its user.")
def agent(
    gateway: str, key: str | None, key_env: str | None, max_spend: str, max_per_call: str | None, rpc_url: str | None,
    network: str | None, asset: str | None, deployment_file: Path, max_valid_seconds: int, tool_name: str | None,
    args_json: str | None, user_token_env: str | None,
) -> None:
    """Discover a gateway's tools, pay for one call within the agent's own limits, print result and receipt.

    Exit status: 0 paid (or free) and answered 2xx, 1 answered otherwise or an error, 3 refused to pay."""
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise click.ClickException(f"environment variable {key_env} is not set")
    if not key:
        raise click.ClickException("give the payer key with --key-env VAR (or --key HEX)")
    limit = _amount(max_spend, "--max-spend")
    per_call = _amount(max_per_call, "--max-per-call") if max_per_call is not None else None
    arguments = None
    if args_json is not None:
        try:
            arguments = json.loads(args_json)
        except json.JSONDecodeError:
            raise click.ClickException("--args must be a JSON object") from None
        if not isinstance(arguments, dict):
            raise click.ClickException("--args must be a JSON object")
    user_token = None
    if user_token_env:
        user_token = os.environ.get(user_token_env)
        if not user_token:
            raise click.ClickException(f"environment variable {user_token_env} is not set")
    import httpx

    try:
        code = asyncio.run(_run(gateway, key, limit, per_call, (rpc_url, network, asset, deployment_file),
                                max_valid_seconds, tool_name, arguments, user_token))
    except httpx.HTTPError as exc:
        raise click.ClickException(f"gateway {gateway} did not answer: {type(exc).__name__}") from None
    sys.exit(code)
