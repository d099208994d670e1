"""Ledger export and summary over a ledger with known rows, on SQLite and PostgreSQL: every format
gives exactly the expected rows (exact decimals, UTC times with Z, states, refunds)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from gateway.cli.main import main
from settlement.finance.export import COLUMNS, ExportError, Filters, export, parse_when
from settlement.finance.summary import summarize
from settlement.ledger import Base, Ledger
from settlement.schema import open_ledger
from tests.support.ledger_rows import force_row

NETWORK = "eip155:31337"
ASSET = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
OTHER_ASSET = "0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512"
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
PAY_TO = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
TX = "0x" + "ab" * 32
REFUND_TX = "0x" + "cd" * 32


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    url = f"sqlite:///{tmp_path / 'export.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    book = open_ledger(url)
    try:
        yield book
    finally:
        Base.metadata.drop_all(book.engine)
        book.close()


def _at(day: int, hour: int, micro: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, 0, 0, micro, tzinfo=UTC)


ROWS: list[dict[str, Any]] = [
    # request id, time, owner, tool, amount, decimals, asset, state, extra fields
    dict(request_id="r1", created_at=_at(1, 9, 123456), owner="acme", tool="quote", amount=2000, decimals=6,
         asset=ASSET, state="settled", tx_hash=TX, block_number=12,
         gas_used=61_234, gas_price=2**70 + 3, gas_cost=61_234 * (2**70 + 3)),
    dict(request_id="r2", created_at=_at(1, 23), owner="acme", tool="report", amount=1_500_000, decimals=6,
         asset=ASSET, state="settled", tx_hash=TX, block_number=13, refund_owed=1_500_000,
         refund_reason="upstream_error", refund_tx=REFUND_TX, refunded_at=_at(2, 0, 5)),
    dict(request_id="r3", created_at=_at(2, 10), owner="acme", tool="quote", amount=2000, decimals=6,
         asset=ASSET, state="failed", error_reason="insufficient_funds"),
    dict(request_id="r4", created_at=_at(2, 11), owner="globex", tool="weather", amount=2**256 - 1, decimals=18,
         asset=OTHER_ASSET, state="settled", tx_hash=TX, block_number=14),
    dict(request_id="r5", created_at=_at(3, 0), owner="globex", tool="weather", amount=7, decimals=18,
         asset=OTHER_ASSET, state="pending", tx_hash=TX),
    dict(request_id="r6", created_at=_at(3, 1), owner="acme", tool="report", amount=30_000, decimals=6,
         asset=ASSET, state="voided", upstream_status=500),
    dict(request_id="r7", created_at=_at(3, 2), owner="acme", tool="report", amount=40_000, decimals=6,
         asset=ASSET, state="settled", tx_hash=TX, block_number=15, refund_owed=40_000, refund_reason="timeout"),
]

EXPECTED: list[dict[str, Any]] = [
    {"request_id": "r1", "time": "2025-03-01T09:00:00.123456Z", "owner": "acme", "tool": "quote",
     "amount_atomic": "2000", "amount": "0.002", "decimals": 6, "asset": ASSET, "state": "settled",
     "error_reason": None, "tx_hash": TX, "block_number": 12, "refund_owed_atomic": None, "refund_owed": None,
     "refund_tx": None, "refunded_at": None,
     "gas_used": "61234", "gas_price": str(2**70 + 3), "gas_cost_wei": str(61_234 * (2**70 + 3))},
    {"request_id": "r2", "time": "2025-03-01T23:00:00.000000Z", "owner": "acme", "tool": "report",
     "amount_atomic": "1500000", "amount": "1.5", "decimals": 6, "asset": ASSET, "state": "settled",
     "error_reason": None, "tx_hash": TX, "block_number": 13, "refund_owed_atomic": "1500000", "refund_owed": "1.5",
     "refund_tx": REFUND_TX, "refunded_at": "2025-03-02T00:00:00.000005Z"},
    {"request_id": "r3", "time": "2025-03-02T10:00:00.000000Z", "owner": "acme", "tool": "quote",
     "amount_atomic": "2000", "amount": "0.002", "decimals": 6, "asset": ASSET, "state": "failed",
     "error_reason": "insufficient_funds", "tx_hash": None, "block_number": None, "refund_owed_atomic": None,
     "refund_owed": None, "refund_tx": None, "refunded_at": None},
    {"request_id": "r4", "time": "2025-03-02T11:00:00.000000Z", "owner": "globex", "tool": "weather",
     "amount_atomic": str(2**256 - 1), "amount": "115792089237316195423570985008687907853269984665640564039457.584007913129639935",
     "decimals": 18, "asset": OTHER_ASSET, "state": "settled", "error_reason": None, "tx_hash": TX,
     "block_number": 14, "refund_owed_atomic": None, "refund_owed": None, "refund_tx": None, "refunded_at": None},
    {"request_id": "r5", "time": "2025-03-03T00:00:00.000000Z", "owner": "globex", "tool": "weather",
     "amount_atomic": "7", "amount": "0.000000000000000007", "decimals": 18, "asset": OTHER_ASSET, "state": "pending",
     "error_reason": None, "tx_hash": TX, "block_number": None, "refund_owed_atomic": None, "refund_owed": None,
     "refund_tx": None, "refunded_at": None},
    {"request_id": "r6", "time": "2025-03-03T01:00:00.000000Z", "owner": "acme", "tool": "report",
     "amount_atomic": "30000", "amount": "0.03", "decimals": 6, "asset": ASSET, "state": "voided",
     "error_reason": None, "tx_hash": None, "block_number": None, "refund_owed_atomic": None, "refund_owed": None,
     "refund_tx": None, "refunded_at": None},
    {"request_id": "r7", "time": "2025-03-03T02:00:00.000000Z", "owner": "acme", "tool": "report",
     "amount_atomic": "40000", "amount": "0.04", "decimals": 6, "asset": ASSET, "state": "settled",
     "error_reason": None, "tx_hash": TX, "block_number": 15, "refund_owed_atomic": "40000", "refund_owed": "0.04",
     "refund_tx": None, "refunded_at": None},
]


def _fill(book: Ledger) -> list[dict[str, Any]]:
    """Insert ROWS in a shuffled order (the export sorts by time); the expected rows, with ids."""
    ids: dict[str, int] = {}
    for i, spec in enumerate([ROWS[3], ROWS[0], ROWS[6], ROWS[1], ROWS[5], ROWS[2], ROWS[4]]):
        spec = dict(spec)
        state, created = spec.pop("state"), spec.pop("created_at")
        core = {k: spec.pop(k) for k in ("request_id", "owner", "tool", "amount", "decimals", "asset")}
        row = book.record_verified(
            **core, method="GET", path="/x", payer=PAYER, pay_to=PAY_TO, network=NETWORK,
            nonce="0x" + f"{i:064x}", valid_before=1_800_000_000, authorization="{}",
        )
        force_row(book, row.id, state=state, created_at=created, **spec)
        ids[core["request_id"]] = row.id
    no_gas = {"gas_used": None, "gas_price": None, "gas_cost_wei": None,
              "channel_id": None, "voucher_cumulative_atomic": None, "claim_tx": None,
              "upto_maximum_atomic": None, "upto_maximum": None}
    return [{"payment_id": ids[e["request_id"]], **no_gas, **e, "payer": PAYER, "pay_to": PAY_TO, "network": NETWORK}
            for e in EXPECTED]


def _ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{c: row[c] for c in COLUMNS} for row in rows]


def _as_csv(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{c: "" if row[c] is None else str(row[c]) for c in COLUMNS} for row in rows]


def test_csv_export_is_exact(ledger: Ledger) -> None:
    expected = _fill(ledger)
    out = io.StringIO()

    assert export(ledger, Filters(), "csv", out) == len(ROWS)

    lines = out.getvalue().splitlines()
    assert lines[0] == ",".join(COLUMNS)
    assert list(csv.DictReader(io.StringIO(out.getvalue()))) == _as_csv(expected)


def test_jsonl_export_is_exact(ledger: Ledger) -> None:
    expected = _fill(ledger)
    out = io.StringIO()

    export(ledger, Filters(), "jsonl", out)

    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows == _ordered(expected)
    assert [list(row) for row in rows] == [list(COLUMNS)] * len(ROWS)


def test_parquet_export_is_exact(ledger: Ledger, tmp_path: Path) -> None:
    expected = _fill(ledger)
    path = tmp_path / "ledger.parquet"

    with open(path, "wb") as out:
        export(ledger, Filters(), "parquet", out, batch_rows=3)  # three row groups: 3 + 3 + 1

    parquet = pq.ParquetFile(path)
    assert parquet.metadata.num_row_groups == 3
    table = parquet.read()
    assert table.schema.field("amount_atomic").type == "string"
    rows = table.to_pylist()
    for row in rows:  # timestamps come back as aware datetimes in UTC
        for column in ("time", "refunded_at"):
            if row[column] is not None:
                assert row[column].tzinfo is not None
                row[column] = row[column].astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    assert rows == _ordered(expected)


@pytest.mark.parametrize(
    ("filters", "request_ids"),
    [
        (Filters(start=parse_when("2025-03-02")), ["r3", "r4", "r5", "r6", "r7"]),
        (Filters(end=parse_when("2025-03-02")), ["r1", "r2"]),  # --to is exclusive
        (Filters(start=parse_when("2025-03-01T23:00:00Z"), end=parse_when("2025-03-02T10:00:00.000001")),
         ["r2", "r3"]),
        (Filters(start=parse_when("2025-03-02T12:00:00+02:00")), ["r3", "r4", "r5", "r6", "r7"]),  # 10:00 UTC
        (Filters(owners=frozenset({"globex"})), ["r4", "r5"]),
        (Filters(tools=frozenset({"report"}), states=frozenset({"settled"})), ["r2", "r7"]),
        (Filters(owners=frozenset({"nobody"})), []),
    ],
    ids=["from-date", "to-exclusive", "datetimes", "offset", "owner", "tool-and-state", "none"],
)
def test_filters(ledger: Ledger, filters: Filters, request_ids: list[str]) -> None:
    _fill(ledger)
    out = io.StringIO()

    export(ledger, filters, "jsonl", out)

    assert [json.loads(line)["request_id"] for line in out.getvalue().splitlines()] == request_ids


def test_bad_filters_are_refused() -> None:
    with pytest.raises(ExportError):
        Filters(states=frozenset({"paid"}))
    with pytest.raises(ExportError):
        Filters(start=parse_when("2025-03-02"), end=parse_when("2025-03-01"))
    with pytest.raises(ExportError):
        parse_when("yesterday")


def test_summary_per_owner_and_tool(ledger: Ledger) -> None:
    _fill(ledger)

    groups = [g.to_json(("owner", "tool")) for g in summarize(ledger, ("owner", "tool"))]

    assert [(g["owner"], g["tool"], g["gross"], g["refunds"], g["net"]) for g in groups] == [
        ("acme", "quote", "0.002", "0", "0.002"),
        ("acme", "report", "1.54", "1.54", "0"),
        ("globex", "weather", "115792089237316195423570985008687907853269984665640564039457.584007913129639935",
         "0", "115792089237316195423570985008687907853269984665640564039457.584007913129639935"),
    ]
    counts = [{k: g[k] for k in ("payments", "settled", "failed", "pending", "voided", "refunded", "refund_owed")}
              for g in groups]
    assert counts == [
        {"payments": 2, "settled": 1, "failed": 1, "pending": 0, "voided": 0, "refunded": 0, "refund_owed": 0},
        {"payments": 3, "settled": 2, "failed": 0, "pending": 0, "voided": 1, "refunded": 1, "refund_owed": 1},
        {"payments": 2, "settled": 1, "failed": 0, "pending": 1, "voided": 0, "refunded": 0, "refund_owed": 0},
    ]


def test_summary_per_day(ledger: Ledger) -> None:
    _fill(ledger)

    groups = [g.to_json(("day",)) for g in summarize(ledger, ("day",))]

    assert [(g["day"], g["asset"], g["net_atomic"], g["payments"]) for g in groups] == [
        ("2025-03-01", ASSET, "2000", 2),  # r1 2000 + r2 1.5 settled and refunded
        ("2025-03-02", ASSET, "0", 1),
        ("2025-03-02", OTHER_ASSET, str(2**256 - 1), 1),
        ("2025-03-03", ASSET, "0", 2),  # r7 refund owed, r6 voided
        ("2025-03-03", OTHER_ASSET, "0", 1),
    ]


def test_cli_export_and_summary(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    book = open_ledger(url)
    expected = _fill(book)
    book.close()
    runner = CliRunner()

    result = runner.invoke(main, ["ledger", "export", "--format", "jsonl", "--database-url", url,
                                  "--from", "2025-03-01", "--to", "2025-03-02", "--state", "settled"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line) for line in result.stdout.splitlines()] == _ordered(expected[:2])

    target = tmp_path / "out" / "ledger.csv"
    target.parent.mkdir()
    result = runner.invoke(main, ["ledger", "export", "--database-url", url, "--output", str(target)])
    assert result.exit_code == 0, result.output
    assert list(csv.DictReader(target.open(newline=""))) == _as_csv(expected)
    assert [p.name for p in target.parent.iterdir()] == ["ledger.csv"]  # no partial file left

    result = runner.invoke(main, ["ledger", "summary", "--by", "owner", "--format", "json", "--database-url", url])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(g["owner"], g["net"], g["settled"]) for g in report["groups"]] == [
        ("acme", "0.002", 3), ("globex", "115792089237316195423570985008687907853269984665640564039457.584007913129639935", 1)
    ]

    result = runner.invoke(main, ["ledger", "summary", "--by", "tool", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split()[:4] == ["tool", "asset", "gross", "refunds"]

    result = runner.invoke(main, ["ledger", "export", "--database-url", url, "--state", "paid"])
    assert result.exit_code == 2
