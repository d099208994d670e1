"""Public facts buy nothing, replays included (THREATS.md). Once a payment settles, its signed
authorization is public: the settlement transaction's calldata holds every field and the signature,
and the offer it answered is the gateway's public 402. A free-rider who rebuilds that payload must
not get the payer's answer. A payment first sent with a payment-identifier (x402's idempotency key,
which is on no chain) replays only to a resend carrying that same id; the payer's own resend still
gets its answer, once paid."""

from __future__ import annotations

import uuid
from typing import Any

from eth_abi import decode as abi_decode
from web3 import Web3

from gateway.devkit.payer import Payer
from settlement.x402.codec import decode_header_json, encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of, upstream_hits

PAYER = 5
PATH = "/quotes/PUBRP"


def with_identifier(payment: dict[str, Any], identifier: str | None) -> dict[str, Any]:
    if identifier is not None:
        payment["extensions"] = {"payment-identifier": {"info": {"required": False, "id": identifier}}}
    return payment


def rebuilt_from_chain(devchain: Devchain, tx_hash: str, offer_response: Any) -> dict[str, Any]:
    """The payload as anyone can write it: the transaction's calldata and the public offer."""
    calldata = bytes(devchain.w3.eth.get_transaction(tx_hash)["input"])  # type: ignore[arg-type]
    sender, to, value, after, before, nonce, v, r, s = abi_decode(
        ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"], calldata[4:])
    offer = offer_of(offer_response)
    return {
        "x402Version": 2, "resource": offer.resource.model_dump(by_alias=True, exclude_none=True),
        "accepted": offer.accepts[0].to_wire(),
        "payload": {"signature": "0x" + (r + s + bytes([v])).hex(), "authorization": {
            "from": Web3.to_checksum_address(sender), "to": Web3.to_checksum_address(to), "value": str(value), "validAfter": str(after), "validBefore": str(before),
            "nonce": "0x" + nonce.hex()}},
    }


def test_a_payload_rebuilt_from_the_chain_gets_no_answer_without_the_payers_identifier(
    gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    identifier = f"pid-{uuid.uuid4().hex}"
    with gateway.client() as client:
        offer = offer_of(client.get(PATH))
        signed = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
        paid = client.get(PATH, headers={"PAYMENT-SIGNATURE": encode_header(with_identifier(signed, identifier))})
        assert paid.status_code == 200, paid.text
        tx_hash = decode_header_json(paid.headers["payment-response"])["transaction"]
        balance = devchain.balance(PAY_TO)
        forged = rebuilt_from_chain(devchain, tx_hash, client.get(PATH))
        assert forged["payload"] == signed["payload"]  # the chain gave the attacker the very signature

        for guess in (None, f"pid-{uuid.uuid4().hex}"):  # no id, or a guessed one
            attempt = client.get(PATH, headers={"PAYMENT-SIGNATURE": encode_header(with_identifier(dict(forged), guess))})
            assert attempt.status_code == 409, attempt.text
            assert attempt.json()["error"] == "payment_identifier_required"
            assert b"PUBRP" not in attempt.content and b"price" not in attempt.content  # nothing of the answer
            assert "x402gw-replay" not in attempt.headers and "x402gw-receipt" not in attempt.headers

        # the payer's own resend, with its id: the answer it bought, not charged again
        again = client.get(PATH, headers={"PAYMENT-SIGNATURE": encode_header(with_identifier(signed, identifier))})
        assert again.status_code == 200 and again.headers["x402gw-replay"] == "true"
        assert again.content == paid.content
    assert devchain.balance(PAY_TO) == balance  # nothing moved after the first settlement
    assert upstream_hits(upstream, "GET /api/v1/quote/PUBRP") == 1
    rows = [r for r in gateway.ledger.all() if r.tool == "get_quote" and r.payment_identifier == identifier]
    assert len(rows) == 1 and rows[0].tx_hash == tx_hash


def test_with_payment_identifiers_required_no_stored_answer_is_left_to_a_rebuilt_payload(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    """X402GW_PAYMENT_IDENTIFIER=required: the offer declares the extension required, a payment
    without an id is refused before anything is spent (and may then be sent again with one), so
    every settled payment has an id and a payload rebuilt from its transaction replays nothing."""
    gateway = start_gateway(payment_identifier="required")
    path, identifier = "/quotes/PIDRQ", f"pid-{uuid.uuid4().hex}"
    balance = devchain.balance(PAY_TO)
    with gateway.client() as client:
        challenge = client.get(path)
        offer = offer_of(challenge)
        assert offer.extensions is not None and offer.extensions["payment-identifier"]["info"] == {"required": True}
        assert challenge.json()["extensions"]["payment-identifier"]["info"] == {"required": True}  # the body too
        signed = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource).to_wire()

        missing = client.get(path, headers={"PAYMENT-SIGNATURE": encode_header(with_identifier(dict(signed), None))})
        assert missing.status_code == 402 and missing.json()["error"] == "payment_identifier_missing"
        assert "payment-required" in missing.headers  # the offer again, to pay with an id
        assert devchain.balance(PAY_TO) == balance and upstream_hits(upstream, "GET /api/v1/quote/PIDRQ") == 0
        assert not [r for r in gateway.ledger.all() if r.path == path]  # nothing recorded, nothing spent

        # the very same authorization, now with an id: paid and served
        paid = client.get(path, headers={"PAYMENT-SIGNATURE": encode_header(with_identifier(dict(signed), identifier))})
        assert paid.status_code == 200, paid.text
        tx_hash = decode_header_json(paid.headers["payment-response"])["transaction"]
        forged = rebuilt_from_chain(devchain, tx_hash, client.get(path))
        attempt = client.get(path, headers={"PAYMENT-SIGNATURE": encode_header(forged)})
        assert attempt.status_code == 402 and attempt.json()["error"] == "payment_identifier_missing"
        assert paid.content not in attempt.content and "x402gw-replay" not in attempt.headers
        assert "payment-response" not in attempt.headers and "x402gw-receipt" not in attempt.headers
    assert devchain.balance(PAY_TO) == balance + int(offer.accepts[0].amount)  # charged once
    assert upstream_hits(upstream, "GET /api/v1/quote/PIDRQ") == 1
    rows = [r for r in gateway.ledger.all() if r.path == path]
    assert len(rows) == 1 and rows[0].payment_identifier == identifier and rows[0].tx_hash == tx_hash
