"""Time to first byte of a paid streamed call next to the upstream's own.

    python -m bench.streaming [--calls 20] [--first-token-ms 250] [--token-ms 10] [--tokens 32]

Starts a fresh anvil, the sample REST upstream (its ``/v1/completions`` streams one SSE event per
token after ``--first-token-ms`` of "thinking", then one each ``--token-ms``, as an LLM does) and a gateway selling it as an
``upto`` tool charged per completion token (``stream: true``). Each call is timed from sending the
request to the first byte of the body: straight to the upstream, then through the gateway with a
payment signed beforehand by the official SDK's upto client (signing is the payer's time, not the
gateway's). The gateway's share is verification (signature, Permit2 nonce, allowance, balance, a
simulated settle: a few calls to the chain), the ledger's write-ahead row and the relay. Prints
the medians, their ratio (the issue's bar: at most 1.1), what the gateway adds in milliseconds,
and the whole stream's time each way: a gateway that buffered would show its first byte only
after the last token (about first-token + tokens x token-ms).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from eth_account import Account
from x402 import x402Client
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequired

from catalog import load_catalogs
from gateway.app import create_app
from gateway.devkit.anvil import Anvil
from gateway.devkit.devchain import setup_devchain
from gateway.devkit.samples import rest_upstream
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.schema import open_ledger

CATALOG = """
catalog: 1
owner: bench-streams
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  llm:
    base_url: "{upstream}"
tools:
  - name: complete_stream
    description: A streamed completion, charged per completion token.
    method: POST
    path: /complete
    upstream_path: /v1/completions
    price: 0.00001
    max_price: 0.01
    settle: after
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: event_field, pointer: /usage/completion_tokens}}
    input_schema:
      type: object
      properties:
        prompt: {{type: string}}
        max_tokens: {{type: integer, minimum: 1, maximum: 512}}
        stream: {{const: true}}
      required: [prompt, max_tokens, stream]
"""


def first_byte(client: httpx.Client, url: str, body: dict[str, object], headers: dict[str, str]) -> tuple[float, float]:
    """Seconds from sending the request to the first byte of its body, and to its last."""
    started = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code} {response.read()[:300]!r}")
        chunks = response.iter_raw()
        next(chunks)
        elapsed = time.perf_counter() - started
        for _ in chunks:
            pass
    return elapsed, time.perf_counter() - started


def signed(key: str, required: dict[str, object]) -> str:
    client = x402Client()
    client.register("eip155:31337", UptoEvmClientScheme(Account.from_key(key)))
    client.set_spend_controls({"allowed_assets": True})  # the dev chain's own test USDC
    payload = asyncio.run(client.create_payment_payload(PaymentRequired.model_validate(required)))
    return base64.b64encode(json.dumps(payload.model_dump(mode="json", by_alias=True, exclude_none=True)).encode()).decode()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--first-token-ms", type=float, default=250.0, help="the upstream's own thinking time")
    parser.add_argument("--token-ms", type=float, default=10.0, help="the wait between streamed tokens")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="x402gw-stream-") as tmp, Anvil() as anvil:
        deployment = setup_devchain(anvil.rpc_url)
        deployment_file = Path(tmp) / "devchain.json"
        deployment.write(deployment_file)
        upstream = ThreadServer(rest_upstream.create_app(first_token_seconds=args.first_token_ms / 1000,
                                                     token_seconds=args.token_ms / 1000)).start()
        catalog = Path(tmp) / "streams.yaml"
        catalog.write_text(CATALOG.format(token=deployment.token.address, pay_to=deployment.accounts[8].address, upstream=upstream.url))
        settings = Settings(catalog=[catalog], deployment_file=deployment_file, database_url=f"sqlite:///{tmp}/ledger.sqlite3")
        ledger = open_ledger(settings.database_url)
        gateway = ThreadServer(create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)).start()
        body: dict[str, object] = {"prompt": "tell me about ledgers", "max_tokens": args.tokens, "stream": True}
        try:
            with httpx.Client(timeout=60) as client:
                offer = client.post(f"{gateway.url}/complete", json=body)
                required = json.loads(base64.b64decode(offer.headers["PAYMENT-REQUIRED"]))
                payments = [signed(deployment.accounts[i % 5].private_key, required) for i in range(args.calls)]
                first_byte(client, f"{upstream.url}/v1/completions", body, {})  # warm both paths once
                direct = [first_byte(client, f"{upstream.url}/v1/completions", body, {}) for _ in range(args.calls)]
                paid = [first_byte(client, f"{gateway.url}/complete", body, {"PAYMENT-SIGNATURE": p}) for p in payments]
        finally:
            gateway.stop()
            upstream.stop()
            ledger.close()
    d, g = statistics.median(t for t, _ in direct), statistics.median(t for t, _ in paid)
    d_all, g_all = statistics.median(t for _, t in direct), statistics.median(t for _, t in paid)
    print(f"streamed call (median of {args.calls}; upstream: first token after {args.first_token_ms:g} ms, "
          f"then {args.tokens - 1} more {args.token_ms:g} ms apart):")
    print(f"  upstream direct       first byte {d * 1000:8.1f} ms   whole stream {d_all * 1000:8.1f} ms")
    print(f"  paid, through gateway first byte {g * 1000:8.1f} ms   whole stream {g_all * 1000:8.1f} ms"
          f"   (+{(g - d) * 1000:.1f} ms: verify, ledger, relay)")
    print(f"  ratio of first bytes  {g / d:8.3f}   (bar: <= 1.1)")
    return 0 if g / d <= 1.1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
