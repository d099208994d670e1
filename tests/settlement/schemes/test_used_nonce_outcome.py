"""A settlement that failed because its nonce is used, and a batch item that expired in the queue.

``LocalFacilitator.used_nonce_outcome``: the payment is settled (by the transaction that used the
authorization) only when that transaction moved this payment's money to its payTo and was not our
own settlement of another payment; unknown (pending) when the chain cannot say; failed otherwise.
Then, on a real anvil, a front-run single settlement is served and a batch item whose validBefore
came too close while it waited is failed before the broadcast (never sent, nothing charged)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from eth_account import Account

from gateway.devkit.devchain import ANVIL_KEYS, LOCAL_NETWORK
from gateway.devkit.payer import Payer
from settlement.chain.client import JsonRpcChain
from settlement.chain.receipts import TOPIC_AUTHORIZATION_USED, TOPIC_TRANSFER, LogEntry, Receipt
from settlement.errors import ChainUnavailable
from settlement.schemes.batch import BatchingFacilitator, BatchPolicy
from settlement.schemes.exact_local import CheckedPayment, LocalFacilitator
from settlement.x402.wire import PaymentRequirements, SettleResponse
from tests.conftest import PAY_TO, Devchain
from tests.settlement.schemes.test_batch import PRICE, requirements
from tests.support import chain_actions

TOKEN = "0x" + "11" * 20
OURS = "0x" + "22" * 20
STRANGER = "0x" + "33" * 20
USED = "invalid_exact_evm_nonce_already_used"


def word(address: str) -> bytes:
    return bytes.fromhex(address[2:]).rjust(32, b"\x00")


def checked_payment() -> CheckedPayment:
    req = requirements_offline()
    payment = Payer(Account.create().key.hex()).sign(req)
    return LocalFacilitator({LOCAL_NETWORK: _Chain(None)}).check_offline(payment, req)  # type: ignore[dict-item]


def requirements_offline() -> PaymentRequirements:
    return PaymentRequirements(scheme="exact", network=LOCAL_NETWORK, amount=str(PRICE), asset=TOKEN, pay_to=PAY_TO,
                               max_timeout_seconds=120, extra={"name": "USD Coin", "version": "2"})


def receipt_of(c: CheckedPayment, *, to: str = PAY_TO, value: int = PRICE, sender: str = STRANGER) -> Receipt:
    return Receipt(tx_hash="0x" + "ab" * 32, status=1, block_number=77, sender=sender, logs=(
        LogEntry(TOKEN, (TOPIC_AUTHORIZATION_USED, word(c.payer), c.auth.nonce), b""),
        LogEntry(TOKEN, (TOPIC_TRANSFER, word(c.payer), word(to)), value.to_bytes(32, "big")),
    ))


class _Chain:
    """What ``used_nonce_outcome`` reads: the transaction that used an authorization."""

    chain_id = 31337
    settlement_address = OURS

    def __init__(self, found: Receipt | None | Exception) -> None:
        self.found = found
        self.lookups = 0

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        self.lookups += 1
        if isinstance(self.found, Exception):
            raise self.found
        return self.found


Found = Receipt | None | Exception


def outcome(found: Callable[[CheckedPayment], Found], *, reason: str = USED,
            tx: str = "0x" + "cd" * 32) -> tuple[SettleResponse, int]:
    c = checked_payment()
    chain = _Chain(found(c))
    failed = SettleResponse(success=False, error_reason=reason, payer=c.payer, transaction=tx, network=LOCAL_NETWORK,
                            extra={"blockNumber": 70, "gasUsed": 5})
    local = LocalFacilitator({LOCAL_NETWORK: chain})  # type: ignore[dict-item]
    result = asyncio.run(local.used_nonce_outcome(chain, c, failed))  # type: ignore[arg-type]
    return result, chain.lookups


def test_a_transfer_to_our_payee_under_this_authorization_settles_it_with_that_transaction() -> None:
    result, lookups = outcome(receipt_of)
    assert result.success and result.transaction == "0x" + "ab" * 32 and result.amount == str(PRICE)
    assert result.extra == {"blockNumber": 77, "gasUsed": 5}  # that block; our own gas stays the row's
    assert lookups == 1


def test_a_nonce_used_otherwise_still_fails() -> None:
    for shape in ({"to": STRANGER}, {"value": PRICE - 1}, {"sender": OURS}):
        result, _ = outcome(lambda c: receipt_of(c, **shape))
        assert not result.success and result.error_reason == USED, shape
    result, _ = outcome(lambda c: None)  # cancelled: no AuthorizationUsed at all
    assert not result.success and result.error_reason == USED


def test_a_lookup_that_fails_is_pending_never_a_refusal() -> None:
    result, _ = outcome(lambda c: ChainUnavailable("node down"))
    assert result.error_reason == "settlement_pending" and result.transaction == "0x" + "cd" * 32
    result, _ = outcome(lambda c: ChainUnavailable("node down"), tx="")  # refused outright: no transaction of ours
    assert result.error_reason == "settlement_pending" and not result.transaction


def test_other_failures_are_not_looked_up() -> None:
    result, lookups = outcome(receipt_of, reason="invalid_exact_evm_insufficient_balance")
    assert not result.success and lookups == 0


# -- on anvil -----------------------------------------------------------------------------------------


def test_a_single_settlement_front_run_with_its_own_authorization_is_served(devchain: Devchain) -> None:
    req = requirements(devchain)
    key = chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(9), 10 * PRICE)
    payment = Payer(key).sign(req)
    auth = payment.payload["authorization"]
    before = devchain.balance(PAY_TO)
    front: list[dict[str, Any]] = []

    async def front_run(tx_hash: str) -> None:  # just before our broadcast, someone sends it first
        front.append(chain_actions.use_authorization(devchain.w3, devchain.token, devchain.key(9), auth,
                                                     payment.payload["signature"]))

    async def run() -> SettleResponse:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, ANVIL_KEYS[0])
        try:
            return await LocalFacilitator({LOCAL_NETWORK: chain}).settle(payment, req, before_send=front_run)
        finally:
            await chain.close()

    result = asyncio.run(run())
    assert result.success, result
    assert result.transaction == front[0]["transactionHash"].to_0x_hex()
    assert result.extra is not None and result.extra["blockNumber"] == front[0]["blockNumber"]
    assert devchain.balance(PAY_TO) == before + PRICE  # once
    assert devchain.authorization_state(auth["from"], auth["nonce"])


def test_a_batch_item_that_expires_while_queued_is_failed_before_the_broadcast(devchain: Devchain) -> None:
    req = requirements(devchain)
    keys = [chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(9), 10 * PRICE) for _ in range(2)]
    start = int(time.time())
    calls = [0]

    def clock() -> float:  # the queue-time check sees `start`; everything after, 10 s later
        calls[0] += 1
        return float(start if calls[0] == 1 else start + 10)

    late = Payer(keys[0]).sign(req, now=start, valid_before=start + 10)  # fine when queued, not at the flush
    fine = Payer(keys[1]).sign(req)
    hooks: list[list[str]] = [[], []]

    def hook(seen: list[str]) -> Any:
        async def before_send(tx_hash: str) -> None:
            seen.append(tx_hash)
        return before_send

    async def run() -> list[SettleResponse]:
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, ANVIL_KEYS[0])
        local = LocalFacilitator({LOCAL_NETWORK: chain}, clock=clock)
        batching = BatchingFacilitator(local, {LOCAL_NETWORK: chain}, {LOCAL_NETWORK: str(devchain.deployment.batch_settler)},
                                       {LOCAL_NETWORK: BatchPolicy(5_000, 2)})
        try:
            return list(await asyncio.gather(batching.settle(late, req, before_send=hook(hooks[0])),
                                             batching.settle(fine, req, before_send=hook(hooks[1]))))
        finally:
            await chain.close()

    expired, settled = asyncio.run(run())
    assert not expired.success and expired.error_reason == "invalid_exact_evm_payload_authorization_valid_before"
    assert not expired.transaction and hooks[0] == []  # never part of a transaction
    assert settled.success and hooks[1] == [settled.transaction]
    assert not devchain.authorization_state(late.payload["authorization"]["from"], late.payload["authorization"]["nonce"])
    assert devchain.balance(Account.from_key(keys[0]).address) == 10 * PRICE
    assert devchain.balance(Account.from_key(keys[1]).address) == 9 * PRICE
