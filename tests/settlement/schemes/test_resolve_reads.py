"""Resolving an open payment never misreads a block mined between its reads. ``resolve_exact`` reads
the receipt once and the authorization's state after it: our settlement mined (successfully) right
after the state read used to be resolved ``failed: transaction_reverted`` (ledger failed, money
moved), and one reverted by the payer's cancel in that block was blamed on the transaction.
``resolve_upto`` (Permit2: upto, exact through Permit2) read "nonce used, no receipt" as used
elsewhere when our own transaction had just landed: it reads the receipt again once the nonce is used."""

from __future__ import annotations

import asyncio
from typing import Any

from settlement.chain.receipts import TOPIC_AUTHORIZATION_USED, TOPIC_TRANSFER, LogEntry, Receipt
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

    def nonce_bitmap_call(self) -> bytes:
        return b"bitmap"

    def nonce_used(self, bitmap: bytes) -> bool:
        return bitmap == b"used"


class PermitChain(MinedBetweenReads):
    async def eth_call(self, to: str, data: bytes, **_: Any) -> bytes:
        landed = self._tick()
        return b"used" if landed and self.used_after_block else b"unused"


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
