"""``encode_batch`` writes ``BatchSettler.settle(token, auths)`` calldata by hand: it must be the
bytes eth_abi's encoder gives for the same arguments, and refuse what eth_abi would refuse."""

from __future__ import annotations

import random

import pytest
from eth_abi import encode as abi_encode
from eth_account import Account

from settlement.schemes.batch import _AUTH_TUPLE, SEL_BATCH_SETTLE, encode_batch
from settlement.schemes.eip712 import TransferAuthorization
from settlement.schemes.exact_local import CheckedPayment


def _payment(rng: random.Random, **auth: object) -> CheckedPayment:
    fields: dict[str, object] = {
        "from_": Account.create().address, "to": Account.create().address.lower(),
        "value": rng.choice([0, 1, 10**6, 2**256 - 1, rng.getrandbits(200)]),
        "valid_after": rng.choice([0, rng.getrandbits(40)]), "valid_before": rng.getrandbits(64),
        "nonce": rng.randbytes(32),
    }
    fields.update(auth)
    signature = rng.randbytes(64) + bytes([rng.choice([0, 1, 27, 28])])
    return CheckedPayment(payer=str(fields["from_"]), token="", auth=TransferAuthorization(**fields), signature=signature)  # type: ignore[arg-type]


def _reference(token: str, items: list[CheckedPayment]) -> bytes:
    auths = []
    for item in items:
        a, sig = item.auth, item.signature
        v = sig[64] + 27 if sig[64] in (0, 1) else sig[64]
        auths.append((a.from_, a.to, a.value, a.valid_after, a.valid_before, a.nonce, v, sig[:32], sig[32:64]))
    return SEL_BATCH_SETTLE + abi_encode(["address", f"{_AUTH_TUPLE}[]"], [token, auths])


@pytest.mark.parametrize("size", [0, 1, 2, 7, 50])
def test_the_calldata_is_eth_abis(size: int) -> None:
    rng = random.Random(size)
    token = Account.create().address
    items = [_payment(rng) for _ in range(size)]
    assert encode_batch(token, items) == _reference(token, items)


@pytest.mark.parametrize(("field", "value"), [
    ("value", 2**256), ("value", -1), ("from_", "0x1234"), ("to", "not an address"), ("nonce", b"\x01" * 31),
])
def test_a_value_out_of_its_type_is_refused(field: str, value: object) -> None:
    rng = random.Random(1)
    with pytest.raises((ValueError, OverflowError)):
        encode_batch(Account.create().address, [_payment(rng), _payment(rng, **{field: value})])


def test_a_bad_token_or_signature_is_refused() -> None:
    rng = random.Random(2)
    with pytest.raises(ValueError):
        encode_batch("0xnot", [_payment(rng)])
    bad = _payment(rng)
    with pytest.raises(ValueError):
        encode_batch(Account.create().address, [CheckedPayment(bad.payer, "", bad.auth, bad.signature[:64] + b"\x05")])
