"""``x402gw webhooks list|replay``: the webhook outbox, read and replayed from the ledger database.

A replayed delivery goes back to ``pending`` with its event id and body unchanged; the running
gateway's dispatcher sends it at its next poll (``X402GW_WEBHOOK_POLL_SECONDS``). No secret is read
or printed here: endpoints are named.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

__all__ = ["webhooks"]


def _ledger(database_url: str | None) -> Any:
    from gateway.cli.outputs import fail, missing_ledger
    from gateway.cli.settings_errors import load_settings
    from settlement.errors import LedgerError
    from settlement.schema import open_ledger

    url = database_url or load_settings().database_url  # bad settings: one line, never a value
    missing = missing_ledger(url)
    if missing is not None:
        fail(missing)
    try:
        return open_ledger(url)
    except LedgerError as exc:
        click.echo(f"error: {exc.message} [{exc.code}]", err=True)
        sys.exit(2)


_database = click.option("--database-url", "database_url", default=None,
                         help="Ledger database (default: X402GW_DATABASE_URL).")


@click.group()
def webhooks() -> None:
    """Webhook deliveries: list them, replay one."""


@webhooks.command("list")
@click.option("--status", type=click.Choice(["pending", "delivered", "dead"]), default=None)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per delivery, one a line.")
@_database
def webhooks_list(status: str | None, limit: int, as_json: bool, database_url: str | None) -> None:
    """The latest deliveries, newest first: id, event, endpoint, status, attempts, last answer."""
    import settlement.ledger.outbox as outbox
    from gateway.ops.webhooks import delivery_json

    book = _ledger(database_url)
    try:
        with book.outbox_transaction() as connection:
            rows = [delivery_json(r) for r in outbox.list_rows(connection, status=status, limit=limit)]
    finally:
        book.close()
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, separators=(",", ":")))
        else:
            last = row["lastError"] or (f"HTTP {row['lastStatus']}" if row["lastStatus"] else "-")
            click.echo(f"{row['id']:>6}  {row['eventId']}  {row['type']:<16} {row['endpoint']:<16} "
                       f"{row['status']:<9} attempts {row['attempts']:<3} last {last}")


@webhooks.command("replay")
@click.argument("delivery_id", type=click.IntRange(1, 2**63 - 1))
@_database
def webhooks_replay(delivery_id: int, database_url: str | None) -> None:
    """Deliver one row again (same event id, same body); exit 1 when there is no such row."""
    import settlement.ledger.outbox as outbox
    from settlement.ledger import utcnow

    book = _ledger(database_url)
    try:
        with book.outbox_transaction() as connection:
            found = outbox.replay(connection, delivery_id, utcnow())
    finally:
        book.close()
    if not found:
        click.echo(f"error: no webhook delivery {delivery_id}", err=True)
        sys.exit(1)
    click.echo(f"delivery {delivery_id} will be sent again by the gateway")
