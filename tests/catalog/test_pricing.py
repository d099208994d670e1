from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from catalog import format_amount, to_atomic


@pytest.mark.parametrize(
    ("amount", "decimals", "atomic"),
    [
        ("0.002", 6, 2000),
        ("0.000001", 6, 1),
        (Decimal("0.000001"), 6, 1),
        ("1", 6, 1_000_000),
        (3, 0, 3),
        ("1.500000", 6, 1_500_000),  # trailing zeros are still exact
        ("1E-6", 6, 1),
        ("0", 6, 0),
        ("123456789012345678901234567890.123456789012345678", 18, 123456789012345678901234567890123456789012345678),
        ("115792089237316195423570985008687907853269984665640564039457.584007913129639935", 18, 2**256 - 1),
        ("-0.5", 6, -500_000),
    ],
)
def test_to_atomic_exact(amount, decimals, atomic):
    assert to_atomic(amount, decimals) == atomic


@pytest.mark.parametrize(
    ("amount", "decimals"),
    [("0.0000001", 6), ("0.5", 0), ("abc", 6), ("NaN", 6), ("Infinity", 6), (True, 6), (0.1, 6), ("1e999999999", 6), ("1", -1), ("1", True)],
)
def test_to_atomic_rejects(amount, decimals):
    with pytest.raises(ValueError):
        to_atomic(amount, decimals)


def test_precision_message():
    with pytest.raises(ValueError, match=r"0\.0000001 has more digits than the token's 6 decimals"):
        to_atomic("0.0000001", 6)


@pytest.mark.parametrize(
    ("atomic", "decimals", "text"),
    [
        (2000, 6, "0.002"),
        (1, 6, "0.000001"),
        (0, 6, "0"),
        (1_000_000, 6, "1"),
        (1_500_000, 6, "1.5"),
        (42, 0, "42"),
        (10**30, 18, "1000000000000"),
        (2**256 - 1, 18, "115792089237316195423570985008687907853269984665640564039457.584007913129639935"),
        (-500_000, 6, "-0.5"),
    ],
)
def test_format_amount(atomic, decimals, text):
    assert format_amount(atomic, decimals) == text
    assert "e" not in text.lower()


def test_format_amount_rejects_non_int():
    with pytest.raises(ValueError):
        format_amount(1.5, 6)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        format_amount(True, 6)


@given(atomic=st.integers(min_value=0, max_value=2**256 - 1), decimals=st.integers(min_value=0, max_value=36))
def test_round_trip_from_atomic(atomic, decimals):
    assert to_atomic(format_amount(atomic, decimals), decimals) == atomic


@given(
    amount=st.decimals(min_value=0, max_value=10**20, allow_nan=False, allow_infinity=False, places=6),
    decimals=st.integers(min_value=6, max_value=18),
)
def test_round_trip_from_decimal(amount, decimals):
    text = format_amount(to_atomic(amount, decimals), decimals)
    assert Decimal(text) == amount
    assert to_atomic(text, decimals) == to_atomic(amount, decimals)
