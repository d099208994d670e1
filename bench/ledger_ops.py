"""CPU of the ledger's side of a paid call, alone: its four writes and reads through ``Ledger.run``
and its audit records through ``AuditWriter``, as the gateway makes them, without HTTP or a chain.

    python -m bench.ledger_ops [--calls 4000] [--concurrency 32] [--rounds 3] [--loop-work-us 1500]

``--concurrency`` tasks on one uvloop event loop each make paid calls one after another on a fresh
SQLite ledger (and audit trail, in the same file, on the ledger's thread as the gateway shares it):
``by_authorization``, ``record_verified``, ``begin_settlement``, ``mark_settled`` and four audit
events, with ``--loop-work-us`` of busy CPU on the loop between them (the rest of a paid call's loop
work: it spaces the ledger's calls as the gateway does, so its groups are as small; 0: as fast as
the ledger takes them, large groups). Prints the CPU per call of the event loop's thread (handing the calls over and taking the
answers back) and of the ledger's thread (the statements, commits and audit appends), best of
``--rounds``: a micro-figure for issue 20 that moves less with the machine's noise than
``bench.cpu_per_call``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop

from settlement.audit.records import AuditEvent
from settlement.audit.trail import AuditTrail
from settlement.audit.writer import AuditWriter
from settlement.ledger.payments import Ledger
from settlement.schema import open_ledger

_NONCES = itertools.count()
_PAYER = "0x" + "ab" * 20
_PAY_TO = "0x" + "cd" * 20
_ASSET = "0x" + "ef" * 20


def _thread_cpu(name: str) -> float:
    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    raise RuntimeError(f"no thread {name!r}")


def _events(request_id: str, payment_id: int, nonce: str) -> list[AuditEvent]:
    now = datetime.now(UTC)
    fields: list[tuple[str, dict[str, Any]]] = [
        ("payment_verified", {"amount": "1000", "network": "eip155:31337", "asset": _ASSET, "payTo": _PAY_TO, "nonce": nonce}),
        ("upstream_attempt", {"url": "http://127.0.0.1:9000/quote?symbol=X", "method": "GET", "status": 200,
                              "latencyMs": 1.234, "attempt": 1}),
        ("settled", {"transaction": "0x" + "12" * 32, "network": "eip155:31337", "paymentId": payment_id, "tool": "get_quote",
                     "owner": "demo", "payer": _PAYER, "payTo": _PAY_TO, "asset": _ASSET, "nonce": nonce, "amount": "1000",
                     "method": "GET", "path": "/tools/get_quote", "fingerprint": "f" * 64}),
        ("response", {"method": "GET", "path": "/tools/get_quote", "status": 200, "outcome": "settled", "reason": None,
                      "upstreamStatus": 200, "latencyMs": 12.5, "paymentId": payment_id}),
    ]
    return [AuditEvent(request_id, event, data, _PAYER, "get_quote", now) for event, data in fields]


def _spin(seconds: float) -> None:
    """Busy on the loop's thread for ``seconds`` of its CPU: the rest of a paid call's loop work."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def _paid_call(ledger: Ledger, audit: AuditWriter, spin: float) -> None:
    n = next(_NONCES)
    nonce, request_id = f"0x{n:064x}", f"req-{n}"
    fields = {"request_id": request_id, "owner": "demo", "tool": "get_quote", "method": "GET", "path": "/tools/get_quote",
              "payer": _PAYER, "pay_to": _PAY_TO, "amount": 1000, "network": "eip155:31337", "asset": _ASSET,
              "nonce": nonce, "valid_before": 2_000_000_000, "authorization": "{}", "fingerprint": "f" * 64}
    await ledger.run(ledger.by_authorization, "eip155:31337", _ASSET, _PAYER, nonce)
    _spin(spin)
    row = await ledger.run(ledger.record_verified, **fields)
    _spin(spin)
    response = (200, [("content-type", "application/json")], b'{"price": 1}')
    await ledger.run(ledger.begin_settlement, row.id, response, amount=1000, request_id=request_id)
    _spin(spin)
    await ledger.run(ledger.mark_settled, row.id, tx_hash="0x" + "12" * 32, block_number=7,
                     gas={"gas_used": 50_000, "gas_price": 1_000_000_000, "gas_cost": 50_000 * 10**9})
    _spin(spin)
    audit.submit(_events(request_id, row.id, nonce))


async def _round(ledger: Ledger, audit: AuditWriter, args: argparse.Namespace) -> tuple[float, float]:
    calls, concurrency, spin = args.calls, args.concurrency, args.loop_work_us / 4e6

    async def worker(count: int) -> None:
        for _ in range(count):
            await _paid_call(ledger, audit, spin)

    await asyncio.gather(*(worker(2) for _ in range(concurrency)))  # warm: statements compiled
    await audit.flush()
    loop_before, ledger_before = time.thread_time(), _thread_cpu("x402gw-ledger")
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    await audit.flush()
    done = (calls // concurrency) * concurrency
    return (time.thread_time() - loop_before) / done - 4 * spin, (_thread_cpu("x402gw-ledger") - ledger_before) / done


async def _main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="x402gw-ledger-ops-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'ledger.db'}"
        ledger = open_ledger(url)
        audit = AuditWriter(AuditTrail(url), executor=ledger.shared_executor)
        try:
            figures = [await _round(ledger, audit, args) for _ in range(args.rounds)]
        finally:
            await audit.close()
            ledger.close()
    for loop_s, ledger_s in figures:
        print(f"  loop {1e6 * loop_s:.0f} µs, ledger thread {1e6 * ledger_s:.0f} µs, sum {1e6 * (loop_s + ledger_s):.0f} µs")
    loop_s, ledger_s = min(figures, key=sum)
    print(f"ledger ops c={args.concurrency}, best of {args.rounds}: loop {1e6 * loop_s:.0f} µs, "
          f"ledger thread {1e6 * ledger_s:.0f} µs per paid call")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop-work-us", type=float, default=1500.0,
                        help="CPU the loop spends on each call besides the ledger (spun; left out of the loop figure)")
    args = parser.parse_args(argv)
    uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
