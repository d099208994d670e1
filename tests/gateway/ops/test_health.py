"""/healthz and /readyz: each dependency checked, bounded by a timeout, and the failing one named."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine

from catalog import load_catalogs
from gateway.app import create_app
from gateway.ops.health import (
    CheckFailed,
    Readiness,
    chain_check,
    database_check,
    remote_facilitator_check,
    store_check,
)
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from gateway.store import MemoryStore, RedisStore, StoreUnavailable
from settlement.chain.client import JsonRpcChain
from settlement.schema import open_ledger
from settlement.schemes.remote import RemoteFacilitator
from tests.conftest import Devchain, GatewayFactory, demo_catalog
from tests.support.facilitator_double import NETWORK, SUPPORTED, closed_port_url


def run(readiness: Readiness) -> tuple[bool, dict[str, dict[str, str]]]:
    return asyncio.run(readiness.run())


async def ok() -> None:
    return None


async def hangs() -> None:
    await asyncio.Event().wait()


async def wrong() -> None:
    raise CheckFailed("chain_id_mismatch")


async def broken() -> None:
    raise ConnectionRefusedError("secret internals")


def test_all_checks_pass() -> None:
    ready, report = run(Readiness({"database": ok, "store": ok}))
    assert ready and report == {"database": {"status": "ok"}, "store": {"status": "ok"}}


def test_each_failure_is_named_with_a_code_and_no_internals() -> None:
    ready, report = run(Readiness({"database": ok, "store": broken, "chain": wrong, "facilitator": hangs}, timeout=0.05))
    assert not ready
    assert report == {
        "database": {"status": "ok"},
        "store": {"status": "fail", "error": "unreachable"},
        "chain": {"status": "fail", "error": "chain_id_mismatch"},
        "facilitator": {"status": "fail", "error": "timeout"},
    }


def test_database_check(tmp_path: Any) -> None:
    assert run(Readiness({"db": database_check(create_engine(f"sqlite:///{tmp_path / 'x.sqlite3'}"))}))[0]
    dead = create_engine(closed_port_url().replace("http", "postgresql+psycopg") + "/x")
    assert run(Readiness({"db": database_check(dead)}))[1]["db"]["status"] == "fail"


def test_store_check() -> None:
    assert run(Readiness({"store": store_check(MemoryStore())}))[0]
    dead = RedisStore(closed_port_url().replace("http", "redis") + "/0")
    assert run(Readiness({"store": store_check(dead)}))[1] == {"store": {"status": "fail", "error": "unreachable"}}


def test_chain_check(devchain: Devchain) -> None:
    async def body() -> tuple[bool, dict[str, dict[str, str]]]:
        good = JsonRpcChain(devchain.anvil.rpc_url, 31337, None)
        other = JsonRpcChain(devchain.anvil.rpc_url, 8453, None)
        dead = JsonRpcChain(closed_port_url(), 31337, None)
        try:
            return await Readiness({"good": chain_check(good), "other": chain_check(other),
                                    "dead": chain_check(dead)}).run()
        finally:
            for chain in (good, other, dead):
                await chain.close()

    ready, report = asyncio.run(body())
    assert not ready
    assert report["good"] == {"status": "ok"}
    assert report["other"] == {"status": "fail", "error": "chain_id_mismatch"}
    assert report["dead"] == {"status": "fail", "error": "unreachable"}


@pytest.mark.parametrize(
    ("status", "body", "network", "expected"),
    [
        (200, SUPPORTED, NETWORK, {"status": "ok"}),
        (200, SUPPORTED, "eip155:1", {"status": "fail", "error": "unsupported_network"}),
        (502, {"error": "bad gateway"}, NETWORK, {"status": "fail", "error": "unreachable"}),
    ],
)
def test_remote_facilitator_check(status: int, body: dict[str, Any], network: str, expected: dict[str, str]) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/supported"
        return httpx.Response(status, json=body)

    async def main() -> dict[str, dict[str, str]]:
        remote = RemoteFacilitator("http://facilitator.test", transport=httpx.MockTransport(answer))
        try:
            return (await Readiness({"f": remote_facilitator_check(remote, network)}).run())[1]
        finally:
            await remote.close()

    assert asyncio.run(main()) == {"f": expected}


def test_gateway_is_live_and_ready(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    with gateway.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    # per RPC URL (redacted to scheme and host) as the last call left it; the local chain only
    [rpc] = body.pop("dependencies")["rpc"].values()
    assert [(u["url"].startswith("http://127.0.0.1:"), u["state"], u["failures"]) for u in rpc] == [(True, "up", 0)]
    assert body == {
        "status": "ready",
        "checks": {name: {"status": "ok"} for name in
                   ("database", "store", "chain:eip155:31337", "facilitator:eip155:31337")},
    }


class SwitchableStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def ping(self) -> None:
        if self.down:
            raise StoreUnavailable()


def test_gateway_not_ready_when_the_store_goes_away(tmp_path: Any, devchain: Devchain, upstream: str) -> None:
    settings = Settings(
        catalog=[demo_catalog(tmp_path, upstream)], deployment_file=devchain.deployment_file,
        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
    )
    store = SwitchableStore()
    ledger = open_ledger(settings.database_url)
    app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger, store=store)
    try:
        with ThreadServer(app) as server:
            assert httpx.get(f"{server.url}/readyz").status_code == 200
            store.down = True
            answer = httpx.get(f"{server.url}/readyz")
            assert httpx.get(f"{server.url}/healthz").status_code == 200  # alive, just not ready
    finally:
        ledger.close()
    assert answer.status_code == 503
    assert answer.json()["failing"] == ["store"]
    assert answer.json()["checks"]["store"] == {"status": "fail", "error": "unreachable"}


# -- /readyz?detail=1: the doctor's report beside readiness --------------------------------------


def readyz(readiness: Readiness, *queries: str) -> list[httpx.Response]:
    from starlette.applications import Starlette
    from starlette.routing import Route

    app = Starlette(routes=[Route("/readyz", readiness.endpoint)])

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            return [await client.get(f"/readyz{q}") for q in queries]

    return asyncio.run(main())


def test_readyz_answers_as_before_without_the_detail_query() -> None:
    calls: list[int] = []

    async def detail() -> dict[str, Any]:
        calls.append(1)
        return {"status": "ok"}

    plain, failing = readyz(Readiness({"database": ok}, detail=detail), ""), readyz(Readiness({"store": wrong}, detail=detail), "")
    assert plain[0].json() == {"status": "ready", "checks": {"database": {"status": "ok"}}}
    assert failing[0].status_code == 503 and failing[0].json() == {
        "status": "not_ready", "checks": {"store": {"status": "fail", "error": "chain_id_mismatch"}}, "failing": ["store"]}
    assert calls == []  # the doctor runs only when asked


def test_readyz_detail_is_added_and_the_status_code_stays_readinesss() -> None:
    async def detail() -> dict[str, Any]:
        return {"status": "fail", "findings": [{"code": "gas_low"}]}

    answer = readyz(Readiness({"database": ok}, detail=detail), "?detail=1")[0]
    assert answer.status_code == 200
    assert answer.json() == {"status": "ready", "checks": {"database": {"status": "ok"}},
                             "detail": {"status": "fail", "findings": [{"code": "gas_low"}]}}


def test_readyz_detail_is_shared_and_reused_within_its_ttl() -> None:
    calls: list[int] = []

    async def detail() -> dict[str, Any]:
        calls.append(1)
        return {"run": len(calls)}

    answers = readyz(Readiness({}, detail=detail, detail_ttl=3600), "?detail=1", "?detail=true", "?detail=1")
    assert [a.json()["detail"] for a in answers] == [{"run": 1}] * 3
    answers = readyz(Readiness({}, detail=detail, detail_ttl=-1), "?detail=1", "?detail=1")
    assert [a.json()["detail"] for a in answers] == [{"run": 2}, {"run": 3}]


def test_readyz_detail_that_breaks_or_hangs_is_named_not_a_500() -> None:
    async def broken_detail() -> dict[str, Any]:
        raise RuntimeError("secret internals")

    async def hanging_detail() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    broken_answer = readyz(Readiness({}, detail=broken_detail), "?detail=1")[0]
    hanging_answer = readyz(Readiness({}, detail=hanging_detail, detail_timeout=0.05), "?detail=1")[0]
    unset = readyz(Readiness({}), "?detail=1")[0]
    assert broken_answer.json()["detail"] == {"status": "fail", "error": "unavailable"}
    assert "secret" not in broken_answer.text
    assert hanging_answer.json()["detail"] == {"status": "fail", "error": "timeout"}
    assert unset.json()["detail"] == {"status": "fail", "error": "not_configured"}


def test_readyz_detail_is_the_doctors_report_without_secrets(tmp_path: Any, devchain: Devchain) -> None:
    from gateway.ops.doctor import plan_from_settings
    from gateway.ops.health import doctor_detail

    admin_token = "readyz-detail-admin-token-0123456789"
    settings = Settings(catalog=[demo_catalog(tmp_path, "http://127.0.0.1:9")], deployment_file=devchain.deployment_file,
                        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}", admin_token=admin_token)
    ledger = open_ledger(settings.database_url)
    try:
        plan = plan_from_settings(settings, load_catalogs(settings.catalog))
        answer = readyz(Readiness({}, detail=doctor_detail(plan, engine=ledger.engine, store=MemoryStore())), "?detail=1")[0]
    finally:
        ledger.close()
    detail = answer.json()["detail"]
    assert detail["status"] == "ok" and detail["exitStatus"] == 0, detail
    assert {f["check"] for f in detail["findings"]} >= {"rpc", "asset", "gas", "facilitator", "database", "store", "admin_token", "keys"}
    for secret in (admin_token, devchain.deployment.settlement_key.removeprefix("0x")):
        assert secret not in answer.text


def test_a_running_gateway_serves_the_doctors_detail(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    gateway = start_gateway()  # no admin token: a warning in the detail, readiness unchanged
    with gateway.client() as client:
        plain = client.get("/readyz")
        detailed = client.get("/readyz", params={"detail": "1"})
    assert plain.status_code == detailed.status_code == 200
    assert "detail" not in plain.json()
    assert {k: v for k, v in detailed.json().items() if k != "detail"} == plain.json()
    detail = detailed.json()["detail"]
    assert detail["status"] == "warn" and detail["exitStatus"] == 2
    assert [f["code"] for f in detail["findings"] if f["status"] != "ok"] == ["admin_token_missing"]
    assert any(f["check"] == "gas" and f["status"] == "ok" for f in detail["findings"])
    assert devchain.deployment.settlement_key.removeprefix("0x") not in detailed.text
