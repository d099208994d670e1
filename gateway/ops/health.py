"""``/healthz`` (the process answers) and ``/readyz`` (it can take paid calls right now).

Readiness runs every check concurrently, each bounded by a short timeout: the ledger database
(``SELECT 1``), the state store (ping), each chain RPC (``eth_chainId`` is the configured chain) and
each network's facilitator (remote: ``GET /supported`` lists exact on that network; local: its
chain answers). 200 with one entry per check when all pass; 503 naming the failing checks
otherwise. Answers carry stable codes only; the log gets the detail.

``GET /readyz?detail=1`` adds ``detail``: the ``x402gw doctor`` report of this gateway (token facts,
gas in settlements, facilitator credentials, migrations, admin token, dev keys), each finding with
its code, message and fix, and no secret in it. The status code stays readiness's: low gas is for
an operator to read, not a reason to take the replica out of rotation. The report makes outbound
calls, so one is shared by concurrent requests and reused for ``detail_ttl`` seconds.

Every answer also carries ``dependencies``: each RPC URL's and each remote facilitator's state as
the last real call left it (``up``, ``down``, ``unknown``; URLs redacted to scheme and host), so
a failover that is already happening shows before the last URL of a network goes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.engine import Engine
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.errors import GatewayError
from gateway.ops.doctor import DoctorPlan, GasThresholds, run_doctor
from gateway.store import StateStore

__all__ = ["CheckFailed", "Detail", "Readiness", "doctor_detail", "gateway_checks", "healthz"]

log = logging.getLogger("x402gw.health")


class CheckFailed(GatewayError):
    """A dependency answered, but not as it should: ``code`` is what /readyz reports."""

    status = 503

    def __init__(self, code: str) -> None:
        super().__init__(code, code)


# A check returns nothing when the dependency is fine and raises otherwise.
Check = Callable[[], Awaitable[None]]
# The detail of ``/readyz?detail=1``: a JSON object without secrets (the doctor's report).
Detail = Callable[[], Awaitable[dict[str, Any]]]
# Per-URL state of the RPC endpoints and facilitators (``gateway.wiring.SchemeWiring.health``).
Dependencies = Callable[[], Mapping[str, Any]]


class ChainProbe(Protocol):
    chain_id: int

    async def remote_chain_id(self) -> int: ...


class SupportedProbe(Protocol):
    async def fetch_supported(self) -> dict[str, Any]: ...


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


class Readiness:
    def __init__(
        self,
        checks: Mapping[str, Check],
        timeout: float = 2.0,
        *,
        detail: Detail | None = None,
        detail_timeout: float = 15.0,
        detail_ttl: float = 30.0,
        dependencies: Dependencies | None = None,
    ) -> None:
        self.checks = dict(checks)
        self.timeout = timeout
        self.detail = detail
        self.detail_timeout = detail_timeout
        self.detail_ttl = detail_ttl
        self.dependencies = dependencies
        self._detail_task: asyncio.Task[dict[str, Any]] | None = None
        self._detail_at = 0.0

    async def _run_detail(self, detail: Detail) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(detail(), self.detail_timeout)
        except TimeoutError:
            log.warning("readiness detail timed out after %ss", self.detail_timeout)
            return {"status": "fail", "error": "timeout"}
        except Exception as exc:  # noqa: BLE001 -- the detail is advice: a broken one never breaks /readyz
            log.warning("readiness detail failed: %s: %s", type(exc).__name__, exc)
            return {"status": "fail", "error": "unavailable"}

    async def run_detail(self) -> dict[str, Any] | None:
        """The detail, computed at most once per ``detail_ttl`` and shared by concurrent callers."""
        if self.detail is None:
            return None
        task = self._detail_task
        stale = task is not None and task.done() and time.monotonic() - self._detail_at > self.detail_ttl
        if task is None or stale:
            self._detail_at = time.monotonic()
            task = self._detail_task = asyncio.ensure_future(self._run_detail(self.detail))
        if task.done():
            return task.result()
        return await asyncio.shield(task)  # a caller that goes away does not cancel the others' report

    async def _run_one(self, name: str, check: Check) -> dict[str, str]:
        try:
            await asyncio.wait_for(check(), self.timeout)
        except TimeoutError:
            log.warning("readiness check %s timed out after %ss", name, self.timeout)
            return {"status": "fail", "error": "timeout"}
        except CheckFailed as exc:
            log.warning("readiness check %s failed: %s", name, exc.code)
            return {"status": "fail", "error": exc.code}
        except Exception as exc:  # noqa: BLE001 -- any broken dependency is "not ready", never a 500
            log.warning("readiness check %s failed: %s: %s", name, type(exc).__name__, exc)
            return {"status": "fail", "error": "unreachable"}
        return {"status": "ok"}

    async def run(self) -> tuple[bool, dict[str, dict[str, str]]]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._run_one(name, self.checks[name]) for name in names))
        report = dict(zip(names, results))
        return all(r["status"] == "ok" for r in results), report

    async def endpoint(self, request: Request) -> Response:
        ready, report = await self.run()
        body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "checks": report}
        if not ready:
            body["failing"] = [name for name, r in report.items() if r["status"] != "ok"]
        if self.dependencies is not None:
            body["dependencies"] = self.dependencies()
        if request.query_params.get("detail", "").lower() in ("1", "true", "yes"):
            detail = await self.run_detail()
            body["detail"] = detail if detail is not None else {"status": "fail", "error": "not_configured"}
        return JSONResponse(body, status_code=200 if ready else 503, headers={"Cache-Control": "no-store"})


def database_check(engine: Engine) -> Check:
    def select_one() -> None:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    async def check() -> None:
        await asyncio.to_thread(select_one)

    return check


def store_check(store: StateStore) -> Check:
    async def check() -> None:
        await store.ping()

    return check


def chain_check(chain: ChainProbe) -> Check:
    async def check() -> None:
        if await chain.remote_chain_id() != chain.chain_id:
            raise CheckFailed("chain_id_mismatch")

    return check


def remote_facilitator_check(remote: SupportedProbe, network: str) -> Check:
    async def check() -> None:
        supported = await remote.fetch_supported()
        kinds = supported.get("kinds", [])
        if not any(isinstance(k, dict) and k.get("scheme") == "exact" and k.get("network") == network for k in kinds):
            raise CheckFailed("unsupported_network")

    return check


def gateway_checks(
    *,
    engine: Engine,
    store: StateStore,
    chains: Mapping[str, ChainProbe],
    remote_facilitators: Mapping[str, SupportedProbe],
    local_networks: set[str],
) -> dict[str, Check]:
    """The checks of one gateway: names are ``database``, ``store``, ``chain:<network>`` and
    ``facilitator:<network>``. A local facilitator is ready when its chain is."""
    checks: dict[str, Check] = {"database": database_check(engine), "store": store_check(store)}
    for network, chain in sorted(chains.items()):
        checks[f"chain:{network}"] = chain_check(chain)
    for network in sorted(local_networks & set(chains)):
        checks[f"facilitator:{network}"] = chain_check(chains[network])
    for network, remote in sorted(remote_facilitators.items()):
        checks[f"facilitator:{network}"] = remote_facilitator_check(remote, network)
    return checks


def doctor_detail(
    plan: DoctorPlan,
    *,
    engine: Engine | None = None,
    store: StateStore | None = None,
    thresholds: GasThresholds | None = None,
    timeout: float = 5.0,
) -> Detail:
    """``/readyz?detail=1`` from the doctor's checks over ``plan`` (``gateway.ops.doctor``), with
    the running gateway's own database engine and store."""

    async def detail() -> dict[str, Any]:
        report = await run_doctor(plan, thresholds=thresholds, timeout=timeout, engine=engine, store=store)
        return report.to_json()

    return detail
