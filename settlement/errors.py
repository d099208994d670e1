"""Errors of the settlement package.

    SettlementError                 root; every error carries a stable ``code``
    ├── PaymentDecodeError          a payment header or body that cannot be a payment (client fault)
    ├── ChainUnavailable            the chain RPC did not answer usably (infrastructure)
    │   └── BroadcastUncertain      a settlement was sent and its acknowledgement lost
    ├── FacilitatorUnavailable      a facilitator did not answer usably (infrastructure)
    ├── LedgerError                 the ledger database failed (infrastructure)
    └── ExportError                 an export filter or option that cannot be used; also a ValueError
                                    (settlement.finance.export)

    Private signals that never leave their module stay plain exceptions: the local facilitator's
    ``Rejected`` (turned into a ``VerifyResponse`` value) and the batch settler's ``_HooksFailed``.

Expected payment failures (bad signature, wrong amount, nonce used) are not exceptions: they are
values, ``VerifyResponse(is_valid=False, invalid_reason=...)`` and
``SettleResponse(success=False, error_reason=...)``.
"""

from __future__ import annotations

__all__ = [
    "BroadcastUncertain",
    "ChainUnavailable",
    "FacilitatorUnavailable",
    "LedgerError",
    "PaymentDecodeError",
    "SettlementError",
]


class SettlementError(Exception):
    code = "settlement_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class PaymentDecodeError(SettlementError):
    code = "invalid_payment"


class ChainUnavailable(SettlementError):
    code = "chain_unavailable"


class FacilitatorUnavailable(SettlementError):
    code = "facilitator_unavailable"


class LedgerError(SettlementError):
    code = "ledger_unavailable"


class BroadcastUncertain(ChainUnavailable):
    """The transaction was signed and sent but the node's answer was lost: it may be on chain."""

    code = "settlement_broadcast_uncertain"

    def __init__(self, tx_hash: str) -> None:
        super().__init__("settlement transaction sent, acknowledgement lost")
        self.tx_hash = tx_hash
