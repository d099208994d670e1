"""CPU of the unpaid path alone: a loop of unpaid GETs through the app's ASGI front, in process.

    python -m bench.unpaid_cpu [--calls 3000]

No network and no load generator: the process's CPU (every thread, the audit trail's SQLite writes
included) per unpaid 402, best of five rounds. Paired runs of two revisions compare the unpaid path's
own cost where ``bench.run``'s C/B ratio moves with the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from typing import Any

import uvloop
from starlette.types import Message

from gateway.app import create_app
from gateway.settings import DEFAULT_CATALOG, Settings

ROUNDS = 5
WARM_UP = 500


class NoFacilitator:
    """An unpaid call never reaches the facilitator."""

    async def verify(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unpaid call reached verify")

    async def settle(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unpaid call reached settle")


SCOPE: dict[str, Any] = {
    "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
    "path": "/quotes/AAPL", "raw_path": b"/quotes/AAPL", "root_path": "", "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
    "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
}


async def measure(calls: int) -> float:
    """Microseconds of process CPU per unpaid 402, best of ``ROUNDS`` rounds of ``calls``."""
    directory = tempfile.mkdtemp(prefix="x402gw-unpaid-")
    settings = Settings(catalog=[DEFAULT_CATALOG], database_url=f"sqlite:///{directory}/ledger.sqlite3")
    app = create_app(settings, facilitator=NoFacilitator())
    statuses: set[int] = set()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.add(message["status"])

    best = float("inf")
    async with app.router.lifespan_context(app):
        for _ in range(WARM_UP):
            await app(dict(SCOPE), receive, send)
        for _ in range(ROUNDS):
            started = time.process_time()
            for _ in range(calls):
                await app(dict(SCOPE), receive, send)
            await asyncio.sleep(0.05)  # the audit trail's writer catches up inside the round it belongs to
            best = min(best, (time.process_time() - started) / calls * 1e6)
    if statuses != {402}:
        raise SystemExit(f"expected only 402s, got {sorted(statuses)}")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args(argv)
    spent = uvloop.run(measure(args.calls))
    print(f"unpaid 402: {spent:.1f} us CPU per request (best of {ROUNDS} x {args.calls})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
