"""The in-flight lock with failover: every facilitator of a network may be tried once per call,
and every chain step once per RPC URL, so the lock counts each of them."""

from __future__ import annotations

from pathlib import Path

from catalog import load_catalogs
from gateway.settings import Settings
from gateway.wiring import CHAIN_STEP_SECONDS, build_bridge, in_flight_lock_ttl_ms
from settlement.schemes.failover import FailoverFacilitator
from settlement.schemes.remote import RemoteFacilitator
from tests.gateway.test_lock_ttl import DEFAULT


def test_the_lock_counts_every_facilitator_and_every_rpc_url(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(DEFAULT)
    catalogs = load_catalogs([path])
    bridge = build_bridge(catalogs)
    one = Settings(catalog=[path])
    two = Settings(catalog=[path], rpc_urls={"eip155:31337": ["http://127.0.0.1:1", "http://127.0.0.1:2"]})
    assert in_flight_lock_ttl_ms(two, catalogs, bridge) > in_flight_lock_ttl_ms(one, catalogs, bridge)
    # local: chain step + verify step + settle step each doubled
    assert in_flight_lock_ttl_ms(two, catalogs, bridge) - in_flight_lock_ttl_ms(one, catalogs, bridge) == 3000 * CHAIN_STEP_SECONDS

    single = RemoteFacilitator("http://127.0.0.1:1", settle_timeout=60, verify_timeout=10)
    failover = FailoverFacilitator([RemoteFacilitator("http://127.0.0.1:1", settle_timeout=60, verify_timeout=10),
                                    RemoteFacilitator("http://127.0.0.1:2", settle_timeout=60, verify_timeout=10)])
    alone = in_flight_lock_ttl_ms(one, catalogs, bridge, remotes=[single], local=False)
    both = in_flight_lock_ttl_ms(one, catalogs, bridge, remotes=[failover], local=False)
    assert both - alone == 1000 * (60 + 10)
