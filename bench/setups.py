"""How a benchmarked gateway is deployed: embedded (in-memory store + SQLite ledger, one process) or
replica (Redis store + PostgreSQL ledger, as production runs), with one or several workers
(``x402gw serve --workers N``, each settling from its own funded account, and batching through a
BatchSettler of its own).

Redis and PostgreSQL are the local ones the tests use (BENCH_REDIS_URL, BENCH_PG_ADMIN_URL); each
run gets a database and a key prefix of its own, dropped at the end.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_account import Account

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG_ADMIN_URL = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@dataclass(frozen=True)
class Setup:
    config: str = "embedded"  # or "replica"
    workers: int = 1

    @property
    def label(self) -> str:
        """'' for the embedded single process (the plain cases of bench.run), else a suffix."""
        if self.config == "embedded" and self.workers == 1:
            return ""
        return f" [{'redis+pg' if self.config == 'replica' else self.config}, {self.workers} worker{'s' * (self.workers > 1)}]"


@dataclass
class Deployed:
    env: dict[str, str]
    args: list[str]
    database_url: str
    pid: int = 0  # the gateway's process (with --workers: the supervisor), once started


def process_tree(pid: int) -> list[int]:
    """``pid`` and its children (a supervisor's workers), from /proc."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [int(child) for child in children]


@contextmanager
def deployed(setup: Setup, workdir: Path, name: str, rpc_url: str,
             batch: dict[str, dict[str, object]] | None = None) -> Iterator[Deployed]:
    """The environment and ``serve`` arguments of a gateway deployed as ``setup``; with ``batch``
    (X402GW_BATCH_SETTLEMENT's policies) and several workers, a BatchSettler deployed for each
    worker's account, listed in each network's ``contracts``."""
    if setup.config == "embedded":
        if setup.workers != 1:
            raise ValueError("several workers need the replica configuration (Redis + PostgreSQL)")
        url = f"sqlite:///{workdir / f'{name}-ledger.sqlite3'}"
        yield Deployed({"X402GW_DATABASE_URL": url}, [], url)
        return
    with postgres_database() as database, redis_prefix() as prefix:
        env = {"X402GW_DATABASE_URL": database, "X402GW_REDIS_URL": REDIS_URL, "X402GW_REDIS_PREFIX": prefix}
        args: list[str] = []
        if setup.workers > 1:
            funded = funded_keys(rpc_url, setup.workers)
            keys = workdir / f"{name}-worker-keys.txt"
            keys.write_text("".join(key + "\n" for key in funded))
            args = ["--workers", str(setup.workers), "--settlement-keys-file", str(keys)]
            if batch:
                from gateway.devkit.devchain import deploy_batch_settler

                contracts = [deploy_batch_settler(rpc_url, Account.from_key(key).address) for key in funded]
                env["X402GW_BATCH_SETTLEMENT"] = json.dumps(
                    {network: {**policy, "contracts": contracts} for network, policy in batch.items()})
        yield Deployed(env, args, database)


@contextmanager
def postgres_database() -> Iterator[str]:
    import psycopg

    name = f"x402gw_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_prefix() -> Iterator[str]:
    import redis

    prefix = f"x402gw-bench-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
        client.close()


def funded_keys(rpc_url: str, count: int) -> list[str]:
    """Fresh settlement accounts, one per worker, given gas money on the dev chain (anvil)."""
    keys = []
    for _ in range(count):
        account = Account.create()
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "anvil_setBalance",
                           "params": [account.address, hex(10**21)]}).encode()
        request = urllib.request.Request(rpc_url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.load(response)
        if "error" in answer:
            raise RuntimeError(f"anvil_setBalance: {answer['error']}")
        keys.append("0x" + bytes(account.key).hex())
    return keys
