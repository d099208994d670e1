"""``find_authorization_used`` on a node that caps ``eth_getLogs`` ranges (as many providers do): the
whole-chain query is refused, the last blocks are read window by window back from the head, and a
log older than the scanned blocks is "unknown" (``ChainUnavailable``), never "no such log" (which
would fail a payment whose authorization our own transaction used)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from settlement.chain import client as chain_client
from settlement.chain.client import JsonRpcChain, RpcError
from settlement.chain.receipts import TOPIC_AUTHORIZATION_CANCELED, TOPIC_AUTHORIZATION_USED, Receipt
from settlement.errors import ChainUnavailable

TOKEN, PAYER = "0x" + "aa" * 20, "0x" + "bb" * 20
NONCE = bytes(31) + b"\x07"
TX = "0x" + "cd" * 32


class CappedNode(JsonRpcChain):
    """A JSON-RPC node whose eth_getLogs refuses more than ``cap`` blocks; one log at ``at``."""

    def __init__(self, head: int, at: int | None, cap: int = 2_000) -> None:
        super().__init__("http://127.0.0.1:9", 31337, None)
        self.head, self.at, self.cap = head, at, cap
        self.ranges: list[tuple[int, int]] = []

    async def _rpc(self, method: str, params: list[Any], *, order: int | None = None) -> Any:
        if method == "eth_blockNumber":
            return hex(self.head)
        assert method == "eth_getLogs", method
        query = params[0]
        start = int(query["fromBlock"], 16)
        end = self.head if query["toBlock"] == "latest" else int(query["toBlock"], 16)
        if end - start + 1 > self.cap:
            raise RpcError("eth_getLogs", "query exceeds max block range 2000")
        self.ranges.append((start, end))
        return [{"transactionHash": TX}] if self.at is not None and start <= self.at <= end else []

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        return Receipt(tx_hash, 1, self.at or 0)


def _find(node: CappedNode) -> Receipt | None:
    return asyncio.run(node.find_authorization_used(TOKEN, PAYER, NONCE))


def test_a_recent_use_is_found_window_by_window() -> None:
    node = CappedNode(head=1_000_000, at=995_500)
    found = _find(node)
    assert found is not None and found.tx_hash == TX
    assert node.ranges[0] == (998_001, 1_000_000) and node.ranges[-1][0] <= 995_500 <= node.ranges[-1][1]
    assert all(end - start + 1 <= 2_000 for start, end in node.ranges)


def test_a_use_older_than_the_scan_is_unknown_not_absent() -> None:
    node = CappedNode(head=1_000_000, at=10)
    with pytest.raises(ChainUnavailable) as unknown:
        _find(node)
    assert unknown.value.code == "chain_logs_out_of_range"
    assert sum(end - start + 1 for start, end in node.ranges) == chain_client.LOG_SCAN_BLOCKS


@pytest.mark.parametrize("head", [5_000, 1_500])  # read window by window; within the cap, in one query
def test_a_used_authorization_with_no_log_anywhere_is_unknown_not_used_elsewhere(head: int) -> None:
    """The token says the nonce is used, yet no AuthorizationUsed or AuthorizationCanceled log is
    found in any block: a node that answers ranges it does not hold with nothing (or a pruned one).
    Before, this was "no log": our own settlement (a remote facilitator's, whose hash we never got)
    was blamed on another use and the payment failed while its money had moved."""
    with pytest.raises(ChainUnavailable) as unknown:
        _find(CappedNode(head=head, at=None))
    assert unknown.value.code == "authorization_use_not_found"


def test_the_used_or_cancelled_log_is_asked_for() -> None:
    """One query for either event of this authorizer and nonce: a cancellation is found (its receipt
    has no transfer, so the caller fails the payment: nothing moved)."""
    node = CappedNode(head=1_500, at=None)
    queries: list[Any] = []
    answer = node._rpc

    async def recording(method: str, params: list[Any], *, order: int | None = None) -> Any:
        queries.append(params)
        return await answer(method, params, order=order)

    node._rpc = recording  # type: ignore[method-assign]
    with pytest.raises(ChainUnavailable):
        _find(node)
    topics = queries[0][0]["topics"]
    assert topics[0] == ["0x" + TOPIC_AUTHORIZATION_USED.hex(), "0x" + TOPIC_AUTHORIZATION_CANCELED.hex()]
    assert topics[2] == "0x" + NONCE.hex() and topics[1].endswith(PAYER[2:])


def test_an_uncapped_node_is_asked_once() -> None:
    node = CappedNode(head=1_000_000, at=10, cap=10**9)
    assert _find(node) is not None and node.ranges == [(0, 1_000_000)]
