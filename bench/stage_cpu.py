"""CPU per stage of a paid call: where the gateway's own CPU goes, stage by stage.

    python -m bench.stage_cpu [--calls 300] [--batched] [--yappi]
    python -m bench.stage_cpu --concurrency 32 [--duration 8] [--batched]

Starts a fresh anvil, the sample upstream and a gateway in this process (threads), pays ``--calls``
calls of the example catalog's ``get_quote`` one after another with pre-signed authorizations, and
charges each stage and finalizer the CPU its thread spent while it ran (``time.thread_time``, so
the client and the upstream, on their own threads, are left out): what a stage awaits on the loop
(a batch's send and receipt, the upstream's answer being read) is charged to it. The ledger's
group-commit thread (its writes, and the audit trail's appends, which share it on SQLite) is timed
the same way and shown apart. These are real milliseconds, with a timer call around each stage.

``--concurrency N``: under load instead, as ``bench.cpu_per_call`` drives it (wrk at N connections,
pre-signed authorizations, ``--duration`` seconds): each stage is charged only the CPU of its own
steps (the thread's CPU around each resumption of its coroutine, not what other requests do while
it waits), so the table adds up under concurrency. What a stage starts but does not run itself
(a batch's transaction and receipt polls, JSON-RPC batches, the upstream's answer parsed by the
HTTP client's protocol) is the loop's time outside the stages.

``--yappi``: profile with yappi instead (``pip install -e '.[bench]'``): every function, but the
figures carry yappi's own overhead (a few times the real cost of pure-Python code): read its shares.
"""

from __future__ import annotations

import argparse
import importlib
import os
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from bench.run import BATCH_POLICY, fetch_offer, payment_headers, require_wrk, write_lines, wrk
from catalog import load_catalogs
from gateway.app import create_app
from gateway.devkit.anvil import Anvil
from gateway.devkit.devchain import setup_devchain
from gateway.devkit.payer import Payer
from gateway.devkit.samples import rest_upstream
from gateway.ops.serving import ThreadServer
from gateway.pipeline.chain import build_chain
from gateway.settings import DEFAULT_CATALOG, Settings
from settlement.schema import open_ledger
from settlement.x402.codec import decode_header_json, encode_header
from settlement.x402.wire import PaymentRequired

# Where each row of the table is measured: (label, module path suffix, function name).
BACKGROUND = (
    ("ledger writes (group commit)", "settlement/ledger/group_commit.py", "GroupCommitWorker._run_group"),
    ("audit trail append", "settlement/audit/writer.py", "AuditWriter._write"),
)


def stage_names() -> dict[str, str]:
    """``Class.__call__`` → the stage's name, from the declared chain itself."""
    chain = build_chain(**dict.fromkeys(
        ["router", "tools", "safety", "store", "ledger", "schemes", "signers", "refunds", "bridge", "upstream", "audit"]),
        observers=[], public_url=None, challenge_body_version=2, max_body_bytes=1024, max_upstream_response_bytes=1024,
        lock_ttl_ms=1000)
    names = {f"{type(stage).__name__}.__call__": stage.name for stage in chain.stages}
    names.update({f"{type(f).__name__}.__call__": f"finalizer {f.name}" for f in chain.finalizers})
    return names


def thread_cpu(native_id: int) -> float:
    """Seconds of CPU a thread of this process has used (utime + stime, from /proc)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class StageClock:
    """Each stage's and finalizer's ``__call__`` wrapped to add the CPU its thread spent in it."""

    def __init__(self, chain: Any) -> None:
        self.ns: dict[str, int] = defaultdict(int)
        for part, label in [*((s, s.name) for s in chain.stages), *((f, f"finalizer {f.name}") for f in chain.finalizers)]:
            cls = type(part)
            if "__timed__" not in cls.__dict__:
                cls.__call__ = self._timed(cls.__call__, label)
                cls.__timed__ = True

    def _timed(self, call: Any, label: str) -> Any:
        ns = self.ns

        async def timed(stage: Any, ctx: Any) -> Any:
            started = time.thread_time_ns()
            try:
                return await call(stage, ctx)
            finally:
                ns[label] += time.thread_time_ns() - started

        return timed


class _Steps:
    """Drives a stage's coroutine, adding the thread's CPU of each of its steps to ``ns[label]``."""

    __slots__ = ("coroutine", "label", "ns")

    def __init__(self, coroutine: Any, label: str, ns: dict[str, int]) -> None:
        self.coroutine, self.label, self.ns = coroutine, label, ns

    def __await__(self) -> Any:
        coroutine, ns, label = self.coroutine, self.ns, self.label
        value: Any = None
        error: BaseException | None = None
        while True:
            started = time.thread_time_ns()
            try:
                yielded = coroutine.send(value) if error is None else coroutine.throw(error)
            except StopIteration as stop:
                ns[label] += time.thread_time_ns() - started
                return stop.value
            except BaseException:
                ns[label] += time.thread_time_ns() - started
                raise
            ns[label] += time.thread_time_ns() - started
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # thrown in (a cancellation): handed to the stage
                value, error = None, exc


# Work a paid call starts in tasks of its own, charged to rows of their own under load (each of
# these runs as its own task, never awaited inside a stage, so nothing is counted twice).
BACKGROUND_TASKS = (
    ("verify (its own task, beside the ledger lookup)", "gateway.pipeline.stages.exactly_once", None, "verify"),
    ("batches (calldata, transaction, items)", "settlement.schemes.batch", "_NetworkBatcher", "_settle"),
    ("JSON-RPC batches (encode, HTTP, decode)", "settlement.chain.rpc", "JsonRpcTransport", "_flush"),
    ("receipt polls", "settlement.chain.receipts", "ReceiptPoller", "_poll_receipts"),
)


class StepClock(StageClock):
    """``StageClock`` for concurrent requests: each stage is charged its own steps only, and so are
    the tasks of ``BACKGROUND_TASKS``."""

    def __init__(self, chain: Any) -> None:
        super().__init__(chain)
        for label, module_name, owner_name, attribute in BACKGROUND_TASKS:
            module = importlib.import_module(module_name)
            owner = module if owner_name is None else getattr(module, owner_name)
            original = getattr(owner, attribute)
            if not getattr(original, "__stepped__", False):
                setattr(owner, attribute, self._charged(original, label))

    def _charged(self, function: Any, label: str) -> Any:
        ns = self.ns

        async def charged(*args: Any, **kwargs: Any) -> Any:
            return await _Steps(function(*args, **kwargs), label, ns)

        charged.__stepped__ = True  # type: ignore[attr-defined]
        return charged

    def _timed(self, call: Any, label: str) -> Any:
        ns = self.ns

        def timed(stage: Any, ctx: Any) -> Any:
            return _Steps(call(stage, ctx), label, ns)

        return timed


def under_load(app: Any, url: str, concurrency: int, duration: float, tmp: Path, threads: dict[str, int | None]
               ) -> tuple[StepClock, dict[str, float], int]:
    """wrk at ``concurrency`` on the paid path for ``duration`` seconds: the clock, the threads' CPU and the calls."""
    clock = StepClock(app.state.pipeline.chain)
    offer = fetch_offer(url + "/quotes/AAA")
    headers = write_lines(tmp / "h.txt", payment_headers(offer, int(800 * duration) + 200))
    wrk(url, "/quotes/AAA", 200, concurrency, 1, write_lines(tmp / "w.txt", payment_headers(offer, 400)))  # warm
    clock.ns.clear()
    before = {name: thread_cpu(tid) for name, tid in threads.items() if tid is not None}
    result = wrk(url, "/quotes/AAA", 200, concurrency, duration, headers)
    after = {name: thread_cpu(tid) for name, tid in threads.items() if tid is not None}
    return clock, {name: after[name] - before[name] for name in after}, int(result["ok"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--batched", action="store_true", help="batched settlement (case F) instead of one tx per call")
    parser.add_argument("--yappi", action="store_true", help="profile with yappi (every function, inflated figures)")
    parser.add_argument("--concurrency", type=int, default=0, help="under load: wrk at this many connections")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of load (with --concurrency)")
    args = parser.parse_args(argv)
    if args.concurrency:
        require_wrk()
    yappi: Any = None
    if args.yappi:
        try:  # bench only: pip install -e '.[bench]'
            yappi = importlib.import_module("yappi")
        except ImportError:
            print("bench.stage_cpu --yappi needs yappi: pip install -e '.[bench]'")
            return 2
    with tempfile.TemporaryDirectory(prefix="x402gw-stages-") as tmp, Anvil() as anvil:
        deployment = setup_devchain(anvil.rpc_url)
        deployment_file = Path(tmp) / "devchain.json"
        deployment.write(deployment_file)
        upstream = ThreadServer(rest_upstream.create_app()).start()
        catalog = Path(tmp) / "demo.yaml"
        catalog.write_text(DEFAULT_CATALOG.read_text().replace("http://127.0.0.1:9101", upstream.url))
        batch = {"batch_settlement": {"eip155:31337": BATCH_POLICY}} if args.batched else {}
        settings = Settings(catalog=[catalog], deployment_file=deployment_file,
                            database_url=f"sqlite:///{tmp}/ledger.sqlite3", **batch)  # type: ignore[arg-type]
        ledger = open_ledger(settings.database_url)
        app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)
        gateway = ThreadServer(app).start()
        threads = {"loop": gateway.thread.native_id, "ledger": next(
            (t.native_id for t in threading.enumerate() if t.name == "x402gw-ledger"), None)}
        if args.concurrency:
            try:
                clock, spent, calls = under_load(app, gateway.url, args.concurrency, args.duration, Path(tmp), threads)
            finally:
                gateway.stop()
                upstream.stop()
                ledger.close()
            report_clock(clock.ns, spent, calls, args.batched, f"c={args.concurrency}, {calls} calls in {args.duration:g} s")
            return 0
        clock = None if yappi else StageClock(app.state.pipeline.chain)
        try:
            with httpx.Client(base_url=gateway.url, timeout=60) as client:
                offer = PaymentRequired.model_validate(decode_header_json(client.get("/quotes/AAA").headers["PAYMENT-REQUIRED"]))
                payer = Payer(deployment.accounts[2].private_key)
                headers = [encode_header(payer.sign(offer.accepts[0], resource=offer.resource).to_wire())
                           for _ in range(args.calls + 20)]
                for header in headers[:20]:  # warm: first compiles, connections, caches
                    client.get("/quotes/AAA", headers={"PAYMENT-SIGNATURE": header}).raise_for_status()
                if yappi:
                    yappi.set_clock_type("cpu")
                    yappi.start(builtins=False)
                elif clock is not None:
                    clock.ns.clear()
                before = {name: thread_cpu(tid) for name, tid in threads.items() if tid is not None}
                for header in headers[20:]:
                    client.get("/quotes/AAA", headers={"PAYMENT-SIGNATURE": header}).raise_for_status()
                after = {name: thread_cpu(tid) for name, tid in threads.items() if tid is not None}
                if yappi:
                    yappi.stop()
        finally:
            gateway.stop()
            upstream.stop()
            ledger.close()
    if yappi:
        report(yappi.get_func_stats(), args.calls, stage_names())
    elif clock is not None:
        report_clock(clock.ns, {name: after[name] - before[name] for name in after}, args.calls, args.batched,
                     f"{args.calls} sequential calls")
    return 0


def report_clock(ns: dict[str, int], threads: dict[str, float], calls: int, batched: bool, how: str) -> None:
    loop, ledger = threads.get("loop", 0.0), threads.get("ledger", 0.0)
    staged = sum(ns.values()) / 1e9
    print(f"CPU per paid call by stage ({'batched settlement' if batched else 'one transaction per call'}; thread CPU "
          f"time, {how})")
    print(f"  {'stage':48s} {'ms':>8s} {'share':>7s}")
    total = loop + ledger
    rows = [(name, value / 1e9) for name, value in ns.items()]
    rows.append(("loop outside the stages", max(loop - staged, 0.0)))
    rows.append(("ledger thread (ledger writes, audit)", ledger))
    for name, seconds in sorted(rows, key=lambda kv: -kv[1]):
        if seconds * 1000 / calls >= 0.005:
            print(f"  {name:48s} {seconds * 1000 / calls:8.3f} {100 * seconds / total:6.1f}%")
    print(f"  {'total (loop thread + ledger thread)':48s} {total * 1000 / calls:8.3f}")
    print("  (thread totals from /proc, 10 ms ticks: the stages' sum is exact, the two totals within 10 ms / calls)")


def report(stats: object, calls: int, names: dict[str, str]) -> None:
    cpu: dict[str, float] = defaultdict(float)
    for item in stats:  # type: ignore[attr-defined]
        module, function = str(item.module), str(item.name)
        if "/gateway/pipeline/" in module and function in names:
            cpu[names[function]] += item.ttot
        for label, suffix, name in BACKGROUND:
            if module.endswith(suffix) and function == name:
                cpu[label] += item.ttot
        if module.endswith("gateway/pipeline/chain.py") and function == "Chain._answer":
            cpu["(the whole request on the loop)"] += item.ttot
    whole = cpu.pop("(the whole request on the loop)", 0.0)
    total = whole + sum(cpu[label] for label, _, _ in BACKGROUND)
    print(f"CPU per paid call by stage (yappi, CPU clock, {calls} sequential calls; ms per call under the profiler)")
    print(f"  {'stage':48s} {'ms':>8s} {'share':>7s}")
    for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if seconds * 1000 / calls >= 0.005:
            print(f"  {name:48s} {seconds * 1000 / calls:8.3f} {100 * seconds / total:6.1f}%")
    print(f"  {'request on the loop, all stages':48s} {whole * 1000 / calls:8.3f} {100 * whole / total:6.1f}%")
    print(f"  {'total (loop + ledger + audit)':48s} {total * 1000 / calls:8.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
