"""The chain client under concurrency, on a real anvil: JSON-RPC calls coalesced into batches,
settlements pipelined on locally allocated nonces, and no nonce left as a gap that would queue every
later settlement behind it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.devkit.devchain import LOCAL_NETWORK
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.chain.client import JsonRpcChain
from settlement.schemes.exact_local import LocalFacilitator
from settlement.x402.wire import SettleResponse
from tests.conftest import PAY_TO, Devchain
from tests.support.settlement_helpers import PRICE, SETTLEMENT_KEY, requirements, settlement_nonce, tcp_front


class CountingChain(JsonRpcChain):
    """Counts the HTTP requests and the JSON-RPC calls in them (the unit under test is the client)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.posts: list[int] = []  # calls per HTTP request

    async def _http(self, body: Any) -> Any:
        self.posts.append(len(body) if isinstance(body, list) else 1)
        return await super()._http(body)


def test_concurrent_reads_share_batches(devchain: Devchain) -> None:
    accounts = [devchain.address(i) for i in range(1, 9)] * 4

    async def run() -> tuple[list[int], list[int]]:
        chain = CountingChain(devchain.anvil.rpc_url, 31337, None)
        try:
            balances = await asyncio.gather(*(chain.balance_of(devchain.token, a) for a in accounts))
            return balances, chain.posts
        finally:
            await chain.close()

    balances, posts = asyncio.run(run())
    assert balances == [devchain.balance(a) for a in accounts]  # each answer went to its own caller
    assert sum(posts) == len(accounts)
    assert len(posts) < len(accounts) // 2  # coalesced: far fewer round trips than calls
    assert max(posts) > 1


def test_concurrent_settlements_are_pipelined_and_all_final(devchain: Devchain) -> None:
    req = requirements(devchain)
    payers = [1, 2, 3, 4, 5, 6, 7, 8] * 3
    payments = [Payer(devchain.key(i)).sign(req) for i in payers]
    before_pay_to = devchain.balance(PAY_TO)
    start_nonce = settlement_nonce(devchain, "latest")

    async def run() -> tuple[list[SettleResponse], list[int]]:
        chain = CountingChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        try:
            results = await asyncio.gather(*(local.settle(p, req) for p in payments))
            return results, chain.posts
        finally:
            await chain.close()

    results, posts = asyncio.run(run())
    assert all(r.success for r in results), [r.error_reason for r in results if not r.success]
    assert len({r.transaction for r in results}) == len(payments)  # one transaction per payment
    assert devchain.balance(PAY_TO) == before_pay_to + PRICE * len(payments)
    nonces = sorted(int(devchain.w3.eth.get_transaction(r.transaction)["nonce"]) for r in results)
    assert nonces == list(range(start_nonce, start_nonce + len(payments)))  # consecutive, no gap, no reuse
    assert settlement_nonce(devchain, "pending") == settlement_nonce(devchain, "latest")  # nothing queued
    assert len(posts) < sum(posts)  # broadcasts and receipt polls travelled in batches


def test_a_write_ahead_failure_leaves_no_gap(devchain: Devchain) -> None:
    """Six settlements take their nonces; the first (the lowest nonce) then fails its write-ahead and
    is not broadcast. The five signed on later nonces are still mined: the gap is filled."""
    req = requirements(devchain)
    payments = [Payer(devchain.key(i)).sign(req) for i in (1, 2, 3, 4, 5, 6)]
    start_nonce = settlement_nonce(devchain, "latest")

    async def run() -> list[SettleResponse | BaseException]:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        signed: list[str] = []
        all_signed = asyncio.Event()

        async def before_send(tx_hash: str) -> None:
            signed.append(tx_hash)  # hooks run in nonce order: signing takes the nonce, then calls this
            if len(signed) == len(payments):
                all_signed.set()
            await all_signed.wait()  # every nonce is taken before anything is broadcast
            if tx_hash == signed[0]:
                raise RuntimeError("ledger down")

        try:
            return await asyncio.gather(
                *(local.settle(p, req, before_send=before_send) for p in payments), return_exceptions=True
            )
        finally:
            await chain.close()

    results = asyncio.run(run())
    failed = [i for i, r in enumerate(results) if isinstance(r, RuntimeError)]
    assert len(failed) == 1
    others = [r for i, r in enumerate(results) if i != failed[0]]
    assert all(isinstance(r, SettleResponse) and r.success for r in others), others
    auth = payments[failed[0]].payload["authorization"]
    assert devchain.authorization_state(auth["from"], auth["nonce"]) is False  # never broadcast
    nonces = sorted(int(devchain.w3.eth.get_transaction(r.transaction)["nonce"]) for r in others
                    if isinstance(r, SettleResponse))
    assert nonces == list(range(start_nonce + 1, start_nonce + len(payments)))  # all behind the gap
    # The freed nonce was filled (a zero-value transaction to ourselves): nothing waits behind it.
    assert settlement_nonce(devchain, "latest") == start_nonce + len(payments)
    assert settlement_nonce(devchain, "pending") == settlement_nonce(devchain, "latest")


def test_a_freed_nonce_is_reused_by_the_next_settlement(devchain: Devchain) -> None:
    req = requirements(devchain)
    start_nonce = settlement_nonce(devchain, "latest")

    async def refuse(tx_hash: str) -> None:
        raise RuntimeError("ledger down")

    async def run() -> SettleResponse:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        try:
            with pytest.raises(RuntimeError):
                await local.settle(Payer(devchain.key(1)).sign(req), req, before_send=refuse)
            return await local.settle(Payer(devchain.key(2)).sign(req), req)
        finally:
            await chain.close()

    result = asyncio.run(run())
    assert result.success
    assert int(devchain.w3.eth.get_transaction(result.transaction)["nonce"]) == start_nonce


@pytest.fixture
def no_batch_node(devchain: Devchain) -> Iterator[str]:
    """A JSON-RPC front that forwards single calls to anvil and answers a batch with one error
    object, as some hosted nodes do."""

    async def handle(request: Request) -> Response:
        body = await request.json()
        if isinstance(body, list):
            error = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "batch not supported"}}
            return JSONResponse(error)
        async with httpx.AsyncClient() as client:
            reply = await client.post(devchain.anvil.rpc_url, content=json.dumps(body),
                                      headers={"Content-Type": "application/json"})
        return JSONResponse(reply.json())

    with ThreadServer(Starlette(routes=[Route("/", handle, methods=["POST"])])) as server:
        yield server.url


def test_a_node_without_batches_is_asked_call_by_call(devchain: Devchain, no_batch_node: str) -> None:
    accounts = [devchain.address(i) for i in range(1, 9)]

    async def run() -> tuple[list[int], list[int]]:
        chain = CountingChain(no_batch_node, 31337, None)
        try:
            first = await asyncio.gather(*(chain.balance_of(devchain.token, a) for a in accounts))
            chain.posts.clear()
            second = await asyncio.gather(*(chain.balance_of(devchain.token, a) for a in accounts))
            assert first == second
            return second, chain.posts
        finally:
            await chain.close()

    balances, posts = asyncio.run(run())
    assert balances == [devchain.balance(a) for a in accounts]
    assert posts == [1] * len(accounts)  # learned once: no more batches to this node


def test_a_repeated_broadcast_of_our_own_transaction_is_not_sent_again(devchain: Devchain) -> None:
    """The node's answer to a broadcast was lost and the same signed transaction went again: the
    node says its nonce is used. That is our own transaction, not someone else's: its hash is
    reported, and no second transaction is signed on a fresh nonce."""
    req = requirements(devchain)
    payment = Payer(devchain.key(3)).sign(req)
    start_nonce = settlement_nonce(devchain, "latest")

    async def run() -> tuple[str, str]:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        try:
            first = await local.settle(payment, req)
            assert first.success and first.transaction
            chain._nonce = start_nonce  # as if the first answer had been lost and the same send repeated
            checked = local.check_offline(payment, req)
            again = await chain.send_transfer_with_authorization(checked.token, checked.auth, checked.signature)
            return first.transaction, again
        finally:
            await chain.close()

    first, again = asyncio.run(run())
    assert again == first
    assert settlement_nonce(devchain, "latest") == start_nonce + 1  # nothing else was sent


@pytest.fixture
def dropping_proxy(devchain: Devchain) -> Iterator[tuple[str, list[int]]]:
    """A TCP front to anvil that closes each connection's first request unanswered when told to
    (a kept-alive connection the node has dropped), and relays everything else."""
    import socket
    import threading

    drop: list[int] = [0]  # connections still to drop
    host, port = devchain.anvil.rpc_url.removeprefix("http://").split(":")

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve_connection(client: socket.socket) -> None:
        if drop[0] > 0:
            drop[0] -= 1
            client.recv(65536)
            client.close()
            return
        upstream = socket.create_connection((host, int(port)))
        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    with tcp_front(serve_connection) as url:
        yield url, drop


def test_a_dropped_connection_is_retried_once(devchain: Devchain, dropping_proxy: tuple[str, list[int]]) -> None:
    url, drop = dropping_proxy

    async def run() -> tuple[int, str]:
        chain = JsonRpcChain(url, 31337, None)
        try:
            drop[0] = 1
            balance = await chain.balance_of(devchain.token, PAY_TO)  # first connection dropped, then retried
            assert drop[0] == 0
        finally:
            await chain.close()
        chain = JsonRpcChain(url, 31337, None)
        try:
            drop[0] = 2
            await chain.balance_of(devchain.token, PAY_TO)
        except Exception as exc:  # twice in a row: the caller hears of it
            return balance, type(exc).__name__
        finally:
            await chain.close()
        return balance, "no error"

    balance, error = asyncio.run(run())
    assert balance == devchain.balance(PAY_TO)
    assert error == "ChainUnavailable"


def test_a_broadcast_that_never_reached_the_node_is_sent_again(
    devchain: Devchain, dropping_proxy: tuple[str, list[int]]
) -> None:
    """Both tries of a broadcast are dropped: the payment is reported pending with its hash (never
    a failure, money may move), and the same signed transaction is sent again once the node is back,
    so it is mined and nothing queues behind its nonce."""
    url, drop = dropping_proxy
    req = requirements(devchain)

    async def run() -> tuple[SettleResponse, Any]:
        chain = JsonRpcChain(url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        try:
            assert (await local.settle(Payer(devchain.key(4)).sign(req), req)).success  # fees and nonce known
            await chain.close()  # the next request opens a new connection: the proxy drops two
            drop[0] = 2
            pending = await local.settle(Payer(devchain.key(5)).sign(req), req)
            receipt = await chain.wait_for_receipt(str(pending.transaction), 20)
            return pending, receipt
        finally:
            await chain.close()

    pending, receipt = asyncio.run(run())
    assert not pending.success and pending.error_reason == "settlement_pending" and pending.transaction
    assert receipt is not None and receipt.status == 1
    assert settlement_nonce(devchain, "pending") == settlement_nonce(devchain, "latest")


def test_a_transaction_the_node_forgot_is_sent_again(devchain: Devchain) -> None:
    """The node drops one of our settlement transactions from its pool (anvil can lose one of a burst
    of consecutive nonces; real nodes evict): still unmined after a second, it is looked up, found
    missing, and the same signed transaction goes again, so it and the nonces after it are mined."""
    req = requirements(devchain)
    payment = Payer(devchain.key(6)).sign(req)

    def anvil(method: str, *params: Any) -> Any:
        return devchain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]

    async def run() -> Any:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        anvil("evm_setAutomine", False)
        try:
            checked = local.check_offline(payment, req)
            tx_hash = await chain.send_transfer_with_authorization(checked.token, checked.auth, checked.signature)
            anvil("anvil_dropTransaction", tx_hash)
        finally:
            anvil("evm_setAutomine", True)
        try:
            return await chain.wait_for_receipt(tx_hash, 15)
        finally:
            await chain.close()

    receipt = asyncio.run(run())
    assert receipt is not None and receipt.status == 1
    auth = payment.payload["authorization"]
    assert devchain.authorization_state(auth["from"], auth["nonce"]) is True
    assert settlement_nonce(devchain, "pending") == settlement_nonce(devchain, "latest")


class MethodCountingChain(JsonRpcChain):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.methods: list[str] = []

    async def _rpc(self, method: str, params: list[Any], **kwargs: Any) -> Any:
        self.methods.append(method)
        return await super()._rpc(method, params, **kwargs)


def test_waiting_settlements_share_one_receipt_poller(devchain: Devchain) -> None:
    """Twenty-four settlements wait at once: each looks for its receipt once, then one poller reads
    each new block's receipts and hands each waiter its own; nobody polls its own receipt again."""
    req = requirements(devchain)
    payments = [Payer(devchain.key(i)).sign(req) for i in [1, 2, 3, 4, 5, 6, 7, 8] * 3]

    async def run() -> tuple[list[SettleResponse], list[str]]:
        chain = MethodCountingChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        try:
            return await asyncio.gather(*(local.settle(p, req) for p in payments)), chain.methods
        finally:
            await chain.close()

    results, methods = asyncio.run(run())
    assert all(r.success for r in results)
    for result in results:  # each waiter got the receipt of its own transaction (its block and its gas)
        receipt = devchain.w3.eth.get_transaction_receipt(result.transaction)
        assert result.extra == {
            "blockNumber": receipt["blockNumber"], "gasUsed": str(receipt["gasUsed"]),
            "effectiveGasPrice": str(receipt["effectiveGasPrice"]),
            "gasCost": str(receipt["gasUsed"] * receipt["effectiveGasPrice"]),
        }
    # One direct look each, at most; whatever was not mined by then came from the poller's block reads
    # (test_the_poller_finds_receipts_mined_after_the_waiters_looked makes that case certain).
    assert methods.count("eth_getTransactionReceipt") <= len(payments)


@pytest.fixture
def no_block_receipts_node(devchain: Devchain) -> Iterator[str]:
    """A JSON-RPC front to anvil that does not offer eth_getBlockReceipts (batches pass through)."""

    def answer(call: dict[str, Any], client: httpx.Client) -> dict[str, Any]:
        if call.get("method") == "eth_getBlockReceipts":
            return {"jsonrpc": "2.0", "id": call.get("id"), "error": {"code": -32601, "message": "Method not found"}}
        return dict(client.post(devchain.anvil.rpc_url, json=call).json())

    def handle(request_body: Any) -> Any:
        with httpx.Client() as client:
            if isinstance(request_body, list):
                return [answer(call, client) for call in request_body]
            return answer(request_body, client)

    async def endpoint(request: Request) -> Response:
        import anyio

        return JSONResponse(await anyio.to_thread.run_sync(handle, await request.json()))

    with ThreadServer(Starlette(routes=[Route("/", endpoint, methods=["POST"])])) as server:
        yield server.url


class ScanCountingChain(JsonRpcChain):
    """Tells when ``expected`` waiters have passed their direct look and handed over to the poller."""

    def __init__(self, *args: Any, expected: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected
        self.handed_over = asyncio.Event()
        self._count = 0

    def _scan_from(self, head: int) -> None:
        super()._scan_from(head)
        self._count += 1
        if self._count == self.expected:
            self.handed_over.set()


@pytest.mark.parametrize("block_receipts", [True, False])
def test_the_poller_finds_receipts_mined_after_the_waiters_looked(
    devchain: Devchain, no_block_receipts_node: str, block_receipts: bool
) -> None:
    """Four transactions sit in the pool (automine off) while their waiters look once, find nothing
    and hand over to the poller; then one block mines them all and every waiter gets its receipt,
    through eth_getBlockReceipts, or per transaction from a node that does not offer it."""
    req = requirements(devchain)
    payments = [Payer(devchain.key(i)).sign(req) for i in (1, 2, 3, 4)]
    url = devchain.anvil.rpc_url if block_receipts else no_block_receipts_node

    def anvil(method: str, *params: Any) -> Any:
        return devchain.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]

    async def run() -> tuple[list[Any], bool]:
        chain = ScanCountingChain(url, 31337, SETTLEMENT_KEY, expected=len(payments))
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        anvil("evm_setAutomine", False)
        try:
            hashes = []
            for payment in payments:
                checked = local.check_offline(payment, req)
                hashes.append(await chain.send_transfer_with_authorization(checked.token, checked.auth, checked.signature))
            waits = asyncio.gather(*(chain.wait_for_receipt(h, 20) for h in hashes))
            await chain.handed_over.wait()
            anvil("evm_mine")
            return await waits, chain._block_receipts
        finally:
            anvil("evm_setAutomine", True)
            await chain.close()

    receipts, used_block_receipts = asyncio.run(run())
    assert all(r is not None and r.status == 1 for r in receipts)
    assert len({r.block_number for r in receipts}) == 1  # one block, four waiters, each its own receipt
    assert len({r.tx_hash for r in receipts}) == 4
    assert used_block_receipts is block_receipts


class BatchRecordingChain(JsonRpcChain):
    """Keeps the nonces of the broadcasts in each JSON-RPC request, in the order they were sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.broadcasts: list[list[int]] = []

    async def _http(self, body: Any) -> Any:
        import rlp

        calls = body if isinstance(body, list) else [body]
        nonces = [int.from_bytes(rlp.decode(bytes.fromhex(c["params"][0][4:]))[1], "big")
                  for c in calls if c["method"] == "eth_sendRawTransaction"]
        if nonces:
            self.broadcasts.append(nonces)
        return await super()._http(body)


def test_broadcasts_leave_in_nonce_order(devchain: Devchain) -> None:
    """Five settlements finish their write-ahead in the reverse order of their nonces: their
    broadcasts still reach the node lowest nonce first."""
    req = requirements(devchain)
    payments = [Payer(devchain.key(i)).sign(req) for i in (1, 2, 3, 4, 5)]

    async def run() -> tuple[list[SettleResponse], list[list[int]]]:
        chain = BatchRecordingChain(devchain.anvil.rpc_url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        gates: list[asyncio.Event] = []
        all_signed = asyncio.Event()

        async def before_send(tx_hash: str) -> None:
            gate = asyncio.Event()
            gates.append(gate)  # in nonce order: the nonce is taken, the transaction signed, then this
            if len(gates) == len(payments):
                all_signed.set()
            await gate.wait()

        async def release_in_reverse() -> None:
            await all_signed.wait()
            for gate in reversed(gates):
                gate.set()

        try:
            results = await asyncio.gather(
                release_in_reverse(), *(local.settle(p, req, before_send=before_send) for p in payments)
            )
            return list(results[1:]), chain.broadcasts
        finally:
            await chain.close()

    results, broadcasts = asyncio.run(run())
    assert all(r.success for r in results)
    sent = [nonce for batch in broadcasts for nonce in batch]
    assert sorted(sent) == sent and len(sent) == len(payments)


def test_close_stops_background_sends(devchain: Devchain, dropping_proxy: tuple[str, list[int]]) -> None:
    """A broadcast whose answer was lost leaves a resend waiting in the background; closing the
    client stops it (the payment stays pending for the next start-up's reconcile) and fails any call
    still queued, rather than leaving tasks running against a closed client."""
    url, drop = dropping_proxy
    req = requirements(devchain)

    async def run() -> tuple[SettleResponse, list[asyncio.Task[None]]]:
        chain = JsonRpcChain(url, 31337, SETTLEMENT_KEY)
        local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=20)
        assert (await local.settle(Payer(devchain.key(7)).sign(req), req)).success  # fees and nonce known
        await chain.close()  # the next request opens a new connection: the proxy drops two
        drop[0] = 2
        pending = await local.settle(Payer(devchain.key(8)).sign(req), req)
        background = list(chain._tasks)
        assert background and not any(task.done() for task in background)  # the resend is waiting
        await chain.close()
        await asyncio.gather(*background, return_exceptions=True)
        return pending, background

    pending, background = asyncio.run(run())
    assert pending.error_reason == "settlement_pending"
    assert all(task.cancelled() for task in background)
