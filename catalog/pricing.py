"""Exact conversion between decimal token amounts and integer atomic units.

Money is an ``int`` of atomic units inside the program and a decimal string at the edges;
a float never touches it, so nothing here rounds.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = ["MAX_DIGITS", "format_amount", "to_atomic"]

# No token has supply near 10**80 atomic units (uint256 tops out at ~1.2e77); the cap keeps a
# typo like "1e999999999" from making a gigantic integer.
MAX_DIGITS = 80


def _check_decimals(decimals: int) -> None:
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 36:
        raise ValueError(f"decimals must be an integer between 0 and 36, got {decimals!r}")


def to_atomic(amount: Decimal | str | int, decimals: int) -> int:
    """``to_atomic("0.002", 6) == 2000``; ValueError if the amount is not exact in ``decimals``."""
    _check_decimals(decimals)
    if isinstance(amount, bool) or not isinstance(amount, (Decimal, str, int)):
        raise ValueError(f"amount must be a decimal string, int or Decimal, got {type(amount).__name__}")
    try:
        value = amount if isinstance(amount, Decimal) else Decimal(amount.strip() if isinstance(amount, str) else amount)
    except InvalidOperation:
        raise ValueError(f"{amount!r} is not a decimal number") from None
    if not value.is_finite():
        raise ValueError(f"{amount} is not a finite number")
    if value.is_zero():
        return 0
    if value.adjusted() + decimals >= MAX_DIGITS:
        raise ValueError(f"{amount} is too large")
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    coefficient = int("".join(map(str, digits)))
    exponent += decimals
    if exponent >= 0:
        atomic = coefficient * 10**exponent
    else:
        atomic, remainder = divmod(coefficient, 10**-exponent)
        if remainder:
            raise ValueError(f"{value:f} has more digits than the token's {decimals} decimals")
    result: int = -atomic if sign else atomic
    return result


def format_amount(atomic: int, decimals: int) -> str:
    """``format_amount(2000, 6) == "0.002"``: exact, no exponent, trailing zeros trimmed."""
    _check_decimals(decimals)
    if isinstance(atomic, bool) or not isinstance(atomic, int):
        raise ValueError(f"atomic amount must be an int, got {type(atomic).__name__}")
    sign = "-" if atomic < 0 else ""
    digits = str(abs(atomic)).rjust(decimals + 1, "0")
    if decimals == 0:
        return sign + digits
    whole, fraction = digits[:-decimals], digits[-decimals:].rstrip("0")
    return f"{sign}{whole}.{fraction}" if fraction else sign + whole
