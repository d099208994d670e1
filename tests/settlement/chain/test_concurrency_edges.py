"""Edges of the settlement concurrency code (settlement.chain.client, settlement.ledger.payments) found in review:
each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import rlp
from sqlalchemy import create_engine, text
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.devkit.devchain import LOCAL_NETWORK
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.chain.client import JsonRpcChain
from settlement.errors import ChainUnavailable
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.schemes.exact_local import LocalFacilitator
from settlement.x402.wire import SettleResponse
from tests.conftest import Devchain
from tests.support.settlement_helpers import SETTLEMENT_KEY, anvil_rpc, ledger_fields, requirements, settlement_nonce, tcp_front

# ------------------------------------------------------------------------------------------ ledger


def test_a_write_ahead_answered_in_a_group_is_not_undone_by_a_neighbours_failed_flush(tmp_path: Path) -> None:
    """Two calls share a group transaction: a write-ahead (``begin_settlement``) and a
    ``record_verified`` whose ORM flush fails (it reuses a voided row with a payment-identifier
    another row holds). The Session joined to the group's connection rolls the WHOLE group
    transaction back on its flush error, yet the write-ahead was already answered "written":
    the settlement would be broadcast with no ``settling`` row and no stored answer."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    ledger = open_ledger(url)
    outside = create_engine(url)

    async def run() -> list[Any]:
        voided = await ledger.run(ledger.record_verified, **ledger_fields(1))
        paying = await ledger.run(ledger.record_verified, **ledger_fields(2, payment_identifier="pid-2"))
        await ledger.run(ledger.void, voided.id, None)
        gate, busy = threading.Event(), threading.Event()

        def hold() -> None:
            busy.set()
            gate.wait()

        holding = asyncio.ensure_future(ledger.run(hold))  # the ledger thread is busy: the next two queue
        await asyncio.to_thread(busy.wait)
        write_ahead = asyncio.ensure_future(ledger.run(
            ledger.begin_settlement, paying.id, (200, [("content-type", "text/plain")], b"ok"), tx_hash="0x" + "b" * 64,
        ))
        conflicting = asyncio.ensure_future(ledger.run(
            ledger.record_verified, **ledger_fields(3, nonce=voided.nonce, payment_identifier="pid-2"),
        ))
        await asyncio.sleep(0)  # one turn of the loop: both calls are queued behind the busy thread
        gate.set()
        await holding
        return [paying.id, *(await asyncio.gather(write_ahead, conflicting, return_exceptions=True))]

    try:
        paying_id, write_ahead, conflicting = asyncio.run(run())
        assert isinstance(conflicting, Exception)  # that call's own error
        if isinstance(write_ahead, BaseException):
            return  # told it failed: nothing is broadcast, fine
        # answered "written": it must be in the database
        with outside.connect() as connection:
            state, tx_hash = connection.execute(
                text("select state, tx_hash from payments where id = :id"), {"id": paying_id}
            ).one()
            stored = connection.execute(
                text("select count(*) from stored_responses where payment_id = :id"), {"id": paying_id}
            ).scalar()
        assert (state, tx_hash, stored) == (PaymentState.SETTLING.value, "0x" + "b" * 64, 1)
    finally:
        outside.dispose()
        ledger.close()


# ------------------------------------------------------------------------------------------- chain


def _is_filler(raw_hex: str) -> bool:
    """A type-2 transaction with empty calldata: the chain client's zero-value gap filler."""
    raw = bytes.fromhex(raw_hex[2:])
    fields = rlp.decode(raw[1:])
    return raw[0] == 2 and fields[7] == b""


@pytest.fixture
def losing_filler_node(devchain: Devchain) -> Iterator[tuple[str, list[int]]]:
    """A JSON-RPC front to anvil that loses (never delivers, answers nothing for) the first
    ``lose[0]`` gap-filler broadcasts, and relays everything else."""
    lose = [0]

    async def handle(request: Request) -> Response:
        body = await request.json()
        calls = body if isinstance(body, list) else [body]
        kept = []
        for call in calls:
            if call.get("method") == "eth_sendRawTransaction" and lose[0] > 0 and _is_filler(call["params"][0]):
                lose[0] -= 1
                continue
            kept.append(call)
        if not kept:
            return Response("bad gateway", status_code=502)
        async with httpx.AsyncClient() as client:
            reply = await client.post(devchain.anvil.rpc_url, content=json.dumps(kept if isinstance(body, list) else kept[0]),
                                      headers={"Content-Type": "application/json"})
        return JSONResponse(reply.json())

    with ThreadServer(Starlette(routes=[Route("/", handle, methods=["POST"])])) as server:
        yield server.url, lose


def test_a_gap_filler_whose_broadcast_was_lost_leaves_no_gap(
    devchain: Devchain, losing_filler_node: tuple[str, list[int]]
) -> None:
    """As test_chain_pipelining's write-ahead-failure test, but the zero-value filler of the freed
    nonce never reaches the node (its answer is lost). ``_fill_gap`` just returns: the nonce is
    neither re-sent nor handed back, so every later settlement stays queued behind the gap for good."""
    url, lose = losing_filler_node
    req = requirements(devchain)
    payments = [Payer(devchain.key(i)).sign(req) for i in (1, 2, 3, 4)]
    start_nonce = settlement_nonce(devchain, "latest")

    async def run() -> list[SettleResponse | BaseException]:
        chain = JsonRpcChain(url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=8)
        signed: list[str] = []
        all_signed = asyncio.Event()

        async def before_send(tx_hash: str) -> None:
            signed.append(tx_hash)
            if len(signed) == len(payments):
                all_signed.set()
            await all_signed.wait()
            if tx_hash == signed[0]:
                raise RuntimeError("ledger down")

        lose[0] = 1
        try:
            return await asyncio.gather(
                *(local.settle(p, req, before_send=before_send) for p in payments), return_exceptions=True
            )
        finally:
            await chain.close()

    results = asyncio.run(run())
    assert lose[0] == 0  # the filler was lost once
    others = [r for r in results if not isinstance(r, RuntimeError)]
    assert len(others) == len(payments) - 1
    assert all(isinstance(r, SettleResponse) and r.success for r in others), [
        getattr(r, "error_reason", r) for r in others
    ]
    assert settlement_nonce(devchain, "latest") == start_nonce + len(payments)
    assert settlement_nonce(devchain, "pending") == settlement_nonce(devchain, "latest")


@pytest.fixture
def answer_dropping_proxy(devchain: Devchain) -> Iterator[tuple[str, list[int]]]:
    """An HTTP/1.1 front to anvil that, while ``drop[0] > 0``, DELIVERS a broadcast to anvil and then
    closes the connection without answering (a kept-alive connection dropped after the request
    reached the node). Everything else is relayed."""
    drop = [0]

    def read_request(conn: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
        while b"\r\n\r\n" not in buffer:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return None, b""
            rest += chunk
        return rest[:length], rest[length:]

    def serve_connection(conn: socket.socket) -> None:
        buffer = b""
        with conn, httpx.Client() as client:
            while True:
                try:
                    body, buffer = read_request(conn, buffer)
                except OSError:
                    return
                if body is None:
                    return
                reply = client.post(devchain.anvil.rpc_url, content=body, headers={"Content-Type": "application/json"})
                if drop[0] > 0 and b"eth_sendRawTransaction" in body:
                    drop[0] -= 1
                    return  # delivered, answer lost
                data = reply.content
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(data)).encode() + b"\r\n\r\n" + data)

    with tcp_front(serve_connection) as url:
        yield url, drop


def test_a_broadcast_repeated_after_a_dropped_connection_is_not_reported_refused(
    devchain: Devchain, answer_dropping_proxy: tuple[str, list[int]]
) -> None:
    """The broadcast reaches anvil (not mined at once: automine off, as with ``--block-time``), the
    connection drops, ``_http`` sends it again and anvil answers "transaction already imported".
    ``send_call`` only recognises "already known"/"known transaction", so it treats the answer as an
    outright refusal: the nonce is handed back (reused by the next settlement) and the payment is
    answered "failed, nothing was charged" while its transaction is in the pool and is then mined."""
    url, drop = answer_dropping_proxy
    req = requirements(devchain)
    payment = Payer(devchain.key(7)).sign(req)
    auth = payment.payload["authorization"]

    async def run() -> SettleResponse:
        chain = JsonRpcChain(url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        timer: threading.Timer | None = None
        try:
            await chain.block_number()  # a kept-alive connection
            await chain._fees_now()
            await chain._take_nonce() and chain._give_back(chain._nonce - 1)  # nonce known
            anvil_rpc(devchain, "evm_setAutomine", False)
            drop[0] = 1
            timer = threading.Timer(2.0, lambda: anvil_rpc(devchain, "evm_setAutomine", True))
            timer.start()
            return await local.settle(payment, req)
        finally:
            if timer is not None:
                timer.cancel()
            anvil_rpc(devchain, "evm_setAutomine", True)
            await chain.close()

    result = asyncio.run(run())
    anvil_rpc(devchain, "evm_mine")
    assert drop[0] == 0
    used = devchain.authorization_state(auth["from"], auth["nonce"])
    assert used, "the transaction should have been mined"
    # money moved: the payment must not be answered as a definite failure
    assert result.success or result.error_reason == "settlement_pending", (result.error_reason, result.error_message)
    assert settlement_nonce(devchain, "pending") == settlement_nonce(devchain, "latest")


@pytest.fixture
def refusing_node(devchain: Devchain) -> Iterator[tuple[str, threading.Event, threading.Event]]:
    """A JSON-RPC front to anvil that holds the first broadcast until released, then refuses it
    (the node never gets it); every other call is relayed."""
    received, release = threading.Event(), threading.Event()
    state = {"held": False}

    def answer(call: dict[str, Any], client: httpx.Client) -> dict[str, Any]:
        if call.get("method") == "eth_sendRawTransaction" and not state["held"]:
            state["held"] = True
            received.set()
            release.wait(30)
            return {"jsonrpc": "2.0", "id": call.get("id"),
                    "error": {"code": -32003, "message": "insufficient funds for gas * price + value"}}
        return dict(client.post(devchain.anvil.rpc_url, json=call).json())

    def handle(body: Any) -> Any:
        with httpx.Client() as client:
            return [answer(c, client) for c in body] if isinstance(body, list) else answer(body, client)

    async def endpoint(request: Request) -> Response:
        import anyio

        return JSONResponse(await anyio.to_thread.run_sync(handle, await request.json()))

    with ThreadServer(Starlette(routes=[Route("/", endpoint, methods=["POST"])])) as server:
        yield server.url, received, release


def test_a_caller_gone_mid_broadcast_leaves_no_gap(
    devchain: Devchain, refusing_node: tuple[str, threading.Event, threading.Event]
) -> None:
    """The caller of a settlement goes away (a client disconnect) while its broadcast is in flight,
    and the node then refuses that broadcast: the nonce is handed back all the same, so the next
    settlement takes it and is mined, instead of queueing behind a nonce nobody will use."""
    url, received, release = refusing_node
    req = requirements(devchain)
    start = settlement_nonce(devchain, "latest")

    async def run() -> SettleResponse:
        chain = JsonRpcChain(url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=10)
        try:
            first = asyncio.ensure_future(local.settle(Payer(devchain.key(1)).sign(req), req))
            await asyncio.to_thread(received.wait, 30)  # its broadcast is at the node's door
            first.cancel()
            with pytest.raises(asyncio.CancelledError):
                await first
            release.set()  # the node refuses it now, with nobody waiting for the answer
            # The refusal is dealt with in the background (the nonce handed back); then the next one.
            async def handed_back() -> None:
                while chain._nonce != start:
                    await asyncio.sleep(0)  # one turn of the loop at a time, until the hand-back is done

            await asyncio.wait_for(handed_back(), 10)  # a bound, so a broken hand-back fails, not hangs
            return await local.settle(Payer(devchain.key(2)).sign(req), req)
        finally:
            release.set()
            await chain.close()

    second = asyncio.run(run())
    assert second.success, second.error_reason
    assert int(devchain.w3.eth.get_transaction(second.transaction)["nonce"]) == start
    assert settlement_nonce(devchain, "pending") == settlement_nonce(devchain, "latest") == start + 1


# ------------------------------------------------------------------------------------------ receipts


@pytest.mark.parametrize("failing", ["eth_getTransactionReceipt", "eth_blockNumber"])
def test_one_unanswered_receipt_lookup_does_not_end_the_wait(devchain: Devchain, failing: str) -> None:
    """The node fails one lookup right after the broadcast: the settlement still waits for its
    receipt (the poller and the next check find it), and is reported settled, not pending. The wait
    used to end at that one failure, reporting pending a payment its receipt timeout would have seen
    mined (a full CI run of the workers test once caught a row pending this way)."""
    req = requirements(devchain)

    async def run() -> tuple[SettleResponse, list[str]]:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        real_rpc, failed = chain._rpc, []

        async def once_unanswered(method: str, params: list[Any], **kwargs: Any) -> Any:
            if method == failing and not failed and chain._sent_raw:  # after our broadcast
                failed.append(method)
                raise ChainUnavailable(f"chain RPC {method} failed: ClientOSError")
            return await real_rpc(method, params, **kwargs)

        chain._rpc = once_unanswered  # type: ignore[method-assign]
        try:
            return await local.settle(Payer(devchain.key(6)).sign(req), req), failed
        finally:
            await chain.close()

    response, failed = asyncio.run(run())
    assert failed == [failing]
    assert response.success and response.transaction and response.amount == req.amount
    receipt = anvil_rpc(devchain, "eth_getTransactionReceipt", response.transaction)["result"]
    assert receipt is not None and int(receipt["status"], 16) == 1
