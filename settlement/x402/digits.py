"""Whether outside text is a whole number the gateway may read with ``int()``.

``str.isdigit()`` says yes to digits of every script and to superscripts ("²", "٣"), which ``int()``
then refuses or reads (a 500 on a hostile header, or a number the payer did not write in ASCII), and
``int()`` refuses more than 4,300 digits. A payment's numbers are uint256 (at most 78 digits)."""

from __future__ import annotations

__all__ = ["UINT256_DIGITS", "is_digits"]

UINT256_DIGITS = 78


def is_digits(text: object, max_digits: int = UINT256_DIGITS) -> bool:
    """``text`` is a str of 1 to ``max_digits`` ASCII digits."""
    return isinstance(text, str) and 0 < len(text) <= max_digits and text.isascii() and text.isdigit()
