"""``x402gw ledger refunds [--pay]``: refunds still owed, what the chain says of each, and paying them.

A refund is owed when a settled payment bought nothing; the gateway pays it at once only with a
refund key, and a broadcast that failed or a receipt that never came leaves it owed. This command
lists every owed refund with its status on chain (``settlement.finance.owed_refunds``) and, with
``--pay``, pays what is safe to pay with ``X402GW_REFUND_KEY`` (the settings the gateway reads),
records what already landed, and leaves what may still land. Exactly once against the running
gateway and other runs: each refund is claimed in the ledger before its broadcast.

Exit codes: 0 nothing is owed any more (or, without ``--pay``, the list was printed); 1 with
``--pay``, refunds stay owed (each line says why); 2 the command could not run (bad settings, no
refund key with ``--pay``, a network without chain access, a node or the ledger that stops answering).
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

__all__ = ["refunds"]

_WHY = {
    "left": "left: it may still land (pending) or needs a person (unknown: --include-unknown pays it again; unexplained)",
    "too_recent": "left: claimed too recently, its transaction may still be on its way (run again later)",
    "no_refund_key": "no refund key for this network (X402GW_REFUND_KEY)",
    "charge_unexplained": "left for a person: the row's settlement on chain does not show this payer paying this much "
                          "(the ledger row may have been edited)",
    "refund_unaudited": "left for a person: the audit trail names no such refund (the ledger row may have been edited; "
                        "once checked: --approve PAYMENT_ID)",
    "refund_already_paid": "left for a person: the audit trail records this refund paid (refund_paid); the ledger row "
                           "may have been reopened by an edit",
    "refund_contradicted": "left for a person: the audit trail says this payment's answer was delivered (its response "
                           "record), so no refund is owed; the record naming it may have been written by hand",
    "claimed_elsewhere": "another payer (the gateway, another run) claimed it first",
    "recorded_elsewhere": "its transaction had landed and another payer recorded it first: nothing sent",
    "sent": "sent; its receipt did not come in time: run again to record it",
}


def units(amount: int, decimals: int) -> str:
    """An atomic amount as an exact decimal of the token (4000 with 6 decimals: 0.004)."""
    text = format(Decimal(amount).scaleb(-decimals), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _describe(line: Any, pay: bool) -> str:
    amount = f"{units(line.amount, line.decimals)} ({line.amount} atomic units) to {line.payer} on {line.network}"
    tx = f" [{line.tx_hash}]" if line.tx_hash else ""
    outcome = _WHY.get(line.outcome, line.outcome) if pay else ""
    return f"payment {line.payment_id}: {amount} ({line.reason or 'no reason'}): {line.status}{tx}" + (
        f" -> {outcome}" if outcome else "")


@click.command("refunds")
@click.option("--pay", is_flag=True, help="Pay what is safe to pay with X402GW_REFUND_KEY; record what already landed.")
@click.option("--include-unknown", is_flag=True,
              help="With --pay, also pay again refunds whose transaction the node does not know (check first that it cannot land; "
                   "one claimed less than 10 minutes plus X402GW_RECEIPT_TIMEOUT_SECONDS ago is left: it may still be on its way).")
@click.option("--approve", "approved", multiple=True, type=click.IntRange(min=1), metavar="PAYMENT_ID",
              help="With --pay, pay this refund although the audit trail names none (owed before the trail named refunds, "
                   "or written by hand): a person checked it; the approval is recorded in the audit trail first (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--catalog", "catalogs", multiple=True, type=click.Path(path_type=Path),
              help="Catalog file (repeatable; default: X402GW_CATALOG).")
@click.option("--database-url", envvar="X402GW_DATABASE_URL", default=None,
              help="Ledger database (default: X402GW_DATABASE_URL, else the gateway's default).")
def refunds(pay: bool, include_unknown: bool, approved: tuple[int, ...], as_json: bool, catalogs: tuple[Path, ...],
            database_url: str | None) -> None:
    """Refunds still owed, what the chain says of each; --pay pays them (exit 1 while some stay owed)."""
    from gateway.cli.ledger import EXIT_DISAGREE, EXIT_ERROR, _chains, _fail, _on_chains, _open_ledger, _settings, _write_webhook_events
    from gateway.errors import GatewayConfigError
    from gateway.wiring import build_refunder
    from settlement.errors import LedgerError
    from settlement.finance.owed_refunds import UNKNOWN_QUIET_SECONDS, settle_owed_refunds

    if include_unknown and not pay:
        raise click.UsageError("--include-unknown pays: it needs --pay")
    if approved and not pay:
        raise click.UsageError("--approve pays: it needs --pay")
    settings = _settings(catalog=list(catalogs), database_url=database_url)
    _, chains = _chains(settings)
    refunder = None
    if pay:
        if settings.refund_key is None:
            _fail("--pay needs a refund key: set X402GW_REFUND_KEY or X402GW_REFUND_KEY_FILE (the account that pays refunds)")
        try:
            refunder = build_refunder(settings, chains)
        except GatewayConfigError as exc:
            _fail(f"{exc.message} [{exc.code}]")
    book = _open_ledger(settings.database_url)
    _write_webhook_events(book, settings)  # refund.paid, as the gateway would write it
    named = _audited(settings.database_url) if pay else None
    if named is not None and approved:
        named.approve(book, set(approved))

    def show(line: Any) -> None:
        if not as_json:
            click.echo(_describe(line, pay))

    async def work() -> Any:
        try:
            # A claim is quiet once no gateway can still send its transaction: past its receipt wait.
            quiet = UNKNOWN_QUIET_SECONDS + settings.receipt_timeout_seconds
            return await settle_owed_refunds(book, chains, refunder, pay=pay, include_unknown=include_unknown, on_line=show,
                                             quiet_seconds=quiet, trail=named)
        finally:
            if refunder is not None:
                await refunder.close()
            if named is not None:
                named.trail.close()

    try:
        report = _on_chains(book, chains, work())
    except LedgerError as exc:  # a claim never written is never broadcast: run again when the ledger answers
        _fail(f"{exc.message} [{exc.code}]")
    owed = report.still_owed
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not report.lines:
        click.echo("no refund is owed")
    else:
        click.echo(f"{len(owed)} of {len(report.lines)} refunds still owed ({sum(line.amount for line in owed)} atomic units)"
                   if owed else f"all {len(report.lines)} refunds settled")
    if report.unchecked_networks:
        click.echo(f"error: no RPC URL for {', '.join(report.unchecked_networks)} (X402GW_RPC_URLS)", err=True)
        sys.exit(EXIT_ERROR)
    if pay and owed:
        sys.exit(EXIT_DISAGREE)


class _Audited:
    """The audit trail (in the ledger's database) on a row's refund: why it must not be paid
    (``settlement.audit.refund_refusal``: not named by the pipeline's ``refund_owed`` or a person's
    ``refund_approved``, already paid, or its answer delivered), and the record of one paid."""

    def __init__(self, trail: Any) -> None:
        self.trail = trail

    def refusal(self, row: Any) -> str | None:
        from settlement.audit import refund_refusal

        return refund_refusal(self.trail.for_request(row.request_id), row)

    def paid(self, row: Any, amount: int, tx_hash: str | None) -> None:
        from settlement.audit import REFUND_PAID, AuditEvent

        self.trail.append([AuditEvent(row.request_id, REFUND_PAID, {
            "paymentId": row.id, "amount": str(amount), "transaction": tx_hash,
            "paidBy": "x402gw ledger refunds --pay"}, payer=row.payer, tool=row.tool)])

    def approve(self, book: Any, payment_ids: set[int]) -> None:
        """A person's approval of these owed refunds, written into the audit trail (``refund_approved``,
        the payment id and amount owed) before anything is paid: the trail names who let an
        unrecorded refund through. An id that owes nothing stops the run, named."""
        from gateway.cli.ledger import _fail
        from settlement.audit import REFUND_APPROVED, AuditEvent

        owed = {row.id: row for row in book.owed_refunds() if row.id in payment_ids}
        if missing := sorted(payment_ids - owed.keys()):
            _fail(f"--approve: no refund is owed for payment {', '.join(map(str, missing))} [refund_not_owed]")
        self.trail.append([AuditEvent(row.request_id, REFUND_APPROVED, {
            "paymentId": row.id, "amount": str(row.refund_owed), "reason": row.refund_reason,
            "approvedBy": "x402gw ledger refunds --approve"}, payer=row.payer, tool=row.tool) for row in owed.values()])


def _audited(database_url: str) -> _Audited:
    from gateway.cli.ledger import _fail
    from settlement.audit import AuditTrail
    from settlement.errors import LedgerError

    try:
        return _Audited(AuditTrail(database_url))
    except LedgerError as exc:
        _fail(f"{exc.message} [{exc.code}]")
