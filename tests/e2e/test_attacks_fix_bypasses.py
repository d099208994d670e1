"""Bypasses of the day's fixes (8c13f88, 5914735, 4016dde), found by review and fixed (the simulation is
sent from the settlement account; an answer claimed and its refund as lost exclude each other in the
ledger, ``record_upstream_status`` / ``record_answer_lost``; a cooperative refund waits until the
floor's calls are charged, 402 ``invalid_batch_settlement_evm_refund_too_early``), attacked end to end: a real anvil, the escrow and
the x402 SDK's batch-settlement client, a real upstream on loopback, PostgreSQL, a real Redis server and
in-process gateways. Each test asserts the invariant of ``/work/shared/THREATS.md`` on ledger rows,
chain balances, the settlement key's nonce and gas, and upstream calls, not only on status codes.

1. ``exact_guards.transfer_refusal`` (5914735) simulates a contract wallet's transfer through the
   ``bytes`` overload so that "a wallet that says yes when the gateway asks it directly and no when the
   token asks (``CALLER``, ``ORIGIN``) is refused". The simulation is an ``eth_call`` with no ``from``:
   ``ORIGIN`` is the zero address there, as it is in the wallet check, and is the settlement key in the
   real transaction. A wallet whose ``isValidSignature`` says yes only when ``tx.origin == 0`` passes
   the check and the simulation, and every paid call from it calls the upstream and then reverts on the
   gateway's gas (nothing settles: the payer signs nothing real and loses nothing).
2. The lost-answer sweep now runs each resolver turn over the last 6 h (``owe_lost_answers(sweep=True)``)
   and trusts the payment lock alone to tell a live request from a dead one. A request's lock keeper
   only ``extend``s its lock (``exactly_once._keep``): once Redis loses the key (a restart without
   persistence, a failover), it is never taken again. The next turn owes, and pays, the refund of an
   upfront call whose upstream is still running; the request then serves its answer too.
3. The batch-settlement deposit floor (8c13f88) makes a griefer's channel hold 10 prices, but the
   cooperative refund (``ChannelsEvm.refund_request``) hands them back at once on the seller's gas: one
   call's price earned, and the settlement key pays a deposit, a forced claim and a refund for it.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from eth_account import Account
from web3 import Web3
from x402 import x402Client
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, fresh_database, offer_of
from tests.e2e.test_attacks_gas import settler, spent
from tests.e2e.test_channel_paid_calls import PRICE as CHANNEL_PRICE
from tests.e2e.test_channel_paid_calls import channel_gateway, pay_calls, upstream_calls
from tests.support import chain_actions
from tests.support.polling import poll
from tests.support.recording_upstream import MARKER_PREFIX, RecordingUpstream, UpstreamCall

pytestmark = pytest.mark.e2e

NETWORK = "eip155:31337"
FUNDER = 7  # funds this module's fresh payers and wallets (balances are compared as deltas)
PRICE = 2000  # "0.002" at 6 decimals
REFUNDER = 9  # the payTo account, which pays refunds back (its key is the refund key)

CATALOG = """
catalog: 1
owner: review-todays-fixes
payment: {{network: "{network}", asset: "{token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{pay_to}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{upstream}", timeout_seconds: 30}}
tools:
  - name: review_read
    description: A paid read (settles after the upstream answers)
    method: GET
    path: /r/{{item}}
    upstream_path: /u/review_read/{{item}}
    price: "0.002"
    settle: after
  - name: review_order
    description: Places an order (side effects), settled before the call
    method: GET
    path: /o/{{item}}
    upstream_path: /u/review_order/{{item}}
    price: "0.002"
    settle: upfront
"""






def write_catalog(tmp_path: Path, chain: Devchain, upstream: RecordingUpstream) -> Path:
    path = tmp_path / "review-todays-fixes.yaml"
    path.write_text(CATALOG.format(network=NETWORK, token=chain.token, pay_to=PAY_TO, upstream=upstream.url))
    return path


def settler_txs(chain: Devchain, first_block: int) -> list[dict[str, Any]]:
    """Every transaction the settlement account sent since ``first_block``, with its status and gas."""
    account, sent = settler(chain), []
    for number in range(first_block, chain.w3.eth.block_number + 1):
        for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            assert not isinstance(tx, bytes)
            if tx["from"] == account:
                receipt = chain.w3.eth.get_transaction_receipt(tx["hash"])
                sent.append({"hash": tx["hash"].to_0x_hex(), "to": tx["to"], "status": receipt["status"],
                             "gasUsed": receipt["gasUsed"]})
    return sent


# -- 1. a wallet that says yes whenever tx.origin is the zero address ----------------------------------

# isValidSignature: the magic value when ORIGIN is the zero address (every eth_call the gateway makes
# without a "from": its wallet check and, today, its transfer simulation), a revert otherwise (the
# settlement transaction, whose origin is the settlement key). Whoever calls it (CALLER) does not matter.
# ORIGIN ISZERO PUSH1 0x09 JUMPI PUSH1 0 DUP1 REVERT JUMPDEST PUSH4 magic PUSH1 224 SHL PUSH1 0 MSTORE
# PUSH1 32 PUSH1 0 RETURN
ZERO_ORIGIN_WALLET = "0x3215600957600080fd5b631626ba7e60e01b60005260206000f3"


def test_a_wallet_that_says_yes_only_to_simulations_cannot_make_paid_calls_revert_on_our_gas(
    start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    """A griefer's contract wallet holding two prices answers ``isValidSignature`` with the magic value
    to every ``eth_call`` without a sender and reverts in a real transaction. Its paid calls pass the
    wallet check and verify's simulated transfer (5914735), the upstream runs, and the settlement
    reverts on the settlement key's gas; the griefer signs nothing real and keeps its money."""
    wallet = Web3.to_checksum_address("0x" + uuid.uuid4().hex + uuid.uuid4().hex[:8])
    devchain.w3.provider.make_request("anvil_setCode", [wallet, ZERO_ORIGIN_WALLET])  # type: ignore[arg-type]
    chain_actions.transfer(devchain.w3, devchain.token, devchain.key(FUNDER), wallet, 2 * PRICE)
    gateway = start_gateway(write_catalog(tmp_path, devchain, recording))
    (nonce_before, eth_before), calls_before = spent(devchain), recording.count("review_read")
    payee_before, first_block = devchain.balance(PAY_TO), devchain.w3.eth.block_number + 1
    answers = []
    for attempt in range(2):
        path = f"/r/{attempt + 2}"
        with gateway.client() as client:
            requirements = offer_of(client.get(path)).accepts[0].to_wire()
        payment = {
            "x402Version": 2, "accepted": requirements,
            "payload": {
                "signature": "0x" + "22" * 66,  # not an ECDSA signature: a claim that the wallet accepts it
                "authorization": {"from": wallet, "to": requirements["payTo"], "value": requirements["amount"],
                                  "validAfter": "0", "validBefore": str(int(time.time()) + 280),
                                  "nonce": "0x" + uuid.uuid4().hex + uuid.uuid4().hex},
            },
        }
        with gateway.client() as client:
            answer = client.get(path, headers={"PAYMENT-SIGNATURE": encode_header(payment)})
        answers.append((answer.status_code, answer.headers.get("content-type"), answer.text[:120]))
    rows = [r for r in gateway.ledger.all() if r.payer.lower() == wallet.lower()]
    sent = settler_txs(devchain, first_block)
    nonce_after, eth_after = spent(devchain)
    detail = (f"answers {answers}; ledger {[(r.state, r.error_reason, r.tx_hash) for r in rows]}; the settlement "
              f"key sent {nonce_after - nonce_before} transaction(s) {sent}, {eth_before - eth_after} wei of gas; "
              f"upstream calls {recording.count('review_read', calls_before)}; wallet holds {devchain.balance(wallet)}")
    assert [tx for tx in sent if tx["status"] != 1] == [], detail  # no settlement reverts on our gas
    assert nonce_after == nonce_before and eth_after == eth_before, detail  # nothing sent at all
    assert recording.count("review_read", calls_before) == 0, detail  # refused before the upstream
    assert devchain.balance(wallet) == 2 * PRICE and devchain.balance(PAY_TO) == payee_before, detail
    assert all(status == 402 for status, _, _ in answers), detail
    assert not any(r.state in (PaymentState.SETTLED, PaymentState.FAILED) for r in rows), detail


# -- 2. Redis loses a live request's payment lock: the per-turn sweep refunds an answer being made -----


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of this test's own (no persistence, as a cache-sized Redis often runs), which the
    test restarts: everything in it is gone after, as after a crash, an OOM kill or a failover."""

    def __init__(self, tmp_path: Path) -> None:
        self.port, self.dir = _free_port(), tmp_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        assert poll(up, bool, 15), "the private redis-server did not start"
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(15)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def database() -> Iterator[str]:
    with fresh_database("review_todays") as url:
        yield url


def test_a_live_upfront_call_is_not_refunded_by_the_sweep_when_redis_loses_its_lock(
    database: str, private_redis: PrivateRedis, start_gateway: GatewayFactory, devchain: Devchain,
    recording: RecordingUpstream, tmp_path: Path,
) -> None:
    """An upfront call is settled and its upstream is running (the row ``settled``, no answer yet, its
    payment lock held and kept). Redis restarts: the lock is gone, and the request's keeper only
    extends it. The resolver's turn (every 0.2 s here) sweeps the last 6 h, finds the row "lost" and
    pays its refund; the upstream answers and the request serves it. The payer gets the answer and its
    money back: the seller's content for free, and a resend of the payment replays it."""
    prefix = f"x402gw-review-todays-{uuid.uuid4().hex[:10]}:"
    gateway = start_gateway(write_catalog(tmp_path, devchain, recording), database_url=database,
                            redis_url=private_redis.url, redis_prefix=prefix, resolve_pending_seconds=0.2,
                            refund_key=devchain.key(REFUNDER))
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 5 * PRICE)
    payer = Account.from_key(key).address
    called, release = threading.Event(), threading.Event()

    def hold(call: UpstreamCall) -> None:  # the upstream is working on the order
        called.set()
        release.wait(60)

    recording.on("review_order", hold)
    outcome: dict[str, httpx.Response] = {}
    worker = None
    try:
        with gateway.client() as client:
            offer = offer_of(client.get("/o/1"))
        header = encode_header(Payer(key).sign(offer.accepts[0], resource=offer.resource))
        payer_before, calls_before = devchain.balance(payer), recording.count("review_order")

        def call() -> None:
            outcome["paid"] = httpx.get(f"{gateway.url}/o/1", headers={"PAYMENT-SIGNATURE": header}, timeout=90)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        assert called.wait(30), "the paid upfront call never reached its upstream"
        [row] = [r for r in gateway.ledger.all() if r.payer.lower() == payer.lower()]
        assert row.state == PaymentState.SETTLED and row.upstream_status is None and row.refund_owed is None, row
        assert payer_before - devchain.balance(payer) == PRICE  # settled before the call
        store = redis.Redis.from_url(private_redis.url)
        locks = [k.decode() for k in store.scan_iter(match=f"{prefix}pay:*")]
        store.close()
        assert len(locks) == 1, f"the live request holds no payment lock: {locks}"

        private_redis.restart()  # the request is alive; its lock is gone with Redis' memory
        # Several resolver turns (0.2 s each) while the upstream still works.
        seen = poll(lambda: gateway.ledger.get(row.id), lambda r: r is not None and r.refund_owed is not None, 10)
        refund_during_call = seen.refund_owed if seen is not None else None
    finally:
        release.set()
        if worker is not None:
            worker.join(90)
        recording.on("review_order", None)
    paid = outcome.get("paid")
    assert paid is not None, "the paid request never answered"
    final = poll(lambda: gateway.ledger.get(row.id),
                 lambda r: r is not None and (r.refund_owed is None or r.refunded_at is not None), 15)
    assert final is not None
    served = paid.status_code == 200 and MARKER_PREFIX in paid.text
    charged = payer_before - devchain.balance(payer)
    stored = gateway.ledger.stored_response(row.id)
    detail = (f"the request answered {paid.status_code} {paid.text[:120]!r} (upstream content: {served}); the "
              f"ledger row is {final.state}, upstream_status={final.upstream_status}, refund_owed={final.refund_owed} "
              f"(seen {refund_during_call} while the upstream was still working), refund tx {final.refund_tx}, "
              f"answer stored: {stored is not None}; the payer is charged {charged} on chain; upstream calls "
              f"{recording.count('review_order', calls_before)}")
    assert recording.count("review_order", calls_before) == 1, detail
    # Never an answer AND its refund: the answer served means charged, with nothing owed back.
    if served:
        assert final.refund_owed is None and charged == PRICE, detail
    else:
        assert final.refund_owed == PRICE, detail


# -- 3. the deposit floor and the cooperative refund --------------------------------------------------


def test_a_channel_at_the_deposit_floor_is_not_closed_on_the_sellers_gas_after_one_call(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """The floor (8c13f88) exists because "the gateway pays each deposit's gas and its claim's, so a
    channel of one call's price costs the seller more than it earns". A griefer deposits exactly the
    floor (10 prices), makes one call, and asks for a cooperative refund at once (no withdraw delay, no
    gas of its own): the seller claims on the spot and refunds 9 prices, paying a deposit, a claim and a
    refund for one price earned, and the griefer's capital is free for the next channel. A channel that
    has earned fewer calls than the floor must not be closed on the seller's gas (its payer has the
    escrow's own withdrawal, on its gas, after the withdraw delay)."""
    gateway = channel_gateway(start_gateway, devchain, upstream, tmp_path,
                              channel_claim_every_calls=1000, channel_claim_every_seconds=600)
    floor = 10 * CHANNEL_PRICE  # X402GW_CHANNEL_MIN_DEPOSIT_CALLS's default
    griefer_key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), floor)
    griefer = Account.from_key(griefer_key).address
    before, (nonce_before, eth_before) = devchain.balance(griefer), spent(devchain)
    payee_before, calls_before = devchain.balance(PAY_TO), upstream_calls(upstream)
    first_block = devchain.w3.eth.block_number + 1

    scheme = BatchSettlementEvmScheme(Account.from_key(griefer_key), BatchSettlementEvmSchemeOptions(
        salt="0x" + uuid.uuid4().hex * 2, deposit_strategy=lambda ctx: str(floor)))
    client = x402Client()
    client.register(NETWORK, scheme)
    client.set_spend_controls({"allowed_assets": [{"network": NETWORK, "asset": devchain.token}]})
    assert asyncio.run(pay_calls(gateway.url, client, 1)) == [200]
    assert devchain.balance(griefer) == before - floor  # the floor's deposit went into the escrow
    try:
        refund: Any = scheme.refund(f"{gateway.url}/quotes/ACME")
        refunded = (getattr(refund, "success", None), getattr(refund, "amount", None))
    except Exception as exc:  # a refused refund may surface as the SDK's error
        refunded = (False, repr(exc)[:200])
    nonce_after, eth_after = spent(devchain)
    sent = settler_txs(devchain, first_block)
    earned = devchain.balance(PAY_TO) - payee_before
    detail = (f"one call ({upstream_calls(upstream) - calls_before} upstream call), refund {refunded}; the settlement "
              f"key sent {nonce_after - nonce_before} transaction(s) {[(t['to'], t['status'], t['gasUsed']) for t in sent]}"
              f" = {sum(t['gasUsed'] for t in sent)} gas, {eth_before - eth_after} wei, for {earned} earned "
              f"({CHANNEL_PRICE} a call); the griefer holds {devchain.balance(griefer)} of {before}")
    assert upstream_calls(upstream) - calls_before == 1, detail
    # The seller paid one deposit for this channel, nothing more, and the floor stays in the channel.
    assert nonce_after - nonce_before == 1, detail
    assert devchain.balance(griefer) == before - floor, detail
