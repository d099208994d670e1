"""Which states each named transition of a payment row may leave (``settlement.ledger.payments``
holds the transitions themselves: the only writes of a row's state), and the values they take."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from settlement.ledger.models import PaymentState

__all__ = ["KEEP", "TRANSITIONS", "gas_fields"]


class _Keep:
    """Leave the column as it is (``None`` clears it)."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Any = _Keep()

_V, _SG, _SD, _F, _P = (s.value for s in (
    PaymentState.VERIFIED, PaymentState.SETTLING, PaymentState.SETTLED, PaymentState.FAILED, PaymentState.PENDING,
))
# The states each transition may leave (see the module docstring).
FROM_BEGIN_SETTLEMENT = (_V, _SG)
FROM_SETTLING = (_SG,)
FROM_MARK_SETTLED = (_SG, _P, _SD)
FROM_MARK_PENDING = (_V, _SG, _P)
FROM_FAIL = (_V, _SG, _P, _F)
FROM_VERIFIED = (_V,)
FROM_SETTLED = (_SD,)
FROM_MINED = (_SD, _F)
_GAS_COLUMNS = frozenset({"gas_used", "gas_price", "gas_cost"})
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "begin_settlement": FROM_BEGIN_SETTLEMENT,
    "record_tx_hash": FROM_SETTLING,
    "mark_settled": FROM_MARK_SETTLED,
    "mark_pending": FROM_MARK_PENDING,
    "fail": FROM_FAIL,
    "void": FROM_VERIFIED,
    "record_upstream_status": FROM_SETTLED,
    "record_answer_lost": FROM_SETTLED,
    "record_refund_owed": FROM_SETTLED,
    "record_refund_tx": FROM_SETTLED,
    "record_refund_paid": FROM_SETTLED,
    "record_gas": FROM_MINED,
}


def gas_fields(gas: Mapping[str, int] | None) -> dict[str, int]:
    if gas is None:
        return {}
    if set(gas) != _GAS_COLUMNS:
        raise ValueError(f"gas is {sorted(_GAS_COLUMNS)}, got {sorted(gas)}")
    return dict(gas)
