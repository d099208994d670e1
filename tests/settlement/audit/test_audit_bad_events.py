"""One bad event never costs the other requests their records (review of the insider's threats,
finding 10).

A lone surrogate ("\\udc80", what ``surrogateescape`` makes of a byte that is not UTF-8) in any field
made ``AuditTrail.append`` raise ``UnicodeEncodeError``: not a ``LedgerError``, so the writer logged
its whole batch (up to 500 requests' records, settled ones among them) as lost. Now append cleans
such text to its backslash escape before hashing and storing it (the same text on every later
verify and export), and an event the trail still cannot take (a value with no JSON form) is logged
alone while the rest of its batch is chained. Against the real writer, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import main
from settlement.audit import AuditEvent, AuditTrail, AuditWriter
from tests.conftest import fresh_database

LONE = "\udc80"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'audit.sqlite3'}"
        return
    with fresh_database("badevents") as database:
        yield database


def write(url: str, batch: list[AuditEvent]) -> AuditWriter:
    """One batch through a real writer (one transaction when nothing is wrong), flushed and closed."""
    writer = AuditWriter(AuditTrail(url), linger_seconds=0)

    async def request() -> None:
        writer.submit(batch)
        await writer.flush()
        await writer.close()

    asyncio.run(request())
    return writer


def test_a_lone_surrogate_in_any_field_is_chained_with_its_batch_and_verifies(url: str, tmp_path: Path) -> None:
    batch = [
        AuditEvent("req-before", "settled", {"paymentId": 1, "transaction": "0x" + "1" * 64}),
        AuditEvent(f"req{LONE}", f"response{LONE}", {"path": f"/quotes/{LONE}", f"key{LONE}": [LONE, {"k": LONE}]},
                   tool=f"get_quote{LONE}"),
        AuditEvent("req-after", "settled", {"paymentId": 2, "transaction": "0x" + "2" * 64}),
    ]

    writer = write(url, batch)

    assert (writer.written, writer.failed) == (3, 0)
    trail = AuditTrail(url)
    try:
        report = trail.verify()
        assert report.intact and report.records == 3, report.problems
        [record] = trail.for_request("req\\udc80")  # the escape, as text
        assert (record.event, record.tool) == ("response\\udc80", "get_quote\\udc80")
        assert json.loads(record.data) == {"path": "/quotes/\\udc80", "key\\udc80": ["\\udc80", {"k": "\\udc80"}]}
        assert [r.event for r in trail.for_request("req-after")] == ["settled"]
    finally:
        trail.close()
    exported = tmp_path / "trail.jsonl"
    export = CliRunner().invoke(main, ["audit", "export", "--database-url", url, "-o", str(exported)])
    assert export.exit_code == 0, export.output
    verify = CliRunner().invoke(main, ["audit", "verify", "--file", str(exported)])
    assert verify.exit_code == 0 and "intact: 3 records" in verify.output, verify.output


def test_an_event_the_trail_cannot_take_is_logged_alone_and_the_rest_chained(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    batch = [AuditEvent(f"req{n}", "settled", {"paymentId": n, "transaction": "0x" + f"{n:064x}"}) for n in range(5)]
    batch.insert(2, AuditEvent("req-bad", "usage_counted", {"ratio": math.nan}))  # no JSON form: canonical_json refuses it

    with caplog.at_level("ERROR", logger="x402gw.audit"):
        writer = write(url, batch)

    assert (writer.written, writer.failed) == (5, 1)
    lost = [r.getMessage() for r in caplog.records if r.getMessage().startswith("audit record not chained")]
    assert len(lost) == 1 and "req-bad" in lost[0], lost
    trail = AuditTrail(url)
    try:
        report = trail.verify()
        assert report.intact and report.records == 5, report.problems
        assert [r.request_id for r in trail.records()] == [f"req{n}" for n in range(5)]  # in order
    finally:
        trail.close()
