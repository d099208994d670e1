"""CPU per stage of a paid call: where the gateway's own CPU goes, stage by stage.

    python -m bench.stage_cpu [--calls 300] [--batched]

Starts a fresh anvil, the sample upstream and a gateway in this process (threads), pays ``--calls``
calls of the example catalog's ``get_quote`` one after another with pre-signed authorizations, and
profiles them with yappi (CPU clock, every thread). Each stage's ``__call__`` and each finalizer is
charged its CPU on the event loop, subcalls included; the ledger's group-commit thread, the audit
writer and the executor threads that run the ledger's and chain's blocking work are shown apart.
The client runs in this process too and is left out of the table.

Needs yappi (``pip install -e '.[bench]'``). Absolute figures carry yappi's own overhead (a few times the real cost of pure-Python code): read
the shares, and ``python -m bench.cpu_per_call`` for the real CPU per call.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from collections import defaultdict
from pathlib import Path

import httpx

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


def main(argv: list[str] | None = None) -> int:
    try:  # bench only: pip install -e '.[bench]'
        yappi = importlib.import_module("yappi")
    except ImportError:
        print("bench.stage_cpu needs yappi: pip install -e '.[bench]'")
        return 2

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--batched", action="store_true", help="batched settlement (case F) instead of one tx per call")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="x402gw-stages-") as tmp, Anvil() as anvil:
        deployment = setup_devchain(anvil.rpc_url)
        deployment_file = Path(tmp) / "devchain.json"
        deployment.write(deployment_file)
        upstream = ThreadServer(rest_upstream.create_app()).start()
        catalog = Path(tmp) / "demo.yaml"
        catalog.write_text(DEFAULT_CATALOG.read_text().replace("http://127.0.0.1:9101", upstream.url))
        batch = {"batch_settlement": {"eip155:31337": {"max_wait_ms": 20, "max_payments": 50}}} if args.batched else {}
        settings = Settings(catalog=[catalog], deployment_file=deployment_file,
                            database_url=f"sqlite:///{tmp}/ledger.sqlite3", **batch)  # type: ignore[arg-type]
        ledger = open_ledger(settings.database_url)
        gateway = ThreadServer(create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)).start()
        try:
            with httpx.Client(base_url=gateway.url, timeout=60) as client:
                offer = PaymentRequired.model_validate(decode_header_json(client.get("/quotes/AAA").headers["PAYMENT-REQUIRED"]))
                payer = Payer(deployment.accounts[2].private_key)
                headers = [encode_header(payer.sign(offer.accepts[0], resource=offer.resource).to_wire())
                           for _ in range(args.calls + 20)]
                for header in headers[:20]:  # warm: first compiles, connections, caches
                    client.get("/quotes/AAA", headers={"PAYMENT-SIGNATURE": header}).raise_for_status()
                yappi.set_clock_type("cpu")
                yappi.start(builtins=False)
                for header in headers[20:]:
                    client.get("/quotes/AAA", headers={"PAYMENT-SIGNATURE": header}).raise_for_status()
                yappi.stop()
        finally:
            gateway.stop()
            upstream.stop()
            ledger.close()
    report(yappi.get_func_stats(), args.calls, stage_names())
    return 0


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
    print(f"  {'stage':36s} {'ms':>8s} {'share':>7s}")
    for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]):
        if seconds * 1000 / calls >= 0.005:
            print(f"  {name:36s} {seconds * 1000 / calls:8.3f} {100 * seconds / total:6.1f}%")
    print(f"  {'request on the loop, all stages':36s} {whole * 1000 / calls:8.3f} {100 * whole / total:6.1f}%")
    print(f"  {'total (loop + ledger + audit)':36s} {total * 1000 / calls:8.3f}")


if __name__ == "__main__":
    raise SystemExit(main())
