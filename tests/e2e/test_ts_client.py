"""The official TypeScript client (``@x402/fetch`` + ``@x402/evm`` 2.27.0, viem signer) pays a tool
with several offers (issue 16): two tokens on one anvil and USDC on a second anvil (chain id 31338),
the stack of ``test_several_offers``. Told which offer to pay (the library's policy hook), it pays
that one: exactly that token on that chain moves by exactly that amount from payer to payee, in the
transaction the ledger's one row names, and the upstream runs once. Told nothing, the library pays
the first offer listed. Its signed header sent again gets the stored answer, not a second charge."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from web3 import Web3

from settlement.chain.client import TOPIC_TRANSFER
from settlement.ledger import PaymentState
from settlement.x402.codec import decode_header_json
from tests.conftest import PAY_TO, upstream_hits
from tests.e2e import test_several_offers as several
from tests.e2e.test_several_offers import PAYER, PRICE, PRICE_TWO, SECOND_CHAIN_ID, Offers
from tests.support.ts_payer import ts_pay

QUOTE = "GET /api/v1/quote/ACME"
SECOND = f"eip155:{SECOND_CHAIN_ID}"

# The several-offer stack of test_several_offers, as fixtures here: two anvils with three offered
# tokens (module scope) and a factory of gateways selling get_quote with those offers.
offers = several.offers
start = several.start


def listed(offers: Offers) -> dict[str, tuple[str, str, int]]:
    """The tool's offers in the 402's order: name -> (network, asset, atomic amount)."""
    return {
        "usdc_a": ("eip155:31337", offers.usdc_a, PRICE),
        "two_a": ("eip155:31337", offers.two_a, PRICE_TWO),
        "usdc_b": (SECOND, offers.usdc_b, PRICE),
    }


def allowed(offers: Offers) -> list[tuple[str, str]]:
    """Every offered token, for the client's spend controls (its default list knows none of them)."""
    return [(network, asset) for network, asset, _ in listed(offers).values()]


def transfers(rpc: str, tx_hash: str) -> list[tuple[str, str, str, int]]:
    """The ERC-20 transfers in a mined transaction: (token, from, to, amount)."""
    receipt = Web3(Web3.HTTPProvider(rpc)).eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    assert receipt["status"] == 1
    return [
        (log["address"].lower(), "0x" + bytes(log["topics"][1])[-20:].hex(), "0x" + bytes(log["topics"][2])[-20:].hex(),
         int.from_bytes(bytes(log["data"]), "big"))
        for log in receipt["logs"] if bytes(log["topics"][0]) == TOPIC_TRANSFER
    ]


def assert_paid_once(offers: Offers, gateway: Any, upstream: str, which: str, call: Any) -> dict[str, Any]:
    """Runs ``call`` (a TS-client payment) and asserts it paid offer ``which`` exactly once."""
    network, asset, amount = listed(offers)[which]
    payer = offers.a.address(PAYER)
    payer_before, payee_before = offers.balances(payer), offers.balances(PAY_TO)
    rows_before, hits = len(gateway.ledger.all()), upstream_hits(upstream, QUOTE)
    paid: dict[str, Any] = call()
    assert paid["exit"] == 0 and paid["status"] == 200, paid
    assert paid["body"]["symbol"] == "ACME"
    chosen = paid["chosen"]
    assert (chosen["scheme"], chosen["network"], chosen["asset"], chosen["amount"], chosen["payTo"]) == (
        "exact", network, asset, str(amount), PAY_TO)
    receipt = paid["paymentResponse"]
    assert (receipt["success"], receipt["network"], receipt["amount"], receipt["payer"].lower()) == (
        True, network, str(amount), payer.lower())
    # the header the client sent pays exactly the chosen offer
    sent = decode_header_json(paid["paymentSignature"])
    assert (sent["x402Version"], sent["accepted"]) == (2, chosen)
    assert sent["payload"]["authorization"]["value"] == str(amount)
    # exactly this token on this chain moved, by exactly this amount, from payer to payee
    payer_after, payee_after = offers.balances(payer), offers.balances(PAY_TO)
    assert {k: payer_before[k] - payer_after[k] for k in payer_before} == {k: amount if k == which else 0 for k in payer_before}
    assert {k: payee_after[k] - payee_before[k] for k in payee_before} == {k: amount if k == which else 0 for k in payee_before}
    rpc = offers.b_rpc if network == SECOND else offers.a.anvil.rpc_url
    assert transfers(rpc, receipt["transaction"]) == [(asset.lower(), payer.lower(), PAY_TO.lower(), amount)]
    # one ledger row for the call, naming the offer and the chain's transaction
    rows = gateway.ledger.all()
    assert len(rows) == rows_before + 1
    row = rows[-1]
    assert (row.state, row.network, row.asset, row.amount, row.payer.lower(), row.tx_hash) == (
        PaymentState.SETTLED, network, asset, amount, payer.lower(), receipt["transaction"])
    assert upstream_hits(upstream, QUOTE) == hits + 1
    return paid


@pytest.mark.parametrize("which", ["two_a", "usdc_b"])
def test_the_ts_client_pays_the_offer_it_prefers(offers: Offers, start: Any, upstream: str, which: str) -> None:
    """Offer A (the second token, on the first chain) and offer B (USDC on the second chain)."""
    gateway = start()
    url = f"{gateway.url}/quotes/ACME"
    assert [(a["network"], a["asset"], a["amount"]) for a in httpx.get(url).json()["accepts"]] == [
        (network, asset, str(amount)) for network, asset, amount in listed(offers).values()]
    network, asset, _ = listed(offers)[which]
    assert_paid_once(offers, gateway, upstream, which, lambda: ts_pay(
        url, offers.a.key(PAYER), network=network, asset=asset, allow=allowed(offers),
        networks=["eip155:31337", SECOND]))


def test_without_a_preference_the_ts_client_pays_the_first_offer(offers: Offers, start: Any, upstream: str) -> None:
    """The library's default selector takes the first of the offers it may pay: the catalog's
    ``payment`` (USDC on 31337), registered for every EVM chain (``eip155:*``)."""
    gateway = start()
    url = f"{gateway.url}/quotes/ACME"
    assert_paid_once(offers, gateway, upstream, "usdc_a", lambda: ts_pay(url, offers.a.key(PAYER), allow=allowed(offers)))


def test_the_ts_clients_default_spend_controls_refuse_local_tokens(offers: Offers, start: Any, upstream: str) -> None:
    """Without an opt-in the client pays only tokens on its own list (USDC on public chains):
    it refuses every offer before signing, and nothing is charged or called."""
    gateway = start()
    before = offers.balances(PAY_TO)
    refused = ts_pay(f"{gateway.url}/quotes/ACME", offers.a.key(PAYER))
    assert refused["exit"] == 1 and "rejected by spendControls" in refused["error"], refused
    assert (refused["chosen"], refused["paymentSignature"]) == (None, None)
    assert gateway.ledger.all() == [] and offers.balances(PAY_TO) == before
    assert upstream_hits(upstream, QUOTE) == 0


def test_a_ts_signed_payment_sent_again_is_not_charged_twice(offers: Offers, start: Any, upstream: str) -> None:
    """The same PAYMENT-SIGNATURE header the TS client sent (for USDC on the second chain), sent
    again for the same request: the stored answer, with the first settlement's receipt; no second
    transfer, no second ledger row, no second upstream call."""
    gateway = start()
    url = f"{gateway.url}/quotes/ACME"
    network, asset, _ = listed(offers)["usdc_b"]
    paid = assert_paid_once(offers, gateway, upstream, "usdc_b", lambda: ts_pay(
        url, offers.a.key(PAYER), network=network, asset=asset, allow=allowed(offers)))
    payer = offers.a.address(PAYER)
    payer_before, payee_before, hits = offers.balances(payer), offers.balances(PAY_TO), upstream_hits(upstream, QUOTE)
    again = httpx.get(url, headers={"PAYMENT-SIGNATURE": paid["paymentSignature"]})
    assert again.status_code == 200 and again.headers["x402gw-replay"] == "true", again.text
    assert again.json() == paid["body"]
    assert decode_header_json(again.headers["payment-response"])["transaction"] == paid["paymentResponse"]["transaction"]
    assert (offers.balances(payer), offers.balances(PAY_TO)) == (payer_before, payee_before)
    assert upstream_hits(upstream, QUOTE) == hits
    [row] = gateway.ledger.all()
    assert (row.state, row.tx_hash) == (PaymentState.SETTLED, paid["paymentResponse"]["transaction"])
