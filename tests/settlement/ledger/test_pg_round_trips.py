"""What the ledger sends PostgreSQL per call, read from libpq's own protocol trace of every pooled
connection: a call of one statement runs in autocommit (no BEGIN, no COMMIT), a call of several runs
in one transaction, a connection in use moments ago is not pinged, and one idle for long is, and is
replaced when its server connection is gone."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import pq
from sqlalchemy import event

from settlement.errors import LedgerError
from settlement.ledger import Ledger
from settlement.ledger import models as ledger_models
from tests.settlement.conftest import _admin_connection


@contextmanager
def traced(ledger: Ledger, path: Path) -> Iterator[list[str]]:
    """Every protocol message the ledger's pooled connections send while inside, as
    ``["Query 'BEGIN'", "Parse ...", ...]`` (filled in at the end)."""
    sent: list[str] = []
    out = open(path, "w")

    def start(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        dbapi_connection.pgconn.trace(out.fileno())
        dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)

    def stop(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.pgconn.untrace()

    # First in line: the ledger's own checkout listener (the idle ping) must be seen too.
    event.listen(ledger.engine, "checkout", start, insert=True)
    event.listen(ledger.engine, "checkin", stop)
    try:
        yield sent
    finally:
        event.remove(ledger.engine, "checkout", start)
        event.remove(ledger.engine, "checkin", stop)
        out.close()
        for line in path.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 4 and fields[0] == "F" and fields[2] in ("Query", "Parse"):
                sent.append(f"{fields[2]} {fields[3].strip()}")


def _fields(nonce: int) -> dict[str, Any]:
    return {
        "request_id": f"r{nonce}", "owner": "acme", "tool": "get_quote", "method": "GET", "path": "/quote",
        "payer": "0x" + "11" * 20, "pay_to": "0x" + "22" * 20, "amount": 1000, "network": "eip155:31337",
        "asset": "0x" + "33" * 20, "nonce": "0x" + f"{nonce:064x}", "valid_before": 2**40, "authorization": "{}",
    }


def _count(sent: list[str], needle: str) -> int:
    return sum(needle in message for message in sent)


def _begins(sent: list[str]) -> int:
    return sum(message.startswith('Query "BEGIN') for message in sent)


def _commits(sent: list[str]) -> int:
    return sum(message == 'Query "COMMIT"' for message in sent)


def test_calls_of_one_statement_send_no_begin_or_commit(pg_ledger: Ledger, tmp_path: Path) -> None:
    fields = _fields(1)
    pg_ledger.record_verified(**fields)  # the pool's connection is made outside the trace
    with traced(pg_ledger, tmp_path / "trace.txt") as sent:
        assert pg_ledger.by_authorization(fields["network"], fields["asset"], fields["payer"], _fields(2)["nonce"]) is None
        row = pg_ledger.record_verified(**_fields(2))
        pg_ledger.void(row.id, "upstream_error")
    statements = [message for message in sent if message.startswith("Parse") or "SELECT" in message]
    assert len(statements) == 3, sent  # the lookup, the INSERT, the guarded UPDATE: nothing else
    assert _begins(sent) == 0 and _commits(sent) == 0, sent
    seen = pg_ledger.get(row.id)  # autocommitted: another connection sees it
    assert seen is not None and seen.state == "voided"


def test_a_call_of_several_statements_is_one_transaction(pg_ledger: Ledger, tmp_path: Path) -> None:
    row = pg_ledger.record_verified(**_fields(3))
    with traced(pg_ledger, tmp_path / "trace.txt") as sent:
        pg_ledger.begin_settlement(row.id, (200, [("content-type", "application/json")], b"{}"), tx_hash="0x" + "ab" * 32)
    assert _begins(sent) == 1 and _commits(sent) == 1, sent
    assert len(sent) == 5, sent  # BEGIN, the guarded UPDATE, the stored answer's DELETE and INSERT, COMMIT
    assert pg_ledger.stored_response(row.id) == (200, [("content-type", "application/json")], b"{}")


def test_a_connection_used_moments_ago_is_not_pinged(pg_ledger: Ledger, tmp_path: Path) -> None:
    pg_ledger.record_verified(**_fields(4))
    with traced(pg_ledger, tmp_path / "trace.txt") as sent:
        for nonce in (5, 6, 7):
            pg_ledger.record_verified(**_fields(nonce))
    assert _count(sent, "SELECT 1") == 0, sent
    assert len(sent) == 3, sent


def _kill_backends(database: str) -> int:
    with _admin_connection() as admin:
        killed = admin.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchone()
    assert killed is not None
    return int(killed[0])


def test_an_idle_connection_is_pinged_and_a_dead_one_replaced(
    pg_ledger: Ledger, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    row = pg_ledger.record_verified(**_fields(8))
    monkeypatch.setattr(ledger_models, "IDLE_PING_SECONDS", 0.0)  # every pooled connection counts as idle
    with traced(pg_ledger, tmp_path / "alive.txt") as sent:
        assert pg_ledger.get(row.id) is not None
    assert _count(sent, "SELECT 1") == 1, sent
    assert _kill_backends(postgres_url.rsplit("/", 1)[1]) >= 1
    # The server connection behind the pooled one is gone: the ping finds out, another is made.
    assert pg_ledger.record_verified(**_fields(9)).state == "verified"


def test_a_connection_lost_while_in_use_fails_one_call_and_the_next_is_served(
    pg_ledger: Ledger, postgres_url: str,
) -> None:
    """The cost of not pinging busy connections: a server gone under load fails the call in flight
    (closed: a LedgerError, nothing written), and the pool is renewed for the next."""
    pg_ledger.record_verified(**_fields(10))
    assert _kill_backends(postgres_url.rsplit("/", 1)[1]) >= 1
    with pytest.raises(LedgerError):
        pg_ledger.record_verified(**_fields(11))
    assert pg_ledger.record_verified(**_fields(11)).state == "verified"
    assert pg_ledger.by_authorization("eip155:31337", "0x" + "33" * 20, "0x" + "11" * 20, _fields(11)["nonce"]) is not None


def test_after_a_lost_connection_the_pool_is_pinged_not_lost_one_by_one(
    pg_ledger: Ledger, postgres_url: str,
) -> None:
    """The server restarts while the pool holds several connections: the first call to meet a dead
    one fails (closed), and every connection returned before that is then pinged, so the calls after
    it are served, instead of each pooled connection failing one call in turn."""

    async def fill_the_pool() -> None:  # the ledger's threads, each on a connection of its own
        await asyncio.gather(*(pg_ledger.run(pg_ledger.record_verified, **_fields(n)) for n in range(100, 164)))

    asyncio.run(fill_the_pool())
    pooled = pg_ledger.engine.pool.checkedin()  # type: ignore[attr-defined]  # QueuePool's count
    assert pooled >= 4
    assert _kill_backends(postgres_url.rsplit("/", 1)[1]) >= pooled
    outcomes = []
    for n in range(200, 200 + 2 * pooled):
        try:
            pg_ledger.record_verified(**_fields(n))
            outcomes.append("served")
        except LedgerError:
            outcomes.append("failed")
    assert outcomes == ["failed"] + ["served"] * (2 * pooled - 1)
    assert pg_ledger.by_authorization("eip155:31337", "0x" + "33" * 20, "0x" + "11" * 20, _fields(200)["nonce"]) is None


def test_the_trace_sees_what_psycopg_sends(tmp_path: Path, postgres_url: str) -> None:
    """The trace is a faithful witness: a plain psycopg transaction shows its BEGIN and COMMIT."""
    path = tmp_path / "plain.txt"
    with psycopg.connect(postgres_url.replace("postgresql+psycopg", "postgresql")) as conn, open(path, "w") as out:
        conn.pgconn.trace(out.fileno())
        conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
        conn.execute("SELECT 2")
        conn.commit()
        conn.pgconn.untrace()
    text = path.read_text()
    assert "BEGIN" in text and "COMMIT" in text and "SELECT 2" in text, text
    assert os.path.getsize(path) > 0
