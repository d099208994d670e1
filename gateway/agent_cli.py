"""``x402gw agent``: the reference agent. Discovers a gateway's tools, picks one, pays within a
spend limit, prints the result and the receipt.

    x402gw agent --gateway http://127.0.0.1:8402 --key-env AGENT_KEY --max-spend 0.05 \\
        --tool get_quote --args '{"symbol": "ACME"}'
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import click

from catalog import format_amount, to_atomic

if TYPE_CHECKING:  # imported when the command runs: signing libraries are slow to load for every CLI call
    from gateway.agent import DiscoveredTool


def _choose(tools: list[DiscoveredTool], name: str | None, arguments: dict[str, Any] | None) -> tuple[DiscoveredTool, dict[str, Any]]:
    from gateway.agent import example_arguments

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


async def _run(gateway: str, key: str, max_spend: Decimal, name: str | None, arguments: dict[str, Any] | None) -> int:
    import httpx

    from gateway.agent import PayingAgent, SpendLimitExceeded, call_tool, discover
    from gateway.errors import GatewayError

    async with httpx.AsyncClient(base_url=gateway.rstrip("/"), timeout=60) as client:
        tools = await discover(client, gateway)
        if not tools:
            raise click.ClickException("the gateway lists no tools")
        tool, chosen = _choose(tools, name, arguments)
        try:
            limit = to_atomic(max_spend, tool.decimals)
        except ValueError as exc:
            raise click.ClickException(f"--max-spend: {exc}") from None
        agent = PayingAgent(key, max_spend_atomic=limit, accept_assets={(tool.network, tool.asset)})
        click.echo(f"tool     {tool.name}  {tool.method} {tool.url}  price {tool.price} (limit {max_spend})")
        click.echo(f"args     {json.dumps(chosen, sort_keys=True)}")
        try:
            result = await call_tool(agent, client, tool, chosen)
        except SpendLimitExceeded as exc:
            click.echo(f"refused  {exc}", err=True)
            return 3
        except GatewayError as exc:  # arguments that cannot make a request (a missing path argument)
            raise click.ClickException(f"{tool.name}: {exc.message}") from None
    body = result.body if isinstance(result.body, str) else json.dumps(result.body, indent=2, sort_keys=True)
    click.echo(f"result   HTTP {result.status}")
    click.echo(body)
    receipt = result.receipt
    click.echo(
        f"receipt  tool {tool.name}  price {format_amount(result.price_atomic, tool.decimals) if result.price_atomic else '-'}"
        f"  status {result.status}  tx {receipt.transaction if receipt and receipt.transaction else '-'}"
        f"  settled {bool(receipt and receipt.success)}  payer {agent.payer.address}"
    )
    return 0 if 200 <= result.status < 300 else 1


@click.command("agent")
@click.option("--gateway", required=True, help="Gateway base URL, e.g. http://127.0.0.1:8402")
@click.option("--key", default=None, help="Payer private key (hex). Prefer --key-env.")
@click.option("--key-env", default=None, help="Name of the environment variable holding the payer key.")
@click.option("--max-spend", required=True, help="Most the agent may pay, in token units, e.g. 0.05")
@click.option("--tool", "tool_name", default=None, help="Tool to call (default: the first one callable).")
@click.option("--args", "args_json", default=None, help="Tool arguments as a JSON object.")
def agent(gateway: str, key: str | None, key_env: str | None, max_spend: str, tool_name: str | None, args_json: str | None) -> None:
    """Discover a gateway's tools, pay for one call within a spend limit, print result and receipt."""
    if key_env:
        key = os.environ.get(key_env)
        if not key:
            raise click.ClickException(f"environment variable {key_env} is not set")
    if not key:
        raise click.ClickException("give the payer key with --key-env VAR (or --key HEX)")
    try:
        limit = Decimal(max_spend)
    except InvalidOperation:
        raise click.ClickException(f"--max-spend {max_spend!r} is not a decimal number") from None
    if not limit.is_finite() or limit < 0:
        raise click.ClickException("--max-spend must be a non-negative number")
    arguments = None
    if args_json is not None:
        try:
            arguments = json.loads(args_json)
        except json.JSONDecodeError:
            raise click.ClickException("--args must be a JSON object") from None
        if not isinstance(arguments, dict):
            raise click.ClickException("--args must be a JSON object")
    import httpx

    try:
        code = asyncio.run(_run(gateway, key, limit, tool_name, arguments))
    except httpx.HTTPError as exc:
        raise click.ClickException(f"gateway {gateway} did not answer: {type(exc).__name__}") from None
    sys.exit(code)
