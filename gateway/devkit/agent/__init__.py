"""A reference paying agent: call a tool, answer the 402 within its own limits, keep the receipt.

    token = await read_token_facts(rpc_url, usdc_address)        # or pinned_token(network, asset)
    agent = PayingAgent(private_key, token, max_spend_atomic=50_000, max_per_call_atomic=10_000)
    result = await agent.call(client, "GET", "http://127.0.0.1:8402/quotes/AAPL")

The agent trusts only the chain (or a pinned list of known tokens) and its own limits, never the
gateway it pays:

- it pays in one token, on one network, whose decimals, EIP-712 name and version were read from the
  chain (``eth_chainId`` must be the network's) or pinned; an offer on another network, in another
  asset, or naming the token differently from the chain is refused before anything is signed;
- an offer over the per-call cap or the remaining budget is refused before signing; limits and
  amounts are ``int`` atomic units of that token;
- every authorization it signs is counted as spent when it is signed, receipt or not (a gateway that
  answers without ``PAYMENT-RESPONSE``, or says "failed", still holds a usable authorization);
- it signs exactly the offer's amount, payTo and asset, and never a window longer than
  ``max_valid_seconds`` whatever ``maxTimeoutSeconds`` the offer asks for.

    tokens.py   token facts: read from the chain, or pinned
    offers.py   the checks an offer must pass before anything is signed
    paying.py   the agent: choose, sign, call, count
    tools.py    a gateway's ``/tools``: discover (searching ``?q=`` on a big catalog), and call one by name
"""

from __future__ import annotations

from gateway.devkit.agent.offers import (
    PaymentRefused,
    SpendLimitExceeded,
    UntrustedOffer,
    offer_problem,
)
from gateway.devkit.agent.paying import (
    DEFAULT_MAX_VALID_SECONDS,
    CallResult,
    PayingAgent,
    SignedPayment,
)
from gateway.devkit.agent.tokens import (
    PINNED_TOKENS,
    TokenFacts,
    TokenUnverifiable,
    chain_network,
    pinned_token,
    read_token_facts,
)
from gateway.devkit.agent.tools import (
    BIG_CATALOG,
    DiscoveredTool,
    call_tool,
    discover,
    example_arguments,
    search_tools,
)

__all__ = [
    "BIG_CATALOG",
    "DEFAULT_MAX_VALID_SECONDS",
    "PINNED_TOKENS",
    "CallResult",
    "DiscoveredTool",
    "PayingAgent",
    "PaymentRefused",
    "SignedPayment",
    "SpendLimitExceeded",
    "TokenFacts",
    "TokenUnverifiable",
    "UntrustedOffer",
    "call_tool",
    "chain_network",
    "discover",
    "example_arguments",
    "offer_problem",
    "pinned_token",
    "read_token_facts",
    "search_tools",
]
