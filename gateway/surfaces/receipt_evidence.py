"""What a receipt needs besides a settled ledger row: evidence the payment was settled, because a
row is only what the database says (an insider can set a voided payment to ``settled`` with another
payment's real transaction, and the receipt key would attest a charge the chain never made).

Both must bear it out. The audit trail's ``settled`` records of this very payment (its id), read by
the payment's request id (indexed), must agree with the row in every fact they carry, which are the
fields the receipt signs (``settlement.audit.settled_facts``): one that disagrees refuses the
receipt, and the chain is not asked. The trail is written a few milliseconds after the answer, so
when it has no record of the payment yet the writer is flushed once and the trail read again; a
payment settled by a resolver after its request answered 503 has none at all. Then, always, the
settlement transaction on chain must have moved this payment: its authorization used there, or
(Permit2, upto) its transfer (``settlement.finance.owed_refunds.charge_shown``, what refunds ask
too). The trail has no secret (anyone with the database can append a consistent ``settled``
record), so an agreeing record alone never signs a receipt where the chain can be read; GET
/receipts is not the hot path. On a network the gateway has no chain access to (a remote
facilitator without an RPC URL), the agreeing record is all there is, and it signs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from settlement.audit import AuditTrail, settled_facts
from settlement.errors import ChainUnavailable
from settlement.finance.owed_refunds import charge_shown
from settlement.ledger import Payment

__all__ = ["SettlementEvidence"]


class SettlementEvidence:
    def __init__(self, audit: Any, chains: Mapping[str, Any]) -> None:
        """``audit``: the pipeline's audit sink (an ``AuditWriter`` has the trail); ``chains``: per network."""
        trail = getattr(audit, "trail", None)
        self.trail = trail if isinstance(trail, AuditTrail) else None
        self.audit = audit
        self.chains = chains

    async def confirmed(self, row: Payment) -> bool:
        """Whether the trail and the chain bear out ``row``'s settlement; ``ChainUnavailable`` when the
        chain does not answer. A ``settled`` record of this payment that disagrees with the row is a
        refusal, never a reason to ask the chain instead; one that agrees is not enough alone."""
        if self.trail is not None:
            said = await self._recorded(row)
            flush = getattr(self.audit, "flush", None)
            if said is None and flush is not None:
                await flush()  # the request's records may still be queued
                said = await self._recorded(row)
            if said is False:
                return False
        chain = self.chains.get(row.network)
        if chain is None or not hasattr(chain, "get_receipt"):
            # No chain access on this network (a remote facilitator without an RPC URL): the trail's
            # agreeing record is all there is to hold the row to (none kept: the row, as before).
            return said is True if self.trail is not None else True
        if not row.tx_hash:
            return False
        try:
            return await charge_shown(chain, row, row.amount)
        except ChainUnavailable:
            raise
        except Exception:  # noqa: BLE001 - a node's odd answer about an edited row: no evidence, no receipt
            return False

    async def _recorded(self, row: Payment) -> bool | None:
        """None: the trail has no ``settled`` record of this payment; else whether they all agree with it."""
        trail = self.trail
        assert trail is not None
        return await asyncio.to_thread(lambda: settled_facts(trail.for_request(row.request_id), row))
