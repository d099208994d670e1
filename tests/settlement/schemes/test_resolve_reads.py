"""Resolving an open payment never misreads a block mined between its reads. ``resolve_exact`` reads
the receipt once and the authorization's state after it: our settlement mined (successfully) right
after the state read used to be resolved ``failed: transaction_reverted`` (ledger failed, money
moved), and one reverted by the payer's cancel in that block was blamed on the transaction.
``resolve_upto`` (Permit2: upto, exact through Permit2) read "nonce used, no receipt" as used
elsewhere when our own transaction had just landed: it reads the receipt again once the nonce is used."""

from __future__ import annotations

import asyncio
from typing import Any

from settlement.chain.client import JsonRpcChain
from settlement.chain.receipts import TOPIC_AUTHORIZATION_USED, TOPIC_TRANSFER, LogEntry, Receipt
from settlement.errors import ChainUnavailable
from settlement.ledger import Payment, PaymentState
from settlement.ledger.reads import _payment
from settlement.schemes.exact_resolve import resolve_exact
from settlement.schemes.upto import resolve_upto
from tests.support.settlement_helpers import ledger_fields

TX = "0x" + "ab" * 32
TRANSFER, USED = TOPIC_TRANSFER, TOPIC_AUTHORIZATION_USED


def _row() -> Payment:
    fields = ledger_fields(1, tx_hash=TX, valid_before=2**40)
    return _payment({**fields, "id": 1, "state": PaymentState.PENDING.value, "block_number": None})


def _word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def _settling_receipt(row: Payment) -> Receipt:
    logs = (
        LogEntry(row.asset, (USED, _word(row.payer), bytes.fromhex(row.nonce[2:])), b""),
        LogEntry(row.asset, (TRANSFER, _word(row.payer), _word(row.pay_to)), row.amount.to_bytes(32, "big")),
    )
    return Receipt(TX, 1, 9, logs)


class MinedBetweenReads:
    """A chain on which a block lands right after the first read: each read sees the chain as it is
    at that moment (``mined_at``: the read from which on the block is there)."""

    def __init__(self, receipt: Receipt, used_after_block: bool, mined_at: int = 1) -> None:
        self.receipt, self.used_after_block, self.mined_at = receipt, used_after_block, mined_at
        self.reads = 0

    def _tick(self) -> bool:
        self.reads += 1
        return self.reads > self.mined_at

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None:
        return self.receipt if self._tick() else None

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        landed = self._tick()
        return landed and self.used_after_block

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        self._tick()
        return self.receipt if self.receipt.status == 1 else None


def _resolve(chain: Any) -> tuple[str, str]:
    resolution = asyncio.run(resolve_exact(_row(), chain))
    return resolution.after, resolution.reason


def test_our_settlement_mined_after_the_state_read_is_pending_not_failed() -> None:
    """receipt: none yet; state: unused; then the block with our successful transfer lands."""
    row = _row()
    chain = MinedBetweenReads(_settling_receipt(row), used_after_block=False, mined_at=2)
    assert _resolve(chain) == ("pending", "transaction_not_mined")  # the next round sees it settled
    assert _resolve(MinedBetweenReads(_settling_receipt(row), used_after_block=True, mined_at=0)) == \
        ("settled", "receipt_success")


def test_our_settlement_mined_between_the_receipt_and_the_state_read_is_settled() -> None:
    row = _row()
    chain = MinedBetweenReads(_settling_receipt(row), used_after_block=True, mined_at=1)
    assert _resolve(chain) == ("settled", "authorization_used")


def test_a_cancel_in_the_block_that_reverted_ours_is_the_payers_doing() -> None:
    """The payer's cancelAuthorization went first; our transaction reverted in the same block."""
    reverted = Receipt(TX, 0, 9)
    assert _resolve(MinedBetweenReads(reverted, used_after_block=True, mined_at=1)) == \
        ("failed", "authorization_used_elsewhere")
    assert _resolve(MinedBetweenReads(reverted, used_after_block=True, mined_at=0)) == \
        ("failed", "authorization_used_elsewhere")
    assert _resolve(MinedBetweenReads(reverted, used_after_block=False, mined_at=0)) == \
        ("failed", "transaction_reverted")


class Permit:
    deadline = 2**40
    signature = b"\x5a" * 65

    def nonce_bitmap_call(self) -> bytes:
        return b"bitmap"

    def nonce_used(self, bitmap: bytes) -> bool:
        return bitmap == b"used"


class PermitChain(MinedBetweenReads):
    settlement_address = "0x" + "5e" * 20

    async def eth_call(self, to: str, data: bytes, **_: Any) -> bytes:
        landed = self._tick()
        return b"used" if landed and self.used_after_block else b"unused"

    async def block_number(self) -> int:
        return 9

    async def get_logs(self, *args: Any) -> list[dict[str, Any]]:
        return []  # no transfer of this payment by anyone: the nonce went elsewhere


def _resolve_upto(chain: Any) -> tuple[str, str]:
    resolution = asyncio.run(resolve_upto(_row(), Permit(), chain, lambda: 0.0))
    return resolution.after, resolution.reason


def test_a_permit2_settlement_mined_between_the_receipt_and_the_nonce_read_is_settled() -> None:
    row = _row()
    transfer_only = Receipt(TX, 1, 9, (_settling_receipt(row).logs[1],))  # Permit2 logs the token's Transfer
    assert _resolve_upto(PermitChain(transfer_only, used_after_block=True, mined_at=1)) == ("settled", "receipt_success")
    assert _resolve_upto(PermitChain(transfer_only, used_after_block=True, mined_at=0)) == ("settled", "receipt_success")
    assert _resolve_upto(PermitChain(transfer_only, used_after_block=False, mined_at=2)) == ("pending", "transaction_not_mined")
    reverted = Receipt(TX, 0, 9)  # the nonce spent by another transaction; ours reverted
    assert _resolve_upto(PermitChain(reverted, used_after_block=True, mined_at=1)) == ("failed", "permit_used_elsewhere")


# -- a receipt read that fails is not "not mined" ---------------------------------------------------


def _flaky_node(mined: Receipt, nonce_used: bytes) -> JsonRpcChain:
    """The gateway's own chain client on a node whose receipt lookups fail (a timeout, a 502 from
    its provider) while its state reads answer: our Permit2 settlement is mined and used the nonce."""
    chain = JsonRpcChain("http://127.0.0.1:9", 31337, None)

    async def rpc(method: str, params: list[Any], **_: Any) -> Any:
        if method == "eth_getTransactionReceipt":
            raise ChainUnavailable("receipt lookup timed out")
        if method == "eth_blockNumber":
            return hex(mined.block_number)
        if method == "eth_call":
            return "0x" + nonce_used.hex()
        if method == "eth_getBlockByNumber":
            return {"number": hex(mined.block_number), "timestamp": hex(1)}
        raise AssertionError(method)

    chain._rpc = rpc  # type: ignore[method-assign]
    return chain


def test_a_permit2_settlement_whose_receipt_cannot_be_read_is_not_failed() -> None:
    """``wait_for_receipt(tx, 0)`` answers None when the lookup fails: with the nonce seen used, our
    own mined settlement was resolved ``failed: permit_used_elsewhere`` (ledger failed, money moved;
    final: a failed row with a hash is never resolved again). Unknown is never "no": it stays open."""
    row = _row()
    chain = _flaky_node(Receipt(TX, 1, 9, (_settling_receipt(row).logs[1],)), b"used")
    try:
        resolution = asyncio.run(resolve_upto(row, Permit(), chain, lambda: 0.0))
    except ChainUnavailable:
        return  # the row stays pending; the next round reads it again
    assert resolution.after != PaymentState.FAILED.value, resolution


# -- the window is the chain's clock, read before the authorization's state --------------------------


class LaggingHead(MinedBetweenReads):
    """A chain whose head is dated ``dates[i]`` at read ``i`` (our clock is long past validBefore)."""

    def __init__(self, receipt: Receipt, dates: list[int], used_after_block: bool, mined_at: int) -> None:
        super().__init__(receipt, used_after_block, mined_at)
        self.dates = dates

    async def block_timestamp(self, number: int | None = None) -> int:
        date = self.dates[min(self.reads, len(self.dates) - 1)]
        self._tick()
        return date


VALID_BEFORE = 2**40
LATE = lambda: float(VALID_BEFORE + 3600)  # noqa: E731  # our clock: an hour past validBefore


def _resolve_at(chain: Any) -> tuple[str, str]:
    resolution = asyncio.run(resolve_exact(_row(), chain, clock=LATE))
    return resolution.after, resolution.reason


def test_a_settlement_past_valid_before_on_our_clock_but_not_the_chains_stays_pending() -> None:
    """Our transaction, still in the pool, can land in a block dated before validBefore (it did, on
    anvil, in tests/e2e/test_attacks_pending.py): failing it on our clock was a charge the ledger
    denied."""
    row = _row()
    ahead = LaggingHead(_settling_receipt(row), [VALID_BEFORE - 60], used_after_block=False, mined_at=99)
    assert _resolve_at(ahead) == ("pending", "transaction_not_mined")
    closed = LaggingHead(_settling_receipt(row), [VALID_BEFORE], used_after_block=False, mined_at=99)
    assert _resolve_at(closed) == ("failed", "authorization_expired_unmined")


def test_the_chains_clock_is_read_before_the_authorizations_state() -> None:
    """Read after it, a head dated past validBefore says nothing of the block before it, dated
    before validBefore, in which ours landed after the state read (unused): failed, money moved."""
    row = _row()
    # reads: receipt (none), head (dated before validBefore), state (unused); then ours lands, and
    # a block dated past validBefore follows.
    chain = LaggingHead(_settling_receipt(row), [0, VALID_BEFORE - 1, VALID_BEFORE + 12], used_after_block=True, mined_at=3)
    assert _resolve_at(chain) == ("pending", "transaction_not_mined")


def test_a_remote_rows_window_is_the_chains_clock_too() -> None:
    """No hash (a remote facilitator's outcome unknown): ``not_broadcast`` frees the row for another
    authorization under the same nonce, while the facilitator's own transaction can still land."""
    fields = ledger_fields(1, tx_hash=None, valid_before=VALID_BEFORE)
    row = _payment({**fields, "id": 1, "state": PaymentState.PENDING.value, "block_number": None})
    chain: Any = LaggingHead(_settling_receipt(_row()), [VALID_BEFORE - 60], used_after_block=False, mined_at=99)
    resolution = asyncio.run(resolve_exact(row, chain, write_ahead=False, clock=LATE))
    assert (resolution.after, resolution.reason) == ("pending", "outcome_unknown")


class PermitHead(PermitChain, LaggingHead):
    pass


def test_a_permit2_deadline_is_the_chains_clock_and_is_inclusive() -> None:
    """Permit2 refuses a block dated after the deadline, not at it."""
    row = _row()
    for date, after in ((Permit.deadline, "pending"), (Permit.deadline + 1, "failed")):
        chain: Any = PermitHead(_settling_receipt(row), [date], used_after_block=False, mined_at=99)
        resolution = asyncio.run(resolve_upto(row, Permit(), chain, lambda: float(Permit.deadline + 3600)))
        assert resolution.after == after, (date, resolution)
