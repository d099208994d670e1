"""Money moves exactly once per paid request: concurrency, retries, disconnects, pending
settlements, kill -9, two replicas, and settle-first tools with refunds. Real anvil, Redis,
PostgreSQL; after each test the ledger and the chain agree."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.devkit.payer import Payer
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, body_json, demo_catalog, fresh_redis_prefix, offer_of, running_devchain, upstream_hits
from tests.e2e.test_paid_call import receipt_of
from tests.support.processes import gateway_processes

PAYER = 6
PRICE = 2000  # get_quote


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: these tests switch automining off and on."""
    with running_devchain(tmp_path_factory.mktemp("chain")) as private:
        yield private


def wait_for(predicate: Callable[[], Any], what: str, attempts: int = 600) -> Any:
    """Poll a condition on real state (ledger rows), bounded; each attempt waits on an Event."""
    pause = threading.Event()
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        pause.wait(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def signed(client: httpx.Client, chain: Devchain, path: str, identifier: str | None = None, payer: int = PAYER) -> str:
    offer = offer_of(client.get(path))
    payment = Payer(chain.key(payer)).sign(offer.accepts[0], resource=offer.resource).to_wire()
    if identifier is not None:
        payment["extensions"] = {"payment-identifier": {"info": {"required": False, "id": identifier}}}
    return encode_header(payment)


def assert_ledger_matches_chain(ledger: Ledger, chain: Devchain, pay_to_before: int) -> None:
    rows = ledger.all()
    settled = sum(r.amount for r in rows if r.state == PaymentState.SETTLED)
    refunded = sum(r.amount for r in rows if r.state == PaymentState.SETTLED and r.refunded_at is not None)
    assert chain.balance(PAY_TO) - pay_to_before == settled - refunded


def raw_request(port: int, path: str, header: str) -> socket.socket:
    """Send a GET and leave the connection open without reading: a client we can cut off."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nPAYMENT-SIGNATURE: {header}\r\nConnection: close\r\n\r\n".encode()
    )
    return sock


def row_for(ledger: Ledger, predicate: Callable[[Payment], bool]) -> Payment | None:
    return next((r for r in ledger.all() if predicate(r)), None)


def test_eight_concurrent_requests_with_one_payment_settle_once(
    start_gateway: Any, chain: Devchain, upstream: str
) -> None:
    gateway = start_gateway(deployment_file=chain.deployment_file)
    before = chain.balance(PAY_TO)
    with gateway.client() as client:
        header = signed(client, chain, "/quotes/CONC")

    def call(_: int) -> httpx.Response:
        return httpx.get(f"{gateway.url}/quotes/CONC", headers={"PAYMENT-SIGNATURE": header}, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, range(8)))
    fresh = [r for r in responses if r.status_code == 200 and "x402gw-replay" not in r.headers]
    assert len(fresh) == 1
    for other in responses:
        if other is not fresh[0]:
            assert other.status_code in (200, 409), other.text
            if other.status_code == 409:
                assert body_json(other)["error"] == "payment_in_flight"
            else:
                assert other.headers["x402gw-replay"] == "true" and other.content == fresh[0].content
    assert chain.balance(PAY_TO) - before == PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/CONC") == 1
    assert_ledger_matches_chain(gateway.ledger, chain, before)


def test_eight_concurrent_fresh_payments_with_one_identifier_settle_once(
    start_gateway: Any, chain: Devchain, upstream: str
) -> None:
    gateway = start_gateway(deployment_file=chain.deployment_file)
    before = chain.balance(PAY_TO)
    identifier = f"pay_{uuid.uuid4().hex}"
    with gateway.client() as client:
        headers = [signed(client, chain, "/quotes/IDEM", identifier) for _ in range(8)]

    def call(header: str) -> httpx.Response:
        return httpx.get(f"{gateway.url}/quotes/IDEM", headers={"PAYMENT-SIGNATURE": header}, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(call, headers))
    assert [r.status_code for r in responses].count(200) == 1
    for response in responses:
        if response.status_code != 200:
            assert response.status_code == 409
            assert body_json(response)["error"] in ("payment_in_flight", "payment_identifier_conflict")
    assert chain.balance(PAY_TO) - before == PRICE
    # The same id with the same request and the payment that won replays the stored answer.
    winner = headers[[r.status_code for r in responses].index(200)]
    again = httpx.get(f"{gateway.url}/quotes/IDEM", headers={"PAYMENT-SIGNATURE": winner}, timeout=30)
    assert again.status_code == 200 and again.headers["x402gw-replay"] == "true"
    # The same id on another request is a conflict, not a charge.
    with gateway.client() as client:
        other = client.get("/quotes/OTHER", headers={"PAYMENT-SIGNATURE": signed(client, chain, "/quotes/OTHER", identifier)})
    assert other.status_code == 409 and body_json(other)["error"] == "payment_identifier_conflict"
    assert chain.balance(PAY_TO) - before == PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/IDEM") == 1
    assert_ledger_matches_chain(gateway.ledger, chain, before)


def test_pending_settlement_is_not_served_until_mined_then_served_once(
    start_gateway: Any, chain: Devchain, upstream: str, manual_mining: Callable[[], None]
) -> None:
    gateway = start_gateway(deployment_file=chain.deployment_file, receipt_timeout_seconds=0.5)
    before = chain.balance(PAY_TO)
    with gateway.client() as client:
        header = signed(client, chain, "/quotes/PEND")
        pending = client.get("/quotes/PEND", headers={"PAYMENT-SIGNATURE": header})
        assert pending.status_code == 503, pending.text
        body = body_json(pending)
        assert body["error"] == "settlement_pending" and body["transaction"].startswith("0x")
        assert "symbol" not in body and "payment-required" not in pending.headers
        assert pending.headers["retry-after"]
        [row] = gateway.ledger.all()
        assert row.state == PaymentState.PENDING and row.tx_hash == body["transaction"]
        still = client.get("/quotes/PEND", headers={"PAYMENT-SIGNATURE": header})
        assert still.status_code == 503 and body_json(still)["transaction"] == body["transaction"]
        manual_mining()
        served = client.get("/quotes/PEND", headers={"PAYMENT-SIGNATURE": header})
        assert served.status_code == 200, served.text
        assert served.json()["symbol"] == "PEND"
        assert receipt_of(served).transaction == body["transaction"]
        again = client.get("/quotes/PEND", headers={"PAYMENT-SIGNATURE": header})
        assert again.status_code == 200 and again.content == served.content
    assert chain.balance(PAY_TO) - before == PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/PEND") == 1
    assert_ledger_matches_chain(gateway.ledger, chain, before)


def test_client_disconnect_during_settlement_charges_once_and_keeps_the_answer(
    start_gateway: Any, chain: Devchain, upstream: str, manual_mining: Callable[[], None]
) -> None:
    gateway = start_gateway(deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    before = chain.balance(PAY_TO)
    with gateway.client() as client:
        header = signed(client, chain, "/quotes/DISC")
    port = int(gateway.url.rsplit(":", 1)[1])
    sock = raw_request(port, "/quotes/DISC", header)
    wait_for(lambda: row_for(gateway.ledger, lambda r: r.tx_hash is not None), "the settlement broadcast")
    sock.close()  # the client goes away while the transaction is in flight
    manual_mining()
    wait_for(lambda: row_for(gateway.ledger, lambda r: r.state == PaymentState.SETTLED), "the settlement")
    resend = httpx.get(f"{gateway.url}/quotes/DISC", headers={"PAYMENT-SIGNATURE": header}, timeout=30)
    assert resend.status_code == 200 and resend.json()["symbol"] == "DISC"
    assert resend.headers["x402gw-replay"] == "true"
    assert chain.balance(PAY_TO) - before == PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/DISC") == 1
    assert_ledger_matches_chain(gateway.ledger, chain, before)


def process_env(chain: Devchain, catalog: Path, database_url: str, **extra: str) -> dict[str, str]:
    return {
        "X402GW_CATALOG": str(catalog),
        "X402GW_DEPLOYMENT_FILE": str(chain.deployment_file),
        "X402GW_DATABASE_URL": database_url,
        **extra,
    }


def test_kill_9_after_broadcast_then_restart_neither_charges_twice_nor_asks_again(
    chain: Devchain, upstream: str, tmp_path: Path, manual_mining: Callable[[], None]
) -> None:
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    env = process_env(chain, demo_catalog(tmp_path, upstream), database_url, X402GW_RECEIPT_TIMEOUT_SECONDS="60")
    ledger = open_ledger(database_url)
    before = chain.balance(PAY_TO)
    with gateway_processes([env], tmp_path) as [gateway]:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            header = signed(client, chain, "/quotes/KILL")
        sock = raw_request(gateway.port, "/quotes/KILL", header)
        row = wait_for(lambda: row_for(ledger, lambda r: r.tx_hash is not None), "the settlement broadcast")
        assert row.state == PaymentState.SETTLING
        gateway.kill9()
        sock.close()
    manual_mining()  # the broadcast transaction lands while no gateway runs
    with gateway_processes([env], tmp_path) as [restarted]:
        # start-up reconcile resolved the open row against the chain
        [row] = ledger.all()
        assert row.state == PaymentState.SETTLED and row.tx_hash is not None
        resend = httpx.get(f"{restarted.url}/quotes/KILL", headers={"PAYMENT-SIGNATURE": header}, timeout=30)
    assert resend.status_code == 200, resend.text
    assert resend.json()["symbol"] == "KILL"
    assert receipt_of(resend).transaction == row.tx_hash
    assert chain.balance(PAY_TO) - before == PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/KILL") == 1
    assert_ledger_matches_chain(ledger, chain, before)
    ledger.close()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    with fresh_redis_prefix("test") as prefix:
        yield prefix


def test_two_replicas_sharing_redis_and_postgres_settle_once(
    chain: Devchain, upstream: str, tmp_path: Path, postgres_database: str, redis_prefix: str
) -> None:
    env = process_env(
        chain, demo_catalog(tmp_path, upstream), postgres_database,
        X402GW_REDIS_URL="redis://127.0.0.1:6379/0", X402GW_REDIS_PREFIX=redis_prefix,
    )
    ledger = open_ledger(postgres_database)
    settled_before = sum(r.amount for r in ledger.all() if r.state == PaymentState.SETTLED)
    before = chain.balance(PAY_TO)
    with gateway_processes([env, env], tmp_path) as [one, two]:
        with httpx.Client(base_url=one.url, timeout=30) as client:
            first = signed(client, chain, "/quotes/REPA")
            second = signed(client, chain, "/quotes/REPB")
        # one after the other
        a1 = httpx.get(f"{one.url}/quotes/REPA", headers={"PAYMENT-SIGNATURE": first}, timeout=30)
        a2 = httpx.get(f"{two.url}/quotes/REPA", headers={"PAYMENT-SIGNATURE": first}, timeout=30)
        assert a1.status_code == 200 and a2.status_code == 200
        assert a2.headers["x402gw-replay"] == "true" and a2.content == a1.content
        # at the same time
        barrier = threading.Barrier(2)

        def call(url: str) -> httpx.Response:
            barrier.wait()
            return httpx.get(f"{url}/quotes/REPB", headers={"PAYMENT-SIGNATURE": second}, timeout=30)

        with ThreadPoolExecutor(2) as pool:
            b1, b2 = pool.map(call, [one.url, two.url])
    fresh = [r for r in (b1, b2) if r.status_code == 200 and "x402gw-replay" not in r.headers]
    assert len(fresh) == 1
    other = b2 if fresh[0] is b1 else b1
    assert other.status_code in (200, 409)
    assert chain.balance(PAY_TO) - before == 2 * PRICE
    assert upstream_hits(upstream, "GET /api/v1/quote/REPA") == 1
    assert upstream_hits(upstream, "GET /api/v1/quote/REPB") == 1
    settled_after = sum(r.amount for r in ledger.all() if r.state == PaymentState.SETTLED)
    assert settled_after - settled_before == chain.balance(PAY_TO) - before
    ledger.close()


UPFRONT_TOOL = """
  - name: generate_report_upfront
    description: Generate a report; the generator has side effects, so payment settles first.
    method: GET
    path: /paid-first/reports/{report_id}
    upstream_path: /reports/{report_id}
    price: "0.004"
    settle: upfront
"""


@pytest.mark.parametrize("refund_signer", [False, True], ids=["refund-owed", "refund-paid"])
def test_upfront_tool_whose_upstream_fails_records_and_pays_the_refund(
    start_gateway: Any, chain: Devchain, upstream: str, tmp_path: Path, refund_signer: bool
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    overrides: dict[str, Any] = {"deployment_file": chain.deployment_file}
    if refund_signer:
        overrides["refund_key"] = chain.key(9)  # the payee's account pays refunds back
    gateway = start_gateway(catalog=catalog, **overrides)
    payer = chain.address(PAYER)
    payer_before, pay_to_before = chain.balance(payer), chain.balance(PAY_TO)
    with gateway.client() as client:
        header = signed(client, chain, "/paid-first/reports/500")
        failed = client.get("/paid-first/reports/500", headers={"PAYMENT-SIGNATURE": header})
        ok_header = signed(client, chain, "/paid-first/reports/7")
        ok = client.get("/paid-first/reports/7", headers={"PAYMENT-SIGNATURE": ok_header})
    assert failed.status_code == 500
    assert receipt_of(failed).success  # the payment did settle before the upstream call
    assert ok.status_code == 200 and receipt_of(ok).success
    rows = {r.path: r for r in gateway.ledger.all()}
    refunded_row = rows["/paid-first/reports/500"]
    assert refunded_row.state == PaymentState.SETTLED and refunded_row.settle_mode == "upfront"
    assert refunded_row.refund_owed == 4000 and refunded_row.refund_reason == "upstream_error"
    if refund_signer:
        assert failed.headers["x402gw-refund"].startswith("refunded 0x")
        assert refunded_row.refund_tx is not None and refunded_row.refunded_at is not None
        assert chain.w3.eth.get_transaction_receipt(refunded_row.refund_tx)["status"] == 1
        assert chain.balance(payer) == payer_before - 4000  # only the successful call is paid
        assert chain.balance(PAY_TO) == pay_to_before + 4000
    else:
        assert failed.headers["x402gw-refund"] == "owed"
        assert refunded_row.refund_tx is None and refunded_row.refunded_at is None
        assert chain.balance(payer) == payer_before - 8000
        assert chain.balance(PAY_TO) == pay_to_before + 8000
    assert upstream_hits(upstream, "GET /reports/500") == 1
    assert_ledger_matches_chain(gateway.ledger, chain, pay_to_before)
