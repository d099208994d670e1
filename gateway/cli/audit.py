"""``x402gw audit``: verify the hash chain of the audit trail, and export it as JSON lines."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import click

from gateway.cli.outputs import sink
from settlement.audit import VerifyReport
from settlement.x402.digits import is_digits

EXIT_INTACT, EXIT_TAMPERED, EXIT_UNREADABLE = 0, 1, 2


def _database_url(given: str | None) -> str:
    """The ledger to read: one that exists (a mistyped SQLite path is not a fresh, empty trail)."""
    from gateway.cli.outputs import missing_ledger
    from gateway.cli.settings_errors import load_settings

    url = given or load_settings().database_url  # bad settings: one line, never a value
    missing = missing_ledger(url)
    if missing is not None:
        click.echo(f"error: {missing}", err=True)
        sys.exit(EXIT_UNREADABLE)
    return url


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 date or time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _anchor(value: str | None) -> tuple[int, str] | None:
    if value is None:
        return None
    seq, _, digest = value.partition(":")
    if not is_digits(seq, 18) or len(digest) != 64:
        raise click.BadParameter("expected SEQ:HASH, as printed by an earlier `audit verify`")
    return int(seq), digest.lower()


@click.group()
def audit() -> None:
    """The tamper-evident audit trail: verify it, export it."""


@audit.command("verify")
@click.option("--database-url", default=None, envvar="X402GW_DATABASE_URL", help="Ledger database (default: settings).")
@click.option("--file", "file", default=None, type=click.Path(path_type=Path, exists=True),
              help="Verify an export (JSON lines) instead of the database.")
@click.option("--anchor", default=None, help="SEQ:HASH kept from an earlier run: that record must still have that hash.")
@click.option("--ledger/--no-ledger", "with_ledger", default=True, show_default=True,
              help="Compare each settled record with its payment row (the ledger in the same database).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(database_url: str | None, file: Path | None, anchor: str | None, with_ledger: bool, as_json: bool) -> None:
    """Walk the chain; exit 1 and name each edited, inserted, deleted, reordered or unreadable record,
    and (on a database) each settled record whose payment row says otherwise (ledger_mismatch)."""
    from sqlalchemy.exc import SQLAlchemyError

    from settlement.audit import AuditTrail
    from settlement.errors import LedgerError

    pinned = _anchor(anchor)
    if file is not None:
        try:
            report = _verify_file(file, pinned)
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # Not an export: exit 2, never 1 (TAMPERED) nor a traceback.
            click.echo(f"error: {file} is not an audit export (JSON lines of `audit export`): "
                       f"{type(exc).__name__} [audit_export_unreadable]", err=True)
            sys.exit(EXIT_UNREADABLE)
    else:
        try:
            trail = AuditTrail(_database_url(database_url))
        except LedgerError as exc:
            click.echo(f"error: {exc.message}", err=True)
            sys.exit(EXIT_UNREADABLE)
        try:
            report = trail.verify(anchor=pinned, ledger=with_ledger)
        except SQLAlchemyError as exc:
            _unreadable(exc)
        finally:
            trail.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        for problem in report.problems:
            click.echo(f"TAMPERED {problem.kind}: {problem.detail}")
        state = "intact" if report.intact else f"BROKEN ({len(report.problems)} problems)"
        click.echo(f"audit trail {state}: {report.records} records, head seq {report.last_seq} hash {report.last_hash}")
        if report.ledger_checked is not None:
            click.echo(f"ledger: {report.ledger_checked} settled records compared with their payments")
        if report.intact:
            click.echo(f"anchor for the next run: --anchor {report.last_seq}:{report.last_hash}")
    sys.exit(EXIT_INTACT if report.intact else EXIT_TAMPERED)


def _verify_file(file: Path, pinned: tuple[int, str] | None) -> VerifyReport:
    from settlement.audit import StoredRecord, verify_chain

    with file.open(encoding="utf-8") as lines:
        records = (StoredRecord.from_json(line) for line in lines if line.strip())
        first = next(records, None)
        if first is None:
            return verify_chain([], anchor=pinned)
        # An export may start anywhere: its first record's seq and prev hash are taken on trust.
        chained = (r for part in ([first], records) for r in part)
        return verify_chain(chained, anchor=pinned, start=(first.seq - 1, first.prev_hash))


@audit.command("export")
@click.option("--database-url", default=None, envvar="X402GW_DATABASE_URL", help="Ledger database (default: settings).")
@click.option("--format", "fmt", type=click.Choice(["jsonl"]), default="jsonl", show_default=True)
@click.option("--from", "since", default=None, help="Records at or after this time (ISO-8601, UTC if no zone).")
@click.option("--to", "until", default=None, help="Records before this time (ISO-8601, UTC if no zone).")
@click.option("--from-seq", type=click.IntRange(0, 2**63 - 1), default=None, help="First sequence number.")
@click.option("--to-seq", type=click.IntRange(0, 2**63 - 1), default=None, help="Last sequence number.")
@click.option("--output", "-o", default="-", help="File (default: stdout).")
def export(database_url: str | None, fmt: str, since: str | None, until: str | None, from_seq: int | None,
           to_seq: int | None, output: str) -> None:
    """Stream records in chain order, one JSON object a line (verifiable with `audit verify --file`)."""
    from sqlalchemy.exc import SQLAlchemyError

    from settlement.audit import AuditTrail
    from settlement.errors import LedgerError

    url = _database_url(database_url)
    try:
        trail = AuditTrail(url)
    except LedgerError as exc:
        click.echo(f"error: {exc.message}", err=True)
        sys.exit(EXIT_UNREADABLE)
    try:
        with sink(output, ledger_url=url) as out:  # never over the ledger, a FIFO or a device
            for record in trail.records(from_seq=from_seq, to_seq=to_seq, since=_when(since), until=_when(until)):
                # ASCII: a caller's U+2028/U+2029/U+0085 (in a path it asked for) would split a line for
                # many readers of JSON lines; the records' hashes are over their canonical form, not these bytes.
                out.write(json.dumps(record.to_json(), separators=(",", ":"), ensure_ascii=True) + "\n")
                if record.unreadable is not None:  # exported as stored; `audit verify --file` names it too
                    click.echo(f"warning: seq {record.seq} (id {record.id}): {record.unreadable}", err=True)
    except SQLAlchemyError as exc:
        _unreadable(exc)
    finally:
        trail.close()


def _unreadable(exc: Exception) -> NoReturn:
    """The trail's database answered with an error mid-read (verify, export): one line, exit 2."""
    click.echo(f"error: the audit trail cannot be read ({type(exc).__name__}) [audit_unreadable]", err=True)
    sys.exit(EXIT_UNREADABLE)
