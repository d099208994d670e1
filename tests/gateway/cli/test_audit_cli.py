"""``x402gw audit verify`` and ``x402gw audit export`` against a real SQLite ledger file."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from gateway.cli.main import main
from settlement.audit import AuditEvent, AuditTrail


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    trail = AuditTrail(url)
    day = datetime(2025, 3, 1, tzinfo=UTC)
    for n in range(6):
        trail.append([AuditEvent(f"req{n}", "challenge_issued", {"amount": "2000"}, tool="get_quote",
                                 at=day + timedelta(hours=n)),
                      AuditEvent(f"req{n}", "response", {"status": 402}, tool="get_quote",
                                 at=day + timedelta(hours=n, seconds=1))])
    trail.close()
    return url


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def tamper(url: str, statement: str) -> None:
    trail = AuditTrail(url)
    with trail.engine.begin() as conn:
        conn.execute(text(statement))
    trail.close()


def test_verify_an_intact_trail_exits_0_and_prints_an_anchor(url: str) -> None:
    code, out = run("audit", "verify", "--database-url", url)
    assert code == 0, out
    assert "intact: 12 records" in out and "--anchor 12:" in out
    anchor = out.split("--anchor ")[1].strip()
    assert run("audit", "verify", "--database-url", url, "--anchor", anchor)[0] == 0


def test_verify_names_the_tampered_record_and_exits_1(url: str) -> None:
    tamper(url, "UPDATE audit_records SET data = '{\"amount\":\"1\"}' WHERE seq = 3")
    code, out = run("audit", "verify", "--database-url", url)
    assert code == 1
    assert "TAMPERED hash_mismatch: seq 3" in out
    code, out = run("audit", "verify", "--database-url", url, "--json")
    report = json.loads(out)
    assert code == 1 and report["intact"] is False
    assert report["problems"] == [{"kind": "hash_mismatch", "seq": 3, "id": 3, "detail": report["problems"][0]["detail"]}]


def test_verify_names_a_deleted_record(url: str) -> None:
    tamper(url, "DELETE FROM audit_records WHERE seq = 8")
    code, out = run("audit", "verify", "--database-url", url, "--json")
    assert code == 1
    assert [(p["kind"], p["seq"]) for p in json.loads(out)["problems"]] == [("sequence_gap", 9)]


def test_export_streams_json_lines_that_verify_offline(url: str, tmp_path: Path) -> None:
    code, out = run("audit", "export", "--database-url", url)
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["seq"] for line in lines] == list(range(1, 13))
    assert lines[0]["event"] == "challenge_issued" and lines[0]["data"] == {"amount": "2000"}
    assert lines[0]["at"] == "2025-03-01T00:00:00.000000Z" and lines[1]["prevHash"] == lines[0]["hash"]
    exported = tmp_path / "audit.jsonl"
    exported.write_text(out)
    assert run("audit", "verify", "--file", str(exported))[0] == 0
    edited = out.replace('"status":402', '"status":200', 1)
    exported.write_text(edited)
    code, report = run("audit", "verify", "--file", str(exported), "--json")
    assert code == 1 and json.loads(report)["problems"][0]["seq"] == 2


def test_export_filters_by_time_and_sequence(url: str) -> None:
    code, out = run("audit", "export", "--database-url", url, "--from", "2025-03-01T02:00:00", "--to",
                    "2025-03-01T04:00:00Z")
    assert code == 0
    assert [json.loads(line)["requestId"] for line in out.splitlines()] == ["req2", "req2", "req3", "req3"]
    code, out = run("audit", "export", "--database-url", url, "--from-seq", "11", "--format", "jsonl")
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [11, 12]
    code, out = run("audit", "export", "--database-url", url, "--from", "yesterday")
    assert code == 2 and "ISO-8601" in out
