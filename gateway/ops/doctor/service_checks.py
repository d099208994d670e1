"""Checks beside the chains: the ledger database is reachable and at the migrations' head, the
state store answers, an admin token is set, and no public anvil key is used off the local chain.

Codes: ``database_unreachable``, ``database_not_migrated``, ``store_unreachable``,
``admin_token_missing`` (fail when selling on a public chain, warn on the local chain only),
``admin_token_weak`` (warn), ``dev_key_on_public_chain``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import Engine, make_url

from gateway.ops.doctor.findings import Finding, fail, ok, warn
from gateway.ops.doctor.plan import DoctorPlan
from gateway.store import StateStore, create_store
from settlement.chain.deployment import ANVIL_KEYS
from settlement.schema import current_revision, head_revision

__all__ = ["MIN_ADMIN_TOKEN_LENGTH", "check_admin_token", "check_database", "check_dev_keys", "check_store", "is_dev_key"]

MIN_ADMIN_TOKEN_LENGTH = 24
_ANVIL_KEYS = frozenset(key.lower().removeprefix("0x") for key in ANVIL_KEYS)


def is_dev_key(key: str) -> bool:
    return key.strip().lower().removeprefix("0x") in _ANVIL_KEYS


def _describe_database(url: str) -> str:
    """The database without its credentials: backend, host and name."""
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 -- sqlalchemy's ArgumentError and friends: say nothing of the URL
        return "the database (unparsable X402GW_DATABASE_URL)"
    if parsed.get_backend_name() == "sqlite":
        return f"sqlite {parsed.database or ':memory:'}"
    port = f":{parsed.port}" if parsed.port else ""
    return f"{parsed.get_backend_name()} {parsed.host or ''}{port}/{parsed.database or ''}"


def _revision(url: str, engine: Engine | None) -> str | None:
    own = engine is None
    engine = engine or create_engine(url)
    try:
        with engine.connect() as connection:
            return current_revision(connection)
    finally:
        if own:
            engine.dispose()


async def check_database(url: str, *, engine: Engine | None = None, timeout: float = 5.0) -> Finding:
    what = _describe_database(url)
    upgrade = "run `x402gw db upgrade` with this X402GW_DATABASE_URL (the gateway also migrates when it starts)"
    if engine is None:
        try:
            parsed = make_url(url)
        except Exception:  # noqa: BLE001 -- any unparsable URL
            return fail("database", "ledger database", "database_unreachable", f"{what}", "set X402GW_DATABASE_URL to a SQLAlchemy URL")
        if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
            # Connecting would create the file: the doctor reads, it never writes.
            return fail("database", "ledger database", "database_not_migrated", f"{what} does not exist yet", upgrade)
    try:
        revision = await asyncio.wait_for(asyncio.to_thread(_revision, url, engine), timeout)
    except Exception as exc:  # noqa: BLE001 -- driver errors of every kind: the database is not usable
        return fail("database", "ledger database", "database_unreachable", f"{what} did not answer: {type(exc).__name__}",
                    "check X402GW_DATABASE_URL and that the database server is up and reachable from here")
    head = head_revision()
    if revision != head:
        state = "has no schema" if revision is None else f"is at revision {revision}"
        return fail("database", "ledger database", "database_not_migrated", f"{what} {state}; this x402gw's head is {head}",
                    upgrade + "; a database newer than this x402gw needs the matching x402gw version")
    return ok("database", "ledger database", f"{what} reachable, at the migrations' head ({head})")


async def check_store(plan: DoctorPlan, *, store: StateStore | None = None, timeout: float = 5.0) -> Finding:
    if store is None and plan.redis_url is None:
        return ok("store", "state store", "in-memory store (one replica; set X402GW_REDIS_URL to run several)")
    target = store or create_store(plan.redis_url, plan.redis_prefix)
    try:
        await asyncio.wait_for(target.ping(), timeout)
    except Exception as exc:  # noqa: BLE001 -- StoreUnavailable, timeouts, refused connections alike
        return fail("store", "state store", "store_unreachable", f"the state store did not answer a ping: {type(exc).__name__}",
                    "start Redis, or fix X402GW_REDIS_URL (host, port, password, TLS)")
    finally:
        if store is None:
            await target.close()
    return ok("store", "state store", "Redis answers" if plan.redis_url else "the state store answers")


def check_admin_token(plan: DoctorPlan) -> Finding:
    fix = ("set X402GW_ADMIN_TOKEN to a long random value, e.g. "
           "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` (the dashboard, kill switch and payer lists need it)")
    token = plan.admin_token or ""
    if not token:
        message = "no admin token: /admin, the kill switch and the payer lists are off"
        if plan.public_networks:
            return fail("admin_token", "X402GW_ADMIN_TOKEN", "admin_token_missing", message + f" while selling on {', '.join(plan.public_networks)}", fix)
        return warn("admin_token", "X402GW_ADMIN_TOKEN", "admin_token_missing", message, fix)
    if len(token) < MIN_ADMIN_TOKEN_LENGTH:
        return warn("admin_token", "X402GW_ADMIN_TOKEN", "admin_token_weak", f"the admin token is shorter than {MIN_ADMIN_TOKEN_LENGTH} characters", fix)
    return ok("admin_token", "X402GW_ADMIN_TOKEN", "set")


def check_dev_keys(plan: DoctorPlan) -> list[Finding]:
    found: list[Finding] = []
    for network in plan.networks:
        if network.is_local_chain or network.rehearsal:  # anvil either way: the gateway allows its dev keys there too
            continue
        keys = [("settlement key", "X402GW_SETTLEMENT_KEY", network.settlement_key if network.local else None),
                ("refund key", "X402GW_REFUND_KEY", plan.refund_key)]
        for what, variable, key in keys:
            if key and is_dev_key(key):
                found.append(fail("keys", network.network, "dev_key_on_public_chain",
                                  f"the {what} is one of anvil's public dev keys: anyone can spend from it on {network.network}",
                                  f"set {variable} to a key of your own (a new account, funded for gas), never a published one"))
    if plan.receipt_key and is_dev_key(plan.receipt_key) and plan.public_networks:
        # Refused by the gateway itself as soon as any chain but the local one is sold on (rehearsals too).
        found.append(fail("keys", ", ".join(plan.public_networks), "dev_key_on_public_chain",
                          "the receipt key is one of anvil's public dev keys: anyone can sign receipts in this gateway's name",
                          "set X402GW_RECEIPT_KEY to a key of your own (it signs only; it needs no funds), never a published one"))
    if not found:
        local_only = not plan.public_networks
        rehearsals = [n.network for n in plan.networks if n.rehearsal]
        found.append(ok("keys", "all networks", "local chain only: anvil's dev keys are fine here" if local_only
                        else "no public anvil key is used off the local chain"
                        + (f" (rehearsal chains of {', '.join(rehearsals)}: anvil on loopback, its dev keys allowed)" if rehearsals else "")))
    return found
