"""The hash-chained audit trail: appends, tamper detection, concurrent writers, the async writer."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from settlement.audit import (
    GENESIS_HASH,
    REDACTED,
    AuditEvent,
    AuditTrail,
    AuditWriter,
    StoredRecord,
    record_hash,
    redact_url,
    verify_chain,
)

PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


def events(request_id: str, count: int = 1, **fields: object) -> list[AuditEvent]:
    return [AuditEvent(request_id, f"event_{i}", {"i": i, **fields}, payer=PAYER, tool="get_quote")
            for i in range(count)]


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[AuditTrail]:
    trail = AuditTrail(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield trail
    trail.close()


@pytest.fixture
def ten(trail: AuditTrail) -> AuditTrail:
    for n in range(5):
        trail.append(events(f"req{n}", 2))
    return trail


def sql(trail: AuditTrail, statement: str, **params: object) -> None:
    with trail.engine.begin() as conn:
        conn.execute(text(statement), params)


def rows(trail: AuditTrail) -> list[StoredRecord]:
    return list(trail.records())


def kinds(trail: AuditTrail) -> list[tuple[str, int | None]]:
    return [(p.kind, p.seq) for p in trail.verify().problems]


def test_records_chain_in_order_from_the_genesis(ten: AuditTrail) -> None:
    records = rows(ten)
    assert [r.seq for r in records] == list(range(1, 11))
    assert records[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash
    assert all(r.computed_hash() == r.hash for r in records)
    assert ten.head() == (10, records[-1].hash)
    report = ten.verify()
    assert report.intact and report.records == 10 and report.last_seq == 10


def test_the_hash_covers_every_column_and_the_previous_hash(ten: AuditTrail) -> None:
    r = rows(ten)[3]
    assert record_hash(r.seq, r.at, r.request_id, r.event, r.payer, r.tool, r.data, r.prev_hash) == r.hash
    for changed in ({"seq": r.seq + 1}, {"at": r.at.replace("Z", "1Z")}, {"request_id": "x"}, {"event": "x"},
                    {"payer": None}, {"tool": "x"}, {"data": '{"i":9}'}, {"prev_hash": GENESIS_HASH}):
        values = {"seq": r.seq, "at": r.at, "request_id": r.request_id, "event": r.event, "payer": r.payer,
                  "tool": r.tool, "data": r.data, "prev_hash": r.prev_hash, **changed}
        assert record_hash(**values) != r.hash, changed  # type: ignore[arg-type]


def test_an_edited_field_is_named(ten: AuditTrail) -> None:
    sql(ten, "UPDATE audit_records SET data = :d WHERE seq = 4", d='{"i":1,"status":200}')
    problems = ten.verify().problems
    assert [(p.kind, p.seq) for p in problems] == [("hash_mismatch", 4)]
    assert "seq 4" in problems[0].detail and "edited" in problems[0].detail


def test_an_edited_payer_that_was_re_hashed_breaks_the_link_to_the_next_record(ten: AuditTrail) -> None:
    r = rows(ten)[4]
    forged = record_hash(r.seq, r.at, r.request_id, r.event, "0x000000000000000000000000000000000000dEaD", r.tool,
                         r.data, r.prev_hash)
    sql(ten, "UPDATE audit_records SET payer = '0x000000000000000000000000000000000000dEaD', hash = :h WHERE seq = 5",
        h=forged)
    problems = ten.verify().problems
    assert [(p.kind, p.seq) for p in problems] == [("prev_hash_mismatch", 6)]
    assert "seq 5" in problems[0].detail


def test_a_deleted_record_is_named_by_its_sequence_number(ten: AuditTrail) -> None:
    sql(ten, "DELETE FROM audit_records WHERE seq = 7")
    problems = ten.verify().problems
    assert [(p.kind, p.seq) for p in problems] == [("sequence_gap", 8)]
    assert "seq 7 missing" in problems[0].detail


def test_deleted_records_at_the_end_disagree_with_the_head(ten: AuditTrail) -> None:
    sql(ten, "DELETE FROM audit_records WHERE seq >= 9")
    [problem] = ten.verify().problems
    assert problem.kind == "head_mismatch" and "chain ends at seq 8" in problem.detail


def test_an_inserted_record_is_named(ten: AuditTrail) -> None:
    """The forger renumbers the records after seq 3 and slips a correctly hashed record in."""
    third = rows(ten)[2]
    for seq in range(10, 3, -1):
        sql(ten, "UPDATE audit_records SET seq = seq + 1 WHERE seq = :s", s=seq)
    at, data = third.at, '{"i":0,"note":"forged"}'
    digest = record_hash(4, at, "forged", "payment_verified", PAYER, "get_quote", data, third.hash)
    sql(ten, "INSERT INTO audit_records (seq, recorded_at, request_id, event, payer, tool, data, prev_hash, hash) "
             "VALUES (4, :at, 'forged', 'payment_verified', :payer, 'get_quote', :data, :prev, :hash)",
        at=third.at.replace("T", " ").rstrip("Z"), payer=PAYER, data=data, prev=third.hash, hash=digest)
    problems = ten.verify().problems
    assert ("inserted", 4) in [(p.kind, p.seq) for p in problems]
    assert not ten.verify().intact


def test_a_record_appended_behind_the_trails_back_is_found(ten: AuditTrail) -> None:
    last = rows(ten)[-1]
    data = '{"i":0}'
    digest = record_hash(11, last.at, "forged", "settled", PAYER, "get_quote", data, last.hash)
    sql(ten, "INSERT INTO audit_records (seq, recorded_at, request_id, event, payer, tool, data, prev_hash, hash) "
             "VALUES (11, :at, 'forged', 'settled', :payer, 'get_quote', :data, :prev, :hash)",
        at=last.at.replace("T", " ").rstrip("Z"), payer=PAYER, data=data, prev=last.hash, hash=digest)
    [problem] = ten.verify().problems
    assert problem.kind == "head_mismatch" and "appended outside the trail" in problem.detail


def test_reordered_records_are_named(ten: AuditTrail) -> None:
    sql(ten, "UPDATE audit_records SET seq = -1 WHERE seq = 5")
    sql(ten, "UPDATE audit_records SET seq = 5 WHERE seq = 6")
    sql(ten, "UPDATE audit_records SET seq = 6 WHERE seq = -1")
    found = kinds(ten)
    assert ("hash_mismatch", 5) in found and ("hash_mismatch", 6) in found
    assert ("sequence_out_of_order", 5) in found


def test_an_anchor_pins_the_chain_against_a_complete_rewrite(ten: AuditTrail) -> None:
    seq, digest = ten.head()
    assert ten.verify(anchor=(seq, digest)).intact
    assert [p.kind for p in ten.verify(anchor=(seq, "f" * 64)).problems] == ["anchor_mismatch"]
    assert [p.kind for p in ten.verify(anchor=(seq + 5, digest)).problems] == ["anchor_mismatch"]


def test_an_exported_slice_verifies_from_its_first_record(ten: AuditTrail) -> None:
    lines = [StoredRecord.from_json(json.dumps(r.to_json())) for r in ten.records(from_seq=4)]
    first = lines[0]
    assert verify_chain(lines, start=(first.seq - 1, first.prev_hash)).intact
    del lines[2]
    assert [p.kind for p in verify_chain(lines, start=(first.seq - 1, first.prev_hash)).problems] == ["sequence_gap"]


def test_credentials_never_reach_a_record(trail: AuditTrail) -> None:
    trail.append([AuditEvent("r", "upstream_attempt", {
        "url": "https://user:pa55@api.example.com:8443/v1/quote/AAPL?api_key=SECRET#frag",
        "failover": "http://admin:pw@10.0.0.1/x?token=T",
        "headers": {"Authorization": "Bearer abc"},
        "signature": "0xdeadbeef",
        "nested": {"apiKey": "k", "upstreamUrl": "http://h/p?q=1"},
    })])
    [record] = rows(trail)
    assert "pa55" not in record.data and "SECRET" not in record.data and "abc" not in record.data
    assert "0xdeadbeef" not in record.data and "token=T" not in record.data and "q=1" not in record.data
    data = record.to_json()["data"]
    assert data["url"] == "https://api.example.com:8443/v1/quote/AAPL"
    assert data["failover"] == "http://10.0.0.1/x"
    assert data["headers"] == data["signature"] == data["nested"]["apiKey"] == REDACTED
    assert redact_url("not a url?x=1") == "not a url"


def _hammer(trails: list[AuditTrail], threads_per_trail: int, batches: int) -> None:
    start = threading.Barrier(len(trails) * threads_per_trail)
    errors: list[BaseException] = []

    def write(trail: AuditTrail, name: str) -> None:
        try:
            start.wait()
            for n in range(batches):
                trail.append(events(f"{name}-{n}", 1 + n % 3))
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=write, args=(trail, f"t{i}-{j}"))
               for i, trail in enumerate(trails) for j in range(threads_per_trail)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []


def _expected(threads: int, batches: int) -> int:
    return threads * sum(1 + n % 3 for n in range(batches))


def test_concurrent_writers_on_sqlite_make_one_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    trails = [AuditTrail(url), AuditTrail(url)]  # two engines: as two processes would
    try:
        _hammer(trails, 4, 50)
        report = trails[0].verify()
        assert report.intact, report.problems[:5]
        assert report.records == report.last_seq == _expected(8, 50)
        # a request's events are contiguous: one transaction each
        records = rows(trails[0])
        by_request: dict[str, list[int]] = {}
        for r in records:
            by_request.setdefault(r.request_id, []).append(r.seq)
        assert all(seqs == list(range(seqs[0], seqs[0] + len(seqs))) for seqs in by_request.values())
    finally:
        for trail in trails:
            trail.close()


def test_concurrent_writers_on_postgresql_make_one_chain(postgres_url: str) -> None:
    trails = [AuditTrail(postgres_url), AuditTrail(postgres_url)]
    try:
        before = trails[0].head()[0]
        _hammer(trails, 4, 50)
        report = trails[0].verify()
        assert report.intact, report.problems[:5]
        assert report.last_seq - before == _expected(8, 50)
    finally:
        for trail in trails:
            trail.close()


WRITER = """
import sys
from settlement.audit import AuditEvent, AuditTrail
trail = AuditTrail(sys.argv[1])
sys.stdin.readline()  # go: both processes are connected and waiting
for n in range(100):
    trail.append([AuditEvent(f"{sys.argv[2]}-{n}", "e", {"n": n}), AuditEvent(f"{sys.argv[2]}-{n}", "f", {})])
trail.close()
"""


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_two_processes_append_to_one_chain(backend: str, postgres_url: str, tmp_path: Path) -> None:
    url = postgres_url if backend == "postgresql" else f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    trail = AuditTrail(url)  # creates the tables and the head before the writers race
    before = trail.head()[0]
    root = Path(__file__).resolve().parents[3]
    processes = [
        subprocess.Popen([sys.executable, "-c", WRITER, url, f"p{i}"], cwd=root, stdin=subprocess.PIPE,
                         stderr=subprocess.PIPE)
        for i in range(2)
    ]
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
    for process in processes:
        _, err = process.communicate(timeout=120)
        assert process.returncode == 0, err.decode()
    try:
        report = trail.verify()
        assert report.intact, report.problems[:5]
        assert report.last_seq - before == 400
    finally:
        trail.close()


def test_the_async_writer_batches_overflows_and_drops_nothing(trail: AuditTrail) -> None:
    writer = AuditWriter(trail, max_queued=4, max_batch=50)

    async def requests() -> None:
        async def one(n: int) -> None:
            await asyncio.sleep(0)  # interleave the submitters (a yield, not a wait for time)
            writer.submit(events(f"req{n}", 3))

        await asyncio.gather(*(one(n) for n in range(200)))
        await writer.flush()
        assert writer.written == 600 and writer.failed == 0
        await writer.close()

    asyncio.run(requests())
    reopened = AuditTrail(trail.url)
    try:
        report = reopened.verify()
        assert report.intact and report.records == 600
    finally:
        reopened.close()


def test_the_async_writer_logs_what_it_cannot_write(trail: AuditTrail, caplog: pytest.LogCaptureFixture) -> None:
    writer = AuditWriter(trail, retries=0)
    sql(trail, "DROP TABLE audit_head")

    async def request() -> None:
        writer.submit([AuditEvent("lost-request", "settled", {"transaction": "0xabc"})])
        await writer.flush()

    with caplog.at_level("ERROR", logger="x402gw.audit"):
        asyncio.run(request())
    assert writer.failed == 1
    assert any("lost-request" in r.getMessage() and "0xabc" in r.getMessage() for r in caplog.records)
