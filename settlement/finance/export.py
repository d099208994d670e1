"""Ledger export for finance: one row per payment, as CSV, JSON lines or Parquet, streamed.

Rows come from a server-side cursor (``stream_results`` + ``yield_per``) and are written as they
arrive, so memory stays flat whatever the size of the ledger. Amounts are exact: the atomic amount
as a string of digits (uint256 does not fit any float, nor Parquet's decimal128) and the decimal
amount as a string built from the row's ``decimals``. Times are UTC, ISO 8601 with ``Z``.

Filters: ``start`` inclusive, ``end`` exclusive (half-open, so ``--from 2025-03-01 --to
2025-04-01`` is March), owners / tools / states as sets.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import IO, Any, Literal, TypeVar

from sqlalchemy import case, func, select

from catalog.pricing import format_amount
from settlement.errors import SettlementError
from settlement.ledger import Ledger, Payment, PaymentState

_Q = TypeVar("_Q")  # a Select of any columns

Format = Literal["csv", "jsonl", "parquet"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl", "parquet")
BATCH_ROWS = 10_000  # rows fetched per round trip, and rows per Parquet row group

COLUMNS = (
    "payment_id",
    "request_id",
    "time",
    "owner",
    "tool",
    "payer",
    "pay_to",
    "amount_atomic",
    "amount",
    "decimals",
    "asset",
    "network",
    "state",
    "error_reason",
    "tx_hash",
    "block_number",
    "refund_owed_atomic",
    "refund_owed",
    "refund_tx",
    "refunded_at",
    "gas_used",  # the settlement transaction's gasUsed and effectiveGasPrice (wei per gas),
    "gas_price",  # and this payment's share of their product in wei (settlement.chain.gas)
    "gas_cost_wei",
    "channel_id",  # batch-settlement: the channel, the voucher's cumulative amount, and the claim
    "voucher_cumulative_atomic",  # (the transaction that settled the call; empty while it is accrued)
    "claim_tx",
    "upto_maximum_atomic",  # upto: the most the payer signed for; amount is what was charged of it
    "upto_maximum",
)


class ExportError(SettlementError, ValueError):
    """A filter or option that cannot be used (the CLI shows the message); still a ValueError, as before."""

    code = "invalid_export_filter"


def parse_when(text: str) -> datetime:
    """An ISO date (midnight UTC) or datetime (UTC when it names no offset) as an aware UTC datetime."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time(0), tzinfo=UTC)
        value = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ExportError(f"not an ISO date or datetime: {text!r}") from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso_utc(value: datetime | None) -> str | None:
    """``2025-03-01T12:00:00.000000Z``; SQLite hands back naive datetimes, which are UTC here."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


@dataclass(frozen=True, slots=True)
class Filters:
    start: datetime | None = None
    end: datetime | None = None
    owners: frozenset[str] = frozenset()
    tools: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = self.states - {s.value for s in PaymentState}
        if unknown:
            raise ExportError(f"unknown state(s) {sorted(unknown)}; states are {[s.value for s in PaymentState]}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ExportError("--to must be after --from (--to is exclusive)")

    def apply(self, query: _Q) -> _Q:
        q: Any = query
        if self.start is not None:
            q = q.where(Payment.created_at >= self.start)
        if self.end is not None:
            q = q.where(Payment.created_at < self.end)
        if self.owners:
            q = q.where(Payment.owner.in_(sorted(self.owners)))
        if self.tools:
            q = q.where(Payment.tool.in_(sorted(self.tools)))
        if self.states:
            q = q.where(Payment.state.in_(sorted(self.states)))
        return q  # type: ignore[no-any-return]


_SELECTED = (
    Payment.id,
    Payment.request_id,
    Payment.created_at,
    Payment.owner,
    Payment.tool,
    Payment.payer,
    Payment.pay_to,
    Payment.amount,
    Payment.decimals,
    Payment.asset,
    Payment.network,
    Payment.state,
    Payment.error_reason,
    Payment.tx_hash,
    Payment.block_number,
    Payment.refund_owed,
    Payment.refund_tx,
    Payment.refunded_at,
    Payment.gas_used,
    Payment.gas_price,
    Payment.gas_cost,
    # Only a batch-settlement or Permit2 row's signed payload is read (the database tests it; others stay there).
    case((Payment.authorization.contains('"channelConfig"'), Payment.authorization),
         (Payment.authorization.contains('"permit2Authorization"'), Payment.authorization), else_=None),
)


def count(ledger: Ledger, filters: Filters) -> int:
    with ledger.engine.connect() as conn:
        return int(conn.execute(filters.apply(select(func.count()).select_from(Payment))).scalar_one())


def iter_rows(ledger: Ledger, filters: Filters, batch_rows: int = BATCH_ROWS) -> Iterator[dict[str, Any]]:
    """Export rows in (time, id) order, fetched ``batch_rows`` at a time from a server-side cursor."""
    query = filters.apply(select(*_SELECTED)).order_by(Payment.created_at, Payment.id)
    with ledger.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=batch_rows).execute(query)
        for (pid, request_id, created_at, owner, tool, payer, pay_to, amount, decimals, asset, network, state,
             error_reason, tx_hash, block_number, refund_owed, refund_tx, refunded_at, gas_used, gas_price,
             gas_cost, channel_payload) in result:
            channel = _channel_fields(channel_payload, tx_hash, state)
            maximum = _upto_maximum(channel_payload)
            yield {
                "payment_id": pid,
                "request_id": request_id,
                "time": iso_utc(created_at),
                "owner": owner,
                "tool": tool,
                "payer": payer,
                "pay_to": pay_to,
                "amount_atomic": str(amount),
                "amount": format_amount(amount, decimals),
                "decimals": decimals,
                "asset": asset,
                "network": network,
                "state": state,
                "error_reason": error_reason,
                "tx_hash": tx_hash,
                "block_number": block_number,
                "refund_owed_atomic": None if refund_owed is None else str(refund_owed),
                "refund_owed": None if refund_owed is None else format_amount(refund_owed, decimals),
                "refund_tx": refund_tx,
                "refunded_at": iso_utc(refunded_at),
                "gas_used": None if gas_used is None else str(gas_used),
                "gas_price": None if gas_price is None else str(gas_price),
                "gas_cost_wei": None if gas_cost is None else str(gas_cost),
                **channel,
                "upto_maximum_atomic": None if maximum is None else str(maximum),
                "upto_maximum": None if maximum is None else format_amount(maximum, decimals),
            }


_NO_CHANNEL: dict[str, Any] = {"channel_id": None, "voucher_cumulative_atomic": None, "claim_tx": None}


def _upto_maximum(payload: str | None) -> int | None:
    """An upto row's signed maximum (its Permit2 authorization's permitted amount); else None."""
    if payload is None or '"facilitator"' not in payload:
        return None
    # Imported here: it brings the x402 SDK, which an export of exact payments never needs.
    from settlement.schemes.upto_permit import parse_upto

    try:
        permit = parse_upto(json.loads(payload))
    except ValueError:
        return None
    return permit.maximum if permit is not None else None


def _channel_fields(payload: str | None, tx_hash: str | None, state: str) -> dict[str, Any]:
    """A batch-settlement row's channel, voucher cumulative amount and claim (settled rows only)."""
    if payload is None or '"channelConfig"' not in payload:
        return _NO_CHANNEL
    try:
        voucher = json.loads(payload)["voucher"]
        return {"channel_id": str(voucher["channelId"]), "voucher_cumulative_atomic": str(voucher["maxClaimableAmount"]),
                "claim_tx": tx_hash if state == PaymentState.SETTLED else None}
    except (ValueError, KeyError, TypeError):
        return _NO_CHANNEL


# A cell a spreadsheet would read as a formula (OWASP "CSV injection"): error_reason can come from a
# remote facilitator. Such a cell is written as text, behind a ' (JSON lines and Parquet keep the value).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(rows: Iterator[dict[str, Any]], out: IO[str], tick: Callable[[int], None]) -> int:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    n = 0
    for row in rows:
        writer.writerow([csv_cell(row[c]) for c in COLUMNS])
        n += 1
        if n % 1000 == 0:
            tick(1000)
    tick(n % 1000)
    return n


def write_jsonl(rows: Iterator[dict[str, Any]], out: IO[str], tick: Callable[[int], None]) -> int:
    n = 0
    for row in rows:
        out.write(json.dumps(row, separators=(",", ":")) + "\n")
        n += 1
        if n % 1000 == 0:
            tick(1000)
    tick(n % 1000)
    return n


def parquet_schema() -> Any:
    import pyarrow as pa  # type: ignore[import-untyped]

    string, timestamp = pa.string(), pa.timestamp("us", tz="UTC")
    types = {"payment_id": pa.int64(), "decimals": pa.int16(), "block_number": pa.int64(),
             "time": timestamp, "refunded_at": timestamp}
    return pa.schema([pa.field(c, types.get(c, string), nullable=c not in ("payment_id", "time")) for c in COLUMNS])


def _parquet_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)


def write_parquet(rows: Iterator[dict[str, Any]], out: IO[bytes] | str, tick: Callable[[int], None],
                  batch_rows: int = BATCH_ROWS) -> int:
    """Parquet, one row group per ``batch_rows`` rows; times as UTC timestamps (microseconds),
    amounts as strings (exact at any size)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        raise ExportError("Parquet export needs pyarrow: pip install 'x402gw[parquet]'") from None
    schema = parquet_schema()
    n = 0
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        batch: dict[str, list[Any]] = {c: [] for c in COLUMNS}

        def flush() -> None:
            batch["time"] = [_parquet_time(t) for t in batch["time"]]
            batch["refunded_at"] = [_parquet_time(t) for t in batch["refunded_at"]]
            writer.write_batch(pa.RecordBatch.from_pydict(batch, schema=schema), row_group_size=batch_rows)
            tick(len(batch["payment_id"]))
            for column in batch.values():
                column.clear()

        for row in rows:
            for c in COLUMNS:
                batch[c].append(row[c])
            n += 1
            if n % batch_rows == 0:
                flush()
        if batch["payment_id"]:
            flush()
    return n


def export(ledger: Ledger, filters: Filters, fmt: Format, out: IO[Any], *,
           tick: Callable[[int], None] = lambda _: None, batch_rows: int = BATCH_ROWS) -> int:
    """Write the filtered ledger to ``out`` (text for csv/jsonl, binary for parquet); rows written."""
    rows = iter_rows(ledger, filters, batch_rows)
    if fmt == "csv":
        return write_csv(rows, out, tick)
    if fmt == "jsonl":
        return write_jsonl(rows, out, tick)
    if fmt == "parquet":
        return write_parquet(rows, out, tick, batch_rows)
    raise ExportError(f"unknown format {fmt!r}; formats are {list(FORMATS)}")

