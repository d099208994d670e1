"""The gateway with batched settlement on a real anvil: concurrent paid calls share one transaction."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, offer_of
from tests.e2e.test_paid_call import receipt_of

PAYERS = (1, 3, 5, 6, 7)


def test_concurrent_paid_calls_settle_in_one_batch(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    # Flushed by count (the fifth payment), not by time: a loaded machine may spread the five over more than any wait.
    gateway = start_gateway(batch_settlement={"eip155:31337": {"max_wait_ms": 10_000, "max_payments": len(PAYERS)}})
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/BATCH"))
    headers = [encode_header(Payer(devchain.key(i)).sign(offer.accepts[0], resource=offer.resource)) for i in PAYERS]
    before_pay_to = devchain.balance(PAY_TO)

    def call(header: str) -> httpx.Response:
        with gateway.client() as client:
            return client.get("/quotes/BATCH", headers={"PAYMENT-SIGNATURE": header})

    with ThreadPoolExecutor(len(headers)) as pool:
        responses = list(pool.map(call, headers))
    assert [r.status_code for r in responses] == [200] * len(PAYERS), [r.text for r in responses]
    receipts = [receipt_of(r) for r in responses]
    assert all(r.success for r in receipts)
    [tx_hash] = {r.transaction for r in receipts}
    chain_receipt = devchain.w3.eth.get_transaction_receipt(tx_hash)
    assert chain_receipt["status"] == 1 and chain_receipt["to"] == devchain.deployment.batch_settler
    assert devchain.balance(PAY_TO) == before_pay_to + 2000 * len(PAYERS)
    rows = gateway.ledger.all()
    assert len(rows) == len(PAYERS)
    assert {row.state for row in rows} == {PaymentState.SETTLED}
    assert {row.tx_hash for row in rows} == {tx_hash}
    assert {row.block_number for row in rows} == {chain_receipt["blockNumber"]}


def test_a_used_authorization_in_a_batch_is_refused_alone(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    """The first gateway settles a payment; the second, batching, gets it again with fresh ones."""
    plain = start_gateway()
    batching = start_gateway(batch_settlement={"eip155:31337": {"max_wait_ms": 50, "max_payments": 50}})
    with plain.client() as client:
        offer = offer_of(client.get("/quotes/USED"))
        used = encode_header(Payer(devchain.key(2)).sign(offer.accepts[0], resource=offer.resource))
        assert client.get("/quotes/USED", headers={"PAYMENT-SIGNATURE": used}).status_code == 200
    with batching.client() as client:
        fresh = encode_header(Payer(devchain.key(2)).sign(offer_of(client.get("/quotes/USED")).accepts[0]))
        ok = client.get("/quotes/USED", headers={"PAYMENT-SIGNATURE": fresh})
        again = client.get("/quotes/USED", headers={"PAYMENT-SIGNATURE": used})
    assert ok.status_code == 200 and receipt_of(ok).success
    # Caught at verify (authorizationState), before any batch: a 402, and nothing recorded as paid.
    assert again.status_code == 402
    assert [row.state for row in batching.ledger.all()] == [PaymentState.SETTLED]
