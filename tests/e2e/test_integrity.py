"""Issue 13's findings on the paid path, each against a real anvil, the sample upstream and a
gateway on loopback: a settled payment's public facts buy nothing; a replay holds only for the same
signed payload on the same request; a settle-after payment must outlive the upstream; limits are
spent on verified signers only; an upfront answer lost after settlement is refunded, once.

Each test asserts the ledger, the payee's balance on chain and the upstream's call log, not only
the status code."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import delete, update

from gateway.devkit.payer import Payer
from settlement.ledger import Payment, PaymentState, StoredResponse
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, body_json, demo_catalog, offer_of, upstream_hits
from tests.e2e.test_paid_call import receipt_of

VICTIM = 4
ATTACKER = 5
QUOTE_PRICE = 2000


def pay_header(client: httpx.Client, devchain: Devchain, path: str, payer: int, **sign: Any) -> tuple[str, dict[str, Any]]:
    offer = offer_of(client.get(path))
    payment = Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource, **sign).to_wire()
    return encode_header(payment), payment


def forged(payment: dict[str, Any], accepted: dict[str, Any] | None = None, **authorization: Any) -> str:
    """The victim's public facts (payer, nonce) with the attacker's choice of everything else (the
    public offer of any route as ``accepted``) and a junk 65-byte signature."""
    wire = {**payment, "payload": {**payment["payload"]}}
    if accepted is not None:
        wire["accepted"] = accepted
    wire["payload"]["authorization"] = {**payment["payload"]["authorization"], **authorization}
    wire["payload"]["signature"] = "0x" + "11" * 64 + "1b"
    return encode_header(wire)


def settled_rows(gateway: Any) -> list[Payment]:
    return [r for r in gateway.ledger.all() if r.state == PaymentState.SETTLED]


def test_a_settled_payments_public_facts_with_a_junk_signature_get_nothing(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway()
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        header, payment = pay_header(client, devchain, "/quotes/AAPL", VICTIM)
        paid = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": header})
        assert paid.status_code == 200, paid.text
        # the genuine resend of the same payload for the same request is a replay (no second charge)
        again = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": header})
        assert again.status_code == 200 and again.headers["x402gw-replay"] == "true"
        msft_offer = offer_of(client.get("/quotes/MSFT")).accepts[0].to_wire()
        attempts = [
            ("/quotes/AAPL", {"PAYMENT-SIGNATURE": forged(payment, validBefore="1")}),
            ("/quotes/AAPL", {"PAYMENT-SIGNATURE": forged(payment)}),
            ("/quotes/MSFT", {"PAYMENT-SIGNATURE": forged(payment, msft_offer)}),
            ("/quotes/MSFT", {"PAYMENT-SIGNATURE": forged(payment, msft_offer, validBefore="1")}),
        ]
        v1 = {"x402Version": 1, "scheme": "exact", "network": "eip155:31337",
              "payload": {**payment["payload"], "signature": "0x" + "22" * 64 + "1c"}}
        attempts.append(("/quotes/AAPL", {"X-PAYMENT": encode_header(v1)}))
        answers = [client.get(path, headers=headers) for path, headers in attempts]
    for answer in answers:
        assert answer.status_code == 402, answer.text
        assert body_json(answer)["error"] == "invalid_exact_evm_payload_signature"
        assert "x402gw-replay" not in answer.headers
    assert upstream_hits(upstream, "GET /api/v1/quote/AAPL") == 1
    assert upstream_hits(upstream, "GET /api/v1/quote/MSFT") == 0
    assert [r.amount for r in settled_rows(gateway)] == [QUOTE_PRICE]
    assert devchain.balance(PAY_TO) - before == QUOTE_PRICE


def test_a_settled_payload_retargeted_to_another_request_is_a_used_nonce_not_a_replay(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway()
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        header, _ = pay_header(client, devchain, "/quotes/IBM", VICTIM)
        assert client.get("/quotes/IBM", headers={"PAYMENT-SIGNATURE": header}).status_code == 200
        # the same signed payload (valid signature, settled nonce) on another route of the same price
        other = client.get("/quotes/ORCL", headers={"PAYMENT-SIGNATURE": header})
    # the binding in ``accepted.extra`` differs, so it is refused as made for another offer
    assert other.status_code == 402
    assert body_json(other)["error"] == "payment_requirements_mismatch"
    assert "x402gw-replay" not in other.headers
    assert upstream_hits(upstream, "GET /api/v1/quote/ORCL") == 0
    assert devchain.balance(PAY_TO) - before == QUOTE_PRICE


def test_a_retargeted_payload_with_an_edited_binding_verifies_as_fresh_and_is_refused(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    """``extra.requestBinding`` is not signed: a client can rewrite it. What stops a settled payload
    on another request is that it is verified as a fresh payment, and its nonce is spent."""
    gateway = start_gateway()
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        header, payment = pay_header(client, devchain, "/quotes/NFLX", VICTIM)
        assert client.get("/quotes/NFLX", headers={"PAYMENT-SIGNATURE": header}).status_code == 200
        other_offer = offer_of(client.get("/quotes/AMZN"))
        retargeted = {**payment, "accepted": other_offer.accepts[0].to_wire()}
        other = client.get("/quotes/AMZN", headers={"PAYMENT-SIGNATURE": encode_header(retargeted)})
    assert other.status_code == 402, other.text
    assert body_json(other)["error"] == "invalid_exact_evm_nonce_already_used"
    assert upstream_hits(upstream, "GET /api/v1/quote/AMZN") == 0
    assert devchain.balance(PAY_TO) - before == QUOTE_PRICE


def test_a_settle_after_payment_must_outlive_the_upstreams_worst_case(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway()
    tool = gateway.catalogs.tool("get_quote")
    needed = tool.payment_window_seconds
    assert tool.settle == "after" and needed >= tool.max_call_seconds
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        short, _ = pay_header(client, devchain, "/quotes/TSLA", VICTIM, valid_before=int(time.time()) + 8)
        refused = client.get("/quotes/TSLA", headers={"PAYMENT-SIGNATURE": short})
        enough, _ = pay_header(client, devchain, "/quotes/TSLA", VICTIM, valid_before=int(time.time()) + needed + 5)
        served = client.get("/quotes/TSLA", headers={"PAYMENT-SIGNATURE": enough})
    assert refused.status_code == 402
    body = body_json(refused)
    assert body["error"] == "payment_window_too_short" and body["minimumValidSeconds"] == needed
    assert served.status_code == 200, served.text
    assert upstream_hits(upstream, "GET /api/v1/quote/TSLA") == 1  # only the paid call reached it
    assert devchain.balance(PAY_TO) - before == QUOTE_PRICE


def test_state_changing_tools_settle_before_the_upstream_runs(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway()
    assert gateway.catalogs.tool("create_order").settle == "upfront"
    assert gateway.catalogs.tool("request_report").settle == "upfront"  # POST, by default
    payer = Payer(devchain.key(ATTACKER))
    with gateway.client() as client:
        offer = offer_of(client.post("/orders", json={"symbol": "ACME", "quantity": 2}))
        # a payment the chain will refuse (signed for more than the payer holds): nothing may run
        broke = Payer(os.urandom(32).hex())
        payment = broke.sign(offer.accepts[0], resource=offer.resource).to_wire()
        refused = client.post("/orders", json={"symbol": "ACME", "quantity": 2},
                              headers={"PAYMENT-SIGNATURE": encode_header(payment)})
        good = payer.sign(offer.accepts[0], resource=offer.resource).to_wire()
        placed = client.post("/orders", json={"symbol": "ACME", "quantity": 2},
                             headers={"PAYMENT-SIGNATURE": encode_header(good)})
    assert refused.status_code == 402
    assert body_json(refused)["error"] == "invalid_exact_evm_insufficient_balance"
    assert placed.status_code == 201 and receipt_of(placed).success
    assert upstream_hits(upstream, "POST /orders") == 1


def test_junk_headers_naming_a_victim_spend_no_limit_of_the_victim_or_the_tool(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    text = catalog.read_text().replace(
        "    path: /quotes/{symbol}\n",
        "    path: /quotes/{symbol}\n    rate_limits: {per_payer: {requests: 2, window: 1h}, per_tool: {requests: 3, window: 1h}}\n", 1)
    assert "per_payer: {requests: 2" in text
    catalog.write_text(text)
    gateway = start_gateway(catalog, rate_limit_per_client="30/1h")
    victim = devchain.address(VICTIM)
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/GOOG"))
        template = Payer(devchain.key(ATTACKER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
        junk = [client.get("/quotes/GOOG", headers={"PAYMENT-SIGNATURE": forged(
            template, **{"from": victim, "nonce": "0x" + os.urandom(32).hex()})}) for _ in range(10)]
        header, _ = pay_header(client, devchain, "/quotes/GOOG", VICTIM)
        paid = client.get("/quotes/GOOG", headers={"PAYMENT-SIGNATURE": header})
    assert {r.status_code for r in junk} == {402}
    assert paid.status_code == 200, paid.text  # neither the victim's nor the tool's tokens were spent


def test_per_client_limits_requests_that_carry_a_payment_header(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway(rate_limit_per_client="3/1h")
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/META"))  # one token
        template = Payer(devchain.key(ATTACKER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
        answers = [client.get("/quotes/META", headers={"PAYMENT-SIGNATURE": forged(template)}) for _ in range(3)]
    assert [r.status_code for r in answers] == [402, 402, 429]
    assert body_json(answers[-1])["error"] == "rate_limited"


UPFRONT_TOOL = """
  - name: generate_report_upfront
    description: Generate a report; the generator has side effects, so payment settles first.
    method: GET
    path: /paid-first/reports/{report_id}
    upstream_path: /reports/{report_id}
    price: "0.004"
    side_effects: true
"""


def test_an_upfront_answer_lost_after_settlement_is_never_charged_again_and_owes_one_refund(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog)
    assert gateway.catalogs.tool("generate_report_upfront").settle == "upfront"  # side_effects: true
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        header, _ = pay_header(client, devchain, "/paid-first/reports/7", VICTIM)
        assert client.get("/paid-first/reports/7", headers={"PAYMENT-SIGNATURE": header}).status_code == 200
        # The process died between the settlement and the stored answer: the row is settled with
        # no answer (what a kill -9 at that point leaves behind).
        (row,) = [r for r in gateway.ledger.all() if r.path == "/paid-first/reports/7"]
        with gateway.ledger.engine.begin() as connection:
            connection.execute(delete(StoredResponse).where(StoredResponse.payment_id == row.id))
            connection.execute(update(Payment).where(Payment.id == row.id).values(upstream_status=None))
        lost = client.get("/paid-first/reports/7", headers={"PAYMENT-SIGNATURE": header})
        again = client.get("/paid-first/reports/7", headers={"PAYMENT-SIGNATURE": header})
    assert lost.status_code == 502, lost.text
    assert body_json(lost)["error"] == "upstream_answer_lost" and body_json(lost)["refund"] == "owed"
    assert receipt_of(lost).success  # the receipt of the settled payment
    assert again.status_code == 409 and body_json(again)["refund"] == "owed"
    refreshed = gateway.ledger.get(row.id)
    assert refreshed is not None and refreshed.state == PaymentState.SETTLED
    assert refreshed.refund_owed == 4000 and refreshed.refund_reason == "answer_lost"
    assert upstream_hits(upstream, "GET /reports/7") == 1  # never run again
    assert devchain.balance(PAY_TO) - before == 4000  # charged once
