"""Review of replicas and workers sharing Redis and PostgreSQL, attacked end to end: a real anvil, a
recording upstream on loopback, real gateway processes (``serve`` and ``serve --workers 2``), one
Redis prefix and one PostgreSQL ledger shared as replicas share them. Each test asserts the
invariant of ``/work/shared/THREATS.md`` (never a charge without the answer it paid for, and never
an answer *and* its refund) on ledger rows, chain balances and upstream calls.

1. The supervisor of ``serve --workers N`` releases a dead worker's locks by the owner suffix
   ``@<pid>`` (``gateway.cli.workers.release_locks_of``), scanning the whole shared prefix. A pid
   names a process on one host only: replicas in containers or pods (their own pid namespaces, the
   supervisor pid 1, its workers 2, 3, ...) have workers with the very same pids. A worker dying on
   replica A makes A's supervisor free the payment lock of a live request on replica B's worker of
   that pid, between B's upfront settlement and its answer: a resend of that payment (or the
   restarted worker's start-up sweep, ``Refunds.owe_lost_answers``) then records the refund of an
   "answer lost" that B is about to deliver. The payer gets the answer and is owed its price back.

2. ``Refunds.owe_lost_answers`` decides from two reads in the wrong order: the stored answer first
   (none yet), the payment lock second. A live upfront request on replica A stores its answer and
   then releases its lock; if both land between replica B's two reads (B restarting, its sweep
   running), B sees "no answer" and "no lock" and refunds (with a refund key, on chain) a call A
   has just answered. The test widens that window deterministically: B's Redis connection goes
   through a relay that holds back the sweep's read of the lock until A has answered.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from eth_account import Account

from gateway.devkit.payer import Payer
from settlement.ledger import Payment, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, fresh_database, fresh_redis_prefix, offer_of
from tests.e2e.test_exactly_once import raw_request
from tests.support import chain_actions
from tests.support.polling import poll
from tests.support.processes import GatewayProcess
from tests.support.recording_upstream import MARKER_PREFIX, RecordingUpstream, UpstreamCall

NETWORK = "eip155:31337"
REDIS_URL = "redis://127.0.0.1:6379/0"
FUNDER = 6  # funds each test's fresh payer (delta-based checks only)
REFUNDER = 9  # the payTo account pays refunds back (as in test_attacks_refunds)
PRICE = 3000  # 0.003 of the 6-decimal test USDC


def catalog_text(devchain: Devchain, upstream: str, tool: str) -> str:
    return f"""
catalog: 1
owner: review-replicas
payment: {{network: "{NETWORK}", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{upstream}", timeout_seconds: 30}}
tools:
  - name: {tool}
    description: Places an order (side effects), settled before the call
    method: GET
    path: /{tool}/{{item}}
    upstream_path: /u/{tool}/{{item}}
    price: "0.003"
    settle: upfront
"""




def read_answer(sock: socket.socket, seconds: float = 60) -> tuple[int, bytes]:
    """The status and body of the HTTP/1.1 answer on ``sock`` (``Connection: close``: read to the end)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def funded_account(devchain: Devchain) -> Any:
    account = Account.create()
    devchain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])  # type: ignore[arg-type]
    return account


def key_hex(account: Any) -> str:
    return "0x" + bytes(account.key).hex()




@pytest.fixture
def database() -> Iterator[str]:
    """A PostgreSQL database of the test's own, shared by its replicas: its ledger holds only this test's rows."""
    with fresh_database("review_replicas") as url:
        yield url


@pytest.fixture
def prefix() -> Iterator[str]:
    """The replicas' shared Redis prefix; every key under it is dropped after the test."""
    with fresh_redis_prefix("review-replicas") as prefix:
        yield prefix


def lock_key(prefix: str, payer: str, nonce: str) -> str:
    return f"{prefix}pay:{NETWORK}:{payer.lower()}:{nonce.lower()}"


# -- 1. a worker dying on one replica frees the payment lock of a live request on another -------------


def _unshare() -> list[str] | None:
    """The command prefix that runs a process in a pid namespace of its own (as a container or a pod
    does), or None where this machine cannot make one."""
    binary = shutil.which("unshare")
    if binary is None:
        return None
    command = [binary, "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        command[1:1] = ["--user", "--map-root-user"]
    probe = subprocess.run([*command, "true"], capture_output=True, timeout=30, check=False)
    return command if probe.returncode == 0 else None


class ContainedReplica(GatewayProcess):
    """``x402gw serve --workers 2`` in its own pid namespace: one replica of a fleet of containers."""

    def __init__(self, unshare: list[str], env: dict[str, str], cwd: Path, log: Path, args: tuple[str, ...]) -> None:
        super().__init__(env, cwd, log, args)
        self._unshare = unshare

    def start(self, timeout: float = 120.0) -> ContainedReplica:
        log = open(self._log_path, "ab")  # the child writes to it for its whole life
        self.process = subprocess.Popen(
            [*self._unshare, sys.executable, "-m", "gateway.cli.main", "serve", *self.args], env=self._env,
            cwd=self._cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_ready(self.process, timeout)
            return self
        except BaseException:
            self.stop()
            raise

    def workers(self) -> dict[int, int]:
        """Each worker's pid inside the replica's namespace (what its locks are tagged with) → its pid here."""
        assert self.process is not None
        found: dict[int, int] = {}
        for supervisor in _children(self.process.pid):
            for worker in _children(supervisor):
                inside = _pid_inside(worker)
                if inside is not None:
                    found[inside] = worker
        return found

    def serving(self, client_port: int) -> int | None:
        """The worker (its pid here) whose socket is the server end of the client's connection."""
        inodes = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{self.port:04X}") and fields[2].endswith(f":{client_port:04X}"):
                inodes.add(f"socket:[{fields[9]}]")
        for worker in self.workers().values():
            try:
                links = {os.readlink(f"/proc/{worker}/fd/{fd}") for fd in os.listdir(f"/proc/{worker}/fd")}
            except OSError:
                continue
            if links & inodes:
                return worker
        return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _pid_inside(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    except OSError:
        return None
    return None


def test_a_worker_dying_on_one_replica_frees_a_live_upfront_request_on_another_to_be_answered_and_refunded(
    devchain: Devchain, recording: RecordingUpstream, tmp_path: Path, database: str, prefix: str,
) -> None:
    """Replicas A and B, each ``serve --workers 2`` in its own pid namespace, share one Redis prefix
    and one PostgreSQL ledger. B's worker settles an upfront order and calls its upstream (held by
    the test): settled, no answer yet, B's request holds the payment lock ``<request>@<its pid>``.
    A's worker with that same pid (in A's namespace) dies; A's supervisor releases "its" locks and
    restarts it. The double-spender presents the same payment again, on A. B's request then
    answers. The payer got the order's answer; the ledger must not owe it its price back."""
    unshare = _unshare()
    if unshare is None:
        pytest.skip("no pid namespaces here (unshare --pid): replicas cannot be contained")
    tool = "contained_order"
    catalog = tmp_path / "orders.yaml"
    catalog.write_text(catalog_text(devchain, recording.url, tool))
    replicas: list[ContainedReplica] = []
    for name in ("a", "b"):
        keys = tmp_path / f"replica-{name}-keys.txt"  # each worker of each replica settles from its own account
        keys.write_text("".join(key_hex(funded_account(devchain)) + "\n" for _ in range(2)))
        env = {"X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
               "X402GW_DATABASE_URL": database, "X402GW_REDIS_URL": REDIS_URL, "X402GW_REDIS_PREFIX": prefix}
        replicas.append(ContainedReplica(unshare, env, tmp_path, tmp_path / f"replica-{name}.log",
                                         ("--workers", "2", "--settlement-keys-file", str(keys))))
    a, b = replicas
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 50_000)
    payer = Account.from_key(key).address
    called, release = threading.Event(), threading.Event()

    def hold(call: UpstreamCall) -> None:  # B's upstream is running: settled, not answered yet
        called.set()
        release.wait(90)

    recording.on(tool, hold)
    store = redis.Redis.from_url(REDIS_URL)
    ledger = open_ledger(database)
    payer_before, pay_to_before = devchain.balance(payer), devchain.balance(PAY_TO)
    upstream_before = recording.count(tool)
    try:
        for replica in replicas:
            replica.start(timeout=180)
            assert poll(replica.workers, lambda w: len(w) == 2, 60), f"two workers: {replica.log_tail()}"
        with httpx.Client(base_url=b.url, timeout=30) as client:
            offer = offer_of(client.get(f"/{tool}/1"))
        payment = Payer(key).sign(offer.accepts[0], resource=offer.resource)
        header = encode_header(payment)
        nonce = str(payment.payload["authorization"]["nonce"])
        sock = raw_request(b.port, f"/{tool}/1", header)
        assert called.wait(60), f"B never called its upstream: {b.log_tail()}"
        [row] = ledger.all()
        assert row.state == PaymentState.SETTLED and row.upstream_status is None  # settled, its answer to come
        lock = lock_key(prefix, payer, nonce)
        owner = store.get(lock)
        assert owner is not None, "B's live request holds no payment lock"
        serving = b.serving(sock.getsockname()[1])  # B's worker on the request's connection
        worker_pid = next((inside for inside, here in b.workers().items() if here == serving), None)
        assert worker_pid is not None, f"no worker of B holds the request's connection: {b.workers()}"
        namesake = a.workers().get(worker_pid)  # A's worker numbered as B's is, each in its own namespace
        assert namesake is not None, f"no worker of A has pid {worker_pid} in A's namespace: {a.workers()}"
        os.kill(namesake, signal.SIGKILL)  # A's worker dies (a crash, an OOM kill)
        # A's supervisor releases the dead worker's locks and then starts its successor.
        restarted = poll(a.workers, lambda w: len(w) == 2 and namesake not in w.values(), 60)
        assert len(restarted) == 2 and namesake not in restarted.values(), f"A's worker not restarted: {a.log_tail()}"
        lock_after_restart = store.get(lock)
        # The double-spender presents the same payment on the other replica while B still works on it.
        resend = httpx.get(f"{a.url}/{tool}/1", headers={"PAYMENT-SIGNATURE": header}, timeout=60)
        release.set()
        status, body = read_answer(sock)
        final: Payment | None = ledger.get(row.id)
        stored = ledger.stored_response(row.id)
    finally:
        release.set()
        recording.on(tool, None)
        for replica in replicas:
            replica.stop()
        ledger.close()
        store.close()
    assert final is not None
    # B's request delivered the order's answer: the upstream's content, for the payment it settled.
    assert status == 200 and MARKER_PREFIX.encode() in body, (status, body[:300])
    assert stored is not None and stored[0] == 200
    assert recording.count(tool) - upstream_before == 1  # the order ran once
    assert payer_before - devchain.balance(payer) == PRICE  # charged once
    assert devchain.balance(PAY_TO) - pay_to_before == PRICE
    assert final.refund_owed is None, (
        f"the payer got its order's answer (200, stored) and the ledger also owes it {final.refund_owed} back "
        f"({final.refund_reason}): A's supervisor released B's live payment lock {owner!r} (a worker of A had the "
        f"same pid {worker_pid} in its own namespace; the lock after A's restart: {lock_after_restart!r}), so the "
        f"resend on A ({resend.status_code} {resend.text[:160]}) or A's restarted worker's start-up sweep took "
        f"B's answer for lost"
    )


# -- 2. the start-up sweep reads the answer, then the lock: a live request answers in between ---------


class HeldRelay:
    """A TCP relay in front of Redis for one replica: forwards both ways, and holds back (once) the
    client's bytes that name ``needle`` until ``go`` is set; ``seen`` is set when they arrive. Any
    latency between two commands (a busy event loop, a slow network) is what it stands for."""

    def __init__(self, target: tuple[str, int], needle: bytes) -> None:
        self.target, self.needle = target, needle
        self.seen, self.go = threading.Event(), threading.Event()
        self._held = False
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.needle in data:
                    with self._lock:
                        first, self._held = not self._held, True
                    if first:
                        self.seen.set()
                        self.go.wait(120)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.go.set()
        for sock in self._sockets:
            try:
                sock.close()
            except OSError:
                pass


def test_a_replica_restarting_never_refunds_an_upfront_call_another_replica_has_just_answered(
    devchain: Devchain, recording: RecordingUpstream, tmp_path: Path, database: str, prefix: str,
) -> None:
    """Replica A (a plain ``serve``) settles an upfront order and calls its upstream (held by the
    test). Replica B, with a refund key, starts meanwhile; its start-up sweep finds the row settled
    with no answer and asks Redis whether a live request holds its payment lock. That read is held
    back (B's Redis link is slow) while A's upstream answers, A stores the answer and releases its
    lock. B then reads "no lock" and refunds. The payer must end up charged once for the answer it got."""
    tool = "swept_order"
    catalog = tmp_path / "orders.yaml"
    catalog.write_text(catalog_text(devchain, recording.url, tool))
    common = {"X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
              "X402GW_DATABASE_URL": database, "X402GW_REDIS_PREFIX": prefix}
    a = GatewayProcess({**common, "X402GW_REDIS_URL": REDIS_URL,
                        "X402GW_SETTLEMENT_KEY": key_hex(funded_account(devchain))}, tmp_path, tmp_path / "replica-a.log")
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 50_000)
    payer = Account.from_key(key).address
    called, release = threading.Event(), threading.Event()

    def hold(call: UpstreamCall) -> None:  # A's upstream is running: settled, not answered yet
        called.set()
        release.wait(90)

    recording.on(tool, hold)
    store = redis.Redis.from_url(REDIS_URL)
    ledger = open_ledger(database)
    relay: HeldRelay | None = None
    b: GatewayProcess | None = None
    starting: Future[GatewayProcess] | None = None
    pool = ThreadPoolExecutor(1)
    payer_before, pay_to_before = devchain.balance(payer), devchain.balance(PAY_TO)
    upstream_before = recording.count(tool)
    try:
        a.start()
        with httpx.Client(base_url=a.url, timeout=30) as client:
            offer = offer_of(client.get(f"/{tool}/1"))
        payment = Payer(key).sign(offer.accepts[0], resource=offer.resource)
        nonce = str(payment.payload["authorization"]["nonce"])
        lock = lock_key(prefix, payer, nonce)
        sock = raw_request(a.port, f"/{tool}/1", encode_header(payment))
        assert called.wait(60), f"A never called its upstream: {a.log_tail()}"
        [row] = ledger.all()
        assert row.state == PaymentState.SETTLED and row.upstream_status is None  # settled, its answer to come
        assert store.get(lock) is not None, "A's live request holds no payment lock"
        # B starts (a deploy, a restart), its Redis link through the relay.
        relay = HeldRelay(("127.0.0.1", 6379), lock.removeprefix(prefix).encode())
        b = GatewayProcess({**common, "X402GW_REDIS_URL": relay.url, "X402GW_REFUND_KEY": devchain.key(REFUNDER),
                            "X402GW_SETTLEMENT_KEY": key_hex(funded_account(devchain))}, tmp_path,
                           tmp_path / "replica-b.log")
        starting = pool.submit(b.start)
        assert relay.seen.wait(120), f"B's start-up never looked at the live row's lock: {b.log_tail()}"
        # A's upstream answers now: A stores the answer, delivers it and releases the payment lock.
        release.set()
        status, body = read_answer(sock)
        released = poll(lambda: store.get(lock), lambda owner: owner is None, 30)
        assert released is None, "A never released its payment lock"
        relay.go.set()  # B's read of the lock arrives
        starting.result(timeout=180)  # B serves: its start-up sweep is done
        final: Payment | None = ledger.get(row.id)
        stored = ledger.stored_response(row.id)
    finally:
        release.set()
        recording.on(tool, None)
        if relay is not None:
            relay.go.set()
        if starting is not None:
            starting.exception(timeout=180)
        if b is not None:
            b.stop()
        a.stop()
        pool.shutdown()
        if relay is not None:
            relay.close()
        ledger.close()
        store.close()
    assert final is not None
    # A's request delivered the order's answer, stored for a resend to replay.
    assert status == 200 and MARKER_PREFIX.encode() in body, (status, body[:300])
    assert stored is not None and stored[0] == 200
    assert recording.count(tool) - upstream_before == 1  # the order ran once
    charged = payer_before - devchain.balance(payer)
    assert (final.refund_owed, charged) == (None, PRICE), (
        f"the payer got its order's answer (200, stored) and was charged {charged} of {PRICE}; the ledger owes "
        f"{final.refund_owed} back ({final.refund_reason}, tx {final.refund_tx}): B's start-up sweep read 'no answer' "
        f"before A stored it and 'no lock' after A released it (pay_to moved {devchain.balance(PAY_TO) - pay_to_before})"
    )
