"""Attacks on paying owed refunds (``settle_owed_refunds``) with a real ledger, the chain and the
refund payer behind their Protocols: a refund still being sent by the gateway, a payer that signs
again after a stale nonce. Each test counts the broadcasts and reads the ledger row."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from settlement.chain.broadcast import BeforeSend
from settlement.chain.receipts import LogEntry, Receipt
from settlement.chain.refunds import Refunder, RefundResult
from settlement.chain.rpc import RpcError
from settlement.errors import BroadcastUncertain
from settlement.finance.owed_refunds import settle_owed_refunds
from settlement.ledger import Ledger, Payment
from settlement.ledger.models import utcnow
from tests.settlement.finance.test_owed_refunds import REFUNDER, TRANSFER, Chain, Payer, _owed, _topic, ledger

__all__ = ["ledger"]  # the fixture

IN_FLIGHT = "0x" + "a7" * 32


def _run(ledger: Ledger, chain: Chain, payer: Payer, **options: Any) -> list[tuple[str, str]]:
    report = asyncio.run(settle_owed_refunds(ledger, {"eip155:31337": chain}, payer, pay=True, **options))
    return [(line.status, line.outcome) for line in report.lines]


def _row(ledger: Ledger, payment_id: int) -> Payment:
    row = ledger.get(payment_id)
    assert row is not None
    return row


def test_include_unknown_leaves_a_refund_the_gateway_is_still_sending(ledger: Ledger) -> None:
    """The gateway claimed the refund a moment ago and broadcasts next: the node does not know the
    transaction yet. Paying it again now pays the payer twice when the gateway's lands."""
    chain, payer = Chain(), Payer()
    row = _owed(ledger, 1, IN_FLIGHT)  # the gateway's claim, written before its broadcast

    assert _run(ledger, chain, payer, include_unknown=True) == [("unknown", "too_recent")]
    assert payer.sent == []  # nothing broadcast over the gateway's refund
    assert _row(ledger, row.id).refund_tx == IN_FLIGHT

    chain.mine(row, IN_FLIGHT)  # the gateway's broadcast lands
    assert _run(ledger, chain, payer, include_unknown=True) == [("landed", "recorded")]
    assert payer.sent == [] and _row(ledger, row.id).refunded_at is not None


def test_include_unknown_pays_a_claim_gone_quiet_once(ledger: Ledger) -> None:
    chain, payer = Chain(), Payer()
    row = _owed(ledger, 1, IN_FLIGHT)
    table = Payment.__table__
    with ledger.engine.begin() as connection:  # claimed an hour ago: its process died before the broadcast
        connection.execute(update(table).where(table.c.id == row.id).values(updated_at=utcnow() - timedelta(hours=1)))

    assert _run(ledger, chain, payer, include_unknown=True) == [("unknown", "paid")]
    assert _run(ledger, chain, payer, include_unknown=True) == []
    assert len(payer.sent) == 1 and _row(ledger, row.id).refund_tx == payer.sent[0]


class SignsAgain(Payer):
    """The broadcast lane of a refund account someone else used meanwhile (the running gateway): its
    first signature is refused for a stale nonce (it can never land) and it signs again on a fresh
    one, calling ``before_send`` for each."""

    async def refund(self, network: str, token: str, to: str, amount: int, before_send: BeforeSend | None = None) -> RefundResult:
        assert before_send is not None
        await before_send("0x" + "e1" * 32)  # refused: nonce too low
        await before_send("0x" + "e2" * 32)
        self.sent.append("0x" + "e2" * 32)
        return RefundResult("0x" + "e2" * 32, True)


def test_a_payer_signing_again_after_a_stale_nonce_replaces_its_own_claim(ledger: Ledger) -> None:
    chain, payer = Chain(), SignsAgain()
    row = _owed(ledger, 1)

    assert _run(ledger, chain, payer) == [("unpaid", "paid")]  # not "claimed_elsewhere": nobody else did

    assert payer.sent == ["0x" + "e2" * 32]
    paid = _row(ledger, row.id)
    assert paid.refund_tx == "0x" + "e2" * 32 and paid.refunded_at is not None


OTHER = "0x" + "42" * 20


def _log(row: Payment, *, token: str | None = None, from_: str = REFUNDER, to: str | None = None,
         amount: int | None = None, extra_topics: tuple[bytes, ...] = ()) -> LogEntry:
    topics = (TRANSFER, _topic(from_), _topic(to or row.payer), *extra_topics)
    return LogEntry(token or row.asset, topics, (1000 if amount is None else amount).to_bytes(32, "big"))


@pytest.mark.parametrize("mutate", [
    lambda row: _log(row, to=OTHER),  # the transfer went to someone else
    lambda row: _log(row, token=OTHER),  # the same event from another contract (another token)
    lambda row: _log(row, amount=999),  # less than owed
    lambda row: _log(row, amount=1000 + 2**255),  # not the amount (a word that only ends like it)
    lambda row: _log(row, from_=OTHER),  # someone else's tokens, not the refund account's
    lambda row: LogEntry(row.asset, (TRANSFER, _topic(REFUNDER)), bytes(32)),  # a malformed event
], ids=["to-other", "other-contract", "short", "high-bits", "from-other", "malformed"])
def test_a_receipt_without_this_refunds_transfer_is_never_recorded_paid(ledger: Ledger, mutate: Any) -> None:
    chain, payer = Chain(), Payer()
    row = _owed(ledger, 1, IN_FLIGHT)
    chain.receipts[IN_FLIGHT] = Receipt(IN_FLIGHT, 1, 7, (mutate(row),), sender=REFUNDER)

    assert _run(ledger, chain, payer, include_unknown=True) == [("unexplained", "left")]
    assert payer.sent == []
    again = _row(ledger, row.id)
    assert again.refunded_at is None and again.refund_tx == IN_FLIGHT


class RefundChain:
    """The refund account's chain client: its broadcast raises ``error`` or sends, then ``receipt``."""

    settlement_address = REFUNDER

    def __init__(self, receipt: Receipt | None, error: Exception | None = None, urls: int = 1) -> None:
        self.receipt, self.error = receipt, error
        self.rpc_urls = [f"http://node-{i}" for i in range(urls)]

    async def send_transfer(self, token: str, to: str, amount: int, before_send: BeforeSend | None = None) -> str:
        if before_send is not None:
            await before_send(IN_FLIGHT)
        if self.error is not None:
            raise self.error
        return IN_FLIGHT

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None:
        return self.receipt


@pytest.mark.parametrize(("receipt", "error", "expected"), [
    (None, RpcError("eth_sendRawTransaction", "insufficient funds"), RefundResult(None, False, "chain_rpc_error", refused=True)),
    (None, BroadcastUncertain(IN_FLIGHT), RefundResult(IN_FLIGHT, False, "settlement_broadcast_uncertain")),
    (None, None, RefundResult(IN_FLIGHT, False, "refund_pending")),
    ("to-other", None, RefundResult(IN_FLIGHT, False, "refund_failed")),
    ("other-token", None, RefundResult(IN_FLIGHT, False, "refund_failed")),
    ("reverted", None, RefundResult(IN_FLIGHT, False, "refund_failed")),
    ("paid", None, RefundResult(IN_FLIGHT, True)),
], ids=["refused", "uncertain", "pending", "to-other", "other-token", "reverted", "paid"])
def test_the_refunder_confirms_only_its_own_transfer_to_the_payer(
    ledger: Ledger, receipt: str | None, error: Exception | None, expected: RefundResult
) -> None:
    """Only a node's refusal is ``refused`` (its claim may be released); a broadcast whose answer was
    lost keeps its hash; only the very transfer (token, from the refund account, to the payer, the
    amount) is ``confirmed``."""
    row = _owed(ledger, 1)
    logs = {"to-other": (_log(row, to=OTHER),), "other-token": (_log(row, token=OTHER),), "paid": (_log(row),)}
    mined = None if receipt is None else Receipt(IN_FLIGHT, 0 if receipt == "reverted" else 1, 7, logs.get(receipt, ()))
    refunder = Refunder({row.network: RefundChain(mined, error)})  # type: ignore[dict-item]
    assert asyncio.run(refunder.refund(row.network, row.asset, row.payer, 1000)) == expected


def test_a_refusal_after_failing_over_between_nodes_is_not_known_to_be_refused(ledger: Ledger) -> None:
    """With several RPC URLs, one node may hold the transaction (its answer lost) while the next
    refuses it: the claim is not released (``refused`` False), so nothing pays the refund again
    while the first node may still mine it."""
    row = _owed(ledger, 1)
    chain = RefundChain(None, RpcError("eth_sendRawTransaction", "insufficient funds for gas"), urls=2)
    refunder = Refunder({row.network: chain})  # type: ignore[dict-item]
    result = asyncio.run(refunder.refund(row.network, row.asset, row.payer, 1000))
    assert (result.confirmed, result.refused, result.reason) == (False, False, "chain_rpc_error")
