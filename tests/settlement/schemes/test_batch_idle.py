"""Batched settlement with ``flush_when_idle`` (group commit) on a real anvil: a payment that finds
nothing in flight goes at once; what arrives while a batch is in flight goes together as soon as
that batch resolves. ``max_wait_ms`` is 60 s here, so a payment left to the timer would fail the
test's 30 s deadline instead of passing late."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from web3.exceptions import TransactionNotFound

from gateway.devkit.devchain import ANVIL_KEYS, LOCAL_NETWORK
from gateway.devkit.payer import Payer
from settlement.chain.client import JsonRpcChain
from settlement.errors import ChainUnavailable
from settlement.schemes.batch import TOPIC_FAILED, TOPIC_SETTLED, BatchingFacilitator, BatchPolicy, _Item
from settlement.schemes.exact_local import LocalFacilitator
from settlement.x402.wire import PaymentPayload, SettleResponse
from tests.conftest import PAY_TO, Devchain
from tests.settlement.schemes.test_batch import PRICE, recording_hook, requirements, settle_all

LONG_WAIT_MS = 60_000
DEADLINE = 30  # seconds: generous, only there to turn a payment stuck behind the timer into a failure


def idle_facilitators(devchain: Devchain, *, max_payments: int = 50) -> tuple[JsonRpcChain, BatchingFacilitator]:
    chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, ANVIL_KEYS[0])
    local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=10)
    assert devchain.deployment.batch_settler is not None
    batching = BatchingFacilitator(
        local, {LOCAL_NETWORK: chain}, {LOCAL_NETWORK: devchain.deployment.batch_settler},
        {LOCAL_NETWORK: BatchPolicy(LONG_WAIT_MS, max_payments, flush_when_idle=True)}, receipt_timeout=10,
    )
    return chain, batching


def batch_size(devchain: Devchain, tx_hash: str | None) -> int:
    """How many payments the batch transaction ``tx_hash`` carried (one Settled or Failed event each)."""
    receipt = devchain.w3.eth.get_transaction_receipt(str(tx_hash))
    assert receipt["status"] == 1 and receipt["to"] == devchain.deployment.batch_settler
    return sum(1 for log in receipt["logs"] if log["address"] == receipt["to"] and log["topics"][0] in (TOPIC_SETTLED, TOPIC_FAILED))


def transactions(results: list[Any]) -> list[str | None]:
    assert all(isinstance(r, SettleResponse) and r.success for r in results), results
    return [r.transaction for r in results]


def test_a_lone_payment_goes_at_once_not_after_the_wait(devchain: Devchain) -> None:
    req = requirements(devchain)
    payment = Payer(devchain.key(1)).sign(req)
    before = devchain.balance(devchain.address(1))

    async def run() -> SettleResponse:
        chain, batching = idle_facilitators(devchain)
        try:
            return await asyncio.wait_for(batching.settle(payment, req), DEADLINE)
        finally:
            await chain.close()

    [tx_hash] = transactions([asyncio.run(run())])
    assert batch_size(devchain, tx_hash) == 1
    assert devchain.balance(devchain.address(1)) == before - PRICE


def test_payments_gathered_in_one_turn_share_one_transaction(devchain: Devchain) -> None:
    req = requirements(devchain)
    payments = [(Payer(devchain.key(i)).sign(req), req) for i in (2, 3, 4)]

    async def run() -> list[SettleResponse | BaseException]:
        chain, batching = idle_facilitators(devchain)
        try:
            return await asyncio.wait_for(settle_all(batching, payments, [None] * 3), DEADLINE)
        finally:
            await chain.close()

    hashes = transactions(asyncio.run(run()))
    assert len(set(hashes)) == 1 and batch_size(devchain, hashes[0]) == 3


def hold_first_receipt(monkeypatch: pytest.MonkeyPatch, chain: Any, in_flight: asyncio.Event, release: asyncio.Event) -> None:
    """The first batch is broadcast but its receipt is not read until ``release``: it stays in
    flight (``in_flight`` is set once it is)."""
    wait_for_receipt = chain.wait_for_receipt

    async def held(tx_hash: str, timeout: float) -> Any:
        if not in_flight.is_set():
            in_flight.set()
            await release.wait()
        return await wait_for_receipt(tx_hash, timeout)

    monkeypatch.setattr(chain, "wait_for_receipt", held)


async def behind_one_in_flight(
    devchain: Devchain, batching: BatchingFacilitator, first: PaymentPayload, rest: list[PaymentPayload],
    hold: Callable[[asyncio.Event, asyncio.Event], None],
) -> tuple[SettleResponse | BaseException, list[SettleResponse | BaseException]]:
    """Settle ``first`` and hold its batch in flight (``hold`` installs the gate: it sets the first
    event once the batch is in flight and waits for the second); meanwhile submit ``rest`` one at a
    time, each in a later loop turn than the one before; then let the first batch resolve."""
    req = requirements(devchain)
    batcher = batching._batchers[LOCAL_NETWORK]
    in_flight, release, arrived = asyncio.Event(), asyncio.Event(), asyncio.Event()
    hold(in_flight, release)
    submit = batcher.submit

    def submitted(item: _Item) -> None:
        submit(item)
        arrived.set()

    batcher.submit = submitted  # type: ignore[method-assign]

    async def settle(payment: PaymentPayload) -> SettleResponse:
        return await asyncio.wait_for(batching.settle(payment, req), DEADLINE)

    head = asyncio.ensure_future(settle(first))
    await asyncio.wait_for(in_flight.wait(), DEADLINE)
    tails = []
    for payment in rest:
        arrived.clear()
        tails.append(asyncio.ensure_future(settle(payment)))
        await asyncio.wait_for(arrived.wait(), DEADLINE)
    assert len(batcher._queues.get(req.asset, [])) == len(rest)  # queued behind it, not sent
    release.set()
    return (await asyncio.gather(head, return_exceptions=True))[0], await asyncio.gather(*tails, return_exceptions=True)


def test_payments_arriving_while_a_batch_is_in_flight_go_together_when_it_is_mined(
    devchain: Devchain, monkeypatch: pytest.MonkeyPatch
) -> None:
    req = requirements(devchain)
    first = Payer(devchain.key(1)).sign(req)
    rest = [Payer(devchain.key(i)).sign(req) for i in (2, 3, 4)]

    async def run() -> tuple[Any, list[Any]]:
        chain, batching = idle_facilitators(devchain)

        def hold(in_flight: asyncio.Event, release: asyncio.Event) -> None:
            hold_first_receipt(monkeypatch, chain, in_flight, release)

        try:
            return await behind_one_in_flight(devchain, batching, first, rest, hold)
        finally:
            await chain.close()

    head, tails = asyncio.run(run())
    [first_tx] = transactions([head])
    later = transactions(tails)
    assert len(set(later)) == 1 and first_tx not in later  # two transactions in all
    assert batch_size(devchain, first_tx) == 1 and batch_size(devchain, later[0]) == len(rest)


def test_payments_behind_a_batch_that_raised_still_go(devchain: Devchain, monkeypatch: pytest.MonkeyPatch) -> None:
    req = requirements(devchain)
    first = Payer(devchain.key(5)).sign(req)
    rest = [Payer(devchain.key(i)).sign(req) for i in (6, 7)]
    before = devchain.balance(devchain.address(5))

    async def run() -> tuple[Any, list[Any]]:
        chain, batching = idle_facilitators(devchain)

        def hold(in_flight: asyncio.Event, release: asyncio.Event) -> None:
            send_call = chain.send_call

            async def failing_once(to: str, calldata: bytes, before_send: Any = None, *, gas: int) -> str:
                if not in_flight.is_set():
                    in_flight.set()
                    await release.wait()
                    raise ChainUnavailable("node down before the broadcast")
                return await send_call(to, calldata, before_send, gas=gas)

            monkeypatch.setattr(chain, "send_call", failing_once)

        try:
            return await behind_one_in_flight(devchain, batching, first, rest, hold)
        finally:
            await chain.close()

    head, tails = asyncio.run(run())
    assert isinstance(head, ChainUnavailable)
    assert devchain.balance(devchain.address(5)) == before  # never sent: nothing moved
    later = transactions(tails)
    assert len(set(later)) == 1 and batch_size(devchain, later[0]) == len(rest)


def test_max_payments_still_splits(devchain: Devchain) -> None:
    req = requirements(devchain)
    payments = [(Payer(devchain.key(i)).sign(req), req) for i in (1, 2, 3, 4, 5)]

    async def run() -> list[SettleResponse | BaseException]:
        chain, batching = idle_facilitators(devchain, max_payments=2)
        try:
            return await asyncio.wait_for(settle_all(batching, payments, [None] * 5), DEADLINE)
        finally:
            await chain.close()

    a, b, c, d, e = transactions(asyncio.run(run()))
    # Two full batches at once; the fifth found two in flight and went when the first resolved.
    assert a == b and c == d and len({a, c, e}) == 3
    assert [batch_size(devchain, h) for h in (a, c, e)] == [2, 2, 1]


Hook = Callable[[str], Awaitable[None]]


def test_a_failing_write_ahead_hook_moves_nothing_and_the_rest_settle_once(devchain: Devchain) -> None:
    req = requirements(devchain)
    payers = (6, 7, 8)
    payments = [(Payer(devchain.key(i)).sign(req), req) for i in payers]
    before = {i: devchain.balance(devchain.address(i)) for i in payers}
    before_pay_to = devchain.balance(PAY_TO)
    seen: list[list[str]] = [[], [], []]

    async def broken(tx_hash: str) -> None:
        seen[1].append(tx_hash)
        raise OSError("ledger down")

    async def run() -> list[SettleResponse | BaseException]:
        chain, batching = idle_facilitators(devchain)
        hooks: list[Hook | None] = [recording_hook(seen[0]), broken, recording_hook(seen[2])]
        try:
            return await asyncio.wait_for(settle_all(batching, payments, hooks), DEADLINE)
        finally:
            await chain.close()

    ok1, failed, ok2 = asyncio.run(run())
    assert isinstance(failed, OSError)
    tx_hash, other = transactions([ok1, ok2])
    assert tx_hash == other == seen[0][-1] == seen[2][-1]
    assert batch_size(devchain, tx_hash) == 2
    # The first signing (all three) was never broadcast: its hash is nowhere on chain.
    assert len(seen[0]) == 2 and seen[1] == [seen[0][0]]
    with pytest.raises(TransactionNotFound):
        devchain.w3.eth.get_transaction(seen[0][0])
    assert devchain.balance(devchain.address(7)) == before[7]
    auth = payments[1][0].payload["authorization"]
    assert devchain.authorization_state(auth["from"], auth["nonce"]) is False
    assert devchain.balance(devchain.address(6)) == before[6] - PRICE
    assert devchain.balance(devchain.address(8)) == before[8] - PRICE
    assert devchain.balance(PAY_TO) == before_pay_to + 2 * PRICE


def test_drain_waits_for_what_queued_behind_a_batch_in_flight(devchain: Devchain, monkeypatch: pytest.MonkeyPatch) -> None:
    req = requirements(devchain)
    first, *rest = [Payer(devchain.key(i)).sign(req) for i in (1, 2, 3)]

    async def run() -> list[Any]:
        chain, batching = idle_facilitators(devchain)
        in_flight, release = asyncio.Event(), asyncio.Event()
        hold_first_receipt(monkeypatch, chain, in_flight, release)
        try:
            head = asyncio.ensure_future(batching.settle(first, req))
            await asyncio.wait_for(in_flight.wait(), DEADLINE)
            drained = asyncio.ensure_future(batching.drain())  # started with only the first batch to wait for
            tails = [asyncio.ensure_future(batching.settle(p, req)) for p in rest]
            release.set()
            await asyncio.wait_for(drained, DEADLINE)
            assert all(t.done() for t in [head, *tails])  # drain waited for the batch sent after it began
            return [t.result() for t in [head, *tails]]
        finally:
            await chain.close()

    first_tx, *later = transactions(asyncio.run(run()))
    assert len(set(later)) == 1 and first_tx not in later and batch_size(devchain, later[0]) == 2
