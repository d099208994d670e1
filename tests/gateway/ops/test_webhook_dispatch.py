"""Webhook outbox and dispatcher against real SQLite and PostgreSQL ledgers and a real HTTP receiver
on loopback: each ledger transition writes its event in its own transaction; the dispatcher
delivers it signed, retries a receiver that is down on an injected clock, never lets two
dispatchers deliver a leased row, and the endpoint's secret shows in no log and no admin answer."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from sqlalchemy import text

from gateway.errors import GatewayConfigError
from gateway.ops.webhooks import Dispatcher, Endpoint, endpoints_from_settings, exponential_backoff, verify
from gateway.ops.webhooks.config import subscriptions_of
from gateway.ops.webhooks.signing import signature_header
from settlement.ledger import Ledger, outbox
from settlement.schema import open_ledger
from tests.support.processes import free_port
from tests.support.settlement_helpers import ledger_fields
from tests.support.webhook_receiver import Receiver

T = TypeVar("T")
Runner = Callable[[Awaitable[int]], int]
SECRET = "whsec-test-3b1f9c0e77a2-never-logged"
TX = "0x" + "cd" * 32


class Clock:
    """Time as the test says: starts now (after the events it delivers were written), moved by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_database")
    book = open_ledger(url)
    with book.engine.begin() as conn:  # the PostgreSQL database lives for the whole session
        for table in ("webhook_outbox", "stored_responses", "payments"):
            conn.execute(text(f"DELETE FROM {table}"))
    yield book
    book.close()


@pytest.fixture
def run() -> Iterator[Runner]:
    """One event loop for the whole test (the dispatcher's HTTP client keeps its connections)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hooks = Receiver(SECRET.encode()).start()
    yield hooks
    hooks.stop()


def endpoint(url: str, events: tuple[str, ...] = ("payment.settled", "payment.pending", "refund.owed")) -> Endpoint:
    return Endpoint("erp", "acme", url, frozenset(events), SECRET.encode())


def settle_one(ledger: Ledger, i: int = 1) -> int:
    row = ledger.record_verified(**ledger_fields(i))
    ledger.begin_settlement(row.id, None, tx_hash=TX)
    ledger.mark_settled(row.id, tx_hash=TX, block_number=9)
    return row.id


def rows(ledger: Ledger) -> list[dict[str, Any]]:
    with ledger.outbox_transaction() as connection:
        return [dict(r) for r in outbox.list_rows(connection)]


def test_a_settled_payment_is_delivered_signed_once(ledger: Ledger, receiver: Receiver, run: Runner) -> None:
    hook = endpoint(receiver.url)
    ledger.subscriptions = subscriptions_of({"erp": hook})
    pid = settle_one(ledger)
    ledger.mark_settled(pid, tx_hash=TX, block_number=9)  # a reconcile that got there first: no new event
    [row] = rows(ledger)
    assert (row["event_type"], row["status"], row["endpoint"]) == ("payment.settled", "pending", "erp")

    dispatcher = Dispatcher(ledger, {"erp": hook}, clock=Clock())
    assert run(dispatcher.run_once()) == 1
    [delivery] = receiver.accepted()
    assert delivery.signed and delivery.event_id == row["event_id"] and delivery.event_type == "payment.settled"
    data = delivery.body["data"]
    assert (data["paymentId"], data["state"], data["transaction"], data["amount"]) == (pid, "settled", TX, "1001")
    assert delivery.body["id"] == delivery.event_id and delivery.body["owner"] == "acme"
    assert rows(ledger)[0]["status"] == "delivered"
    assert run(dispatcher.run_once()) == 0  # nothing left to deliver


def test_without_subscriptions_a_transition_writes_no_event(ledger: Ledger) -> None:
    settle_one(ledger)
    assert rows(ledger) == []


def test_an_event_stands_or_falls_with_its_transition(ledger: Ledger) -> None:
    """The outbox insert is in the transition's transaction: if it fails, the state change is undone."""
    def broken(owner: str, event_type: str) -> list[str]:
        raise RuntimeError("subscriptions unavailable")

    row = ledger.record_verified(**ledger_fields(2))
    ledger.begin_settlement(row.id, None, tx_hash=TX)
    ledger.subscriptions = broken
    with pytest.raises(RuntimeError):
        asyncio.run(ledger.run(ledger.mark_settled, row.id, tx_hash=TX, block_number=9))
    assert ledger.get(row.id).state == "settling"  # type: ignore[union-attr]
    assert rows(ledger) == []


def test_a_receiver_that_is_down_gets_the_event_after_it_returns(ledger: Ledger, run: Runner,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there yet: the receiver is down
    hook = endpoint(f"http://127.0.0.1:{port}/hooks")
    ledger.subscriptions = subscriptions_of({"erp": hook})
    settle_one(ledger)
    clock = Clock()
    dispatcher = Dispatcher(ledger, {"erp": hook}, clock=clock)
    caplog.set_level(logging.DEBUG)

    assert run(dispatcher.run_once()) == 0
    [row] = rows(ledger)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 1, "connection_failed")
    assert row["next_attempt_at"].replace(tzinfo=UTC) == clock.now + exponential_backoff(1)
    assert run(dispatcher.run_once()) == 0 and rows(ledger)[0]["attempts"] == 1  # not due yet

    receiver = Receiver(SECRET.encode(), down=True).start(port)  # up, but answering 503
    try:
        clock.now += exponential_backoff(1)
        assert run(dispatcher.run_once()) == 0
        assert (rows(ledger)[0]["attempts"], rows(ledger)[0]["last_status"]) == (2, 503)
        receiver.down = False
        clock.now += exponential_backoff(2) - timedelta(seconds=1)
        assert run(dispatcher.run_once()) == 0  # a second early
        clock.now += timedelta(seconds=1)
        assert run(dispatcher.run_once()) == 1
        assert [d.signed for d in receiver.accepted()] == [True]
        assert len({d.event_id for d in receiver.deliveries}) == 1  # every attempt: the same event id
    finally:
        receiver.stop()
    assert rows(ledger)[0]["status"] == "delivered"
    assert SECRET not in caplog.text and "failed (connection_failed)" in caplog.text


def test_a_leased_row_is_delivered_by_one_dispatcher_only(ledger: Ledger, receiver: Receiver, run: Runner) -> None:
    hook = endpoint(receiver.url)
    ledger.subscriptions = subscriptions_of({"erp": hook})
    settle_one(ledger)
    clock = Clock()
    first = Dispatcher(ledger, {"erp": hook}, clock=clock, lease=timedelta(seconds=30))
    second = Dispatcher(ledger, {"erp": hook}, clock=clock, lease=timedelta(seconds=30))
    [row] = rows(ledger)
    assert first._claim(int(row["id"]), clock.now)  # the first replica took it, then stalled
    assert run(second.run_once()) == 0 and receiver.deliveries == []
    clock.now += timedelta(seconds=30)  # the lease ran out (the first replica died)
    assert run(second.run_once()) == 1
    # The first replica's late answer cannot overwrite the row: its lease is gone.
    assert not first._finish(int(row["id"]), delivered=False, now=clock.now, next_attempt_at=clock.now,
                             status_code=None, error="timeout")
    assert rows(ledger)[0]["status"] == "delivered" and len(receiver.accepted()) == 1


def test_the_signature_a_receiver_checks() -> None:
    body = b'{"id":"evt_1"}'
    header = signature_header(b"k", 1_700_000_000, body)
    assert verify(b"k", header, body, now=1_700_000_100)
    assert not verify(b"k", header, body + b" ", now=1_700_000_100)
    assert not verify(b"other", header, body, now=1_700_000_100)
    assert not verify(b"k", header, body, now=1_700_000_000 + 301)  # too old: a replay


def test_endpoints_read_their_secret_from_the_environment_or_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "hook.secret"
    secret_file.write_text(SECRET + "\n")
    config = {"acme": [{"name": "a", "url": "https://a.example/h", "secret_env": "HOOK_A"},
                       {"name": "b", "url": "https://b.example/h", "events": ["refund.paid"],
                        "secret_file": str(secret_file)}]}
    found = endpoints_from_settings(config, {"HOOK_A": "s3cret-a"})
    assert (found["a"].secret, found["b"].secret, found["b"].events) == (b"s3cret-a", SECRET.encode(),
                                                                         frozenset({"refund.paid"}))
    assert SECRET not in repr(found["b"]) and SECRET not in str(found["b"].describe())
    with pytest.raises(GatewayConfigError) as missing:
        endpoints_from_settings(config, {})
    assert missing.value.code == "webhook_secret_missing" and "HOOK_A" in missing.value.message
    with pytest.raises(GatewayConfigError) as unknown:
        endpoints_from_settings({"acme": [{"name": "c", "url": "https://c.example", "events": ["payment.lost"],
                                           "secret_env": "HOOK_A"}]}, {"HOOK_A": "x"})
    assert unknown.value.code == "webhook_invalid"


def test_each_payment_transition_writes_its_event(ledger: Ledger) -> None:
    every = Endpoint("all", "acme", "https://all.example/h", frozenset(outbox.EVENTS), SECRET.encode())
    other = Endpoint("other", "globex", "https://other.example/h", frozenset(outbox.EVENTS), SECRET.encode())
    ledger.subscriptions = subscriptions_of({"all": every, "other": other})
    row = ledger.record_verified(**ledger_fields(3))
    ledger.begin_settlement(row.id, None, tx_hash=TX)
    ledger.mark_pending(row.id, tx_hash=TX, error_reason="settlement_pending")
    ledger.mark_pending(row.id, tx_hash=TX)  # still pending: no second event
    ledger.mark_settled(row.id, tx_hash=TX, block_number=9)
    ledger.record_refund_owed(row.id, 1003, "upstream_error")
    ledger.record_refund_paid(row.id, "0x" + "ef" * 32)
    failed = ledger.record_verified(**ledger_fields(4))
    ledger.fail(failed.id, "settlement_unavailable")
    events = [(r["event_type"], r["endpoint"], r["owner"]) for r in reversed(rows(ledger))]
    assert events == [
        ("payment.pending", "all", "acme"), ("payment.settled", "all", "acme"), ("refund.owed", "all", "acme"),
        ("refund.paid", "all", "acme"), ("payment.failed", "all", "acme"),
    ]  # globex's endpoint hears nothing of acme's payments
    refund = json.loads(rows(ledger)[1]["payload"])  # newest first: payment.failed, then refund.paid
    assert refund["type"] == "refund.paid" and refund["data"]["refundTransaction"] == "0x" + "ef" * 32


def test_two_concurrent_identical_transitions_write_one_event(postgres_database: str) -> None:
    """PostgreSQL, two threads settling the same row at once (the request path and a reconcile):
    the second waits on the first's row lock, then sees it settled: one event, not two."""
    ledger = open_ledger(postgres_database)
    try:
        with ledger.engine.begin() as conn:
            for table in ("webhook_outbox", "stored_responses", "payments"):
                conn.execute(text(f"DELETE FROM {table}"))
        ledger.subscriptions = subscriptions_of({"erp": endpoint("https://erp.example/h")})
        row = ledger.record_verified(**ledger_fields(5))
        ledger.begin_settlement(row.id, None, tx_hash=TX)
        with ledger.engine.connect() as holder, holder.begin():  # holds the row until both wait on it
            holder.execute(text("SELECT id FROM payments WHERE id = :id FOR UPDATE"), {"id": row.id})
            threads = [threading.Thread(target=ledger.mark_settled, args=(row.id,), kwargs={"tx_hash": TX})
                       for _ in range(2)]
            for thread in threads:
                thread.start()
            waiting = threading.Event()
            # Until both transitions wait on the lock (a condition, polled; pg_stat_activity is a
            # snapshot per transaction, hence a connection of its own in autocommit).
            with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as probe:
                for _ in range(2000):
                    blocked = probe.execute(text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                    )).scalar_one()
                    if blocked >= 2:
                        break
                    waiting.wait(0.005)
            assert blocked >= 2
        for thread in threads:
            thread.join(20)
        assert ledger.get(row.id).state == "settled"  # type: ignore[union-attr]
        assert [r["event_type"] for r in rows(ledger)] == ["payment.settled"]
    finally:
        ledger.close()
