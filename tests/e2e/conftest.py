"""End-to-end fixtures for the protocol bridge: the sample SOAP warehouse on loopback, the demo
credentials in the environment, and the warehouse catalog pointed at the test's upstreams; and
``manual_mining`` for the modules that run a private anvil (their own ``chain`` fixture); ``recording``,
a recording upstream per module (``tests.support.recording_upstream``)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.devkit.samples import rest_upstream, soap_warehouse
from gateway.ops.serving import ThreadServer
from gateway.settings import DEFAULT_CATALOG
from tests.conftest import Devchain
from tests.support.recording_upstream import RecordingUpstream

WAREHOUSE_CATALOG = DEFAULT_CATALOG.with_name("warehouse.yaml")
SLOW_SECONDS = 1.0  # GetInventoryReport's delay in tests; a tool with a shorter timeout times out


@pytest.fixture(scope="session")
def warehouse_server() -> Iterator[ThreadServer]:
    with ThreadServer(soap_warehouse.create_app(slow_seconds=SLOW_SECONDS)) as server:
        yield server


@pytest.fixture
def warehouse(warehouse_server: ThreadServer) -> str:
    httpx.post(f"{warehouse_server.url}/stats/reset")
    return warehouse_server.url


@pytest.fixture
def bridge_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The samples' credentials, where the warehouse catalog tells the gateway to read them."""
    values = {"WAREHOUSE_TOKEN": soap_warehouse.DEMO_TOKEN, "ACME_FX_KEY": rest_upstream.DEMO_FX_KEY}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def dead_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def warehouse_catalog(tmp_path: Path, upstream: str, warehouse: str, *, replace: dict[str, str] | None = None) -> Path:
    text = (
        WAREHOUSE_CATALOG.read_text()
        .replace('failover: ["http://localhost:9101"]', f'failover: ["{upstream.replace("127.0.0.1", "localhost")}"]')
        .replace("http://127.0.0.1:9101", upstream)
        .replace("http://127.0.0.1:9102", warehouse)
        .replace("../../gateway/devkit/samples/warehouse.wsdl", str(soap_warehouse.WSDL_PATH))
    )
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "warehouse.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def manual_mining(chain: Devchain) -> Iterator[Callable[[], None]]:
    """Automining off until the test ends: a block is mined when the test calls the function. Only
    for a module that runs a private anvil: it needs the module's own ``chain`` fixture."""
    chain.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]

    def mine() -> None:
        chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]

    yield mine
    chain.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    mine()


@pytest.fixture(scope="module")
def recording() -> Iterator[RecordingUpstream]:
    """An upstream on loopback that records every call (what it was asked, how often), per module."""
    upstream = RecordingUpstream().start()
    yield upstream
    upstream.stop()
