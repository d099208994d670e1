"""Signed receipts (settlement.finance.receipts): derived from a ledger row, signed, and checked
offline; every field is signed, so changing any one of them breaks the signature."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from settlement.chain.deployment import ANVIL_KEYS
from settlement.finance.receipts import (
    RECEIPT_TYPES,
    ReceiptInvalid,
    ReceiptSigner,
    receipt_payload,
    recover_receipt_signer,
)
from settlement.ledger import Payment, PaymentState

PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
TX = "0x" + "ab" * 32


def settled_row(**overrides: Any) -> Payment:
    fields: dict[str, Any] = dict(
        id=7, request_id="f" * 32, created_at=datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC), owner="acme", tool="get_quote",
        method="GET", path="/quotes/AAPL", payer=PAYER, pay_to=PAY_TO, amount=2000, network="eip155:31337",
        asset=TOKEN, nonce="0x" + "01" * 32, valid_before=2_000_000_000, state=PaymentState.SETTLED.value,
        authorization=json.dumps({"authorization": {"value": "2000"}, "signature": "0x"}), tx_hash=TX,
        block_number=42, fingerprint="c" * 64,
    )
    fields.update(overrides)
    return Payment(**fields)


SIGNER = ReceiptSigner.from_key(ANVIL_KEYS[8])


def test_a_receipt_is_signed_and_recovers_to_the_receipt_key() -> None:
    receipt = SIGNER.receipt(settled_row(), "https://api.example.com")
    assert receipt["format"] == "eip712"
    assert recover_receipt_signer(receipt) == SIGNER.address
    assert receipt["payload"] == {
        "network": "eip155:31337", "resourceUrl": "https://api.example.com/quotes/AAPL", "payer": PAYER,
        "issuedAt": 1796385600, "transaction": TX, "blockNumber": 42, "payTo": PAY_TO, "asset": TOKEN,
        "amount": "2000", "maxAmount": "2000", "tool": "get_quote", "method": "GET", "argumentsDigest": "c" * 64,
        "paymentId": 7, "requestId": "f" * 32,
    }


def test_the_same_row_gives_the_same_receipt_byte_for_byte() -> None:
    first = SIGNER.receipt(settled_row())
    assert json.dumps(SIGNER.receipt(settled_row()), sort_keys=True) == json.dumps(first, sort_keys=True)
    # A naive created_at (SQLite gives one back) means UTC: the same receipt.
    naive = settled_row(created_at=datetime(2026, 12, 4, 12, 0, 0))
    assert SIGNER.receipt(naive) == first


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        raise AssertionError("no booleans in a receipt")
    if isinstance(value, int):
        return value + 1
    if value.startswith("0x") and len(value) == 42:
        return "0x" + ("1" if value[2] != "1" else "2") + value[3:]  # another address
    if value.isdigit():
        return str(int(value) + 1)
    if value.startswith("eip155:"):
        return "eip155:8453"
    return value + "x"


def assert_not_the_gateways(receipt: dict[str, Any]) -> None:
    """Invalid: malformed (ReceiptInvalid), or it recovers to some other address."""
    try:
        recovered = recover_receipt_signer(receipt)
    except ReceiptInvalid:
        return
    assert recovered != SIGNER.address


@pytest.mark.parametrize("name", [item["name"] for item in RECEIPT_TYPES["Receipt"]])
def test_changing_any_one_field_breaks_the_signature(name: str) -> None:
    receipt = SIGNER.receipt(settled_row())
    tampered = {**receipt, "payload": {**receipt["payload"], name: _changed(receipt["payload"][name])}}
    assert tampered["payload"][name] != receipt["payload"][name]
    assert_not_the_gateways(tampered)


def test_a_changed_signature_or_shape_is_invalid() -> None:
    receipt = SIGNER.receipt(settled_row())
    signature = receipt["signature"]
    flipped = signature[:-4] + ("00" if signature[-4:-2] != "00" else "01") + signature[-2:]
    assert_not_the_gateways({**receipt, "signature": flipped})
    other = ReceiptSigner.from_key(ANVIL_KEYS[7]).receipt(settled_row())
    assert recover_receipt_signer(other) != SIGNER.address
    for broken in (
        {**receipt, "format": "jws"},
        {**receipt, "signature": "0x1234"},
        {**receipt, "payload": {k: v for k, v in receipt["payload"].items() if k != "tool"}},
        {**receipt, "payload": {**receipt["payload"], "extra": "field"}},
        {**receipt, "payload": {**receipt["payload"], "amount": -1}},
        {**receipt, "payload": {**receipt["payload"], "network": "base"}},
        {**receipt, "payload": {**receipt["payload"], "payer": "not an address"}},
    ):
        with pytest.raises(ReceiptInvalid):
            recover_receipt_signer(broken)


@pytest.mark.parametrize("state", [s for s in PaymentState if s != PaymentState.SETTLED])
def test_no_receipt_for_a_payment_that_is_not_settled(state: PaymentState) -> None:
    with pytest.raises(ReceiptInvalid):
        receipt_payload(settled_row(state=state.value))


def test_the_key_is_not_in_the_repr() -> None:
    assert ANVIL_KEYS[8].removeprefix("0x") not in repr(SIGNER)


@pytest.mark.parametrize("overrides", [
    {}, {"amount": 2**255, "tool": "ünïcode tool", "block_number": None}, {"network": "eip155:8453", "path": "/x" * 300},
    {"fingerprint": "", "tx_hash": "0x" + "00" * 32, "amount": 0},
])
def test_the_written_out_digest_and_signature_are_eth_accounts(overrides: dict[str, Any]) -> None:
    """receipt_digest is EIP-712 written out for speed: it hashes what encode_typed_data hashes, and
    the signature is byte for byte the one eth-account's sign_message gives."""
    from eth_account.messages import _hash_eip191_message

    from settlement.finance.receipts import _typed, receipt_digest

    payload = receipt_payload(settled_row(**overrides), "https://api.example.com")
    assert receipt_digest(payload) == _hash_eip191_message(_typed(payload))
    reference = SIGNER.account.sign_message(_typed(payload)).signature
    assert SIGNER.sign(payload)["signature"] == "0x" + bytes(reference).hex()


def test_an_upto_receipt_names_the_signed_maximum_beside_the_charge() -> None:
    upto = json.dumps({"permit2Authorization": {"permitted": {"amount": "10000"}, "witness": {"facilitator": PAY_TO}},
                       "signature": "0x"})
    receipt = SIGNER.receipt(settled_row(authorization=upto, amount=1120))
    assert (receipt["payload"]["amount"], receipt["payload"]["maxAmount"]) == ("1120", "10000")
    assert recover_receipt_signer(receipt) == SIGNER.address
