"""The real stack the attack suite runs against, one per test module: a private anvil with the test
USDC, a JSON-RPC counting proxy in front of it, a recording upstream on loopback, and in-process
gateways (memory store, and Redis at 127.0.0.1:6379 under a key prefix of their own) serving the
attack catalog through that proxy. Also the helpers attacks use to build payments."""

from __future__ import annotations

import copy
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from catalog import Catalogs, load_catalogs
from gateway.app import create_app
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.ledger import Ledger
from settlement.schema import open_ledger
from settlement.x402.codec import decode_header_json, encode_header
from settlement.x402.wire import PaymentPayload, PaymentRequired, PaymentRequirements
from tests.conftest import PAY_TO, Devchain, running_devchain
from tests.support.invariant import InvariantChecker
from tests.support.recording_upstream import RecordingUpstream
from tests.support.rpc_counter import RpcCounter

REDIS_URL = "redis://127.0.0.1:6379/0"
JUNK_SIGNATURE = "0x" + "11" * 64 + "1b"  # 65 bytes, recovers to nobody in particular

ATTACK_CATALOG = """
catalog: 1
owner: attack-suite
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  rec: {{base_url: "{upstream}", timeout_seconds: 5}}
  slow: {{base_url: "{upstream}", timeout_seconds: 20, retry: {{attempts: 2, backoff_seconds: 0.5}}}}
tools:
  - name: read_quote
    description: A paid read (settles after the upstream answers)
    method: GET
    path: /q/{{symbol}}
    upstream: rec
    upstream_path: /u/read_quote/{{symbol}}
    price: "0.002"
    input_schema: &symbol
      type: object
      properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [symbol]
      additionalProperties: false
  - name: read_twin
    description: Another paid read at the same price
    method: GET
    path: /q2/{{symbol}}
    upstream: rec
    upstream_path: /u/read_twin/{{symbol}}
    price: "0.002"
    input_schema: *symbol
  - name: weather
    description: A paid read taking its arguments from the query
    method: GET
    path: /w
    upstream: rec
    upstream_path: /u/weather
    price: "0.002"
    input_schema:
      type: object
      properties:
        city: {{type: string, minLength: 1, maxLength: 100}}
        units: {{type: string, enum: [metric, imperial]}}
      required: [city]
      additionalProperties: false
  - name: order
    description: Places an order (side effects; the default settle mode for POST applies)
    method: POST
    path: /orders
    upstream: rec
    upstream_path: /u/order
    price: "0.01"
    input_schema: &order
      type: object
      properties:
        symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}
        quantity: {{type: integer, minimum: 1, maximum: 1000}}
      required: [symbol, quantity]
      additionalProperties: false
  - name: slow_read
    description: A settle-after read whose upstream may take 2 x 20 s
    method: GET
    path: /slow/{{item}}
    upstream: slow
    upstream_path: /u/slow_read/{{item}}
    price: "0.001"
  - name: drain_read
    description: A settle-after read; the test drains the payer while it runs
    method: GET
    path: /drain/{{item}}
    upstream: rec
    upstream_path: /u/drain_read/{{item}}
    price: "0.002"
  - name: cancel_read
    description: A settle-after read; the test uses or cancels the authorization while it runs
    method: GET
    path: /cancel/{{item}}
    upstream: rec
    upstream_path: /u/cancel_read/{{item}}
    price: "0.002"
  - name: drain_order
    description: A state-changing call whose payer is drained before it settles
    method: POST
    path: /drain-orders
    upstream: rec
    upstream_path: /u/drain_order
    price: "0.002"
    input_schema: *order
  - name: redirect_read
    description: Its upstream answers 302 with a body
    method: GET
    path: /redir/{{item}}
    upstream: rec
    upstream_path: /u/redirect_read/{{item}}
    price: "0.002"
  - name: inject_read
    description: Its upstream tries to inject payment headers
    method: GET
    path: /inject/{{item}}
    upstream: rec
    upstream_path: /u/inject_read/{{item}}
    price: "0.002"
  - name: limited_read
    description: A read with per-payer, per-tool and per-client rate limits
    method: GET
    path: /limited/{{item}}
    upstream: rec
    upstream_path: /u/limited_read/{{item}}
    price: "0.002"
    rate_limits:
      per_payer: {{requests: 3, window: 1m}}
      per_tool: {{requests: 6, window: 1m}}
      per_client: {{requests: 4, window: 1m}}
"""


@dataclass
class Gateway:
    url: str
    store: str
    ledger: Ledger
    server: ThreadServer

    def client(self, source: str | None = None) -> httpx.Client:
        """A client; ``source`` binds it to another loopback address (another client for per_client)."""
        transport = httpx.HTTPTransport(local_address=source) if source else None
        return httpx.Client(base_url=self.url, timeout=60, transport=transport)


@dataclass
class Stack:
    chain: Devchain
    rpc: RpcCounter
    upstream: RecordingUpstream
    catalogs: Catalogs
    catalog_path: Path
    deployment_file: Path
    directory: Path
    redis_prefix: str
    gateways: dict[str, Gateway] = field(default_factory=dict)

    def gateway(self, store: str = "memory") -> Gateway:
        if store not in self.gateways:
            values: dict[str, Any] = {
                "catalog": [self.catalog_path],
                "deployment_file": self.deployment_file,
                "database_url": f"sqlite:///{self.directory / f'ledger-{store}.sqlite3'}",
                "receipt_timeout_seconds": 10,
            }
            if store == "redis":
                values.update(redis_url=REDIS_URL, redis_prefix=self.redis_prefix)
            settings = Settings(**values)
            ledger = open_ledger(settings.database_url)
            server = ThreadServer(create_app(settings, catalogs=self.catalogs, ledger=ledger)).start()
            self.gateways[store] = Gateway(server.url, store, ledger, server)
        return self.gateways[store]

    def checker(self, gateway: Gateway) -> InvariantChecker:
        return InvariantChecker(chain=self.chain, ledger=gateway.ledger, upstream=self.upstream,
                                catalogs=self.catalogs, pay_to=PAY_TO)

    @property
    def w3(self) -> Any:
        return self.chain.w3


@contextmanager
def attack_stack(directory: Path) -> Iterator[Stack]:
    with running_devchain(directory) as chain:
        rpc = RpcCounter(chain.anvil.rpc_url).start()
        upstream = RecordingUpstream().start()
        catalog_path = directory / "attacks.yaml"
        catalog_path.write_text(ATTACK_CATALOG.format(token=chain.token, pay_to=PAY_TO, upstream=upstream.url))
        stack = Stack(
            chain=chain, rpc=rpc, upstream=upstream, catalogs=load_catalogs([catalog_path]),
            catalog_path=catalog_path, deployment_file=rpc.deployment_file(chain.deployment, directory),
            directory=directory, redis_prefix=f"x402gw-attacks-{uuid.uuid4().hex[:12]}:",
        )
        try:
            yield stack
        finally:
            for gateway in stack.gateways.values():
                gateway.server.stop()
                gateway.ledger.close()
            upstream.stop()
            rpc.stop()
            try:
                client = redis.Redis.from_url(REDIS_URL)
                for key in client.scan_iter(match=f"{stack.redis_prefix}*"):
                    client.delete(key)
                client.close()
            except redis.RedisError:
                pass


@contextmanager
def reference_gateway(stack: Stack, settlement_index: int = 7) -> Iterator[Gateway]:
    """A gateway like ``stack.gateway()`` with the fast path off (every request through the app): the
    reference the fast path's answers are compared with. It settles from anvil account
    ``settlement_index``, not the stack's settlement account, so two gateways never race one nonce."""
    settings = Settings(catalog=[stack.catalog_path], deployment_file=stack.deployment_file,
                        database_url=f"sqlite:///{stack.directory / 'ledger-reference.sqlite3'}",
                        receipt_timeout_seconds=10, settlement_key=stack.chain.key(settlement_index))
    ledger = open_ledger(settings.database_url)
    server = ThreadServer(create_app(settings, catalogs=stack.catalogs, ledger=ledger, fast_path=False)).start()
    try:
        yield Gateway(server.url, "memory", ledger, server)
    finally:
        server.stop()
        ledger.close()


# -- building payments -----------------------------------------------------------------------------


def offer_for(client: httpx.Client, method: str, path: str, **kwargs: Any) -> PaymentRequired:
    response = client.request(method, path, **kwargs)
    assert response.status_code == 402, response.text
    return PaymentRequired.model_validate(decode_header_json(response.headers["payment-required"]))


def sign(key: str, offer: PaymentRequired, **kwargs: Any) -> PaymentPayload:
    return Payer(key).sign(offer.accepts[0], resource=offer.resource, **kwargs)


def v2_header(payload: PaymentPayload | dict[str, Any]) -> dict[str, str]:
    return {"PAYMENT-SIGNATURE": encode_header(payload)}


def v1_wire(payload: PaymentPayload, network: str | None = None) -> dict[str, Any]:
    return {"x402Version": 1, "scheme": "exact", "network": network or payload.accepted.network,
            "payload": copy.deepcopy(payload.payload)}


def v1_header(payload: PaymentPayload | dict[str, Any], network: str | None = None) -> dict[str, str]:
    wire = v1_wire(payload, network) if isinstance(payload, PaymentPayload) else payload
    return {"X-PAYMENT": encode_header(wire)}


def forged(requirements: PaymentRequirements, offer: PaymentRequired, payer: str, nonce: str,
           valid_before: int = 1) -> dict[str, Any]:
    """A v2 payment naming a victim's (payer, nonce) with the public offer and a junk signature."""
    wire: dict[str, Any] = {
        "x402Version": 2,
        "accepted": requirements.to_wire(),
        "payload": {
            "signature": JUNK_SIGNATURE,
            "authorization": {
                "from": payer, "to": requirements.pay_to, "value": requirements.amount,
                "validAfter": "0", "validBefore": str(valid_before), "nonce": nonce,
            },
        },
    }
    if offer.resource is not None:
        wire["resource"] = offer.resource.to_wire()
    return wire


def random_nonce() -> str:
    return "0x" + os.urandom(32).hex()


def now() -> int:
    return int(time.time())


def error_of(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None


def ledger_view(ledger: Ledger) -> list[tuple[Any, ...]]:
    return [(r.id, r.state, r.tx_hash, r.error_reason, r.updated_at) for r in ledger.all()]
