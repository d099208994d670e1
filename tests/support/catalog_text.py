"""A one-tool catalog as YAML text, for loader tests of one block of a tool (answers, user_auth...):
the caller appends the tool's extra lines (indented four spaces) and checks what loads or which
error lands at which line."""

from __future__ import annotations

USDC = "0x5FbDB2315678afecb367f032d93F642f64180aa3"  # the dev chain's token (asset: USDC on the local chain)
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"


def one_tool_catalog(tool_extra: str) -> str:
    """Tool ``a`` (GET /a, 0.002 of the dev chain's USDC) with ``tool_extra`` after its price; the
    tool's extra lines start at line 17."""
    return f"""catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "{USDC}"
  pay_to: "{PAY_TO}"
upstreams:
  u: {{base_url: "http://127.0.0.1:9"}}
tools:
  - name: a
    description: d
    method: GET
    path: /a
    price: "0.002"
{tool_extra}"""
