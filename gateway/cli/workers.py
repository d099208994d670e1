"""``x402gw serve --workers N``: N gateway processes on one machine sharing one listening socket.

The supervisor (this module, the parent process) checks the configuration can be shared, binds the
port once and starts N ``serve`` processes that inherit the socket: the kernel hands each new
connection to one of them. It restarts a worker that dies (kill -9, a crash) with the same index
and settlement key, forwards SIGTERM/SIGINT to all of them and exits when they have. A worker that
refuses its configuration at its first start (exit 2) stops them all; one that keeps dying within
seconds of starting stops them all too (``worker_crash_loop``). A worker dies with its supervisor.

What several workers need, refused at start-up with a stable code otherwise (exit 2):

* ``workers_need_redis``: the state store is shared (in-flight locks, limits, budgets,
  idempotency); the in-memory store is per process, so two workers would each let a payment in.
* ``workers_need_postgresql``: the ledger takes writes from every worker at once; SQLite's
  group commit assumes one writing process (another one waits on the file lock, then fails).
* ``workers_need_settlement_keys``: one settlement account per worker
  (``--settlement-keys-file``, one 0x key per line, at least N), so each worker's broadcast lane
  owns its account's nonces as a single process does. Only when the gateway settles itself.
* ``workers_need_batch_settlers``: with batched settlement (``X402GW_BATCH_SETTLEMENT``), one
  BatchSettler per worker in each network's ``contracts`` (a BatchSettler accepts one settler
  account); each worker takes the one naming its account, checked on chain when it starts.
* ``workers_channels_unsupported``: a batch-settlement channel names one receiverAuthorizer (the
  settlement account that signs its claims); each worker's own account would be another.
* ``workers_refund_key_shared``: one refund account's nonces would be taken by N processes.
* ``workers_invalid``: fewer than one worker.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import click

from catalog.source import read_catalog_text
from gateway.settings import Settings
from gateway.store import WORKER_GROUP_ENV

__all__ = ["WorkerPlanError", "plan_workers", "read_keys", "release_locks_of", "supervise"]

CRASH_LOOP_SECONDS = 2.0  # a worker that dies this soon after it started, this many times in a row:
CRASH_LOOP_LIMIT = 5  # the supervisor gives up (worker_crash_loop) rather than restart forever


class WorkerPlanError(Exception):
    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.message, self.code = message, code


def read_keys(path: Path | None) -> list[str]:
    """Settlement keys, one 0x-prefixed hex key per line (blank lines and # comments skipped)."""
    if path is None:
        return []
    try:  # a regular file only (a FIFO would block for ever), small, UTF-8
        lines = read_catalog_text(str(path)).splitlines()
    except OSError as exc:
        raise WorkerPlanError(f"--settlement-keys-file: cannot read {path}: {exc.strerror}", "secret_file_unreadable") from None
    except UnicodeDecodeError:
        raise WorkerPlanError(f"--settlement-keys-file: {path} is not text", "secret_file_unreadable") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    for number, key in enumerate(keys, 1):
        body = key[2:] if key.startswith("0x") else ""
        if len(body) != 64 or any(c not in "0123456789abcdefABCDEF" for c in body):
            raise WorkerPlanError(f"--settlement-keys-file: key {number} is not a 0x-prefixed 32-byte hex key",
                                  "invalid_setting")
    if len({key.lower() for key in keys}) != len(keys):
        raise WorkerPlanError("--settlement-keys-file: a key is listed twice (each worker needs its own account)",
                              "workers_need_settlement_keys")
    return keys


def plan_workers(settings: Settings, workers: int, keys: list[str], settles_locally: bool,
                 schemes: frozenset[str] = frozenset()) -> list[dict[str, str]]:
    """The environment of each worker (its index and, when it settles, its own settlement key), or
    ``WorkerPlanError`` when this configuration cannot be shared by ``workers`` processes."""
    if workers < 1:
        raise WorkerPlanError("--workers must be at least 1", "workers_invalid")
    if workers == 1:
        return [{"X402GW_WORKER_INDEX": "0"}]
    if settings.redis_url is None:
        raise WorkerPlanError(
            f"--workers {workers} needs a shared state store: set X402GW_REDIS_URL (the in-memory store is "
            "per process, so locks, limits and budgets would not be shared)", "workers_need_redis")
    if not settings.database_url.startswith("postgresql"):
        raise WorkerPlanError(
            f"--workers {workers} needs a PostgreSQL ledger (X402GW_DATABASE_URL=postgresql+psycopg://...): "
            "SQLite takes one writing process", "workers_need_postgresql")
    for network, batch in sorted(settings.batch_settlement.items()):
        if len(batch.contracts or ()) < workers:
            raise WorkerPlanError(
                f"--workers {workers} with X402GW_BATCH_SETTLEMENT on {network} needs one BatchSettler per worker "
                f"(a BatchSettler takes one settler account, and each worker settles from its own): list "
                f"{workers} in its \"contracts\", each deployed with one worker's account as its settler "
                f"({len(batch.contracts or ())} listed)", "workers_need_batch_settlers")
    if "batch-settlement" in schemes:
        raise WorkerPlanError(
            f"--workers {workers} cannot sell in batch-settlement: a channel names one receiverAuthorizer "
            "(the account that signs its claims), and each worker settles from its own", "workers_channels_unsupported")
    if settings.refund_key is not None:
        raise WorkerPlanError(
            f"--workers {workers} cannot share X402GW_REFUND_KEY: its account's nonces would be taken by "
            f"{workers} processes; run one worker per refund account", "workers_refund_key_shared")
    if settles_locally and len(keys) < workers:
        raise WorkerPlanError(
            f"--workers {workers} settles on chain from one account per worker: --settlement-keys-file "
            f"lists {len(keys)} key(s), {workers} are needed", "workers_need_settlement_keys")
    envs = []
    for index in range(workers):
        env = {"X402GW_WORKER_INDEX": str(index)}
        if settles_locally:
            env["X402GW_SETTLEMENT_KEY"] = keys[index]
        envs.append(env)
    return envs


def listening_socket(host: str, port: int) -> socket.socket:
    """The one socket every worker accepts on (inherited, not re-bound: one accept queue, so a
    worker that dies loses no connection waiting to be accepted)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


_RELEASE_IF_SAME = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def release_locks_of(redis_url: str, prefix: str, group: str, pid: int) -> int:
    """Release the locks a dead worker held (their owners end in ``@<group>.<pid>``: gateway.store;
    ``group`` is its supervisor's: a worker of another host with the same pid is not it), so a resend
    of the payment it was settling is resolved against the chain now, not after the lock's TTL.
    Compare-and-delete: a lock re-taken meanwhile is left alone. How many were released."""
    import redis

    suffix = f"@{group}.{pid}".encode()
    released = 0
    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        release = client.register_script(_RELEASE_IF_SAME)
        for key in client.scan_iter(match=f"{prefix}*", count=1000, _type="STRING"):
            value = client.get(key)
            if isinstance(value, bytes) and value.endswith(suffix):
                released += int(release(keys=[key], args=[value]))
    finally:
        client.close()
    return released


@dataclass
class _Worker:
    index: int
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restarts: int = 0


@dataclass
class _Supervisor:
    argv: list[str]
    fd: int
    workers: list[_Worker]
    redis: tuple[str, str] | None = None  # (URL, key prefix) of the shared store
    group: str = field(default_factory=lambda: uuid.uuid4().hex[:16])  # in its workers' lock tags
    stopping: bool = False
    by_pid: dict[int, _Worker] = field(default_factory=dict)

    def start(self, worker: _Worker) -> None:
        env = dict(os.environ)
        if "X402GW_SETTLEMENT_KEY" in worker.env:  # its own key replaces the one the operator set
            env.pop("X402GW_SETTLEMENT_KEY_FILE", None)
        env.update(worker.env)
        env[WORKER_GROUP_ENV] = self.group
        worker.process = subprocess.Popen([*self.argv, "--worker-fd", str(self.fd)], env=env, pass_fds=(self.fd,),
                                          preexec_fn=_die_with_parent)
        worker.started = time.monotonic()
        self.by_pid[worker.process.pid] = worker
        click.echo(f"worker {worker.index} started (pid {worker.process.pid})")

    def signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def stop(self, _signum: int = signal.SIGTERM, _frame: object = None) -> None:
        self.stopping = True
        self.signal_all(signal.SIGTERM)

    def release_locks(self, pid: int) -> None:
        if self.redis is None:
            return
        try:
            released = release_locks_of(*self.redis, self.group, pid)
        except Exception as exc:  # noqa: BLE001 (the locks lapse after their TTL anyway)
            click.echo(f"warning: could not release worker pid {pid}'s locks ({type(exc).__name__}); "
                       "they lapse after their TTL [store_unavailable]", err=True)
            return
        if released:
            click.echo(f"released {released} lock(s) of worker pid {pid}", err=True)

    def run(self) -> int:
        for worker in self.workers:
            self.start(worker)
        status = 0
        while self.by_pid:
            pid, wait_status = os.wait()
            if pid not in self.by_pid:
                continue
            worker = self.by_pid.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            if self.stopping:
                continue
            if code == 2 and worker.restarts == 0:  # refused its configuration at first start: a restart won't fix it
                click.echo(f"error: worker {worker.index} refused to start; stopping [worker_start_failed]", err=True)
                status = 2
                self.stop()
                continue
            lived = time.monotonic() - worker.started
            worker.quick_deaths = worker.quick_deaths + 1 if lived < CRASH_LOOP_SECONDS else 0
            if worker.quick_deaths >= CRASH_LOOP_LIMIT:
                click.echo(f"error: worker {worker.index} keeps dying at start-up [worker_crash_loop]", err=True)
                status = 1
                self.stop()
                continue
            click.echo(f"worker {worker.index} (pid {pid}) exited with {code}; restarting it", err=True)
            self.release_locks(pid)
            worker.restarts += 1
            self.start(worker)
        return status


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM when the supervisor dies (Linux), so a supervisor killed
    with -9 leaves no worker serving on its own."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(argv: list[str], sock: socket.socket, envs: list[dict[str, str]], redis: tuple[str, str] | None) -> int:
    """Run one worker per environment on ``sock`` until SIGTERM/SIGINT; the exit status.
    ``redis``: (URL, prefix) of the shared store, where a dead worker's locks are released."""
    supervisor = _Supervisor(argv, sock.fileno(), [_Worker(i, env) for i, env in enumerate(envs)], redis)
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    try:
        return supervisor.run()
    finally:
        supervisor.stopping = True
        supervisor.signal_all(signal.SIGTERM)
        sock.close()


def worker_argv(catalogs: tuple[Path, ...]) -> list[str]:
    argv = [sys.executable, "-m", "gateway.cli.main", "serve"]
    for path in catalogs:
        argv += ["--catalog", str(path)]
    return argv
