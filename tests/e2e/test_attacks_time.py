"""Time attacks on the paid path (a review of payment windows, the chain's clock and lookbacks).

Found by an attack review of TIME; each test failed on the code it was written against, names the
invariant it holds, and is fixed as follows:

1. ``test_an_upto_stream_read_slowly_past_its_deadline_is_still_charged_what_it_delivered``: a
   payer that stopped reading a metered (``upto``) stream held back the stream's settlement for as
   long as it liked, resumed once the Permit2 deadline had passed and kept everything streamed, for
   nothing (``relay.PaidStream`` checked the tool's time budget only while a chunk waited on the
   upstream, never while one waited for the payer). Fixed: one timer bounds the whole relay, the
   upstream's waits and the payer's (``PaidStream._relay``), ending at the tool's budget counted from
   the upstream call (headers included) or the payment's deadline less the settle margin, whichever
   comes first; the stream is cut there and what was sent is settled at once, whether or not the
   payer reads (its outcome and the end of the stream wait a bounded grace for it).
2. ``test_a_permit2_copy_mined_more_than_64_blocks_before_our_revert_is_still_this_payment``: a
   griefer's copy of a pending exact-through-Permit2 settlement that landed more than
   ``COPY_SCAN_BLOCKS`` before the gateway's own (stuck, then reverted) transaction was not found:
   the payer was charged, the ledger said failed, the payer got a plain 402. Fixed: the chain's head
   is read beside the settlement's write-ahead, before its broadcast (``permit2_outcome.BroadcastHead``),
   and the copy is looked for from that block up to our receipt, in bounded ``eth_getLogs`` windows;
   an open row read back later (no such head known) keeps the ``COPY_SCAN_BLOCKS`` window.
3. ``test_a_payment_already_expired_by_the_chains_clock_is_refused_before_the_upstream``: the
   payment window was judged by the gateway's clock only; with the chain's clock ahead (a skewed
   host), a payment signed with the minimum window verified, the upstream ran unpaid and the
   settlement was broadcast and reverted on the gateway's gas. Fixed: windows are judged by the
   later of our clock and the chain's (``settlement.chain.head_clock.HeadClock``: the head's
   timestamp, carried forward, read at start-up and then in the background at most every 2 s, so
   no paid call waits for it), in ``payment_window`` and in the local facilitator.
4. ``test_an_upfront_payment_too_close_to_its_valid_before_is_refused_before_any_broadcast``: an
   ``upfront`` tool took a payment with 8 s left (its 15 s settle margin was never enforced); the
   block that takes the settlement one slot later is past ``validBefore``: reverted, the gateway's
   gas. Fixed: ``payment_window`` applies to every tool, an upfront one needing the settle margin
   (15 s: verify, the write-ahead, a 12 s slot and its propagation), and the catalog refuses an
   upfront tool whose ``max_timeout_seconds`` is shorter.

Private anvils (one ahead of our clock, one whose blocks the test mines by hand): no other module
is affected.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from web3 import Web3
from web3.exceptions import TransactionNotFound

from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.schemes.permit2_outcome import COPY_SCAN_BLOCKS
from settlement.x402.codec import encode_header
from tests.conftest import (
    PAY_TO,
    Devchain,
    GatewayFactory,
    RunningGateway,
    body_json,
    demo_catalog,
    offer_of,
    running_devchain,
    upstream_hits,
)
from tests.e2e.test_attacks_code_payers import PLAIN_CATALOG, PLAIN_PRICE
from tests.e2e.test_attacks_gas import settler
from tests.e2e.test_attacks_permit2_copies import _broadcast_then, _mine, _permit2_header, _rows
from tests.e2e.test_upto_paid_call import _header as upto_header
from tests.support import chain_actions

pytestmark = pytest.mark.e2e

CHAIN_AHEAD_SECONDS = 60  # the skewed chain's blocks are dated a minute ahead of the gateway's clock


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil on our clock; one test mines its blocks by hand (automining restored after)."""
    with running_devchain(tmp_path_factory.mktemp("review-time")) as private:
        yield private


@pytest.fixture(scope="module")
def ahead_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil whose clock runs ahead of the gateway's (equivalently: a gateway host whose clock is slow)."""
    with running_devchain(tmp_path_factory.mktemp("review-time-ahead")) as private:
        private.w3.provider.make_request("evm_setTime", [int(time.time()) + CHAIN_AHEAD_SECONDS])  # type: ignore[arg-type]
        private.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        yield private


def _mined(chain: Devchain, tx_hash: Any) -> bool:
    try:
        return chain.w3.eth.get_transaction_receipt(tx_hash) is not None
    except TransactionNotFound:
        return False


def _settlement_nonce(chain: Devchain) -> int:
    return chain.w3.eth.get_transaction_count(settler(chain))


# -- 1. a metered stream whose payer stops reading until the deadline has passed ---------------------------

EVENT_PAD = 16 * 1024  # bytes of filler per event: a few hundred events fill the socket buffers
EVENTS = 2000  # 32 MB: far more than the buffers between the gateway and a payer that does not read
STREAM_CATALOG = """
catalog: 1
owner: review-time-streams
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 16
upstreams:
  feed: {{base_url: "{upstream}", timeout_seconds: 1, retry: {{attempts: 1}}}}
tools:
  - name: feed
    description: A metered event feed, charged per event delivered.
    method: GET
    path: /feed
    upstream: feed
    upstream_path: /feed
    price: 0.000001
    max_price: 0.01
    stream: true
    payment: {{scheme: upto}}
    usage: {{from: events}}
"""


class BigFeed:
    """An upstream that streams ``EVENTS`` large SSE events as fast as it is read; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def app(self) -> Starlette:
        async def feed(request: Request) -> Response:
            self.calls += 1

            async def events() -> AsyncIterator[bytes]:
                pad = "x" * EVENT_PAD
                for i in range(EVENTS):
                    yield f'data: {{"i": {i}, "content": "PAID-CONTENT-{i}", "pad": "{pad}"}}\n\n'.encode()

            return StreamingResponse(events(), media_type="text/event-stream")

        return Starlette(routes=[Route("/feed", feed, methods=["GET"])])


@pytest.fixture
def big_feed() -> Iterator[tuple[BigFeed, str]]:
    feed = BigFeed()
    with ThreadServer(feed.app()) as server:
        yield feed, server.url


def _recv_until(sock: socket.socket, wanted: bytes, received: bytearray) -> None:
    while wanted not in received:
        chunk = sock.recv(65536)
        assert chunk, bytes(received[:300])
        received += chunk


def _recv_all(sock: socket.socket, received: bytearray) -> None:
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return
        received += chunk


def test_an_upto_stream_read_slowly_past_its_deadline_is_still_charged_what_it_delivered(
    start_gateway: GatewayFactory, chain: Devchain, tmp_path: Path, big_feed: tuple[BigFeed, str],
) -> None:
    """Attack (free-rider, alone): pay a metered stream (``upto``, settled once the stream ends) with
    the shortest deadline the tool takes (its 1 s upstream budget + 15 s: 16 s), read the first events,
    then stop reading. The gateway's next ``yield`` waits on the payer's socket (backpressure), and
    ``PaidStream._body`` checks the tool's time budget (``max_call_seconds``, what the payment's window
    was sized for) only before it pulls the next chunk: nothing ends the stream or settles it while the
    payer does not read. Once our clock is within 6 s of the deadline the payer reads again: the loop
    ends (``stream_time_limit``) and settles what was delivered, but the Permit2 deadline is too close
    (``UptoEvm._offline``): nothing is charged, the payer keeps megabytes of content.
    Correct: the stream is settled (what was delivered) when the tool's time budget ends, whether or
    not the payer reads: content delivered is content charged."""
    feed, url = big_feed
    catalog = tmp_path / "feed.yaml"
    catalog.write_text(STREAM_CATALOG.format(token=chain.token, pay_to=PAY_TO, upstream=url))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, max_upstream_response_bytes=64 * 1_048_576)
    payer_index = 5
    with gateway.client() as http:
        offer = http.get("/feed")
    assert offer.status_code == 402, offer.text
    required = json.loads(base64.b64decode(offer.headers["PAYMENT-REQUIRED"]))
    assert required["accepts"][0]["maxTimeoutSeconds"] == 16
    header = upto_header(chain, payer_index, required)
    deadline = int(json.loads(base64.b64decode(header))["payload"]["permit2Authorization"]["deadline"])
    payer, payee_before = chain.address(payer_index), chain.balance(PAY_TO)
    payer_before = chain.balance(payer)

    received = bytearray()
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a payer that reads little at a time
        sock.connect(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])))
        sock.sendall(f"GET /feed HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                     f"PAYMENT-SIGNATURE: {header}\r\n\r\n".encode())
        _recv_until(sock, b"PAID-CONTENT-3\"", received)  # the stream is live: the payer has its first events
        # ... and reads no more until our clock is 5 s from the deadline (the attack's only cost: waiting)
        pause = threading.Event()
        while time.time() < deadline - 5:
            pause.wait(0.2)
        _recv_all(sock, received)  # reads on: everything the buffers held, and the end of the stream

    text = received.decode(errors="replace")
    delivered = text.count('"content": "PAID-CONTENT-')
    outcome = next((json.loads(line[5:]) for line in text.splitlines()
                    if line.startswith("data:") and '"streamEnded"' in line), None)
    rows = [r for r in gateway.ledger.all() if r.tool == "feed"]
    moved = chain.balance(PAY_TO) - payee_before
    assert text.startswith("HTTP/1.1 200") and delivered > 100, text[:400]
    assert feed.calls == 1
    assert len(rows) == 1 and rows[0].state == PaymentState.SETTLED and rows[0].amount > 0 and moved == rows[0].amount, (
        f"the payer received {delivered} events ({len(received)} bytes) of a stream priced 1 atomic unit per event, "
        f"stopped reading until 5 s before its deadline, and paid {payer_before - chain.balance(payer)} "
        f"(payee +{moved}); the stream's settlement event: {outcome}; ledger: "
        f"{[(str(r.state), r.amount, r.error_reason) for r in rows]}")


# -- 2. a griefer's Permit2 copy mined more than COPY_SCAN_BLOCKS before our settlement's revert -------------


def test_a_permit2_copy_mined_more_than_64_blocks_before_our_revert_is_still_this_payment(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (griefer, on a congested chain): the gateway's exact-through-Permit2 settlement is in the
    pool with a fee cap of twice the base fee of when it was signed (``BroadcastLane._fees_now``),
    and the base fee climbs past it: our transaction waits. The griefer sends the very same calldata
    to the (open) exact proxy with a fee that clears, so the payer's price moves to payTo under this
    permit. The base fee stays high for ``COPY_SCAN_BLOCKS`` + 2 blocks, then falls; our transaction
    is mined and reverts (Permit2 nonce used). ``explain_revert`` looks for the copy only in the 64
    blocks before our receipt (``permit2_outcome.copied_settlement``): not found, so the row is
    ``failed`` (``permit2_nonce_used``) and the payer gets a 402 asking it to pay again, with its money
    at payTo and no refund owed. Correct: the copy is found however long ours waited (it can only
    come after our broadcast, whose block the gateway knows): settled by the copy, the answer served."""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=60,
                            resolve_pending_seconds=0)
    payer_index = 4
    key, address = chain.key(payer_index), chain.address(payer_index)
    griefer_key = chain.key(7)
    chain_actions.set_eth(chain.w3, chain.address(7), 10**22)
    path = "/q/LATE"
    header = _permit2_header(gateway, key, plain.address, path)
    pay_to_before = chain_actions.balance_of(chain.w3, plain.address, PAY_TO)
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/LATE")
    blocks: dict[str, int] = {}
    ours_hash: list[Any] = []

    def congested_then_copied(tx: Any) -> None:
        w3 = chain.w3
        high = int(tx["maxFeePerGas"]) * 10**5  # far above our fee cap, for every block below
        set_base = "anvil_setNextBlockBaseFeePerGas"
        raw = w3.provider.make_request("eth_getRawTransactionByHash", [tx["hash"].to_0x_hex()])["result"]  # type: ignore[arg-type]
        w3.provider.make_request(set_base, [hex(high)])  # type: ignore[arg-type]
        account = w3.eth.account.from_key(griefer_key)
        copy_tx = {"from": account.address, "to": Web3.to_checksum_address(str(tx["to"])), "data": bytes(tx["input"]),
                   "gas": 400_000, "nonce": w3.eth.get_transaction_count(account.address, "pending"),
                   "maxFeePerGas": 2 * high, "maxPriorityFeePerGas": 10**9, "chainId": 31337}
        copy_hash = "0x" + bytes(w3.eth.send_raw_transaction(account.sign_transaction(copy_tx).raw_transaction)).hex()
        _mine(chain)  # the copy lands; ours waits in the pool, its fee cap below the base fee
        blocks["copy"] = int(w3.eth.get_transaction_receipt(copy_hash)["blockNumber"])  # type: ignore[arg-type]
        for _ in range(COPY_SCAN_BLOCKS + 2):
            w3.provider.make_request(set_base, [hex(high)])  # type: ignore[arg-type]
            _mine(chain)
        assert not _mined(chain, tx["hash"])  # ours still waits (anvil evicts it; a geth pool would keep it)
        w3.provider.make_request(set_base, [hex(1)])  # type: ignore[arg-type]  # the congestion passes
        w3.provider.make_request("eth_sendRawTransaction", [raw])  # type: ignore[arg-type]  # ours, as signed: mined next
        ours_hash.append(tx["hash"])

    first = _broadcast_then(chain, gateway, address, lambda: httpx.get(
        f"{gateway.url}{path}", headers={"PAYMENT-SIGNATURE": header}, timeout=90), congested_then_copied)
    ours = chain.w3.eth.get_transaction_receipt(ours_hash[0])
    assert ours["status"] == 0 and ours["blockNumber"] - blocks["copy"] > COPY_SCAN_BLOCKS, (ours["status"], ours["blockNumber"], blocks)
    received = chain_actions.balance_of(chain.w3, plain.address, PAY_TO) - pay_to_before
    assert received == PLAIN_PRICE  # the payer paid, once, under this permit (the copy)
    rows = _rows(gateway, address)
    with gateway.client() as http:
        resend = http.get(path, headers={"PAYMENT-SIGNATURE": header})
    assert first.status_code == 200 and len(rows) == 1 and rows[0].state == PaymentState.SETTLED, (
        f"payTo received the payer's {received} under this permit (a copy mined {ours['blockNumber'] - blocks['copy']} "
        f"blocks before our reverted settlement), yet the payer was answered {first.status_code} "
        f"{first.text[:200]!r}, its resend {resend.status_code} {resend.text[:160]!r}, and the ledger says "
        f"{[(str(r.state), r.error_reason, r.refund_owed) for r in rows]}: charged without its answer")
    assert upstream_hits(upstream, "GET /api/v1/quote/LATE") - hits_before == 1


# -- 3. the payment window judged by our clock only --------------------------------------------------------------


def test_a_payment_already_expired_by_the_chains_clock_is_refused_before_the_upstream(
    start_gateway: GatewayFactory, ahead_chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (free-rider/griefer): the chain's clock is a minute ahead of the gateway's (a gateway host
    whose clock is slow; its clock is public in every ``Date`` header and ``validBeforeAtLeast``). The
    attacker signs ``get_quote`` with the shortest window the gateway takes (``check_window`` and
    ``LocalFacilitator._authorization`` both read ``time.time()``): by the chain's clock, which is the
    one the token judges ``validBefore`` by, it has already expired. Verify passes (an EOA's transfer
    is never simulated), the upstream is called, the settlement is broadcast and reverts: the upstream
    call is unpaid and the gas is the gateway's, per attempt, for free. Correct: a payment whose
    ``validBefore`` the chain's head has passed (or leaves too little of) is refused before the
    upstream and before any broadcast."""
    catalog = demo_catalog(tmp_path, upstream)
    gateway: RunningGateway = start_gateway(catalog, deployment_file=ahead_chain.deployment_file)
    payer = Payer(ahead_chain.key(3))
    needed = gateway.catalogs.tool("get_quote").payment_window_seconds
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/SKEW"))
        valid_before = int(time.time()) + needed + 2  # inside the window by the gateway's clock
        head = int(ahead_chain.w3.eth.get_block("latest")["timestamp"])
        assert head >= valid_before, (head, valid_before)  # the scenario: closed by the chain's clock
        header = encode_header(payer.sign(offer.accepts[0], resource=offer.resource, valid_before=valid_before).to_wire())
        nonce_before, eth_before = _settlement_nonce(ahead_chain), ahead_chain.w3.eth.get_balance(settler(ahead_chain))
        hits_before = upstream_hits(upstream, "GET /api/v1/quote/SKEW")
        answer = client.get("/quotes/SKEW", headers={"PAYMENT-SIGNATURE": header})
    broadcasts = _settlement_nonce(ahead_chain) - nonce_before
    gas = eth_before - ahead_chain.w3.eth.get_balance(settler(ahead_chain))
    upstream_calls = upstream_hits(upstream, "GET /api/v1/quote/SKEW") - hits_before
    rows = [(str(r.state), r.error_reason, r.gas_cost) for r in gateway.ledger.all()]
    assert answer.status_code == 402, answer.text
    assert broadcasts == 0 and upstream_calls == 0, (
        f"a payment already expired by the chain's clock (head {head} >= validBefore {valid_before}) was "
        f"verified: {upstream_calls} unpaid upstream call(s), {broadcasts} settlement broadcast(s) reverting on "
        f"{gas} wei of the gateway's gas; answer {answer.status_code} {body_json(answer).get('error')}; ledger {rows}")


# -- 4. an upfront tool takes a payment with 6 s left: broadcast, mined a block later, reverted ---------------

UPFRONT_CATALOG = """
catalog: 1
owner: review-time-upfront
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  legacy: {{base_url: "{upstream}"}}
tools:
  - name: quote_first
    description: A quote settled before the upstream runs.
    method: GET
    path: /qf/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: "0.002"
    settle: upfront
    input_schema:
      type: object
      properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [symbol]
"""
BLOCK_INTERVAL_SECONDS = 12  # an Ethereum slot: the block after a broadcast may come this much later


def test_an_upfront_payment_too_close_to_its_valid_before_is_refused_before_any_broadcast(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (griefer): an ``upfront`` tool settles before its upstream, and its payment window
    (``Tool.payment_window_seconds``: "for upfront tools, the settle margin", 15 s) is never
    enforced: ``PaymentWindow`` checks ``settle: after`` tools only, and the facilitator keeps the
    reference's 6 s (``VALID_BEFORE_MARGIN_SECONDS``). The attacker signs ``validBefore = now + 8``:
    verified, broadcast, and the next block (one 12 s slot later on Ethereum, where USDC has
    EIP-3009) is dated past ``validBefore``: the transfer reverts, nothing moves, the gateway paid
    the gas, and the attacker can do it again with every fresh nonce for free.
    Correct: a payment whose window cannot cover the settlement's block is refused (402
    ``payment_window_too_short``) before any broadcast."""
    catalog = tmp_path / "upfront.yaml"
    catalog.write_text(UPFRONT_CATALOG.format(token=chain.token, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=30)
    payer = Payer(chain.key(6))
    with gateway.client() as client:
        offer = offer_of(client.get("/qf/EDGE"))
    left = 8  # past the facilitator's 6 s margin, short of the tool's 15 s
    valid_before = int(time.time()) + left
    header = encode_header(payer.sign(offer.accepts[0], resource=offer.resource, valid_before=valid_before).to_wire())
    nonce_before, eth_before = _settlement_nonce(chain), chain.w3.eth.get_balance(settler(chain))
    payee_before, hits_before = chain.balance(PAY_TO), upstream_hits(upstream, "GET /api/v1/quote/EDGE")

    def next_slot(_: Any) -> None:  # the block that takes our settlement comes one slot after the broadcast
        head = int(chain.w3.eth.get_block("latest")["timestamp"])
        chain.w3.provider.make_request(  # type: ignore[arg-type]
            "evm_setNextBlockTimestamp", [max(head + 1, int(time.time()) + BLOCK_INTERVAL_SECONDS)])

    try:
        answer = _broadcast_then(chain, gateway, payer.address, lambda: httpx.get(
            f"{gateway.url}/qf/EDGE", headers={"PAYMENT-SIGNATURE": header}, timeout=60), next_slot)
    except AssertionError as refused:  # answered before any broadcast: what a fixed gateway does
        assert "answered before any broadcast" in str(refused), refused
        answer = None
    broadcasts = _settlement_nonce(chain) - nonce_before
    gas = eth_before - chain.w3.eth.get_balance(settler(chain))
    rows = [(str(r.state), r.error_reason, r.gas_cost) for r in gateway.ledger.all()]
    assert chain.balance(PAY_TO) == payee_before  # nothing moved either way
    assert upstream_hits(upstream, "GET /api/v1/quote/EDGE") == hits_before
    assert broadcasts == 0, (
        f"a payment signed with {left}s left was "
        f"taken by an upfront tool: {broadcasts} settlement broadcast, reverted in the next slot, {gas} wei of the "
        f"gateway's gas; answer {answer.status_code if answer is not None else None} "
        f"{answer.text[:160] if answer is not None else ''!r}; ledger {rows}")
