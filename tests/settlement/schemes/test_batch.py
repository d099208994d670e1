"""Batched settlement on a real anvil: one transaction for many payments, each with its own outcome."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from web3 import Web3

from gateway.devkit.devchain import ANVIL_KEYS, LOCAL_NETWORK
from gateway.devkit.payer import Payer
from settlement.chain.client import JsonRpcChain
from settlement.schemes.batch import BatchingFacilitator, BatchPolicy, decode_revert, encode_batch, item_outcomes
from settlement.schemes.exact_local import LocalFacilitator
from settlement.schemes.exact_resolve import settled_by
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse
from tests.conftest import PAY_TO, Devchain

PRICE = 1000


def requirements(devchain: Devchain, amount: int = PRICE) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="exact", network=LOCAL_NETWORK, amount=str(amount), asset=devchain.token, pay_to=PAY_TO,
        max_timeout_seconds=120, extra={"name": "USD Coin", "version": "2"},
    )


def facilitators(
    devchain: Devchain, *, max_payments: int = 50, max_wait_ms: float = 200, receipt_timeout: float = 10
) -> tuple[JsonRpcChain, LocalFacilitator, BatchingFacilitator]:
    chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, ANVIL_KEYS[0])
    local = LocalFacilitator({LOCAL_NETWORK: chain}, receipt_timeout=receipt_timeout)
    assert devchain.deployment.batch_settler is not None
    batching = BatchingFacilitator(
        local, {LOCAL_NETWORK: chain}, {LOCAL_NETWORK: devchain.deployment.batch_settler},
        {LOCAL_NETWORK: BatchPolicy(max_wait_ms, max_payments)}, receipt_timeout=receipt_timeout,
    )
    return chain, local, batching


Hook = Callable[[str], Awaitable[None]]


def recording_hook(seen: list[str]) -> Hook:
    async def before_send(tx_hash: str) -> None:
        seen.append(tx_hash)

    return before_send


async def settle_all(
    batching: BatchingFacilitator, payments: list[tuple[PaymentPayload, PaymentRequirements]], hooks: list[Hook | None]
) -> list[SettleResponse | BaseException]:
    return await asyncio.gather(
        *(batching.settle(p, r, before_send=h) for (p, r), h in zip(payments, hooks)), return_exceptions=True
    )


def test_a_batch_of_payments_settles_in_one_transaction(devchain: Devchain) -> None:
    payers = [1, 2, 3, 5, 5]  # the same payer twice: two authorizations, two transfers
    req = requirements(devchain)
    payments = [(Payer(devchain.key(i)).sign(req), req) for i in payers]
    before = {i: devchain.balance(devchain.address(i)) for i in set(payers)}
    before_pay_to = devchain.balance(PAY_TO)
    seen: list[list[str]] = [[] for _ in payers]

    async def run() -> list[SettleResponse | BaseException]:
        chain, _, batching = facilitators(devchain, max_payments=len(payers), max_wait_ms=5_000)
        try:
            return await settle_all(batching, payments, [recording_hook(s) for s in seen])
        finally:
            await chain.close()

    results = asyncio.run(run())
    assert all(isinstance(r, SettleResponse) and r.success for r in results), results
    hashes = {r.transaction for r in results if isinstance(r, SettleResponse)}
    assert len(hashes) == 1
    [tx_hash] = hashes
    assert all(s == [tx_hash] for s in seen)  # every write-ahead hook saw the batch hash, once
    receipt = devchain.w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["status"] == 1
    assert receipt["to"] == devchain.deployment.batch_settler
    assert {r.extra["blockNumber"] for r in results if isinstance(r, SettleResponse) and r.extra} == {
        receipt["blockNumber"]
    }
    for i in set(payers):
        assert devchain.balance(devchain.address(i)) == before[i] - PRICE * payers.count(i)
    assert devchain.balance(PAY_TO) == before_pay_to + PRICE * len(payers)
    for payment, _ in payments:
        auth = payment.payload["authorization"]
        assert devchain.authorization_state(auth["from"], auth["nonce"]) is True


def test_one_bad_authorization_fails_alone(devchain: Devchain) -> None:
    req = requirements(devchain)
    used = Payer(devchain.key(6)).sign(req)
    rich = requirements(devchain, amount=10**15)  # more than any account holds
    payments = [
        (Payer(devchain.key(6)).sign(req), req),
        (used, req),  # settled below before the batch: its nonce is used
        (Payer(devchain.key(7)).sign(rich), rich),  # insufficient balance
        (Payer(devchain.key(6)).sign(req), req),  # same payer, payee and amount as the used one
    ]
    before = devchain.balance(devchain.address(6)), devchain.balance(devchain.address(7))

    async def run() -> tuple[SettleResponse, list[SettleResponse | BaseException]]:
        chain, local, batching = facilitators(devchain, max_payments=len(payments), max_wait_ms=5_000)
        try:
            first = await local.settle(used, req)
            return first, await settle_all(batching, payments, [None] * len(payments))
        finally:
            await chain.close()

    first, results = asyncio.run(run())
    assert first.success
    ok1, dup, poor, ok2 = results
    assert isinstance(ok1, SettleResponse) and ok1.success
    assert isinstance(ok2, SettleResponse) and ok2.success
    assert isinstance(dup, SettleResponse) and not dup.success
    assert dup.error_reason == "invalid_exact_evm_nonce_already_used"
    assert isinstance(poor, SettleResponse) and not poor.success
    assert poor.error_reason == "invalid_exact_evm_insufficient_balance"
    assert len({ok1.transaction, dup.transaction, poor.transaction, ok2.transaction}) == 1
    assert devchain.balance(devchain.address(6)) == before[0] - 3 * PRICE  # the single one + two in the batch
    assert devchain.balance(devchain.address(7)) == before[1]

    # Reconcile reads this receipt too: it holds a Transfer identical to the failed duplicate's
    # (payer 6 → payTo, PRICE), so only AuthorizationUsed tells the failed item from the settled.
    async def receipt() -> Any:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, None)
        try:
            return await chain.get_receipt(str(ok1.transaction))
        finally:
            await chain.close()

    batch_receipt = asyncio.run(receipt())

    def row(payment: PaymentPayload, amount: int = PRICE) -> Any:
        auth = payment.payload["authorization"]
        return SimpleNamespace(asset=devchain.token, payer=auth["from"], pay_to=PAY_TO, amount=amount, nonce=auth["nonce"])

    assert settled_by(batch_receipt, row(payments[0][0]))
    assert settled_by(batch_receipt, row(payments[3][0]))
    assert not settled_by(batch_receipt, row(used))
    assert not settled_by(batch_receipt, row(payments[2][0], 10**15))
    outcomes = item_outcomes(batch_receipt, str(devchain.deployment.batch_settler))
    # Items go into the batch as their settle calls get there (a payer's second item reads its balance
    # first: exact_guards.InFlight), so by outcome, not by position.
    assert sorted(ok for ok, _ in outcomes.values()) == [False, False, True, True]
    reverts = sorted(decode_revert(reason) for ok, reason in outcomes.values() if not ok)
    assert "exceeds balance" in reverts[0] and "authorization is used" in reverts[1], reverts


def test_a_failing_write_ahead_hook_takes_its_item_out_of_the_batch(devchain: Devchain) -> None:
    req = requirements(devchain)
    payments = [(Payer(devchain.key(8)).sign(req), req) for _ in range(3)]
    seen: list[list[str]] = [[], [], []]

    async def broken(tx_hash: str) -> None:
        raise OSError("ledger down")

    async def run() -> list[SettleResponse | BaseException]:
        chain, _, batching = facilitators(devchain, max_payments=3, max_wait_ms=5_000)
        try:
            return await settle_all(batching, payments, [recording_hook(seen[0]), broken, recording_hook(seen[2])])
        finally:
            await chain.close()

    ok1, failed, ok2 = asyncio.run(run())
    assert isinstance(failed, OSError)
    assert isinstance(ok1, SettleResponse) and ok1.success and isinstance(ok2, SettleResponse) and ok2.success
    # The first signing named all three; the re-signed transaction (without the failed item) was sent.
    assert seen[0][-1] == seen[2][-1] == ok1.transaction == ok2.transaction
    assert len(seen[0]) == 2
    auth = payments[1][0].payload["authorization"]
    assert devchain.authorization_state(auth["from"], auth["nonce"]) is False


def test_a_batch_not_mined_in_time_is_pending_for_every_item(devchain: Devchain) -> None:
    req = requirements(devchain)
    payments = [(Payer(devchain.key(i)).sign(req), req) for i in (1, 2)]
    w3: Web3 = devchain.w3
    w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        async def run() -> list[SettleResponse | BaseException]:
            chain, _, batching = facilitators(devchain, max_payments=2, max_wait_ms=5_000, receipt_timeout=0.3)
            try:
                return await settle_all(batching, payments, [None, None])
            finally:
                await chain.close()

        results = asyncio.run(run())
    finally:
        w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
        w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    assert all(isinstance(r, SettleResponse) and r.error_reason == "settlement_pending" for r in results), results
    tx_hashes = {r.transaction for r in results if isinstance(r, SettleResponse)}
    assert len(tx_hashes) == 1 and None not in tx_hashes
    assert w3.eth.get_transaction_receipt(str(tx_hashes.pop()))["status"] == 1  # mined later: reconcile's job


def test_the_wait_bound_flushes_a_partial_batch(devchain: Devchain) -> None:
    req = requirements(devchain)
    payment = Payer(devchain.key(3)).sign(req)

    async def run() -> SettleResponse:
        chain, _, batching = facilitators(devchain, max_payments=50, max_wait_ms=20)
        try:
            return await asyncio.wait_for(batching.settle(payment, req), 10)
        finally:
            await chain.close()

    assert asyncio.run(run()).success


def test_only_the_settler_may_call_the_batch_contract(devchain: Devchain) -> None:
    req = requirements(devchain)
    payment = Payer(devchain.key(4)).sign(req)
    local = LocalFacilitator({LOCAL_NETWORK: JsonRpcChain(devchain.anvil.rpc_url, 31337, None)})
    checked = local.check_offline(payment, req)
    w3: Web3 = devchain.w3
    stranger = devchain.address(4)
    with pytest.raises(Exception, match="caller is not the settler"):
        w3.eth.call({
            "from": stranger, "to": devchain.deployment.batch_settler,
            "data": "0x" + encode_batch(devchain.token, [checked]).hex(),
        })


def test_verify_marks_what_was_given_back_before_its_balance_read_is_sent(devchain: Devchain) -> None:
    """A hold of the asset given back while verify's balance read is on its way may have spent its
    value after the node answered: verify's noted balance must count it as given back since (its
    mark is taken before the read is sent), so the estimate a settlement may use is the balance read
    less that value, never the balance read alone."""
    req = requirements(devchain)
    payment = Payer(devchain.key(4)).sign(req)
    inner = JsonRpcChain(devchain.anvil.rpc_url, 31337, None)

    class GivenBackDuringTheRead:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        async def balance_of(self, token: str, owner: str) -> int:
            async def mined() -> bool:
                return True

            # Another payer's settlement of the same asset ends while this read is in flight.
            async with local.in_flight.hold(inner, LOCAL_NETWORK, token, devchain.address(5), 777, mined):
                pass
            return await inner.balance_of(token, owner)

    local = LocalFacilitator({LOCAL_NETWORK: GivenBackDuringTheRead()})  # type: ignore[dict-item]

    async def run() -> tuple[bool, int, int | None]:
        try:
            verdict = await local.verify(payment, req)
            balance = await inner.balance_of(devchain.token, devchain.address(4))
            return verdict.is_valid, balance, local.in_flight._estimate(LOCAL_NETWORK, devchain.token, devchain.address(4))
        finally:
            await inner.close()

    valid, balance, estimate = asyncio.run(run())
    assert valid and estimate == balance - 777
