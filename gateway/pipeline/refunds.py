"""A refund owed to a payer whose settled payment bought nothing: recorded always, paid when a
refund signer exists for the network. Used by the ``bridge`` stage (an ``upfront`` call whose
upstream failed), by ``exactly_once`` (a settled payment whose answer was lost), and after a reconcile
settled an ``upfront`` payment whose request died before its answer (``owe_lost_answers``)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from catalog import Tool
from gateway.pipeline.context import RequestContext
from gateway.protocol.offers import Quote
from gateway.store import StateStore, StoreUnavailable, payment_lock
from settlement.audit import REFUND_OWED, REFUND_PAID, AuditEvent, AuditSink
from settlement.chain.refunds import Refunder
from settlement.ledger import Payment, PaymentState
from settlement.ledger.payments import Ledger
from settlement.ledger.resolve import Resolution
from settlement.schemes.upto import UPTO, upto_charge

__all__ = ["Refunds", "callers_failure", "keeps_charge", "user_scoped"]

log = logging.getLogger("x402gw.refunds")

# How far back the resolver's turn looks for settled upfront payments without their answer each round
# (a request lives minutes at most; the start-up sweep reads the whole ledger).
SWEEP_HOURS = 6

# An upstream's 4xx that is not about what the caller asked: the credentials the gateway sends (401,
# 403, 407: the owner's), the request the gateway built (405, 411, 415, 426), or the upstream's state
# (408: it timed out; 429: it would not serve now).
_UPSTREAM_4XX = frozenset({401, 403, 405, 407, 408, 411, 415, 426, 429})
# A user-scoped tool sends the caller's own credential (its token, or its linked account): refused, or
# over its own quota at the upstream (429), it is the caller's.
_USERS_CREDENTIAL = frozenset({401, 403, 429})
# A SOAP fault the upstream blames on the request (1.1 Client, 1.2 Sender).
_CALLER_FAULTS = frozenset({"client", "sender"})


def callers_failure(status: int, fault_code: object = None, *, user_scoped: bool = False) -> bool:
    """Whether an upstream answered a call with a failure of the caller's request: a 4xx about what
    it asked (400, 404, 409, 422...; 401, 403 and 429 only when the tool sends the caller's own
    credential), or a SOAP Client/Sender fault of a tool that sends the caller's own credential. An ``upfront`` tool's such call stays charged unless
    its catalog says ``refund_on: any_failure``: a refund costs the gateway gas, and any payer could
    otherwise make it spend that for free, call after call, by asking for what is not there (the
    price comes back, the gas does not). Every other failure (5xx, the 4xx above, unreachable,
    timed out, a drifted answer) is the upstream's or the owner's, and refunded."""
    if isinstance(fault_code, str) and fault_code.rpartition(":")[2].lower() in _CALLER_FAULTS:
        # SOAP 1.1 files authentication (the owner's token) and a request the gateway built under
        # Client too: the caller's only when it is the caller's credential the tool sends.
        return user_scoped
    if user_scoped and status in _USERS_CREDENTIAL:
        return True
    return 400 <= status < 500 and status not in _UPSTREAM_4XX


def keeps_charge(tool: Tool, status: int, fault_code: object = None) -> bool:
    """Whether an ``upfront`` call of ``tool`` that failed with ``status`` (and SOAP ``fault_code``)
    stays charged: the caller's own failure (``callers_failure``) under ``refund_on: upstream_fault``."""
    return tool.refund_on == "upstream_fault" and callers_failure(status, fault_code, user_scoped=user_scoped(tool))


def user_scoped(tool: Tool) -> bool:
    """Whether the caller's own credential goes upstream (its token, or its linked account)."""
    return tool.user_auth is not None or tool.wallet_accounts is not None


def _owed(payment_id: int, amount: int, reason: str) -> dict[str, Any]:
    return {"paymentId": payment_id, "amount": str(amount), "reason": reason}


def _refund_events(request_id: str, payment_id: int, amount: int, reason: str, fields: dict[str, Any],
                   payer: str | None = None, tool: str | None = None) -> list[AuditEvent]:
    """``refund_owed``, and ``refund_paid`` when this very call paid it (``ledger refunds --pay``
    refuses a refund the trail records paid: one reopened by SQL is not paid twice)."""
    events = [AuditEvent(request_id, REFUND_OWED, _owed(payment_id, amount, reason), payer, tool)]
    if fields.get("refund") == "refunded":
        events.append(AuditEvent(request_id, REFUND_PAID, {"paymentId": payment_id, "amount": str(amount),
                                                           "transaction": fields.get("refundTransaction")}, payer, tool))
    return events


class _ClaimedElsewhere(Exception):
    """Another payer of this refund claimed it before our broadcast."""


class Refunds:
    """Owes refunds, and names each in the audit trail (``refund_owed``: payment id, amount, reason,
    under the payment's own request id): ``ledger refunds --pay`` pays only a refund the trail names,
    never one an insider wrote into the ledger (``settlement.audit.refund_recorded``)."""

    def __init__(self, ledger: Ledger, refunder: Refunder | None, audit: AuditSink | None = None) -> None:
        self.ledger = ledger
        self.refunder = refunder
        self.audit = audit  # for refunds owed outside a request (owe_lost_answers); a request's go with its events
        self._recheck: set[int] = set()  # answers lost whose payment lock was held when last seen

    async def owe(self, ctx: RequestContext, quote: Quote, payment_id: int, reason: str,
                  request_id: str | None = None) -> dict[str, Any]:
        """Record the refund and pay it if possible; the fields the answer carries about it.
        ``request_id``: the payment's request, when another one (a resend) owes it."""
        requirements = quote.requirements
        # What was charged: an upto offer's amount is the signed maximum, its charge in extra.charge.
        amount = upto_charge(requirements) if requirements.scheme == UPTO else int(requirements.amount)
        ctx.outcome = "refund_owed"
        outcome, fields = await self._owe(payment_id, requirements.network, requirements.asset, ctx.payer, amount, reason)
        ctx.outcome = outcome
        if outcome != "settled":  # chained with the request's other events, stamped with its payer and tool
            ctx.events.extend(_refund_events(request_id or ctx.request_id, payment_id, amount, reason, fields))
        return fields

    async def owe_lost_answers(self, store: StateStore, resolved: Iterable[Resolution] | None = None, *,
                               sweep: bool = False) -> list[int]:
        """Settled ``upfront`` payments whose answer never came (no stored answer, no upstream status:
        the process died between the settlement and the answer, or the settlement was still pending
        when its request answered): a refund is owed now, as a resend would get (``exactly_once``), not
        only if the payer resends. ``resolved``: only the rows a reconcile just settled; None: every
        such row in the ledger (at start-up: another process's reconcile may have settled them).
        ``sweep``: those created in the last ``SWEEP_HOURS`` too (the resolver's turn each round: a
        replica killed and never restarted left them, and no start-up of its will find them).
        A row whose payment lock a live request holds (a replica's, a resend) is left to it."""
        ledger = self.ledger
        if resolved is None:
            rows = await ledger.run(ledger.answers_lost)
        else:  # and the rows a held lock kept back before: a dead process's lock lapses
            wanted = self._recheck | {r.payment_id for r in resolved if r.after == PaymentState.SETTLED.value}
            if sweep:
                since = datetime.now(UTC) - timedelta(hours=SWEEP_HOURS)
                wanted |= {row.id for row in await ledger.run(ledger.answers_lost, since)}
            rows = [row for payment_id in sorted(wanted) if (row := await ledger.run(ledger.get, payment_id)) is not None]
        self._recheck = set()
        owed = []
        for row in rows:
            if not await self._lost(row):
                continue
            if await store.holder(payment_lock(row.network, row.payer, row.nonce)) is not None:
                self._recheck.add(row.id)  # a live request's, or a killed process's until it lapses: asked again
                continue
            # Read again after the lock: a live request stores its answer before it lets its lock go, so
            # a row still without one now was not being answered when the lock was seen free.
            row = await ledger.run(ledger.get, row.id)
            if row is None or not await self._lost(row):
                continue
            outcome, fields = await self._owe(row.id, row.network, row.asset, row.payer, row.amount, "answer_lost")
            if outcome == "settled":  # its request claimed the answer meanwhile (a lock Redis lost)
                continue
            log.warning("payment %d was settled with no answer (its request died): refund %s", row.id, fields["refund"])
            if self.audit is not None:
                self.audit.submit(_refund_events(row.request_id, row.id, row.amount, "answer_lost", fields,
                                                 row.payer, row.tool))
            owed.append(row.id)
        return owed

    @staticmethod
    async def orphaned(store: StateStore, row: Payment) -> bool:
        """A ``settling`` row no live request holds (its payment lock free): its process died, and the
        resolver follows it now rather than at that process's next start-up."""
        try:
            return await store.holder(payment_lock(row.network, row.payer, row.nonce)) is None
        except StoreUnavailable:  # cannot tell: left to its request, or to the next round
            return False

    async def _lost(self, row: Payment) -> bool:
        """Settled ``upfront``, no refund, no upstream status, no stored answer."""
        return (row.state == PaymentState.SETTLED and row.settle_mode == "upfront" and row.refund_owed is None
                and row.upstream_status is None and await self.ledger.run(self.ledger.stored_response, row.id) is None)

    async def _owe(self, payment_id: int, network: str, asset: str, payer: str | None, amount: int,
                   reason: str) -> tuple[str, dict[str, Any]]:
        """The refund recorded (once), then paid if a refund signer exists: the outcome and the fields."""
        ledger = self.ledger
        owed = {"refund": "owed", "refundAmount": str(amount)}
        if reason == "answer_lost":  # only while no answer is claimed: never an answer and its refund
            first = await ledger.run(ledger.record_answer_lost, payment_id, amount)
            row = None if first else await ledger.run(ledger.get, payment_id)
            if row is not None and row.refund_owed is None:  # the answer was claimed: it is being given
                return "settled", {"refund": "none"}
        else:
            first = await ledger.run(ledger.record_refund_owed, payment_id, amount, reason)
        if not first:  # another request owes it (the locks were lost): that one pays it, not this one
            return "refund_owed", owed
        if self.refunder is None or not self.refunder.can_refund(network) or payer is None:
            return "refund_owed", owed

        claimed: list[str] = []

        async def before_send(tx_hash: str) -> None:
            # A second signature (the first refused for a stale nonce, so it never lands: the refund
            # account is shared with `ledger refunds --pay`) replaces this request's own claim.
            if not await ledger.run(ledger.record_refund_tx, payment_id, tx_hash, claimed[-1] if claimed else None):
                raise _ClaimedElsewhere  # `ledger refunds --pay` took it meanwhile: never broadcast twice
            claimed.append(tx_hash)

        try:
            result = await self.refunder.refund(network, asset, payer, amount, before_send)
        except _ClaimedElsewhere:
            return "refund_owed", owed
        if result.refused and claimed:  # never left: `ledger refunds --pay` finds it unpaid, not unknown
            await ledger.run(ledger.record_refund_tx, payment_id, None, claimed[-1])
        if result.confirmed:
            await ledger.run(ledger.record_refund_paid, payment_id, result.tx_hash)
            return "refunded", {"refund": "refunded", "refundAmount": str(amount), "refundTransaction": result.tx_hash}
        return "refund_owed", {**owed, "refundTransaction": result.tx_hash}
