"""The calldata the chain client writes out by hand on the paid path equals eth_abi's encoding."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_abi import encode as abi_encode
from hypothesis import given
from hypothesis import strategies as st

from settlement.chain.client import (
    SEL_TRANSFER_WITH_AUTHORIZATION,
    address_word,
    transfer_with_authorization_calldata,
)

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
uints = st.integers(min_value=0, max_value=2**256 - 1)
words = st.binary(min_size=32, max_size=32)


@dataclass(frozen=True)
class Auth:
    from_: str
    to: str
    value: int
    valid_after: int
    valid_before: int
    nonce: bytes


@given(addresses, addresses, uints, uints, uints, words, st.integers(0, 255), words, words)
def test_transfer_with_authorization_calldata_is_eth_abis(
    sender: str, to: str, value: int, after: int, before: int, nonce: bytes, v: int, r: bytes, s: bytes,
) -> None:
    expected = SEL_TRANSFER_WITH_AUTHORIZATION + abi_encode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"],
        [sender, to, value, after, before, nonce, v, r, s],
    )
    assert transfer_with_authorization_calldata(Auth(sender, to, value, after, before, nonce), v, r, s) == expected


@given(addresses)
def test_an_address_word_is_eth_abis(address: str) -> None:
    assert address_word(address) == abi_encode(["address"], [address])


@pytest.mark.parametrize("bad", ["0x1234", "1234" * 10, "0x" + "zz" * 20, ""])
def test_a_malformed_address_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        address_word(bad)


def test_out_of_range_values_are_refused() -> None:
    auth = Auth("0x" + "11" * 20, "0x" + "22" * 20, 2**256, 0, 1, b"\0" * 32)
    with pytest.raises(OverflowError):
        transfer_with_authorization_calldata(auth, 27, b"\0" * 32, b"\0" * 32)
    with pytest.raises(ValueError):
        transfer_with_authorization_calldata(Auth("0x" + "11" * 20, "0x" + "22" * 20, 1, 0, 1, b"\0" * 31), 27, b"\0" * 32, b"\0" * 32)
