"""``settle_owed_refunds`` on a real ledger with a chain and a refund payer behind their Protocols:
each status of a refund on chain leads to its one safe action, and a claim taken by another payer
between the read and the broadcast stops the broadcast."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from settlement.chain.broadcast import BeforeSend
from settlement.chain.receipts import TOPIC_AUTHORIZATION_USED, LogEntry, Receipt
from settlement.chain.refunds import RefundResult
from settlement.finance.owed_refunds import RefundsReport, refund_status, settle_owed_refunds
from settlement.ledger import Ledger, Payment
from settlement.schema import open_ledger
from tests.support.ledger_rows import force_row
from tests.support.settlement_helpers import ledger_fields

REFUNDER = "0x" + "99" * 20
TRANSFER = bytes.fromhex("ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef")


def _topic(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


SETTLEMENT_TX = "0x" + "cd" * 32  # every owed row's settlement (``_owed``)


def settlement_receipt() -> Receipt:
    """The rows' settlement on chain (a batch): each row's authorization used, and its payment moved
    from its payer to its payee."""
    logs = tuple(log for fields in map(ledger_fields, range(1, 20)) for log in (
        LogEntry(fields["asset"], (TOPIC_AUTHORIZATION_USED, _topic(fields["payer"]), bytes.fromhex(fields["nonce"][2:])), b""),
        LogEntry(fields["asset"], (TRANSFER, _topic(fields["payer"]), _topic(fields["pay_to"])),
                 int(fields["amount"]).to_bytes(32, "big"))))
    return Receipt(SETTLEMENT_TX, 1, 3, logs, sender=REFUNDER)


class Chain:
    def __init__(self) -> None:
        self.receipts: dict[str, Receipt] = {}
        self.pool: set[str] = set()

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        if tx_hash == SETTLEMENT_TX and tx_hash not in self.receipts:
            return settlement_receipt()
        return self.receipts.get(tx_hash)

    async def knows_transaction(self, tx_hash: str) -> bool:
        return tx_hash in self.pool or tx_hash in self.receipts

    def mine(self, row: Payment, tx_hash: str, *, status: int = 1, amount: int | None = None) -> None:
        logs = (LogEntry(row.asset, (TRANSFER, _topic(REFUNDER), _topic(row.payer)),
                         (amount if amount is not None else int(row.refund_owed or 0)).to_bytes(32, "big")),)
        self.receipts[tx_hash] = Receipt(tx_hash, status, 7, logs if status == 1 else (), sender=REFUNDER)


class Payer:
    """Signs ``0x..`` hashes in order, claims through ``before_send``, then 'broadcasts'."""

    def __init__(self, before_claim: object = None) -> None:
        self.sent: list[str] = []
        self.before_claim = before_claim

    def can_refund(self, network: str) -> bool:
        return True

    async def refund(self, network: str, token: str, to: str, amount: int, before_send: BeforeSend | None = None) -> RefundResult:
        tx_hash = "0x" + f"{len(self.sent) + 1:064x}"
        if callable(self.before_claim):
            self.before_claim()
        assert before_send is not None
        await before_send(tx_hash)
        self.sent.append(tx_hash)
        return RefundResult(tx_hash, True)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


def _owed(ledger: Ledger, n: int, refund_tx: str | None = None) -> Payment:
    row = ledger.record_verified(**ledger_fields(n))
    ledger.begin_settlement(row.id, None)
    ledger.mark_settled(row.id, tx_hash=SETTLEMENT_TX, block_number=3)
    assert ledger.record_refund_owed(row.id, 1000, "upstream_error")
    if refund_tx is not None:
        assert ledger.record_refund_tx(row.id, refund_tx)
    found = ledger.get(row.id)
    assert found is not None
    return found


def _run(ledger: Ledger, chain: Chain, payer: Payer | None, **options: Any) -> RefundsReport:
    return asyncio.run(settle_owed_refunds(ledger, {"eip155:31337": chain}, payer, **options))


def test_each_status_gets_its_one_safe_action(ledger: Ledger) -> None:
    chain = Chain()
    unpaid = _owed(ledger, 1)
    landed = _owed(ledger, 2, "0x" + "a1" * 32)
    chain.mine(landed, "0x" + "a1" * 32)
    reverted = _owed(ledger, 3, "0x" + "a2" * 32)
    chain.mine(reverted, "0x" + "a2" * 32, status=0)
    pending = _owed(ledger, 4, "0x" + "a3" * 32)
    chain.pool.add("0x" + "a3" * 32)
    unknown = _owed(ledger, 5, "0x" + "a4" * 32)
    odd = _owed(ledger, 6, "0x" + "a5" * 32)
    chain.mine(odd, "0x" + "a5" * 32, amount=1)  # succeeded, but not this refund's transfer
    payer = Payer()

    report = _run(ledger, chain, payer, pay=True)

    got = {line.payment_id: (line.status, line.outcome) for line in report.lines}
    assert got == {
        unpaid.id: ("unpaid", "paid"), landed.id: ("landed", "recorded"), reverted.id: ("reverted", "paid"),
        pending.id: ("pending", "left"), unknown.id: ("unknown", "left"), odd.id: ("unexplained", "left"),
    }
    assert len(payer.sent) == 2  # the unpaid and the reverted one; nothing else was broadcast
    assert {line.payment_id for line in report.still_owed} == {pending.id, unknown.id, odd.id}
    assert [r.id for r in ledger.owed_refunds()] == [pending.id, unknown.id, odd.id]


def test_listing_sends_and_writes_nothing(ledger: Ledger) -> None:
    chain = Chain()
    row = _owed(ledger, 1)
    payer = Payer()
    report = _run(ledger, chain, payer, pay=False)
    assert [(line.status, line.outcome) for line in report.lines] == [("unpaid", "listed")]
    assert payer.sent == [] and [r.id for r in ledger.owed_refunds()] == [row.id]


def test_a_claim_taken_between_the_read_and_the_broadcast_stops_the_broadcast(ledger: Ledger) -> None:
    """The gateway's own refund (or another run) claims the row after this run read it."""
    chain = Chain()
    row = _owed(ledger, 1)
    payer = Payer(before_claim=lambda: ledger.record_refund_tx(row.id, "0x" + "77" * 32))
    report = _run(ledger, chain, payer, pay=True)
    assert [line.outcome for line in report.lines] == ["claimed_elsewhere"]
    assert payer.sent == []  # claimed first, broadcast never
    again = ledger.get(row.id)
    assert again is not None and again.refund_tx == "0x" + "77" * 32 and again.refunded_at is None


def test_include_unknown_pays_again_and_no_payer_leaves_it_owed(ledger: Ledger) -> None:
    """A claim gone quiet (``quiet_seconds=0``: older than the wait; a fresh one: test_refund_attacks)."""
    chain = Chain()
    row = _owed(ledger, 1, "0x" + "a4" * 32)
    assert [line.outcome for line in _run(ledger, chain, None, pay=True, include_unknown=True,
                                          quiet_seconds=0).lines] == ["no_refund_key"]
    payer = Payer()
    report = _run(ledger, chain, payer, pay=True, include_unknown=True, quiet_seconds=0)
    assert [line.outcome for line in report.lines] == ["paid"] and len(payer.sent) == 1
    paid = ledger.get(row.id)
    assert paid is not None and paid.refund_tx == payer.sent[0] and paid.refunded_at is not None


def test_a_network_without_chain_access_is_reported_not_guessed(ledger: Ledger) -> None:
    _owed(ledger, 1)
    report = asyncio.run(settle_owed_refunds(ledger, {}, Payer(), pay=True))
    assert report.lines == [] and report.unchecked_networks == ["eip155:31337"]


def test_the_status_of_a_landed_refund_needs_its_transfer(ledger: Ledger) -> None:
    chain = Chain()
    row = _owed(ledger, 1, "0x" + "a1" * 32)
    chain.mine(row, "0x" + "a1" * 32, amount=999)
    assert asyncio.run(refund_status(chain, row)) == "unexplained"
    chain.mine(row, "0x" + "a1" * 32)
    assert asyncio.run(refund_status(chain, row)) == "landed"


@pytest.mark.parametrize("edit", [
    {"refund_owed": 10**12},  # more than was charged
    {"payer": "0x" + "7" * 40},  # an accomplice who never paid
    {"tx_hash": "0x" + "ee" * 32},  # a settlement the chain does not know
    {"nonce": "0x" + "ab" * 32},  # another authorization than the one the settlement used
    {"amount": 999_999},  # the charge itself inflated: its transfer is not in the settlement
])
def test_a_row_the_chain_does_not_bear_out_is_never_paid(ledger: Ledger, edit: dict[str, Any]) -> None:
    """An insider's edit of the ledger is not a licence to spend the refund account: the row's own
    settlement on chain must show its payer paying at least what is owed back."""
    row = _owed(ledger, 1)
    force_row(ledger, row.id, **edit)
    payer = Payer()
    report = _run(ledger, Chain(), payer, pay=True)
    assert [line.outcome for line in report.lines] == ["charge_unexplained"]
    assert payer.sent == []
    again = ledger.get(row.id)
    assert again is not None and again.refund_tx is None and again.refunded_at is None  # still owed, for a person
