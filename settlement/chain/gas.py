"""Gas the settlement key paid, per payment: what the transaction's receipt reports, shared exactly.

A transaction's cost is ``gasUsed × effectiveGasPrice`` wei (its receipt). A transaction that
settles one payment puts all of it on that payment; a batch (``settlement.schemes.batch``) shares
one transaction among its n payments: each gets ``cost // n`` wei, and the first ``cost % n`` of
them (batch order; ledger id order for ``backfill``) one wei more, so the shares add up to the cost
exactly and never differ by more than one wei. Each row also keeps the transaction's own
``gasUsed`` and ``effectiveGasPrice``, so the shares can be checked against the chain.

The facilitator reports a payment's share in ``SettleResponse.extra`` under ``GAS_KEYS`` (decimal
strings); the gateway takes them off (``take_gas``) before the receipt goes to the payer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from settlement.chain.receipts import Receipt
from settlement.x402.digits import is_digits

__all__ = ["GAS_KEYS", "GasShare", "gas_extra", "receipt_shares", "split_gas", "take_gas"]

GAS_KEYS = ("gasUsed", "effectiveGasPrice", "gasCost")


@dataclass(frozen=True, slots=True)
class GasShare:
    gas_used: int  # the whole transaction's gasUsed
    gas_price: int  # its effectiveGasPrice, wei per gas
    gas_cost: int  # this payment's share of gas_used × gas_price, wei

    def ledger_fields(self) -> dict[str, int]:
        return {"gas_used": self.gas_used, "gas_price": self.gas_price, "gas_cost": self.gas_cost}


def split_gas(gas_used: int, gas_price: int, payments: int) -> list[GasShare]:
    """The transaction's cost shared among ``payments`` payments, exactly (see the module docstring)."""
    if payments < 1:
        raise ValueError("a transaction's gas is shared among one payment or more")
    share, remainder = divmod(gas_used * gas_price, payments)
    return [GasShare(gas_used, gas_price, share + (1 if i < remainder else 0)) for i in range(payments)]


def receipt_shares(receipt: Receipt, payments: int) -> list[GasShare] | None:
    """``split_gas`` of a receipt, or None when the node reported no gas."""
    if receipt.gas_used is None or receipt.effective_gas_price is None:
        return None
    return split_gas(receipt.gas_used, receipt.effective_gas_price, payments)


def gas_extra(share: GasShare | None) -> dict[str, str]:
    """The share for ``SettleResponse.extra`` (empty when unknown)."""
    if share is None:
        return {}
    return {"gasUsed": str(share.gas_used), "effectiveGasPrice": str(share.gas_price), "gasCost": str(share.gas_cost)}


def take_gas(extra: dict[str, Any] | None) -> tuple[dict[str, Any] | None, GasShare | None]:
    """``extra`` without the gas keys, and the share they held (None when absent or malformed)."""
    if not extra or not any(key in extra for key in GAS_KEYS):
        return extra, None
    rest = {key: value for key, value in extra.items() if key not in GAS_KEYS}
    values = [extra.get(key) for key in GAS_KEYS]
    if not all(is_digits(v) for v in values):
        return rest, None
    used, price, cost = (int(v) for v in values)  # type: ignore[arg-type]
    return rest, GasShare(used, price, cost)
