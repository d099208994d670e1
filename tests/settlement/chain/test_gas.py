"""Gas shares (settlement.chain.gas): a transaction's cost split exactly among its payments, and the
gas keys taken off a facilitator's answer before it reaches a payer."""

from __future__ import annotations

from decimal import Decimal

import pytest

from gateway.errors import GatewayConfigError
from gateway.settings import Settings
from settlement.chain.gas import GasShare, gas_extra, split_gas, take_gas


@pytest.mark.parametrize(("gas_used", "price", "payments"), [
    (21_000, 1, 1), (187_345, 875_000_007, 3), (100, 7, 700), (2**63 - 1, 2**70 + 1, 49), (1, 1, 50),
])
def test_a_transaction_cost_is_split_exactly(gas_used: int, price: int, payments: int) -> None:
    shares = split_gas(gas_used, price, payments)
    assert len(shares) == payments
    assert sum(s.gas_cost for s in shares) == gas_used * price
    assert max(s.gas_cost for s in shares) - min(s.gas_cost for s in shares) <= 1
    # The remainder goes one wei each to the first payments, in order.
    assert [s.gas_cost for s in shares] == sorted((s.gas_cost for s in shares), reverse=True)
    assert {(s.gas_used, s.gas_price) for s in shares} == {(gas_used, price)}


def test_no_payments_is_refused() -> None:
    with pytest.raises(ValueError):
        split_gas(21_000, 1, 0)


def test_the_gas_keys_are_taken_off_a_receipt() -> None:
    share = GasShare(50_000, 3, 150_000)
    extra, taken = take_gas({"blockNumber": 7, **gas_extra(share)})
    assert extra == {"blockNumber": 7} and taken == share
    assert take_gas({"blockNumber": 7}) == ({"blockNumber": 7}, None)
    assert take_gas(None) == (None, None)
    assert take_gas({"gasUsed": "1.5", "effectiveGasPrice": "2", "gasCost": "3"}) == ({}, None)  # malformed


def test_native_usd_rates_are_exact_decimals() -> None:
    assert Settings(native_usd_rate={"eip155:8453": "3150.25"}).native_usd_rate == {"eip155:8453": Decimal("3150.25")}
    for wrong in (3150.25, "abc", "-1", "NaN"):
        with pytest.raises(GatewayConfigError):
            Settings(native_usd_rate={"eip155:8453": wrong})
