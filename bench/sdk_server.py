"""Case E: the official x402 SDK's payment middleware in front of the same upstream.

``payment_middleware`` (x402.http.middleware.fastapi) with an in-process ``x402Facilitator`` that
verifies and settles through ``FacilitatorWeb3Signer`` on the bench's anvil; the route behind it
is the same aiohttp pass-through as case B. Configured by environment:
BENCH_UPSTREAM, BENCH_RPC_URL, BENCH_TOKEN, BENCH_PAY_TO, BENCH_SETTLEMENT_KEY.
"""

from __future__ import annotations

import os

from starlette.middleware.base import BaseHTTPMiddleware
from x402 import x402Facilitator, x402ResourceServer
from x402.http.middleware.fastapi import payment_middleware
from x402.mechanisms.evm import FacilitatorWeb3Signer
from x402.mechanisms.evm.exact import ExactEvmServerScheme, register_exact_evm_facilitator

from bench.passthrough_proxy import app

NETWORK = "eip155:31337"

facilitator = x402Facilitator()
register_exact_evm_facilitator(
    facilitator,
    FacilitatorWeb3Signer(private_key=os.environ["BENCH_SETTLEMENT_KEY"], rpc_url=os.environ["BENCH_RPC_URL"]),
    networks=NETWORK,
    eip6492_allowed_factories=[],
    simulate_in_settle=False,
)
server = x402ResourceServer(facilitator)
server.register(NETWORK, ExactEvmServerScheme())  # type: ignore[no-untyped-call,arg-type]
routes = {
    "GET /api/v1/quote/*": {
        "accepts": {
            "scheme": "exact",
            "network": NETWORK,
            "payTo": os.environ["BENCH_PAY_TO"],
            "price": {"amount": "2000", "asset": os.environ["BENCH_TOKEN"], "extra": {"name": "USD Coin", "version": "2"}},
            "maxTimeoutSeconds": 120,
        },
        "description": "quote",
        "mimeType": "application/json",
    }
}
app.add_middleware(BaseHTTPMiddleware, dispatch=payment_middleware(routes, server))
