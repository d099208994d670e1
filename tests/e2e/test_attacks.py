"""The attacker suite of issue 13, against the real stack: a private anvil (behind a JSON-RPC
counting proxy), the recording upstream on loopback, in-process gateways with the memory store and
with Redis. Every test asserts the shared payment invariant (tests/support/invariant.py) and the
payee's balance on chain, not only status codes. THREATS.md names the actors."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.codec import decode_header_json
from tests.conftest import PAY_TO
from tests.support import chain_actions
from tests.support.attack_stack import (
    Stack,
    attack_stack,
    error_of,
    forged,
    ledger_view,
    now,
    offer_for,
    random_nonce,
    sign,
    v1_header,
    v2_header,
)
from tests.support.recording_upstream import INJECTED_RECEIPT

VICTIM = 1
RETARGET_PAYER = 2
MALICIOUS_UPSTREAM_PAYER = 3
WINDOW_PAYER = 5
ORDER_BODY = {"symbol": "ACME", "quantity": 1}
FUNDER = 8  # funds the fresh keys of the drain tests; the sink drained balances go to


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with attack_stack(tmp_path_factory.mktemp("attacks")) as built:
        yield built


def settle_victim(stack: Stack, store: str, path: str) -> tuple[dict[str, Any], bytes]:
    """The victim pays for ``path`` honestly; returns (its authorization, the answer it bought)."""
    gateway = stack.gateway(store)
    with gateway.client() as client:
        payment = sign(stack.chain.key(VICTIM), offer_for(client, "GET", path))
        paid = client.get(path, headers=v2_header(payment))
    assert paid.status_code == 200, paid.text
    return payment.payload["authorization"], paid.content


# -- a. forged signatures on a known (payer, nonce) --------------------------------------------------

FORGE_TARGETS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/q/VICT", {}),  # the victim's own route
    ("GET", "/q2/VICT", {}),  # another tool at the same price
    ("GET", "/w", {"params": {"city": "Lisbon"}}),  # a query route at the same price
    ("POST", "/orders", {"json": ORDER_BODY}),  # a dearer, state-changing route
]


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_forged_signature_on_a_settled_payers_nonce_gets_nothing(stack: Stack, store: str) -> None:
    victim_auth, victim_answer = settle_victim(stack, store, "/q/VICT")
    gateway = stack.gateway(store)
    checker = stack.checker(gateway)
    rows_before = ledger_view(gateway.ledger)
    upstream_before = len(stack.upstream.snapshot())
    payer_before = stack.chain.balance(victim_auth["from"])
    with gateway.client() as client:
        for method, path, kwargs in FORGE_TARGETS:
            offer = offer_for(client, method, path, **kwargs)
            header = forged(offer.accepts[0], offer, victim_auth["from"], victim_auth["nonce"])
            v1 = {k: v for k, v in header.items() if k not in ("accepted", "resource")}
            v1.update(x402Version=1, scheme="exact", network=offer.accepts[0].network)
            for version, headers in (("v2", v2_header(header)), ("v1", v1_header(v1))):
                response = checker.send(client, method, path, headers=headers, label=f"forged {version}", **kwargs)
                where = f"{version} {method} {path}: {response.status_code} {response.text[:300]}"
                assert response.status_code == 402, where
                assert error_of(response) == "invalid_exact_evm_payload_signature", where
                assert "x402gw-replay" not in response.headers, where
                assert victim_answer not in response.content, where
    assert len(stack.upstream.snapshot()) == upstream_before  # no upstream call
    assert ledger_view(gateway.ledger) == rows_before  # ledger unchanged
    assert stack.chain.balance(victim_auth["from"]) == payer_before
    checker.check()  # includes: payee balance unchanged, as nothing settled


# -- b. a genuine settled payload re-targeted -----------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_settled_payload_retargeted_never_gets_a_second_answer_or_charge(stack: Stack, store: str) -> None:
    gateway = stack.gateway(store)
    checker = stack.checker(gateway)
    key = stack.chain.key(RETARGET_PAYER)
    payer = stack.chain.address(RETARGET_PAYER)
    with gateway.client() as client:
        quote = sign(key, offer_for(client, "GET", "/q/RETA"))
        first = checker.send(client, "GET", "/q/RETA", headers=v2_header(quote), label="honest quote")
        assert first.status_code == 200, first.text
        weather = sign(key, offer_for(client, "GET", "/w", params={"city": "Lisbon"}))
        w_first = checker.send(client, "GET", "/w", params={"city": "Lisbon"}, headers=v2_header(weather),
                               label="honest weather")
        assert w_first.status_code == 200, w_first.text
        order = sign(key, offer_for(client, "POST", "/orders", json=ORDER_BODY))
        o_first = checker.send(client, "POST", "/orders", json=ORDER_BODY, headers=v2_header(order), label="honest order")
        assert o_first.status_code == 201, o_first.text
        settled_payee = stack.chain.balance(PAY_TO)
        settled_payer = stack.chain.balance(payer)
        calls_before = len(stack.upstream.snapshot())

        wrong_network = copy.deepcopy(quote.to_wire())
        wrong_network["accepted"]["network"] = "eip155:8453"
        wrong_asset = copy.deepcopy(quote.to_wire())
        wrong_asset["accepted"]["asset"] = "0x" + "11" * 20
        attempts: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/q/RETB", {"headers": v2_header(quote)}),  # same tool, other path
            ("GET", "/q2/RETA", {"headers": v2_header(quote)}),  # other tool, same price
            ("GET", "/q/RETA", {"headers": v2_header(quote), "params": {"symbol": "X"}}),  # other query
            ("GET", "/w", {"headers": v2_header(quote), "params": {"city": "Lisbon"}}),  # other tool, same price
            ("POST", "/orders", {"headers": v2_header(quote), "json": ORDER_BODY}),  # dearer tool
            ("GET", "/w", {"headers": v2_header(weather), "params": {"city": "Paris"}}),  # other query
            ("GET", "/w", {"headers": v2_header(weather), "params": {"city": "Lisbon", "units": "imperial"}}),
            ("GET", "/q/RETA", {"headers": v2_header(weather)}),  # query payment on a path route
            ("POST", "/orders", {"headers": v2_header(order), "json": {"symbol": "ACME", "quantity": 2}}),  # other body
            ("POST", "/orders", {"headers": v2_header(order), "json": {"symbol": "EVIL", "quantity": 1}}),
            ("GET", "/q/RETA", {"headers": v2_header(wrong_network)}),  # other network in accepted
            ("GET", "/q/RETA", {"headers": v2_header(wrong_asset)}),  # other asset in accepted
            ("GET", "/q/RETA", {"headers": v1_header(quote, network="base")}),  # v1, other network
            ("GET", "/q/RETB", {"headers": v1_header(quote)}),  # v1, other path
            ("GET", "/q2/RETA", {"headers": v1_header(quote)}),  # v1, other tool
        ]
        for method, path, kwargs in attempts:
            response = checker.send(client, method, path, label="retargeted", **kwargs)
            where = f"{method} {path} {kwargs.get('params') or kwargs.get('json') or ''}: {response.status_code} {response.text[:300]}"
            assert not 200 <= response.status_code < 300, where
            assert response.status_code in (402, 409, 422), where
            if response.status_code == 402:
                assert error_of(response) in (
                    "invalid_exact_evm_nonce_already_used", "payment_requirements_mismatch",
                ), where
            assert "x402gw-replay" not in response.headers, where
        # The identical payload on the identical request is a replay (allowed), and only that.
        replay = checker.send(client, "GET", "/q/RETA", headers=v2_header(quote), label="replay")
        assert replay.status_code == 200 and replay.headers.get("x402gw-replay") == "true", replay.text
        assert replay.content == first.content
        w_replay = checker.send(client, "GET", "/w", params={"city": "Lisbon"}, headers=v2_header(weather), label="replay")
        assert w_replay.status_code == 200 and w_replay.headers.get("x402gw-replay") == "true", w_replay.text
    assert len(stack.upstream.snapshot()) == calls_before  # no upstream call for any of them
    assert stack.chain.balance(PAY_TO) == settled_payee  # never a second charge
    assert stack.chain.balance(payer) == settled_payer
    checker.check()


# -- c. boundary windows --------------------------------------------------------------------------------


def test_settle_after_read_refuses_a_window_shorter_than_its_worst_case(stack: Stack) -> None:
    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    key = stack.chain.key(WINDOW_PAYER)
    payee_before = stack.chain.balance(PAY_TO)
    with gateway.client() as client:
        offer = offer_for(client, "GET", "/slow/1")
        short = checker.send(client, "GET", "/slow/1", label="short window",
                             headers=v2_header(sign(key, offer, valid_before=now() + 15)))
        assert short.status_code == 402, short.text
        assert error_of(short) == "payment_window_too_short", short.text
        minimum = short.json().get("minimumValidSeconds")
        assert isinstance(minimum, int) and not isinstance(minimum, bool), short.text
        assert 40 < minimum <= offer.accepts[0].max_timeout_seconds, minimum  # 2 x 20 s upstream + settling
        assert stack.upstream.count("slow_read", checker.upstream_since) == 0
        assert stack.chain.balance(PAY_TO) == payee_before
        # a second short of the minimum is still refused; the minimum (plus request latency) passes
        almost = checker.send(client, "GET", "/slow/2", label="one second short", headers=v2_header(
            sign(key, offer_for(client, "GET", "/slow/2"), valid_before=now() + minimum - 2)))
        assert almost.status_code == 402 and error_of(almost) == "payment_window_too_short", almost.text
        assert stack.upstream.count("slow_read", checker.upstream_since) == 0
        enough = checker.send(client, "GET", "/slow/3", label="long enough", headers=v2_header(
            sign(key, offer_for(client, "GET", "/slow/3"), valid_before=now() + minimum + 3)))
        assert enough.status_code == 200, enough.text
    assert stack.upstream.count("slow_read", checker.upstream_since) == 1
    assert stack.chain.balance(PAY_TO) == payee_before + 1000
    checker.check()


# -- d. balance drained / nonce used on chain mid-call -----------------------------------------------------


def _mid_call(stack: Stack, tool: str, path: str, action: Any, *, external_credit: int = 0) -> None:
    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    w3 = stack.w3
    key = chain_actions.fresh_payer(w3, stack.chain.token, stack.chain.key(FUNDER), 50_000)
    payee_before = stack.chain.balance(PAY_TO)
    with gateway.client() as client:
        payment = sign(key, offer_for(client, "GET", path))
        stack.upstream.on(tool, lambda call: action(w3, key, payment))
        try:
            response = checker.send(client, "GET", path, headers=v2_header(payment), label=f"mid-call {tool}")
        finally:
            stack.upstream.on(tool, None)
        again = checker.send(client, "GET", path, headers=v2_header(payment), label="resend after failure")
    checker.note_external_payee_credit(external_credit)
    where = f"{response.status_code} {response.text[:300]}"
    assert not 200 <= response.status_code < 300, where
    assert not 200 <= again.status_code < 300, f"{again.status_code} {again.text[:300]}"
    nonce = payment.payload["authorization"]["nonce"].lower()
    [row] = [r for r in gateway.ledger.all() if r.nonce.lower() == nonce]
    assert row.state == PaymentState.FAILED, (row.state, row.error_reason)
    assert row.error_reason, "the failure is recorded with a reason"
    assert stack.upstream.count(tool, checker.upstream_since) <= 1
    assert stack.chain.balance(PAY_TO) == payee_before + external_credit
    checker.check()


def test_balance_drained_during_a_settle_after_read_serves_nothing(stack: Stack) -> None:
    sink = stack.chain.address(FUNDER)
    _mid_call(stack, "drain_read", "/drain/1",
              lambda w3, key, payment: chain_actions.drain(w3, stack.chain.token, key, sink))


def test_authorization_cancelled_during_a_settle_after_read_serves_nothing(stack: Stack) -> None:
    def cancel(w3: Any, key: str, payment: Any) -> None:
        chain_actions.cancel_authorization(w3, stack.chain.token, "USD Coin", "2", key,
                                           payment.payload["authorization"]["nonce"])

    _mid_call(stack, "cancel_read", "/cancel/1", cancel)


def test_authorization_used_elsewhere_during_a_settle_after_read_serves_nothing(stack: Stack) -> None:
    """Mid-call, the payer spends the payment's nonce on a transfer of its own (to another address):
    the payment can no longer settle, nothing is served. The very same authorization sent by someone
    else (as anyone can, once it is public) is another matter: the money reached our payee under
    exactly this authorization, so the answer it paid for is served and the ledger names that
    transaction (a charge without its answer is the other half of the invariant)."""
    sink = stack.chain.address(FUNDER)

    def spend_nonce_elsewhere(w3: Any, key: str, payment: Any) -> None:
        nonce = bytes.fromhex(payment.payload["authorization"]["nonce"].removeprefix("0x"))
        spent = Payer(key).sign(payment.accepted.model_copy(update={"pay_to": sink}), nonce=nonce)
        chain_actions.use_authorization(w3, stack.chain.token, stack.chain.key(FUNDER),
                                        spent.payload["authorization"], spent.payload["signature"])

    _mid_call(stack, "cancel_read", "/cancel/2", spend_nonce_elsewhere)

    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    w3 = stack.w3
    key = chain_actions.fresh_payer(w3, stack.chain.token, stack.chain.key(FUNDER), 50_000)
    payer_before, payee_before = stack.chain.balance(Payer(key).address), stack.chain.balance(PAY_TO)
    used: list[dict[str, Any]] = []
    with gateway.client() as client:
        payment = sign(key, offer_for(client, "GET", "/cancel/3"))
        stack.upstream.on("cancel_read", lambda call: used.append(chain_actions.use_authorization(
            w3, stack.chain.token, stack.chain.key(FUNDER), payment.payload["authorization"], payment.payload["signature"])))
        try:
            response = checker.send(client, "GET", "/cancel/3", headers=v2_header(payment), label="sent by another")
        finally:
            stack.upstream.on("cancel_read", None)
        again = checker.send(client, "GET", "/cancel/3", headers=v2_header(payment), label="resend")
    assert response.status_code == 200, response.text
    assert not 200 <= again.status_code < 300 or again.headers.get("x402gw-replay") == "true", again.text
    nonce = payment.payload["authorization"]["nonce"].lower()
    [row] = [r for r in gateway.ledger.all() if r.nonce.lower() == nonce]
    assert row.state == PaymentState.SETTLED and row.tx_hash == used[0]["transactionHash"].to_0x_hex()
    assert stack.chain.balance(Payer(key).address) == payer_before - 2000
    assert stack.chain.balance(PAY_TO) == payee_before + 2000
    assert stack.upstream.count("cancel_read", checker.upstream_since) == 1
    checker.check()


def test_state_changing_post_settles_upfront_so_a_drained_payer_never_reaches_the_upstream(stack: Stack) -> None:
    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    w3 = stack.w3
    payee_before = stack.chain.balance(PAY_TO)
    with gateway.client() as client:
        # An honest call: its row was settled (upfront) when the upstream ran (the checker asserts it).
        honest_key = chain_actions.fresh_payer(w3, stack.chain.token, stack.chain.key(FUNDER), 50_000)
        honest = sign(honest_key, offer_for(client, "POST", "/drain-orders", json=ORDER_BODY))
        ok = checker.send(client, "POST", "/drain-orders", json=ORDER_BODY, headers=v2_header(honest), label="honest POST")
        assert ok.status_code == 201, ok.text
        nonce = honest.payload["authorization"]["nonce"].lower()
        [row] = [r for r in gateway.ledger.all() if r.nonce.lower() == nonce]
        assert row.settle_mode == "upfront" and row.state == PaymentState.SETTLED
        # A payer drained between signing and sending: nothing reaches the upstream.
        key = chain_actions.fresh_payer(w3, stack.chain.token, stack.chain.key(FUNDER), 50_000)
        payment = sign(key, offer_for(client, "POST", "/drain-orders", json=ORDER_BODY))
        chain_actions.drain(w3, stack.chain.token, key, stack.chain.address(FUNDER))
        calls = stack.upstream.count("drain_order")
        refused = checker.send(client, "POST", "/drain-orders", json=ORDER_BODY, headers=v2_header(payment),
                               label="drained POST")
    assert not 200 <= refused.status_code < 300, refused.text
    assert stack.upstream.count("drain_order") == calls  # never called
    assert stack.chain.balance(PAY_TO) == payee_before + 2000
    checker.check()


# -- e. duplicate JSON keys ---------------------------------------------------------------------------------

DUPLICATE = b'{"quantity":999999,"symbol":"ACME","quantity":1}'


def test_duplicate_json_keys_are_a_400_before_any_offer_or_charge(stack: Stack) -> None:
    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    key = stack.chain.key(RETARGET_PAYER)
    payer = stack.chain.address(RETARGET_PAYER)
    json_type = {"Content-Type": "application/json"}
    with gateway.client() as client:
        unpaid = checker.send(client, "POST", "/orders", content=DUPLICATE, headers=json_type, label="dup unpaid")
        assert unpaid.status_code == 400, unpaid.text
        assert error_of(unpaid) == "duplicate_json_key", unpaid.text
        assert "payment-required" not in unpaid.headers
        payment = sign(key, offer_for(client, "POST", "/orders", json=ORDER_BODY))
        before = stack.chain.balance(payer), stack.chain.balance(PAY_TO)
        rows = ledger_view(gateway.ledger)
        paid = checker.send(client, "POST", "/orders", content=DUPLICATE, headers={**json_type, **v2_header(payment)},
                            label="dup paid")
        assert paid.status_code == 400, paid.text
        assert error_of(paid) == "duplicate_json_key", paid.text
        assert (stack.chain.balance(payer), stack.chain.balance(PAY_TO)) == before
        assert ledger_view(gateway.ledger) == rows
        nested = checker.send(client, "POST", "/orders", label="dup other order",
                              content=b'{"symbol":"ACME","quantity":1,"symbol":"EVIL"}', headers=json_type)
        assert nested.status_code == 400 and error_of(nested) == "duplicate_json_key", nested.text
        # A body on a GET is refused, not forwarded.
        get_body = checker.send(client, "GET", "/q/BODY", content=b'{"symbol":"EVIL"}', headers=json_type,
                                label="GET with a body")
        assert 400 <= get_body.status_code < 500 and get_body.status_code != 402, get_body.text
    assert stack.upstream.count("order", checker.upstream_since) == 0
    assert stack.upstream.count("read_quote", checker.upstream_since) == 0
    checker.check()


def test_upstream_gets_the_validated_arguments_reserialised(stack: Stack) -> None:
    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    body = b'{ "symbol" : "ACME",\n "quantity" : 3 }'
    with gateway.client() as client:
        payment = sign(stack.chain.key(RETARGET_PAYER), offer_for(client, "POST", "/orders", json=ORDER_BODY))
        paid = checker.send(client, "POST", "/orders", content=body, label="odd spacing",
                            headers={"Content-Type": "application/json; charset=utf-8", **v2_header(payment)})
    assert paid.status_code == 201, paid.text
    [call] = [c for c in stack.upstream.snapshot()[checker.upstream_since:] if c.tool == "order"]
    assert json.loads(call.body) == {"symbol": "ACME", "quantity": 3}
    assert call.headers.get("content-type", "").startswith("application/json")
    checker.check()


# -- f. lock-out through rate limits --------------------------------------------------------------------

JUNK_CLIENT = {"memory": "127.0.0.2", "redis": "127.0.0.4"}
VICTIM_CLIENT = {"memory": "127.0.0.3", "redis": "127.0.0.5"}
OFFER_CLIENT = {"memory": "127.0.0.6", "redis": "127.0.0.7"}
FRESH_KEY_CLIENT = {"memory": "127.0.0.8", "redis": "127.0.0.9"}
PER_CLIENT_LIMIT = 4


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_junk_headers_naming_a_victim_do_not_lock_the_victim_out_and_cost_no_rpc(stack: Stack, store: str) -> None:
    gateway = stack.gateway(store)
    checker = stack.checker(gateway)
    victim_key = chain_actions.fresh_payer(stack.w3, stack.chain.token, stack.chain.key(FUNDER), 50_000)
    victim = chain_actions.Account.from_key(victim_key).address
    with gateway.client(OFFER_CLIENT[store]) as client:
        offer = offer_for(client, "GET", "/limited/1")
    rpc_before = stack.rpc.snapshot()
    statuses = []
    with gateway.client(JUNK_CLIENT[store]) as junk:
        for i in range(12):
            header = forged(offer.accepts[0], offer, victim, random_nonce(), valid_before=now() + 100)
            response = checker.send(junk, "GET", "/limited/1", headers=v2_header(header), label=f"junk {i}")
            statuses.append((response.status_code, error_of(response)))
    rpc_spent = stack.rpc.since(rpc_before)
    assert all(s in ((402, "invalid_exact_evm_payload_signature"), (429, "rate_limited")) for s in statuses), statuses
    assert statuses.count((402, "invalid_exact_evm_payload_signature")) <= PER_CLIENT_LIMIT, statuses
    assert (429, "rate_limited") in statuses, f"per_client must limit requests with payment headers too: {statuses}"
    # A signature that does not recover to ``from`` may be a contract wallet's (issue 16): it costs
    # at most one gas-capped eth_call (isValidSignature on ``from``), and only for the requests the
    # per-client limit let through; nothing else (no balance, nonce or lock) is spent on it.
    refused_402 = statuses.count((402, "invalid_exact_evm_payload_signature"))
    assert set(rpc_spent) <= {"eth_call"} and rpc_spent["eth_call"] <= refused_402, (
        f"junk signatures cost more than one eth_call each: {dict(rpc_spent)}"
    )
    # Valid signatures from fresh, empty keys do cost RPC (balance, nonce), so per_client bounds them.
    rpc_before = stack.rpc.snapshot()
    fresh: list[tuple[int, str | None]] = []
    with gateway.client(FRESH_KEY_CLIENT[store]) as griefer:
        for i in range(8):
            payment = sign("0x" + os.urandom(32).hex(), offer)
            response = checker.send(griefer, "GET", "/limited/1", headers=v2_header(payment), label=f"fresh key {i}")
            fresh.append((response.status_code, error_of(response)))
    rpc_spent = stack.rpc.since(rpc_before)
    verified = [s for s in fresh if s[0] != 429]
    assert all(s[0] == 402 for s in verified) and len(verified) <= PER_CLIENT_LIMIT, fresh
    assert (429, "rate_limited") in fresh, fresh
    assert sum(rpc_spent.values()) <= 4 * len(verified), dict(rpc_spent)
    with gateway.client(VICTIM_CLIENT[store]) as client:
        payment = sign(victim_key, offer_for(client, "GET", "/limited/1"))
        paid = checker.send(client, "GET", "/limited/1", headers=v2_header(payment), label="victim pays")
    assert paid.status_code == 200, paid.text
    checker.check()


# -- h. a malicious upstream ------------------------------------------------------------------------------


def test_upstream_redirect_with_a_body_is_not_served_nor_charged(stack: Stack) -> None:
    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    payer = stack.chain.address(MALICIOUS_UPSTREAM_PAYER)
    before = stack.chain.balance(payer), stack.chain.balance(PAY_TO)
    with gateway.client() as client:
        payment = sign(stack.chain.key(MALICIOUS_UPSTREAM_PAYER), offer_for(client, "GET", "/redir/1"))
        response = checker.send(client, "GET", "/redir/1", headers=v2_header(payment), label="3xx upstream")
    assert response.status_code == 502, response.text
    assert error_of(response) == "upstream_redirect", response.text
    assert "location" not in response.headers
    assert (stack.chain.balance(payer), stack.chain.balance(PAY_TO)) == before
    assert stack.upstream.count("redirect_read", checker.upstream_since) == 1
    nonce = payment.payload["authorization"]["nonce"].lower()
    [row] = [r for r in gateway.ledger.all() if r.nonce.lower() == nonce]
    assert row.state != PaymentState.SETTLED and row.tx_hash is None
    checker.check()


def test_upstream_cannot_inject_payment_headers(stack: Stack) -> None:
    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    with gateway.client() as client:
        payment = sign(stack.chain.key(MALICIOUS_UPSTREAM_PAYER), offer_for(client, "GET", "/inject/1"))
        response = checker.send(client, "GET", "/inject/1", headers=v2_header(payment), label="injecting upstream")
        v1_payment = sign(stack.chain.key(MALICIOUS_UPSTREAM_PAYER), offer_for(client, "GET", "/inject/2"))
        v1_response = checker.send(client, "GET", "/inject/2", headers=v1_header(v1_payment), label="injecting, v1")
    assert response.status_code == 200, response.text
    assert response.headers.get_list("payment-response") != [INJECTED_RECEIPT]
    assert len(response.headers.get_list("payment-response")) == 1
    receipt = decode_header_json(response.headers["payment-response"])
    nonce = payment.payload["authorization"]["nonce"].lower()
    [row] = [r for r in gateway.ledger.all() if r.nonce.lower() == nonce]
    assert receipt["success"] is True and receipt["transaction"] == row.tx_hash
    assert "x-payment-response" not in response.headers
    assert "x402gw-replay" not in response.headers  # the upstream's claim is not passed on
    assert v1_response.status_code == 200, v1_response.text
    assert "payment-response" not in v1_response.headers
    assert len(v1_response.headers.get_list("x-payment-response")) == 1
    assert decode_header_json(v1_response.headers["x-payment-response"])["transaction"] != "0xinjected"
    assert "x402gw-replay" not in v1_response.headers
    checker.check()


def test_checker_catches_a_served_forgery(stack: Stack, tmp_path: Path) -> None:
    """The checker itself: a 2xx recorded for a forged payment is a violation (so a green suite means
    something)."""
    import httpx

    from tests.support.invariant import InvariantViolation

    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    victim_auth, answer = settle_victim(stack, "memory", "/q/CHKR")
    with gateway.client() as client:
        offer = offer_for(client, "GET", "/q/CHKR")
    header = forged(offer.accepts[0], offer, victim_auth["from"], victim_auth["nonce"])
    request = httpx.Request("GET", f"{gateway.url}/q/CHKR", headers=v2_header(header))
    fake = httpx.Response(200, content=answer, headers={"X402GW-Replay": "true"}, request=request)
    checker.record(fake, label="simulated leak")
    with pytest.raises(InvariantViolation, match="signature recovers to"):
        checker.check()


# -- double-spender: one payment raced on several routes at once ------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_one_payment_raced_on_its_route_and_others_is_answered_and_charged_once(stack: Stack, store: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    gateway = stack.gateway(store)
    checker = stack.checker(gateway)
    payee_before = stack.chain.balance(PAY_TO)
    with gateway.client() as client:
        payment = sign(stack.chain.key(RETARGET_PAYER), offer_for(client, "GET", f"/q/RACE{store[0].upper()}"))
    own = f"/q/RACE{store[0].upper()}"
    paths = [own, "/q2/RACEX", own, "/q/RACEY", own, "/q2/RACEX", own, "/q/RACEY"]

    def call(path: str) -> Any:
        with gateway.client() as client:
            return checker.send(client, "GET", path, headers=v2_header(payment), label="race")

    with ThreadPoolExecutor(len(paths)) as pool:
        responses = list(pool.map(call, paths))
    fresh = [r for r in responses if r.status_code == 200 and "x402gw-replay" not in r.headers]
    assert len(fresh) == 1 and fresh[0].request.url.path == own, [(r.request.url.path, r.status_code) for r in responses]
    for response in responses:
        if response.request.url.path != own:
            assert not 200 <= response.status_code < 300, response.text
    assert stack.chain.balance(PAY_TO) == payee_before + 2000
    checker.check()


# -- the checker itself: a green suite means something --------------------------------------------------


def test_checker_catches_content_in_a_refusal_and_unledgered_money(stack: Stack) -> None:
    import httpx

    from tests.support.invariant import InvariantViolation

    gateway = stack.gateway("memory")
    checker = stack.checker(gateway)
    _, answer = settle_victim(stack, "memory", "/q/CHKL")
    request = httpx.Request("GET", f"{gateway.url}/q/CHKL")
    checker.record(httpx.Response(402, content=answer, request=request), label="simulated leak in a 402")
    with pytest.raises(InvariantViolation, match="upstream content .* served with status 402"):
        checker.check()
    checker = stack.checker(gateway)
    chain_actions.transfer(stack.w3, stack.chain.token, stack.chain.key(FUNDER), PAY_TO, 7)
    with pytest.raises(InvariantViolation, match="payee balance changed by 7"):
        checker.check()
    checker.note_external_payee_credit(7)
    checker.check()
