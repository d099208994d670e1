"""Review of today's changes (024855c..HEAD), attacked end to end: a real anvil (a private one where a
settlement must wait in the pool), real upstreams on loopback, gateways in-process or as real
processes, Redis where replicas would share it. Each test asserts the invariant of
``/work/shared/THREATS.md`` on ledger rows, chain balances and transactions, not on status codes.

1. ``Refunds.owe_lost_answers`` is one-shot per row. The start-up sweep skips a row whose payment lock
   is held ("a live request's"), and the background resolver only ever looks at rows it has just
   moved from ``pending``. A gateway on Redis killed between its upfront settlement and its
   upstream's answer leaves its request's lock in Redis for the lock's TTL (two minutes here); the
   restarted gateway (a supervisor restarts it in seconds) skips the row at start-up, and nothing
   comes back to it once that dead lock lapses: the payer stays charged for an answer it never got.
2. The served facilitator's ``/facilitator/settle`` takes the paid path's lock (today), but a paid
   request whose settlement went ``pending`` (receipt not in time, 503) has released that lock while
   its transaction still waits in the pool, public. Anyone can post that very authorization to
   ``/facilitator/settle``: verify passes (the nonce is not used yet; the pending hold kept today
   does not stop a payer whose balance covers two prices), the gateway broadcasts it a second time,
   and one of the two transactions reverts on the gateway's gas.
3. ``SettleOnce`` releases the lock after the settlement inside its ``except StoreUnavailable``: the
   store going away while the settlement waits for its receipt turns a settlement that moved the
   payer's money into ``success: false, errorReason: store_unavailable`` (a definite refusal for a
   facilitator client: ``settlement_outcome_unknown`` is False), so its client answers "nothing was
   charged" to a charged payer.
4. Upstream headers kept as raw octets (today) still let an upstream's control character (DEL,
   VT, ...) through: aiohttp accepts it, uvicorn refuses to write it, and a settled answer is a
   dropped connection; the resend replays the same stored header. Charged, no answer, no refund.
"""

from __future__ import annotations

import json
import shutil
import socket
import socketserver
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from eth_account import Account
from web3 import Web3

from gateway.devkit.payer import Payer
from settlement.ledger import Payment, PaymentState
from settlement.schema import open_ledger
from settlement.schemes.remote import settlement_outcome_unknown
from settlement.x402.codec import encode_header
from settlement.x402.wire import SettleResponse
from tests.conftest import PAY_TO, Devchain, GatewayFactory, offer_of, running_devchain
from tests.e2e.test_exactly_once import raw_request
from tests.support import chain_actions
from tests.support.polling import poll
from tests.support.processes import gateway_processes
from tests.support.recording_upstream import RecordingUpstream, UpstreamCall

NETWORK = "eip155:31337"
REDIS_URL = "redis://127.0.0.1:6379/0"
FUNDER = 6  # funds each test's fresh payer (delta-based checks only)
CONTENT = b'{"report":"the paid content"}'




def catalog_text(devchain: Devchain, upstream: str, tools: str, owner: str = "review-today") -> str:
    return f"""
catalog: 1
owner: {owner}
payment: {{network: "{NETWORK}", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{upstream}", timeout_seconds: 20}}
tools:
{tools}"""


def settlement_txs(chain: Devchain, first_block: int) -> list[dict[str, Any]]:
    """Every transaction the gateway's settlement account sent from ``first_block`` on, with its status."""
    account = Web3.to_checksum_address(chain.deployment.deployer)
    sent: list[dict[str, Any]] = []
    for number in range(first_block, chain.w3.eth.block_number + 1):
        for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            assert not isinstance(tx, bytes)
            if tx["from"] == account:
                receipt = chain.w3.eth.get_transaction_receipt(tx["hash"])
                sent.append({"hash": tx["hash"].to_0x_hex(), "status": receipt["status"]})
    return sent


def in_pool(chain: Devchain) -> int:
    """How many of the settlement account's transactions wait in the node's pool (automining off)."""
    account = Web3.to_checksum_address(chain.deployment.deployer)
    return chain.w3.eth.get_transaction_count(account, "pending") - chain.w3.eth.get_transaction_count(account, "latest")




@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: tests here switch automining off (``manual_mining``)."""
    with running_devchain(tmp_path_factory.mktemp("review-today")) as private:
        yield private


# -- 1. a dead request's lock outlives its gateway: the lost answer's refund is never owed -------------


LOST_TOOL = """
  - name: lost_order
    description: Places an order (side effects), settled before the call
    method: GET
    path: /lost/{item}
    upstream_path: /u/lost_order/{item}
    price: "0.003"
    settle: upfront
"""
LOST_PRICE = 3000


def test_an_upfront_answer_lost_with_its_gateway_is_owed_back_once_the_dead_requests_lock_lapses(
    devchain: Devchain, recording: RecordingUpstream, tmp_path: Path
) -> None:
    """A gateway sharing Redis (as replicas do) settles an ``upfront`` order and is killed -9 while its
    upstream runs: settled, no answer, no upstream status, the request dead. Its in-flight lock stays
    in Redis for its TTL. The gateway restarts at once; its start-up sweep sees the lock ("a live
    request's") and leaves the row; once the lock has lapsed, several background rounds later, the
    refund must be owed: nobody else ever will (the payer's agent does not resend)."""
    catalog = tmp_path / "lost.yaml"
    catalog.write_text(catalog_text(devchain, recording.url, LOST_TOOL))
    prefix = f"x402gw-review-{uuid.uuid4().hex[:10]}:"
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    env = {"X402GW_CATALOG": str(catalog), "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
           "X402GW_DATABASE_URL": database_url, "X402GW_REDIS_URL": REDIS_URL, "X402GW_REDIS_PREFIX": prefix,
           "X402GW_RECEIPT_TIMEOUT_SECONDS": "10", "X402GW_RESOLVE_PENDING_SECONDS": "0.3"}
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 50_000)
    payer = Account.from_key(key).address
    called, release = threading.Event(), threading.Event()

    def hold(call: UpstreamCall) -> None:  # the upstream is running when the gateway dies
        called.set()
        release.wait(60)

    recording.on("lost_order", hold)
    store = redis.Redis.from_url(REDIS_URL)
    ledger = open_ledger(database_url)
    payer_before, pay_to_before = devchain.balance(payer), devchain.balance(PAY_TO)
    try:
        with gateway_processes([env], tmp_path) as [gateway]:
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                offer = offer_of(client.get("/lost/1"))
            payment = Payer(key).sign(offer.accepts[0], resource=offer.resource)
            nonce = str(payment.payload["authorization"]["nonce"]).lower()
            sock = raw_request(gateway.port, "/lost/1", encode_header(payment))
            assert called.wait(30), "the upstream was never called"
            [row] = ledger.all()
            assert row.state == PaymentState.SETTLED and row.upstream_status is None  # settled, no answer yet
            lock = f"{prefix}pay:{NETWORK}:{payer.lower()}:{nonce}"
            assert store.get(lock) is not None, "the request holds no in-flight lock in Redis"
            gateway.kill9()  # between the settlement and the answer
            sock.close()
        release.set()
        with gateway_processes([env], tmp_path):  # restarted at once, as a supervisor would
            # The dead request's lock is still there (its TTL is two minutes): the start-up sweep left
            # the row to it. Its TTL passes (fast-forwarded: Redis drops it now, as it would by itself).
            if store.exists(lock):
                store.pexpire(lock, 1)
            assert poll(lambda: store.exists(lock), lambda n: n == 0, 5) == 0
            final: Payment = poll(lambda: ledger.get(row.id), lambda r: r.refund_owed is not None, 10)
            answer_missing = ledger.stored_response(row.id) is None
    finally:
        release.set()
        recording.on("lost_order", None)
        ledger.close()
        store.close()
    # The chain and the upstream: charged once, for an order whose answer never reached the payer.
    assert payer_before - devchain.balance(payer) == LOST_PRICE
    assert devchain.balance(PAY_TO) - pay_to_before == LOST_PRICE
    assert answer_missing  # no answer exists for this payment: none ever reached the payer
    assert final.refund_owed == LOST_PRICE, (
        f"payer charged {LOST_PRICE} for an upfront call whose request died with its gateway; the restarted "
        f"gateway skipped the row at start-up (the dead request's Redis lock) and never came back to it after "
        f"the lock lapsed: row {final.state}, refund_owed={final.refund_owed}, upstream_status={final.upstream_status}"
    )


# -- 2. a pending settlement broadcast a second time through the facilitator API --------------------


HELD_TOOL = """
  - name: pending_read
    description: A paid read (settles after the upstream answers)
    method: GET
    path: /pending/{item}
    upstream_path: /u/pending_read/{item}
    price: "0.002"
    settle: after
"""
HELD_PRICE = 2000


def test_a_pending_settlement_is_not_broadcast_again_for_a_facilitator_caller(
    chain: Devchain, recording: RecordingUpstream, start_gateway: GatewayFactory, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """P is presented on /pending/1; its settlement is broadcast and its receipt does not come in time:
    503 settlement_pending, the lock released, P's transaction waiting in the pool where anyone reads
    its calldata. A griefer rebuilds P from it and posts it to /facilitator/settle. The gateway must
    not broadcast P a second time: one of the two transactions can only revert, on the gateway's gas."""
    catalog = tmp_path / "pending.yaml"
    catalog.write_text(catalog_text(chain, recording.url, HELD_TOOL))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, serve_facilitator=True,
                            facilitator_pay_to=[PAY_TO], receipt_timeout_seconds=1, resolve_pending_seconds=0)
    key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 50_000)  # room for several prices
    payer = Account.from_key(key).address
    with gateway.client() as client:
        offer = offer_of(client.get("/pending/1"))
    signed = Payer(key).sign(offer.accepts[0], resource=offer.resource)
    payment = signed.to_wire()
    before = chain.balance(payer), chain.balance(PAY_TO)
    first_block = chain.w3.eth.block_number + 1
    manual_mining: Callable[[], None] = request.getfixturevalue("manual_mining")  # blocks only when the test says
    with gateway.client() as client:
        paid = client.get("/pending/1", headers={"PAYMENT-SIGNATURE": encode_header(signed)})
    assert paid.status_code == 503 and paid.json()["error"] == "settlement_pending", paid.text
    assert in_pool(chain) == 1  # P's settlement, public in the pool
    body = {"x402Version": 2, "paymentPayload": payment, "paymentRequirements": payment["accepted"]}
    facilitated = httpx.post(f"{gateway.url}/facilitator/settle", json=body, timeout=60)
    waiting = in_pool(chain)
    manual_mining()
    sent = settlement_txs(chain, first_block)
    [row] = gateway.ledger.all()
    charged = before[0] - chain.balance(payer)
    assert (charged, chain.balance(PAY_TO) - before[1]) == (HELD_PRICE, HELD_PRICE)  # P moved once
    reverted = [tx for tx in sent if tx["status"] != 1]
    assert reverted == [] and len(sent) == 1, (
        f"the gateway broadcast P again while P's own settlement waited in the pool ({waiting} in the pool): "
        f"sent {sent}; /facilitator/settle told its caller {facilitated.json()}; the paid row is {row.state} "
        f"with tx {row.tx_hash}: the second broadcast could only revert, on the gateway's gas"
    )


# -- 3. the store going away during a served settlement turns its success into a refusal --------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test's own (the test stops it mid-settlement; the shared one stays up)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--save", "", "--appendonly", "no",
                                "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        ready = poll(lambda: _pings(client), bool, 10)
        assert ready, "the private redis-server did not start"
        yield url, process
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
        process.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_a_served_settlement_that_moved_the_money_is_never_answered_as_refused_when_the_store_goes_away(
    chain: Devchain, recording: RecordingUpstream, start_gateway: GatewayFactory, tmp_path: Path,
    private_redis: tuple[str, subprocess.Popen[bytes]], request: pytest.FixtureRequest,
) -> None:
    """/facilitator/settle of P takes the payment lock in Redis and broadcasts; Redis goes away while
    the receipt is awaited; the transaction lands and P's price moves. The facilitator's caller must
    be told it settled (or that the outcome is unknown), never a definite refusal: it would answer its
    charged payer "nothing was charged, pay again"."""
    url, server = private_redis
    catalog = tmp_path / "facilitated.yaml"
    catalog.write_text(catalog_text(chain, recording.url, HELD_TOOL.replace("pending_read", "served_read")
                                    .replace("/pending/", "/served/")))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, serve_facilitator=True,
                            facilitator_pay_to=[PAY_TO], receipt_timeout_seconds=30, resolve_pending_seconds=0,
                            redis_url=url, redis_prefix=f"review-{uuid.uuid4().hex[:8]}:")
    key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 50_000)
    payer = Account.from_key(key).address
    with gateway.client() as client:
        offer = offer_of(client.get("/served/1"))
    payment = Payer(key).sign(offer.accepts[0], resource=offer.resource).to_wire()
    before = chain.balance(payer), chain.balance(PAY_TO)
    body = {"x402Version": 2, "paymentPayload": payment, "paymentRequirements": payment["accepted"]}
    manual_mining: Callable[[], None] = request.getfixturevalue("manual_mining")  # blocks only when the test says
    answers: list[httpx.Response] = []
    poster = threading.Thread(target=lambda: answers.append(
        httpx.post(f"{gateway.url}/facilitator/settle", json=body, timeout=90)))
    poster.start()
    try:
        assert poll(lambda: in_pool(chain), lambda n: n == 1, 20) == 1, "the settlement was never broadcast"
        server.kill()  # the state store goes away while the receipt is awaited
        server.wait(10)
        manual_mining()  # the settlement lands
    finally:
        poster.join(90)
    assert answers, "/facilitator/settle never answered"
    answer = SettleResponse.model_validate(answers[0].json())
    moved = before[0] - chain.balance(payer), chain.balance(PAY_TO) - before[1]
    assert moved == (HELD_PRICE, HELD_PRICE)  # P's price moved to the payee, on chain
    assert answer.success or settlement_outcome_unknown(answer), (
        f"P's price moved on chain ({moved}), yet /facilitator/settle told its caller a definite refusal: "
        f"{json.dumps(answers[0].json())}"
    )


# -- 4. an upstream header with a control character: charged, and the answer never written ------------


class RawUpstream:
    """A raw TCP upstream: its answer's bytes go out exactly as written (no server validates them)."""

    def __init__(self, answer: bytes) -> None:
        self.calls: list[bytes] = []
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                outer.calls.append(head.split(b"\r\n", 1)[0])
                self.request.sendall(answer)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RawUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


CONTROL_HEADER = (b"x-upstream-note", b"rev\x7f2")  # DEL: accepted by aiohttp, refused by uvicorn's writer


@pytest.fixture(scope="module")
def control_upstream() -> Iterator[RawUpstream]:
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + CONTROL_HEADER[0] + b": " + CONTROL_HEADER[1]
              + b"\r\ncontent-length: " + str(len(CONTENT)).encode() + b"\r\nconnection: close\r\n\r\n" + CONTENT)
    with RawUpstream(answer) as upstream:
        yield upstream


def fetch(client: httpx.Client, path: str, header: str) -> httpx.Response | None:
    """The paid call's answer; None when the gateway dropped the connection without one."""
    try:
        return client.get(path, headers={"PAYMENT-SIGNATURE": header})
    except httpx.RemoteProtocolError:
        return None


def test_a_settled_answer_with_a_control_character_in_an_upstream_header_is_delivered_or_not_charged(
    devchain: Devchain, start_gateway: GatewayFactory, tmp_path: Path, control_upstream: RawUpstream
) -> None:
    catalog = tmp_path / "control.yaml"
    catalog.write_text(catalog_text(devchain, control_upstream.url, """
  - name: report
    description: A paid report
    method: GET
    path: /t/report
    upstream_path: /h/report
    price: "0.001"
    settle: after
    input_schema: {type: object, additionalProperties: false}
"""))
    gateway = start_gateway(catalog)
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(FUNDER), 50_000)
    payer = Account.from_key(key).address
    before = devchain.balance(payer), devchain.balance(PAY_TO)
    calls_before = len(control_upstream.calls)
    with gateway.client() as client:
        offer = offer_of(client.get("/t/report"))
        header = encode_header(Payer(key).sign(offer.accepts[0], resource=offer.resource))
        paid = fetch(client, "/t/report", header)
        again = fetch(client, "/t/report", header)  # the payer's resend of the same payment
    [row] = gateway.ledger.all()
    charged = before[0] - devchain.balance(payer)
    assert len(control_upstream.calls) - calls_before == 1  # asked once
    if charged == 0:  # not charged: nothing of the content may have gone out
        assert row.state != PaymentState.SETTLED and devchain.balance(PAY_TO) == before[1]
        assert all(answer is None or CONTENT not in answer.content for answer in (paid, again))
        return
    assert (charged, devchain.balance(PAY_TO) - before[1]) == (1000, 1000)
    assert row.state == PaymentState.SETTLED and row.tx_hash
    got = [None if answer is None else (answer.status_code, answer.content[:80]) for answer in (paid, again)]
    assert all(answer is not None and answer.status_code == 200 and answer.content == CONTENT
               for answer in (paid, again)), (
        f"charged {charged} (settled, tx {row.tx_hash}), refund_owed={row.refund_owed}; the payer got {got}: "
        f"the upstream's header {CONTROL_HEADER!r} cannot be written, the answer paid for is never delivered"
    )

