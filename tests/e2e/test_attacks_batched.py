"""Review: attacks on batched settlement (settlement/schemes/batch.py, contracts/BatchSettler.sol)
against the real stack: a private anvil, the recording upstream, in-process gateways settling in
batches. Every test asserts the payment invariant (tests/support/invariant.py), the ledger rows and
the balances on chain, not only status codes.

Ordering inside a batch is made deterministic without sleeps: the attacker's upstream hook sets an
Event and the honest payers are only sent once it has fired, so the attacker's item is queued first;
``max_payments`` makes the batch go as soon as every item is queued."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from web3 import Web3

from gateway.app import create_app
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.schemes.batch import SEL_BATCH_SETTLE
from tests.conftest import PAY_TO
from tests.support import chain_actions
from tests.support.attack_stack import Gateway, Stack, attack_stack, offer_for, sign, v2_header
from tests.support.chain_actions import SEL_TRANSFER_WITH_AUTHORIZATION
from tests.support.invariant import InvariantChecker

PRICE = 2000  # /q/{symbol}, /q2/{symbol}, /drain/{item}: 0.002 USDC
FUNDER = 8
SPONSOR = 7  # sends the attackers' own transactions (delegation, front-running)
NETWORK = "eip155:31337"
# Runtime `JUMPDEST PUSH1 0 JUMP`: loops until it has burnt all the gas it was given.
GAS_BURNER_INIT = bytes.fromhex("635b6000566000526004601cf3")
AUTH_TUPLE = "(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with attack_stack(tmp_path_factory.mktemp("review-batch")) as built:
        yield built


def batch_gateway(stack: Stack, **policy: Any) -> Gateway:
    """A gateway on the attack stack settling eip155:31337 in batches (its own ledger)."""
    name = f"batch-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        catalog=[stack.catalog_path], deployment_file=stack.deployment_file,
        database_url=f"sqlite:///{stack.directory / f'{name}.sqlite3'}", receipt_timeout_seconds=20,
        batch_settlement={NETWORK: policy},
    )
    ledger = open_ledger(settings.database_url)
    server = ThreadServer(create_app(settings, catalogs=stack.catalogs, ledger=ledger)).start()
    stack.gateways[name] = gateway = Gateway(server.url, name, ledger, server)  # stopped by the stack
    return gateway


def poll(predicate: Callable[[], Any], what: str, attempts: int = 400) -> Any:
    """A condition on real state (mempool, chain), bounded; each attempt waits on an Event."""
    pause = threading.Event()
    for _ in range(attempts):
        value = predicate()
        if value:
            return value
        pause.wait(0.025)
    raise AssertionError(f"timed out waiting for {what}")


def payer(stack: Stack, amount: int = 20 * PRICE) -> str:
    return chain_actions.fresh_payer(stack.w3, stack.chain.token, stack.chain.key(FUNDER), amount)


def send_tx(w3: Web3, key: str, to: str | None, data: bytes, *, wait: bool = True, tip: int = 10**9,
            **extra: Any) -> Any:
    account = Account.from_key(key)
    tx: dict[str, Any] = {
        "from": account.address, "data": data, "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "gas": 1_000_000, "maxFeePerGas": 50 * 10**9, "maxPriorityFeePerGas": tip, "chainId": 31337, **extra,
    }
    if to is not None:
        tx["to"] = Web3.to_checksum_address(to)
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    return w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30) if wait else tx_hash


def row_of(gateway: Gateway, payment: Any) -> Any:
    nonce = payment.payload["authorization"]["nonce"].lower()
    [row] = [r for r in gateway.ledger.all() if r.nonce.lower() == nonce]
    return row


def run_attack_then_honest(
    stack: Stack, gateway: Gateway, checker: InvariantChecker, attack: tuple[str, str, Any], honest: list[tuple[str, Any]],
    on_attacker_call: Callable[[], None],
) -> tuple[httpx.Response, list[httpx.Response]]:
    """The attacker's request first; its upstream hook acts (``on_attacker_call``), then the honest
    requests are sent, so the attacker's item is queued ahead of theirs in the same batch."""
    tool, path, payment = attack
    fired = threading.Event()

    def hook(call: Any) -> None:
        try:
            on_attacker_call()
        finally:
            fired.set()

    def get(path: str, payment: Any, label: str) -> httpx.Response:
        with gateway.client() as client:
            return checker.send(client, "GET", path, headers=v2_header(payment), label=label)

    stack.upstream.on(tool, hook)
    try:
        with ThreadPoolExecutor(1 + len(honest)) as pool:
            attacker = pool.submit(get, path, payment, "attacker")
            assert fired.wait(30), "the attacker's upstream call never came"
            honest_futures = [pool.submit(get, p, pay, f"honest {p}") for p, pay in honest]
            return attacker.result(60), [f.result(60) for f in honest_futures]
    finally:
        stack.upstream.on(tool, None)


# -- 1. an EIP-7702 delegated payer whose isValidSignature burns all the gas it is given ---------------


def test_a_gas_burning_7702_payer_cannot_deny_the_other_payers_of_its_batch(stack: Stack) -> None:
    """The attacker pays with a plain EOA signature (verify recovers it offline: no wallet, so it is
    batched), then delegates its account (EIP-7702) to code whose ``isValidSignature`` loops. The
    token asks that code (it has code now), the loop eats 63/64 of the batch's gas, and every item
    after it runs out of gas. Each honest payer must still get its answer and be charged once."""
    w3 = stack.w3
    gateway = batch_gateway(stack, max_wait_ms=10_000, max_payments=3)
    checker = stack.checker(gateway)
    burner = send_tx(w3, stack.chain.key(SPONSOR), None, GAS_BURNER_INIT)["contractAddress"]
    attacker_key, honest_keys = payer(stack), [payer(stack), payer(stack)]
    attacker_address = Account.from_key(attacker_key).address
    with gateway.client() as client:
        attack = sign(attacker_key, offer_for(client, "GET", "/q2/BURN"))
        honest = [(f"/q/HON{'AB'[i]}", sign(k, offer_for(client, "GET", f"/q/HON{'AB'[i]}")))
                  for i, k in enumerate(honest_keys)]

    def delegate_to_burner() -> None:  # between verify and the batch's broadcast
        authorization = Account.sign_authorization(
            {"chainId": 31337, "address": burner, "nonce": w3.eth.get_transaction_count(attacker_address)}, attacker_key)
        send_tx(w3, stack.chain.key(SPONSOR), "0x000000000000000000000000000000000000dEaD", b"",
                type=4, authorizationList=[authorization])
        assert w3.eth.get_code(attacker_address) == bytes.fromhex("ef0100") + bytes.fromhex(burner[2:])

    honest_before = [stack.chain.balance(Account.from_key(k).address) for k in honest_keys]
    bad, goods = run_attack_then_honest(stack, gateway, checker, ("read_twin", "/q2/BURN", attack), honest,
                                        delegate_to_burner)
    assert not 200 <= bad.status_code < 300, bad.text
    rows = [row_of(gateway, pay) for _, pay in honest]
    tx_hash = row_of(gateway, attack).tx_hash
    mined = w3.eth.get_transaction_receipt(tx_hash) if tx_hash else {}
    gas_used = (mined.get("gasUsed"), mined.get("gas", None) or w3.eth.get_transaction(tx_hash)["gas"], mined.get("status"))
    outcome = [(r.status_code, r.json().get("error") if r.status_code != 200 else "ok") for r in goods]
    assert [r.status_code for r in goods] == [200, 200], (
        f"one attacker's payment denied the honest payers of its batch: {outcome}, rows "
        f"{[(r.state, r.error_reason) for r in rows]}, batch {tx_hash} (gas used, limit, status) {gas_used}")
    assert all(r.state == PaymentState.SETTLED for r in rows)
    for key, before in zip(honest_keys, honest_before, strict=True):
        assert stack.chain.balance(Account.from_key(key).address) == before - PRICE
    checker.check()


# -- 2. a payer drained while its payment waits in a batch with honest payments ------------------------


def test_a_payer_drained_while_queued_fails_alone_and_the_rest_of_its_batch_settles(stack: Stack) -> None:
    gateway = batch_gateway(stack, max_wait_ms=10_000, max_payments=3)
    checker = stack.checker(gateway)
    attacker_key, honest_keys = payer(stack), [payer(stack), payer(stack)]
    with gateway.client() as client:
        attack = sign(attacker_key, offer_for(client, "GET", "/drain/7"))
        honest = [(f"/q/DRN{'AB'[i]}", sign(k, offer_for(client, "GET", f"/q/DRN{'AB'[i]}")))
                  for i, k in enumerate(honest_keys)]
    sink = stack.chain.address(FUNDER)
    bad, goods = run_attack_then_honest(
        stack, gateway, checker, ("drain_read", "/drain/7", attack), honest,
        lambda: chain_actions.drain(stack.w3, stack.chain.token, attacker_key, sink))
    assert not 200 <= bad.status_code < 300, bad.text
    assert [r.status_code for r in goods] == [200, 200], [r.text[:200] for r in goods]
    bad_row, good_rows = row_of(gateway, attack), [row_of(gateway, p) for _, p in honest]
    assert bad_row.state == PaymentState.FAILED and bad_row.error_reason == "invalid_exact_evm_insufficient_balance"
    assert {r.state for r in good_rows} == {PaymentState.SETTLED}
    assert {r.tx_hash for r in good_rows} == {bad_row.tx_hash}  # one batch: the bad item failed inside it
    assert stack.w3.eth.get_transaction_receipt(bad_row.tx_hash)["status"] == 1
    assert not stack.chain.authorization_state(bad_row.payer, bad_row.nonce)
    with gateway.client() as client:  # the free-rider's resend gets nothing either
        again = checker.send(client, "GET", "/drain/7", headers=v2_header(attack), label="attacker resend")
    assert not 200 <= again.status_code < 300, again.text
    checker.check()


# -- 3. one nonce, two differently signed payloads, two routes, one batch ------------------------------


def test_one_nonce_signed_twice_for_two_routes_buys_one_answer(stack: Stack) -> None:
    gateway = batch_gateway(stack, max_wait_ms=300, max_payments=2)
    checker = stack.checker(gateway)
    key = payer(stack)
    address = Account.from_key(key).address
    nonce = uuid.uuid4().bytes * 2
    with gateway.client() as client:
        offers = [offer_for(client, "GET", "/q/SNA"), offer_for(client, "GET", "/q2/SNB")]
    valid_before = int(stack.w3.eth.get_block("latest")["timestamp"]) + 100
    payments = [sign(key, offer, nonce=nonce, valid_before=valid_before - i) for i, offer in enumerate(offers)]
    assert payments[0].payload["signature"] != payments[1].payload["signature"]
    payer_before, payee_before = stack.chain.balance(address), stack.chain.balance(PAY_TO)

    def get(path: str, payment: Any) -> httpx.Response:
        with gateway.client() as client:
            return checker.send(client, "GET", path, headers=v2_header(payment), label=path)

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(get, ["/q/SNA", "/q2/SNB"], payments))
    assert sum(200 <= a.status_code < 300 for a in answers) <= 1, [a.text[:200] for a in answers]
    settled = [r for r in gateway.ledger.all() if r.state == PaymentState.SETTLED]
    assert len(settled) == sum(a.status_code == 200 for a in answers)
    assert stack.chain.balance(address) == payer_before - PRICE * len(settled)
    assert stack.chain.balance(PAY_TO) == payee_before + PRICE * len(settled)
    checker.check()


# -- 4. a third party front-runs one item it copied from the batch transaction in the mempool ----------


def test_an_item_front_run_from_the_mempool_is_not_charged_without_its_answer(stack: Stack) -> None:
    """Once broadcast, the batch's calldata holds every item's signed authorization. A griefer
    submits one of them to the token directly, ahead of the batch: the victim's money moves to the
    payee under exactly the authorization it gave this request, and the item fails in the batch as
    "used". The victim is then charged; it must get the answer it paid for (or a pending), never a
    402 saying nothing was charged, and the ledger must not call that payment failed."""
    w3 = stack.w3
    gateway = batch_gateway(stack, max_wait_ms=10_000, max_payments=2)
    checker = stack.checker(gateway)
    keys = [payer(stack), payer(stack)]
    paths = ["/q/FRA", "/q/FRB"]
    with gateway.client() as client:
        payments = [sign(k, offer_for(client, "GET", p)) for k, p in zip(keys, paths, strict=True)]
    before = [stack.chain.balance(Account.from_key(k).address) for k in keys]
    settler = str(stack.chain.deployment.batch_settler).lower()

    def get(path: str, payment: Any) -> httpx.Response:
        with gateway.client() as client:
            return checker.send(client, "GET", path, headers=v2_header(payment), label=path)

    def pending_batch() -> Any:
        block = w3.eth.get_block("pending", full_transactions=True)
        return next((t for t in block["transactions"] if str(t.get("to") or "").lower() == settler), None)

    w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(get, p, pay) for p, pay in zip(paths, payments, strict=True)]
            batch = poll(pending_batch, "the batch transaction in the mempool")
            data = bytes(batch["input"])
            assert data[:4] == SEL_BATCH_SETTLE
            _, items = abi_decode(["address", f"{AUTH_TUPLE}[]"], data[4:])
            copied = items[0]  # everything needed is public now
            front = send_tx(w3, stack.chain.key(SPONSOR), stack.chain.token,
                            SEL_TRANSFER_WITH_AUTHORIZATION + data[4 + 32 * 3: 4 + 32 * 12], wait=False, tip=5 * 10**9)
            w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
            answers = [f.result(60) for f in futures]
    finally:
        w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    assert w3.eth.get_transaction_receipt(front)["status"] == 1
    victim = next(i for i, k in enumerate(keys) if Account.from_key(k).address.lower() == copied[0].lower())
    other = 1 - victim
    assert answers[other].status_code == 200 and row_of(gateway, payments[other]).state == PaymentState.SETTLED
    charged = before[victim] - stack.chain.balance(Account.from_key(keys[victim]).address)
    assert charged == PRICE  # the victim paid, under the very authorization it gave this request
    row = row_of(gateway, payments[victim])
    assert answers[victim].status_code != 402 and row.state != PaymentState.FAILED, (
        f"charged {charged} for {paths[victim]} but answered {answers[victim].status_code} "
        f"{answers[victim].text[:160]}; ledger row {row.state} ({row.error_reason})")
    # The front-runner's transaction settled it: the answer is served and the ledger names that
    # transaction (so the payee's credit is the ledger's, not an outside one).
    assert answers[victim].status_code == 200 and row.state == PaymentState.SETTLED, answers[victim].text[:200]
    assert row.tx_hash is not None and row.tx_hash.lower() == front.to_0x_hex().lower()
    assert row_of(gateway, payments[other]).tx_hash == batch["hash"].to_0x_hex()
    assert stack.chain.balance(Account.from_key(keys[other]).address) == before[other] - PRICE
    assert stack.upstream.count("read_quote", checker.upstream_since) == 2  # one call per paid request
    checker.check()


# -- 5. a revert of the whole batch transaction leaves every item failed, nothing moved -----------------


def test_a_batch_of_gas_burners_charges_nobody_and_the_ledger_says_so(stack: Stack) -> None:
    """Three payers delegate their accounts (EIP-7702) to code that burns all the gas in
    ``isValidSignature`` after their payments were verified and queued (verify now simulates an
    account with code: delegated before, they are refused there, tests/e2e/test_attacks_gas.py). An
    honest payment fills the batch. Each burner's call is capped (BatchSettler ITEM_GAS), so the
    batch does not run out of gas as a whole: the honest item settles, every burner fails inside
    it. Nobody's money moved but the honest payer's, no burner's row is settled, no content went
    out for them, and no row is left unknown."""
    w3 = stack.w3
    gateway = batch_gateway(stack, max_wait_ms=10_000, max_payments=4)  # the fourth item sends it
    checker = stack.checker(gateway)
    burner = send_tx(w3, stack.chain.key(SPONSOR), None, GAS_BURNER_INIT)["contractAddress"]
    keys = [payer(stack) for _ in range(4)]
    paths = [f"/q2/REV{letter}" for letter in "ABCD"]
    with gateway.client() as client:
        payments = [sign(k, offer_for(client, "GET", path)) for k, path in zip(keys, paths, strict=True)]
    before = [stack.chain.balance(Account.from_key(k).address) for k in keys]

    def get(i: int) -> httpx.Response:
        with gateway.client() as client:
            return checker.send(client, "GET", paths[i], headers=v2_header(payments[i]), label=f"payer {i}")

    with ThreadPoolExecutor(4) as pool:
        burners = [pool.submit(get, i) for i in range(3)]
        poll(lambda: len([r for r in gateway.ledger.all() if r.path in paths[:3]]) == 3, "three burners verified and queued")
        authorizations = [Account.sign_authorization({"chainId": 31337, "address": burner, "nonce": 0}, k) for k in keys[:3]]
        send_tx(w3, stack.chain.key(SPONSOR), "0x000000000000000000000000000000000000dEaD", b"",
                type=4, authorizationList=authorizations)
        honest = get(3)  # the fourth item: the batch goes
        answers = [f.result(60) for f in burners]
    assert honest.status_code == 200, honest.text[:200]
    assert all(a.status_code == 402 for a in answers), [a.text[:160] for a in answers]
    rows = [row_of(gateway, p) for p in payments]
    assert [r.state for r in rows] == [PaymentState.FAILED] * 3 + [PaymentState.SETTLED], [(r.state, r.error_reason) for r in rows]
    [tx_hash] = {r.tx_hash for r in rows}  # one batch transaction, recorded on every row; it did not revert
    assert tx_hash and w3.eth.get_transaction_receipt(tx_hash)["status"] == 1
    after = [stack.chain.balance(Account.from_key(k).address) for k in keys]
    assert after == before[:3] + [before[3] - PRICE]
    assert not any(stack.chain.authorization_state(r.payer, r.nonce) for r in rows[:3])
    checker.check()

