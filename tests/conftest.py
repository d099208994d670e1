"""Shared fixtures: a real anvil with the test USDC, the sample upstream, and gateways on loopback."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
from web3 import Web3

from catalog import Catalogs, load_catalogs
from gateway.app import create_app
from gateway.devkit.devchain import Anvil, Deployment, setup_devchain
from gateway.devkit.samples import rest_upstream
from gateway.ops.serving import ThreadServer
from gateway.settings import DEFAULT_CATALOG, Settings
from settlement.chain.client import SEL_AUTHORIZATION_STATE, SEL_BALANCE_OF
from settlement.ledger import Ledger
from settlement.schema import open_ledger
from settlement.schemes import Facilitator
from settlement.x402.codec import decode_header_json
from settlement.x402.wire import PaymentRequired
from tests.support.forwarding_upstream import Received
from tests.support.forwarding_upstream import create_app as create_forwarding_upstream

PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"  # anvil account 9, the example catalog's payTo
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass
class Devchain:
    anvil: Anvil
    deployment: Deployment
    deployment_file: Path
    w3: Web3

    @property
    def token(self) -> str:
        return self.deployment.token.address

    def balance(self, address: str) -> int:
        data = SEL_BALANCE_OF + bytes.fromhex(address[2:].rjust(64, "0"))
        return int.from_bytes(self.w3.eth.call({"to": self.token, "data": data}), "big")

    def authorization_state(self, authorizer: str, nonce_hex: str) -> bool:
        data = SEL_AUTHORIZATION_STATE + bytes.fromhex(authorizer[2:].rjust(64, "0")) + bytes.fromhex(nonce_hex[2:])
        return bool(int.from_bytes(self.w3.eth.call({"to": self.token, "data": data}), "big"))

    def key(self, index: int) -> str:
        return self.deployment.accounts[index - 1].private_key

    def address(self, index: int) -> str:
        return self.deployment.accounts[index - 1].address


@contextmanager
def running_devchain(directory: Path) -> Iterator[Devchain]:
    """A fresh anvil with the test USDC deployed and accounts funded; its deployment file in ``directory``."""
    with Anvil() as anvil:
        deployment = setup_devchain(anvil.rpc_url)
        path = directory / "devchain.json"
        deployment.write(path)
        yield Devchain(anvil, deployment, path, Web3(Web3.HTTPProvider(anvil.rpc_url)))


@pytest.fixture(scope="session")
def devchain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("devchain")) as chain:
        yield chain


@pytest.fixture(scope="session")
def upstream_server() -> Iterator[ThreadServer]:
    with ThreadServer(rest_upstream.create_app()) as server:
        yield server


@pytest.fixture
def upstream(upstream_server: ThreadServer) -> str:
    httpx.post(f"{upstream_server.url}/stats/reset")
    return upstream_server.url


@pytest.fixture(scope="module")
def recorder() -> Iterator[tuple[ThreadServer, list[Received]]]:
    """A loopback upstream that records every request it gets (tests.support.forwarding_upstream),
    one per test module."""
    received: list[Received] = []
    with ThreadServer(create_forwarding_upstream(received)) as server:
        yield server, received


@pytest.fixture
def received(recorder: tuple[ThreadServer, list[Received]]) -> list[Received]:
    """What ``recorder`` got during this test."""
    recorder[1].clear()
    return recorder[1]


def upstream_hits(upstream_url: str, key: str) -> int:
    return int(httpx.get(f"{upstream_url}/stats").json()["requests"].get(key, 0))


def demo_catalog(tmp_path: Path, upstream_url: str, source: Path = DEFAULT_CATALOG) -> Path:
    """The example catalog, pointed at the test's upstream."""
    text = source.read_text().replace("http://127.0.0.1:9101", upstream_url)
    path = tmp_path / source.name
    path.write_text(text)
    return path


@contextmanager
def fresh_database(label: str = "test") -> Iterator[str]:
    """A PostgreSQL database of its own (its URL), dropped when the block ends: a ledger holding only
    what its test wrote, shared by the replicas or workers the test runs."""
    name = f"x402gw_{label}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_redis_prefix(label: str = "test") -> Iterator[str]:
    """A Redis key prefix of its own; every key under it is dropped when the block ends."""
    prefix = f"x402gw-{label}-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*"):
            client.delete(key)
        client.close()


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end."""
    with fresh_database() as url:
        yield url


@dataclass
class RunningGateway:
    url: str
    settings: Settings
    ledger: Ledger
    catalogs: Catalogs

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def start_gateway(
    tmp_path: Path, devchain: Devchain, upstream: str
) -> Iterator[GatewayFactory]:
    servers: list[ThreadServer] = []
    ledgers: list[Ledger] = []

    def start(catalog: Path | None = None, *, facilitator: Facilitator | None = None,
              app_options: dict[str, Any] | None = None, **overrides: Any) -> RunningGateway:
        """A gateway on loopback: ``overrides`` are settings, ``app_options`` create_app's seams."""
        catalog = catalog or demo_catalog(tmp_path, upstream)
        values: dict[str, Any] = {
            "catalog": [catalog],
            "deployment_file": devchain.deployment_file,
            "database_url": f"sqlite:///{tmp_path / f'ledger{len(servers)}.sqlite3'}",
            "receipt_timeout_seconds": 10,
        }
        values.update(overrides)
        settings = Settings(**values)
        catalogs = load_catalogs(settings.catalog)
        ledger = open_ledger(settings.database_url)
        ledgers.append(ledger)
        app = create_app(settings, catalogs=catalogs, ledger=ledger, facilitator=facilitator, **(app_options or {}))
        server = ThreadServer(app).start()
        servers.append(server)
        return RunningGateway(server.url, settings, ledger, catalogs)

    yield start
    for server in servers:
        server.stop()
    for ledger in ledgers:
        ledger.close()


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return start_gateway()


def offer_of(response: httpx.Response) -> PaymentRequired:
    assert response.status_code == 402, response.text
    return PaymentRequired.model_validate(decode_header_json(response.headers["payment-required"]))


def body_json(response: httpx.Response) -> dict[str, Any]:
    data = json.loads(response.content)
    assert isinstance(data, dict)
    return data
