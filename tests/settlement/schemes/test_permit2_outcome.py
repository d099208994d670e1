"""``permit2_outcome.copied_settlement`` alone, on a fake chain: which transaction counts as a copy of
our Permit2 settlement (the payment settled by it) and which does not. A copy is another account's
transaction to the proxy with our very calldata: only that executed this permit (its nonce makes it
once), sent to the proxy or, where the node traces, made through another contract. A transfer of
the same amount made any other way (the payer's own, this signature pasted in its input, the nonces
invalidated) could otherwise pay for two payments at once; one of ours has its own request to
answer for it. Against a real chain: tests/e2e/test_attacks_permit2_copies.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from settlement.chain.client import LOG_WINDOW_BLOCKS
from settlement.chain.receipts import TOPIC_TRANSFER, LogEntry, Receipt
from settlement.schemes.permit2_outcome import COPY_SCAN_BLOCKS, copied_settlement

TOKEN, PAYER, PAY_TO = "0x" + "70" * 20, "0x" + "a1" * 20, "0x" + "b2" * 20
PROXY, OURS, GRIEFER = "0x" + "40" * 20, "0x" + "5e" * 20, "0x" + "99" * 20
CALLDATA = b"\x13\x7c\x29\xfe" + b"\x01" * 300 + b"\xaa" * 65  # our settle call, this permit's signature last
AMOUNT = 5_000


def _word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


class Chain:
    settlement_address = OURS

    def __init__(self, sender: str, to: str, data: bytes, status: int = 1) -> None:
        self.sent, self.status = (sender, to, data), status

    async def get_logs(self, address: str, topics: list[Any], from_block: int, to_block: int) -> list[dict[str, Any]]:
        assert address == TOKEN and topics[0] == "0x" + TOPIC_TRANSFER.hex() and 0 <= from_block <= to_block == 100
        return [{"transactionHash": "0x" + "c0" * 32, "data": hex(AMOUNT)}]

    async def transaction_of(self, tx_hash: str) -> tuple[str, str, bytes] | None:
        return self.sent

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        log = LogEntry(TOKEN, (TOPIC_TRANSFER, _word(PAYER), _word(PAY_TO)), AMOUNT.to_bytes(32, "big"))
        return Receipt(tx_hash, self.status, 99, (log,))


def _copy(chain: Chain) -> Receipt | None:
    return asyncio.run(copied_settlement(chain, (PROXY, CALLDATA), (TOKEN, PAYER, PAY_TO, AMOUNT), 100))  # type: ignore[arg-type]


def test_another_accounts_transaction_to_the_proxy_with_our_calldata_is_a_copy() -> None:
    found = _copy(Chain(GRIEFER, PROXY, CALLDATA))
    assert found is not None and found.tx_hash == "0x" + "c0" * 32 and found.block_number == 99


@pytest.mark.parametrize(("sender", "to", "data", "status"), [
    (GRIEFER, "0x" + "cc" * 20, CALLDATA, 1),  # our calldata sent elsewhere: that contract moved it its own way
    (GRIEFER, PROXY, CALLDATA[:-1] + b"\xab", 1),  # another permit's (or a changed) call
    (PAYER, "0x" + "cc" * 20, b"\x12\x34" + b"\xaa" * 65, 1),  # the signature pasted into the payer's own transfer
    (OURS, PROXY, CALLDATA, 1),  # ours: its own request answers for it
    (GRIEFER, PROXY, CALLDATA, 0),  # reverted: it moved nothing
], ids=["elsewhere", "other-call", "pasted-signature", "ours", "reverted"])
def test_nothing_else_is(sender: str, to: str, data: bytes, status: int) -> None:
    assert _copy(Chain(sender, to, data, status)) is None


def test_the_same_call_encoded_otherwise_is_the_same_call() -> None:
    """The proxy ignores bytes past its arguments and follows the offsets it is given: a copy padded or
    re-encoded (a griefer's way around a byte-for-byte check) is still this permit's call."""
    from eth_abi import encode

    from settlement.schemes.exact_permit2_payload import SEL_EXACT_SETTLE
    from settlement.schemes.permit2_outcome import same_call

    types = ["((address,uint256),uint256,uint256)", "address", "(address,uint256)", "bytes"]
    args = (((TOKEN, AMOUNT), 7, 2**40), PAYER, (PAY_TO, 0), b"\xaa" * 65)
    ours = SEL_EXACT_SETTLE + encode(types, args)
    assert same_call(ours + bytes(32), ours) and same_call(ours, ours)
    other = SEL_EXACT_SETTLE + encode(types, (((TOKEN, AMOUNT), 8, 2**40), PAYER, (PAY_TO, 0), b"\xaa" * 65))
    assert not same_call(other, ours)  # another nonce: another permit
    assert not same_call(b"\x00\x00\x00\x00" + ours[4:], ours) and not same_call(SEL_EXACT_SETTLE + b"\x01", ours)


MULTICALL = "0x" + "ca" * 20


class TracingChain(Chain):
    """A node that traces: the wrapper transaction's calls that took effect (``traced_calls``)."""

    def __init__(self, sender: str, to: str, data: bytes, calls: list[tuple[str, str, bytes]] | None) -> None:
        super().__init__(sender, to, data)
        self.calls = calls

    async def traced_calls(self, tx_hash: str) -> list[tuple[str, str, bytes]] | None:
        return self.calls


def test_our_call_made_through_another_contract_is_a_copy_where_the_node_traces() -> None:
    """A griefer wraps our calldata in Multicall3 (or any contract of its own): the transaction is not
    sent to the proxy, but the trace shows the wrapper calling the proxy with our call, which took
    effect: this permit executed, the payment is settled by it."""
    wrapped = TracingChain(GRIEFER, MULTICALL, b"\xbc\xe3\x8b\xd7" + CALLDATA,
                           [(GRIEFER, MULTICALL, b"\xbc\xe3\x8b\xd7"), (MULTICALL, PROXY, CALLDATA)])
    found = _copy(wrapped)
    assert found is not None and found.tx_hash == "0x" + "c0" * 32


@pytest.mark.parametrize("calls", [
    None,  # the node does not trace: nothing is assumed
    [(GRIEFER, MULTICALL, b"\x01")],  # the wrapper never called the proxy (its own transfer)
    [(GRIEFER, MULTICALL, b"\x01"), (MULTICALL, PROXY, CALLDATA[:-1] + b"\xab")],  # another permit's call
    [(GRIEFER, MULTICALL, b"\x01"), (MULTICALL, "0x" + "dd" * 20, CALLDATA)],  # our calldata to another contract
], ids=["no-trace", "no-proxy-call", "other-call", "other-contract"])
def test_a_wrapper_transaction_without_our_call_in_its_trace_is_not(calls: list[tuple[str, str, bytes]] | None) -> None:
    assert _copy(TracingChain(GRIEFER, MULTICALL, b"\x01", calls)) is None


def test_ours_is_never_a_copy_even_wrapped() -> None:
    assert _copy(TracingChain(OURS, MULTICALL, b"\x01", [(MULTICALL, PROXY, CALLDATA)])) is None


class WindowedChain(Chain):
    """A node that caps ``eth_getLogs`` ranges; the copy is mined at ``copy_block``."""

    def __init__(self, copy_block: int) -> None:
        super().__init__(GRIEFER, PROXY, CALLDATA)
        self.copy_block = copy_block
        self.ranges: list[tuple[int, int]] = []

    async def get_logs(self, address: str, topics: list[Any], from_block: int, to_block: int) -> list[dict[str, Any]]:
        assert to_block - from_block < LOG_WINDOW_BLOCKS
        self.ranges.append((from_block, to_block))
        return [{"transactionHash": "0x" + "c0" * 32, "data": hex(AMOUNT)}] if from_block <= self.copy_block <= to_block else []


def test_a_copy_is_looked_for_from_the_head_at_our_broadcast_however_long_ours_waited() -> None:
    """Ours waited in the pool (its fee cap under a climbing base fee) for thousands of blocks; the copy
    was mined just after our broadcast: found, reading the logs in windows a capped node answers."""
    sent_at, receipt_block = 1_000, 1_000 + 3 * LOG_WINDOW_BLOCKS + 17
    chain = WindowedChain(copy_block=sent_at + 1)
    found = asyncio.run(copied_settlement(chain, (PROXY, CALLDATA), (TOKEN, PAYER, PAY_TO, AMOUNT),  # type: ignore[arg-type]
                                          receipt_block, sent_at))
    assert found is not None and chain.ranges[0][0] == sent_at and chain.ranges[-1][1] == receipt_block
    assert all(a[1] + 1 == b[0] for a, b in zip(chain.ranges, chain.ranges[1:]))  # no block skipped
    unknown = WindowedChain(copy_block=sent_at + 1)  # an open row read back: our broadcast's head not known
    assert asyncio.run(copied_settlement(unknown, (PROXY, CALLDATA), (TOKEN, PAYER, PAY_TO, AMOUNT),  # type: ignore[arg-type]
                                         receipt_block)) is None
    assert unknown.ranges == [(receipt_block - COPY_SCAN_BLOCKS, receipt_block)]


class DatedChain:
    """Blocks 0..1000 dated 1,000,000 + 2 s each (a 2-second chain)."""

    def __init__(self) -> None:
        self.reads = 0

    async def block_timestamp(self, number: int | None = None) -> int:
        self.reads += 1
        return 1_000_000 + 2 * (1000 if number is None else number)


def test_block_since_finds_the_first_block_dated_after_a_rows_creation_less_the_slack() -> None:
    """An open row read back (resolver, reconcile) has no broadcast head: the copy scan starts at the
    first block dated at or after the row's creation less ``CLOCK_SLACK_SECONDS``, found by bisection
    (a few reads, not one per block); a chain client without block dates: None (the 64-block window)."""
    from datetime import UTC, datetime

    from settlement.schemes.permit2_outcome import CLOCK_SLACK_SECONDS, block_since

    chain = DatedChain()
    created = datetime.fromtimestamp(1_000_000 + 2 * 700 + CLOCK_SLACK_SECONDS, tz=UTC)
    assert asyncio.run(block_since(chain, 1000, created)) == 700 and chain.reads <= 12
    naive = created.replace(tzinfo=None)  # SQLite's naive UTC
    assert asyncio.run(block_since(DatedChain(), 1000, naive)) == 700
    before_all = datetime.fromtimestamp(900_000, tz=UTC)
    assert asyncio.run(block_since(DatedChain(), 1000, before_all)) == 0
    assert asyncio.run(block_since(object(), 1000, created)) is None
