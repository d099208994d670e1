"""``is_digits``: ASCII digits only, within a length, before any ``int()`` of outside text."""

from __future__ import annotations

import pytest

from settlement.chain.networks import to_caip2, to_legacy
from settlement.x402.digits import is_digits


@pytest.mark.parametrize(("text", "ok"), [
    ("0", True), ("8453", True), ("9" * 78, True), ("9" * 79, False), ("", False), ("\u00b2", False),
    ("\u0663", False), ("\uff13", False), ("-1", False), ("+1", False), (" 1", False), ("1_000", False), (12, False),
])
def test_only_ascii_digits_within_the_length_are_digits(text: object, ok: bool) -> None:
    assert is_digits(text) is ok


def test_a_network_with_a_superscript_chain_id_is_no_network_rather_than_a_crash() -> None:
    assert to_caip2("eip155:\u00b2") is None and to_legacy("eip155:\u00b2") == "eip155:\u00b2"
    assert to_legacy("eip155:" + "1" * 5000) == "eip155:" + "1" * 5000  # int() would refuse 5,000 digits
    assert to_legacy("eip155:8453") == "base"
