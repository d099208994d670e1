"""The doctor's run: every check of a plan, concurrently, each bounded by a timeout, into one
report. It only reads: no transaction, no migration, no write to the store."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import replace

import httpx
from sqlalchemy.engine import Engine

from gateway.ops.doctor.batch_checks import check_batch_settlers
from gateway.ops.doctor.chain_checks import GasThresholds, check_gas, check_rpc, check_token
from gateway.ops.doctor.facilitator_checks import check_facilitator
from gateway.ops.doctor.findings import Finding, Report, ok
from gateway.ops.doctor.plan import DoctorPlan, NetworkPlan
from gateway.ops.doctor.rpc import RpcReader
from gateway.ops.doctor.service_checks import check_admin_token, check_database, check_dev_keys, check_store
from gateway.ops.doctor.user_auth_checks import check_jwks
from gateway.store import StateStore

__all__ = ["run_doctor"]


async def _chain(plan: NetworkPlan, client: httpx.AsyncClient, thresholds: GasThresholds, timeout: float) -> list[Finding]:
    if plan.chain_id is None:
        return [ok("rpc", plan.network, "not an eip155 network: no chain checks")]
    found: list[Finding] = []
    gas_checked = False
    for url in plan.rpc_urls:
        rpc = RpcReader(client, url, timeout=timeout)
        verdict = await check_rpc(plan, rpc)
        found.append(verdict)
        if verdict.status != "ok":
            continue  # the token and the balance on another chain say nothing about this one
        for offer in plan.offers:
            found.extend(await check_token(plan, offer, rpc))
        if plan.local and not gas_checked:
            found.append(await check_gas(plan, rpc, thresholds))
            found.extend(await check_batch_settlers(plan, rpc))
            gas_checked = True
    if any(f.check == "rpc" and f.status == "ok" for f in found):
        # Several RPC URLs fail over in order: a dead one beside a working one is degraded, not down.
        # (A URL serving another chain stays a failure: the gateway would read that chain.)
        found = [replace(f, status="warn") if f.check == "rpc" and f.code == "rpc_unreachable" else f for f in found]
    return found


async def _facilitators(plan: NetworkPlan, doctor: DoctorPlan, client: httpx.AsyncClient, timeout: float) -> list[Finding]:
    return [await check_facilitator(plan, url, client, doctor.headers_for, timeout=timeout) for url in plan.facilitators]


async def run_doctor(
    plan: DoctorPlan,
    *,
    thresholds: GasThresholds | None = None,
    timeout: float = 5.0,
    engine: Engine | None = None,
    store: StateStore | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Report:
    """Every check of ``plan``. ``engine`` and ``store``: a running gateway's own (``/readyz``),
    else the doctor opens and closes its own from the plan."""
    thresholds = thresholds or GasThresholds()
    async with httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False) as client:
        jobs: list[Awaitable[list[Finding]]] = []
        for network in plan.networks:
            jobs.append(_chain(network, client, thresholds, timeout))
            jobs.append(_facilitators(network, plan, client, timeout))

        async def services() -> list[Finding]:
            database, state = await asyncio.gather(
                check_database(plan.database_url, engine=engine, timeout=timeout), check_store(plan, store=store, timeout=timeout)
            )
            issuers = [await check_jwks(url, client, timeout=timeout) for url in plan.jwks_urls]
            return [database, state, check_admin_token(plan), *check_dev_keys(plan), *issuers]

        results = await asyncio.gather(services(), *jobs)
    findings = [f for network in plan.networks for f in network.problems]
    findings.extend(f for group in results for f in group)
    return Report.of(findings)
