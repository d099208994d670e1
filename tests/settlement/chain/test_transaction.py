"""Type-2 transaction encoding and signing, checked byte for byte against eth-account."""

from __future__ import annotations

import rlp
from eth_account import Account
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from settlement.chain.transaction import TransactionSigner, rlp_encode
from settlement.schemes.eip712 import SECP256K1_N

PRIVATE_KEYS = st.integers(min_value=1, max_value=SECP256K1_N - 1).map(lambda k: "0x" + k.to_bytes(32, "big").hex())
ADDRESSES = st.binary(min_size=20, max_size=20).map(to_checksum_address)


@settings(max_examples=40, deadline=None)
@given(
    key=PRIVATE_KEYS,
    chain_id=st.integers(min_value=1, max_value=2**40),
    nonce=st.integers(min_value=0, max_value=2**64 - 1),
    to=ADDRESSES,
    data=st.binary(max_size=600),
    gas=st.integers(min_value=21_000, max_value=30_000_000),
    max_fee=st.integers(min_value=0, max_value=10**20),
    tip=st.integers(min_value=0, max_value=10**20),
    value=st.integers(min_value=0, max_value=10**24),
)
def test_signed_transaction_matches_eth_account(
    key: str, chain_id: int, nonce: int, to: str, data: bytes, gas: int, max_fee: int, tip: int, value: int
) -> None:
    tip = min(tip, max_fee)
    ours = TransactionSigner(key).sign(
        chain_id=chain_id, nonce=nonce, to=to, data=data, gas=gas,
        max_fee_per_gas=max_fee, max_priority_fee_per_gas=tip, value=value,
    )
    reference = Account.from_key(key).sign_transaction({
        "type": 2, "chainId": chain_id, "nonce": nonce, "to": to, "value": value, "data": data, "gas": gas,
        "maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip,
    })
    assert ours.raw == bytes(reference.raw_transaction)
    assert ours.hash == bytes(reference.hash)


@given(st.recursive(st.binary(max_size=80) | st.integers(min_value=0, max_value=2**256), st.lists, max_leaves=20))
def test_rlp_matches_pyrlp(item: object) -> None:
    assert rlp_encode(item) == rlp.encode(item)  # type: ignore[arg-type]
