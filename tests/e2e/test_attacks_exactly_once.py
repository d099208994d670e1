"""Attacks on the exactly-once machinery: the in-flight lock outliving its TTL under a slow upstream
(Redis + PostgreSQL), both payment headers at once, payment-identifier squatting and reuse, and a
settle-first call whose upstream failed resent while its refund is owed. Real anvil, recording
upstream, in-process gateways; the shared invariant checker reads the ledger and the chain."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import gateway.app as gateway_app
from gateway.app import create_app
from gateway.ops.serving import ThreadServer
from gateway.pipeline.stages.exactly_once import request_fingerprint
from gateway.settings import Settings
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO
from tests.support.attack_stack import (
    JUNK_SIGNATURE,
    REDIS_URL,
    Gateway,
    Stack,
    attack_stack,
    error_of,
    offer_for,
    sign,
    v1_header,
    v2_header,
)
from tests.support.recording_upstream import UpstreamCall

SHORT_TTL_MS = 400  # the in-flight lock's TTL in the short-lock gateway: far below its slow upstream
ORDER_BODY = {"symbol": "ACME", "quantity": 1}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with attack_stack(tmp_path_factory.mktemp("exactly-once")) as built:
        yield built


@pytest.fixture(scope="module")
def short_lock(stack: Stack, postgres_database: str) -> Iterator[Gateway]:
    """A replica on Redis and PostgreSQL whose in-flight lock TTL is shorter than its upstream's
    answer takes: what a stream read slowly, a stalled settle or a mis-sized TTL amount to."""
    settings = Settings(
        catalog=[stack.catalog_path], deployment_file=stack.deployment_file, database_url=postgres_database,
        receipt_timeout_seconds=10, redis_url=REDIS_URL, redis_prefix=stack.redis_prefix + "short:",
    )
    ledger = open_ledger(postgres_database)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gateway_app, "lock_ttl_ms", lambda *args, **kwargs: SHORT_TTL_MS)
        server = ThreadServer(create_app(settings, catalogs=stack.catalogs, ledger=ledger)).start()
    try:
        yield Gateway(server.url, "redis", ledger, server)
    finally:
        server.stop()
        ledger.close()


def with_identifier(payload: Any, identifier: str) -> dict[str, Any]:
    wire: dict[str, Any] = payload.to_wire()
    wire["extensions"] = {"payment-identifier": {"info": {"required": False, "id": identifier}}}
    return wire


def test_a_resend_after_the_lock_ttl_passes_mid_call_never_runs_beside_the_first(
    stack: Stack, short_lock: Gateway
) -> None:
    """The lock is held as long as its request runs (renewed), not only for its TTL: a resend of the
    same payment while the first request's upstream is still working is a 409, never a second
    upstream call on the same verified row (two answers for one payment)."""
    checker = stack.checker(short_lock)
    entered, go = threading.Event(), threading.Event()
    first_call: list[UpstreamCall] = []

    def slow(call: UpstreamCall) -> None:
        if not first_call:
            first_call.append(call)
            entered.set()
            go.wait(15)

    stack.upstream.on("slow_read", slow)
    try:
        with short_lock.client() as client, ThreadPoolExecutor(1) as pool:
            header = v2_header(sign(stack.chain.key(6), offer_for(client, "GET", "/slow/TTL1")))
            first = pool.submit(checker.send, client, "GET", "/slow/TTL1", headers=header, label="first")
            assert entered.wait(15)
            # Not synchronisation: the lock's TTL must pass (several times over) while the call is held.
            threading.Event().wait(SHORT_TTL_MS * 4 / 1000)
            resend = checker.send(client, "GET", "/slow/TTL1", headers=header, label="resend mid-call")
            go.set()
            answered = first.result(30)
            replay = checker.send(client, "GET", "/slow/TTL1", headers=header, label="replay")
    finally:
        go.set()
        stack.upstream.on("slow_read", None)
    assert (resend.status_code, error_of(resend)) == (409, "payment_in_flight"), resend.text
    assert answered.status_code == 200, answered.text
    assert replay.status_code == 200 and replay.headers.get("x402gw-replay") == "true", replay.text
    assert replay.content == answered.content
    assert sum(1 for c in stack.upstream.snapshot() if c.path == "/u/slow_read/TTL1") == 1
    rows = [r for r in short_lock.ledger.all() if r.payer == stack.chain.address(6) and r.tool == "slow_read"]
    assert [r.state for r in rows] == [PaymentState.SETTLED]
    checker.check()


def test_both_header_versions_charge_only_the_v2_payment_and_never_fall_back(stack: Stack) -> None:
    """``PAYMENT-SIGNATURE`` and ``X-PAYMENT`` carrying two different payments: only the v2 one is
    verified, charged and answered; a junk v2 beside a good v1 is refused, the v1 never charged."""
    gateway = stack.gateway("redis")
    checker = stack.checker(gateway)
    v2_payer, v1_payer = stack.chain.address(7), stack.chain.address(8)
    with gateway.client() as client:
        offer = offer_for(client, "GET", "/q/BOTH")
        v2, v1 = sign(stack.chain.key(7), offer), sign(stack.chain.key(8), offer)
        before = {v2_payer: stack.chain.balance(v2_payer), v1_payer: stack.chain.balance(v1_payer)}
        both = checker.send(client, "GET", "/q/BOTH", headers={**v2_header(v2), **v1_header(v1)}, label="both")
        assert both.status_code == 200, both.text
        assert stack.chain.balance(v2_payer) == before[v2_payer] - 2000
        assert stack.chain.balance(v1_payer) == before[v1_payer]
        assert not stack.chain.authorization_state(v1_payer, v1.payload["authorization"]["nonce"])
        # A junk v2 beside a fresh, valid v1: refused on the v2 alone; the v1 payment stays unspent.
        offer = offer_for(client, "GET", "/q/BOTHB")
        fresh_v1 = sign(stack.chain.key(8), offer)
        junk = v2.to_wire()
        junk["payload"]["signature"] = JUNK_SIGNATURE
        calls = len(stack.upstream.snapshot())
        refused = checker.send(client, "GET", "/q/BOTHB", headers={**v2_header(junk), **v1_header(fresh_v1)},
                               label="junk v2 + good v1")
        assert refused.status_code == 402, refused.text
        assert len(stack.upstream.snapshot()) == calls
        assert stack.chain.balance(v1_payer) == before[v1_payer]
        assert not stack.chain.authorization_state(v1_payer, fresh_v1.payload["authorization"]["nonce"])
    assert [r.payer for r in gateway.ledger.all() if r.path in ("/q/BOTH", "/q/BOTHB")] == [v2_payer]
    checker.check()


def test_payment_identifier_is_bound_to_its_first_payment_and_request(stack: Stack) -> None:
    """Another payer squatting an id, the owner reusing it with another payment or request, or
    resending its settled payload without it: 409s that charge and call nothing. The owner's own
    resend still gets the stored answer."""
    gateway = stack.gateway("redis")
    checker = stack.checker(gateway)
    owner, squatter = stack.chain.address(3), stack.chain.address(5)
    identifier = "squat-" + "a1" * 10
    with gateway.client() as client:
        paid = sign(stack.chain.key(3), offer_for(client, "GET", "/q/PIDA"))
        first = checker.send(client, "GET", "/q/PIDA", headers=v2_header(with_identifier(paid, identifier)),
                             label="owner")
        assert first.status_code == 200, first.text
        calls, squatter_before = len(stack.upstream.snapshot()), stack.chain.balance(squatter)
        attempts = [
            ("/q/PIDA", with_identifier(sign(stack.chain.key(5), offer_for(client, "GET", "/q/PIDA")), identifier),
             "payment_identifier_conflict"),  # another payer, same request, same id
            ("/q/PIDB", with_identifier(sign(stack.chain.key(3), offer_for(client, "GET", "/q/PIDB")), identifier),
             "payment_identifier_conflict"),  # the owner, another payment and request, same id
            ("/q/PIDA", with_identifier(sign(stack.chain.key(3), offer_for(client, "GET", "/q/PIDA")), identifier),
             "payment_identifier_conflict"),  # the owner, a new payment for the same request, same id
            ("/q/PIDA", paid.to_wire(), "payment_identifier_required"),  # the settled payload, without its id
            ("/q/PIDA", with_identifier(paid, "other-" + "b2" * 10), "payment_identifier_required"),
        ]
        for path, wire, code in attempts:
            response = checker.send(client, "GET", path, headers=v2_header(wire), label=code)
            assert (response.status_code, error_of(response)) == (409, code), f"{path}: {response.text}"
            assert "x402gw-replay" not in response.headers
        replay = checker.send(client, "GET", "/q/PIDA", headers=v2_header(with_identifier(paid, identifier)),
                              label="owner resend")
    assert replay.status_code == 200 and replay.headers.get("x402gw-replay") == "true", replay.text
    assert replay.content == first.content
    assert len(stack.upstream.snapshot()) == calls
    assert stack.chain.balance(squatter) == squatter_before
    assert [r.payer for r in gateway.ledger.all() if r.payment_identifier == identifier] == [owner]
    checker.check()


def test_settle_first_call_whose_upstream_failed_owes_one_refund_whatever_the_resends(stack: Stack) -> None:
    """An ``upfront`` order settles, then its upstream fails: the refund is owed once. A resend
    while it runs is a 409 in flight; resends after it (raced) are never charged, never run, and
    never record the refund a second time or under another reason."""
    gateway = stack.gateway("redis")
    checker = stack.checker(gateway)
    payer = stack.chain.address(4)
    entered, go = threading.Event(), threading.Event()

    def broken(call: UpstreamCall) -> None:
        entered.set()
        go.wait(15)
        raise RuntimeError("the order desk is down")

    stack.upstream.on("order", broken)
    try:
        with gateway.client() as client, ThreadPoolExecutor(4) as pool:
            header = v2_header(sign(stack.chain.key(4), offer_for(client, "POST", "/orders", json=ORDER_BODY)))
            payer_before = stack.chain.balance(payer)
            first = pool.submit(checker.send, client, "POST", "/orders", json=ORDER_BODY, headers=header, label="first")
            assert entered.wait(15)
            during = checker.send(client, "POST", "/orders", json=ORDER_BODY, headers=header, label="during")
            go.set()
            failed = first.result(30)
            raced = list(pool.map(lambda i: checker.send(client, "POST", "/orders", json=ORDER_BODY, headers=header,
                                                         label=f"resend {i}"), range(4)))
    finally:
        go.set()
        stack.upstream.on("order", None)
    assert (during.status_code, error_of(during)) == (409, "payment_in_flight"), during.text
    assert failed.status_code >= 500 and failed.headers.get("x402gw-refund", "").startswith("owed"), failed.text
    for response in raced:
        assert response.status_code in (409, 502), response.text
        assert error_of(response) in ("payment_already_settled", "payment_in_flight"), response.text
    assert sum(1 for c in stack.upstream.snapshot() if c.tool == "order" and c.body and b"ACME" in c.body) == 1
    rows = [r for r in gateway.ledger.all() if r.payer == payer and r.tool == "order"]
    assert len(rows) == 1 and rows[0].state == PaymentState.SETTLED
    assert (rows[0].refund_owed, rows[0].refund_reason) == (10000, "upstream_error")
    assert stack.chain.balance(payer) == payer_before - 10000
    assert stack.chain.balance(PAY_TO) >= 10000
    checker.check()


def test_a_verified_row_left_by_a_dead_request_is_taken_over_by_the_request_that_settles_it(stack: Stack) -> None:
    """A gateway killed after ``record`` leaves a ``verified`` row naming its request. The same signed
    payment then sent with another body (the binding covers method, path and query only) settles
    under that row: the row must describe the request that paid (its resend replays its answer),
    and the dead request's body never gets that answer."""
    gateway = stack.gateway("redis")
    checker = stack.checker(gateway)
    payer = stack.chain.address(2)
    paid_body, dead_body = {"symbol": "TAKE", "quantity": 2}, {"symbol": "TAKE", "quantity": 7}
    with gateway.client() as client:
        offer = offer_for(client, "POST", "/orders", json=paid_body)
        payment = sign(stack.chain.key(2), offer)
        auth, requirements = payment.payload["authorization"], offer.accepts[0]
        gateway.ledger.record_verified(  # what a process killed between record and settle leaves
            request_id="killed-after-record", owner="attack-suite", tool="order", decimals=6, method="POST",
            path="/orders", payer=payer, pay_to=requirements.pay_to, amount=int(requirements.amount),
            network=requirements.network, asset=requirements.asset, nonce=auth["nonce"].lower(),
            valid_before=int(auth["validBefore"]), payment_identifier=None, settle_mode="upfront",
            authorization=json.dumps(payment.payload, separators=(",", ":")),
            fingerprint=request_fingerprint("POST", "/orders", "", json.dumps(dead_body).encode()),
        )
        before = stack.chain.balance(payer)
        first = checker.send(client, "POST", "/orders", json=paid_body, headers=v2_header(payment), label="paid")
        assert first.status_code == 201, first.text
        resend = checker.send(client, "POST", "/orders", json=paid_body, headers=v2_header(payment), label="resend")
        other = checker.send(client, "POST", "/orders", json=dead_body, headers=v2_header(payment), label="dead body")
    assert resend.status_code == 201 and resend.headers.get("x402gw-replay") == "true", resend.text
    assert resend.content == first.content
    assert not 200 <= other.status_code < 300 and "x402gw-replay" not in other.headers, other.text
    assert other.status_code in (402, 409), other.text
    orders = [c for c in stack.upstream.snapshot() if c.tool == "order" and b"TAKE" in c.body]
    assert [json.loads(c.body)["quantity"] for c in orders] == [2]
    rows = [r for r in gateway.ledger.all() if r.payer == payer and r.tool == "order"]
    assert [(r.state, r.request_id != "killed-after-record") for r in rows] == [(PaymentState.SETTLED, True)]
    assert stack.chain.balance(payer) == before - 10000
    checker.check()
