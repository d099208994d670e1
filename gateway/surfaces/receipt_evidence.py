"""What a receipt needs besides a settled ledger row: evidence the payment was settled, because a
row is only what the database says (an insider can set a voided payment to ``settled`` with another
payment's real transaction, and the receipt key would attest a charge the chain never made).

Evidence, cheapest first: the audit trail's ``settled`` record of this very payment (its id, its
transaction, its facts agreeing with the row: ``settlement.audit.settled_record``), read by the
payment's request id (indexed); the trail is written a few milliseconds after the answer, so a
receipt asked for at once waits for the writer (``flush``) before looking again. Failing that (a
payment settled by a resolver after its request answered 503 has no such record), its settlement
transaction on chain must have moved this payment: its authorization used there, or (Permit2, upto)
its transfer (``settlement.finance.owed_refunds.charge_shown``, what refunds ask too).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from settlement.audit import AuditTrail, settled_record
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
        """Whether the trail or the chain bears out ``row``'s settlement; ``ChainUnavailable`` when
        only the chain could tell and it does not answer."""
        if self.trail is not None:
            if await self._recorded(row):
                return True
            flush = getattr(self.audit, "flush", None)
            if flush is not None:
                await flush()  # the request's records may still be queued
                if await self._recorded(row):
                    return True
        chain = self.chains.get(row.network)
        if chain is None or not hasattr(chain, "get_receipt") or not row.tx_hash:
            return False
        try:
            return await charge_shown(chain, row, row.amount)
        except ChainUnavailable:
            raise
        except Exception:  # noqa: BLE001 - a node's odd answer about an edited row: no evidence, no receipt
            return False

    async def _recorded(self, row: Payment) -> bool:
        trail = self.trail
        assert trail is not None
        return await asyncio.to_thread(lambda: settled_record(trail.for_request(row.request_id), row))
