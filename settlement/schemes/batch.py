"""Batched settlement: many EIP-3009 payments in one transaction through ``contracts/BatchSettler.sol``.

``BatchingFacilitator`` has the ``Facilitator`` shape. ``verify`` is the local facilitator's;
``settle`` runs the same offline checks, then queues the payment and waits for its own outcome.
A network's queue is sent as ONE ``BatchSettler.settle(token, auths)`` transaction when it holds
``max_payments`` payments or its oldest payment has waited ``max_wait_ms``. With ``flush_when_idle``
(group commit) a payment that finds no batch of its token in flight is sent at the next turn of the
event loop (with whatever else arrived in that turn), and the payments that arrive while a batch is in
flight are sent together as soon as its outcome is known; ``max_payments`` and ``max_wait_ms`` still
bound a batch's size and its wait. The contract calls
``transferWithAuthorization`` for each item under try/catch and emits ``Settled``/``Failed`` per
index; each waiter's answer is read from the receipt (that event, plus the token's own
``AuthorizationUsed`` and ``Transfer`` logs).

The exactly-once rules are the single-payment ones: every item's write-ahead hook is called with
the batch transaction hash before the broadcast (a hook that fails takes its item out of the batch,
and the rest is re-signed), and a batch whose outcome is unknown (broadcast lost, receipt timeout)
answers every item ``settlement_pending`` with that hash, for reconcile to resolve. An item that
failed as "used" is settled when the transaction that used it paid this payment (a copy front-run
from our pending batch: ``LocalFacilitator.used_nonce_outcome``); one whose validBefore came too
close while it was queued fails before the broadcast.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from eth_abi import decode as abi_decode
from eth_hash.auto import keccak
from eth_utils import to_checksum_address

from settlement.chain.authorization import split_signature
from settlement.chain.client import BeforeSend, Chain, Receipt, address_word, authorization_words, selector, uint_word
from settlement.chain.gas import GasShare, gas_extra, receipt_shares
from settlement.errors import BroadcastUncertain, ChainUnavailable
from settlement.schemes.batch_settlers import SettlerReader, choose_settler
from settlement.schemes.exact_guards import in_flight_refusal, revert_reason_code
from settlement.schemes.exact_local import CheckedPayment, LocalFacilitator, Rejected, mined_by
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

_AUTH_TUPLE = "(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
SEL_BATCH_SETTLE = selector(f"settle(address,{_AUTH_TUPLE}[])")
TOPIC_SETTLED = keccak(b"Settled(uint256,address,bytes32)")
TOPIC_FAILED = keccak(b"Failed(uint256,address,bytes32,bytes)")
_ERROR_STRING = selector("Error(string)")

# Gas limit of a batch; unused gas is not charged. BatchSettler gives each item's transfer at most
# its ITEM_GAS (90 k; a legit one measured 44–66 k, a delegated payer's 1271 check and a first credit
# the dearest) and skips an item it could not give that much, so it never runs out of gas as a
# whole. An item that burns its whole cap measured ≈ 98 k with its calldata and event: the budget
# below covers it, so the gateway's own batches skip nothing.
BATCH_BASE_GAS = 60_000
BATCH_ITEM_GAS = 110_000


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    max_wait_ms: float = 20.0
    max_payments: int = 50
    # Group commit: send at once when no batch of the token is in flight, else when one resolves.
    flush_when_idle: bool = False


class BatchChain(Chain, SettlerReader, Protocol):
    async def send_call(
        self, to: str, calldata: bytes, before_send: BeforeSend | None = None, *, gas: int = ...
    ) -> str: ...


@dataclass(eq=False)
class _Item:
    checked: CheckedPayment
    before_send: BeforeSend | None
    future: asyncio.Future[SettleResponse]


class _HooksFailed(Exception):
    def __init__(self, failures: list[tuple[_Item, BaseException]]) -> None:
        super().__init__(f"{len(failures)} write-ahead hooks failed")
        self.failures = failures


def encode_batch(token: str, items: list[CheckedPayment]) -> bytes:
    """``settle(token, auths)`` calldata. Every field of an auth is static, so the ABI layout is
    flat: the token, the array's offset (64), its length, then nine words per item. Written out:
    eth_abi's generic encoder was 3% of a batched paid call's CPU (tests hold the two equal)."""
    words = [SEL_BATCH_SETTLE, address_word(token), uint_word(64), uint_word(len(items))]
    for item in items:
        v, r, s = split_signature(item.signature)
        words.append(authorization_words(item.auth, v, r, s))
    return b"".join(words)


def decode_revert(reason: bytes) -> str:
    """The revert string inside ``Error(string)`` data, or "" for anything else."""
    if reason[:4] == _ERROR_STRING:
        try:
            return str(abi_decode(["string"], reason[4:])[0])
        except Exception:  # noqa: BLE001 - malformed revert data from a token: no reason to report
            return ""
    return ""


def item_outcomes(receipt: Receipt, settler: str) -> dict[int, tuple[bool, bytes]]:
    """index → (settled, revert data) from the batch contract's events in ``receipt``."""
    outcomes: dict[int, tuple[bool, bytes]] = {}
    for log in receipt.logs:
        if log.address.lower() != settler.lower() or len(log.topics) < 2:
            continue
        index = int.from_bytes(log.topics[1], "big")
        if log.topics[0] == TOPIC_SETTLED:
            outcomes[index] = (True, b"")
        elif log.topics[0] == TOPIC_FAILED:
            try:
                reason = bytes(abi_decode(["bytes"], log.data)[0])
            except Exception:  # noqa: BLE001 - not our event layout: no reason
                reason = b""
            outcomes[index] = (False, reason)
    return outcomes


class _NetworkBatcher:
    def __init__(
        self, network: str, chain: BatchChain, settler: str, policy: BatchPolicy, local: LocalFacilitator,
        receipt_timeout: float,
    ) -> None:
        self.network = network
        self.chain = chain
        self.settler = to_checksum_address(settler)
        self.policy = policy
        self.local = local
        self.receipt_timeout = receipt_timeout
        # One queue per token: a batch transaction names one token.
        self._queues: dict[str, list[_Item]] = {}
        # A queue's scheduled flush: the max_wait_ms timer, or (flush_when_idle) the next loop turn.
        self._timers: dict[str, asyncio.Handle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # token → its batches sent (flushed) whose outcome is not resolved yet.
        self._in_flight: dict[str, int] = {}

    def submit(self, item: _Item) -> None:
        token = item.checked.token
        queue = self._queues.setdefault(token, [])
        queue.append(item)
        if len(queue) >= self.policy.max_payments:
            self.flush(token)
        elif len(queue) == 1:
            loop = asyncio.get_running_loop()
            if self.policy.flush_when_idle and not self._in_flight.get(token):
                # Nothing of this token in flight: go at the next turn, with what else arrives in this one.
                self._timers[token] = loop.call_soon(self.flush, token)
            else:
                self._timers[token] = loop.call_later(self.policy.max_wait_ms / 1000, self.flush, token)

    def flush(self, token: str) -> None:
        timer = self._timers.pop(token, None)
        if timer is not None:
            timer.cancel()
        items = self._queues.pop(token, [])
        if items:
            task = asyncio.get_running_loop().create_task(self._settle(token, items))
            self._tasks.add(task)
            self._in_flight[token] = self._in_flight.get(token, 0) + 1
            task.add_done_callback(functools.partial(self._batch_done, token))

    def _batch_done(self, token: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        left = self._in_flight.pop(token, 1) - 1
        if left > 0:
            self._in_flight[token] = left
        # Its outcome is known (mined, failed, pending or raised): what queued behind it goes now. A
        # cancelled batch (shutdown) sends nothing more; its queue's timer still stands.
        if self.policy.flush_when_idle and not task.cancelled() and self._queues.get(token):
            self.flush(token)

    async def drain(self) -> None:
        # Until nothing is queued or in flight: a batch that resolves may send what queued behind it.
        while self._queues or self._tasks:
            for token in list(self._queues):
                self.flush(token)
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _settle(self, token: str, items: list[_Item]) -> None:
        try:
            await self._send_and_resolve(token, items)
        except BaseException as exc:
            for item in items:
                _reject(item, exc)
            if not isinstance(exc, Exception):
                raise

    async def _send_and_resolve(self, token: str, items: list[_Item]) -> None:
        while items:
            self._drop_expiring(items)
            batch = list(items)
            if not batch:
                return

            async def before_send(tx_hash: str) -> None:
                # B023 is fine here: awaited within this iteration, so it sees this iteration's batch
                hooks = [(item, item.before_send) for item in batch if item.before_send is not None]  # noqa: B023
                results = await asyncio.gather(*(hook(tx_hash) for _, hook in hooks), return_exceptions=True)
                failures = [(item, r) for (item, _), r in zip(hooks, results) if isinstance(r, BaseException)]
                if failures:
                    raise _HooksFailed(failures)

            calldata = encode_batch(token, [item.checked for item in batch])
            gas = BATCH_BASE_GAS + BATCH_ITEM_GAS * len(batch)
            try:
                tx_hash = await self.chain.send_call(self.settler, calldata, before_send, gas=gas)
            except _HooksFailed as failed:
                # Nothing was broadcast. Those items fail as a single settlement would; the others
                # go again in a re-signed transaction (their rows get its hash).
                for item, exc in failed.failures:
                    _reject(item, exc)
                    items.remove(item)
                continue
            except BroadcastUncertain as exc:
                for item in batch:
                    _resolve(item, self._pending(exc.tx_hash, item.checked))
                return
            except ChainUnavailable as exc:
                rpc_message = getattr(exc, "rpc_message", None)
                if rpc_message is None:
                    raise
                for item in batch:  # the node refused the transaction outright: nothing was broadcast
                    _resolve(item, SettleResponse(
                        success=False, error_reason=revert_reason_code(rpc_message),
                        error_message="the chain refused the settlement transaction",
                        payer=item.checked.payer, network=self.network,
                    ))
                return
            try:
                receipt = await self.chain.wait_for_receipt(tx_hash, self.receipt_timeout)
            except ChainUnavailable:
                receipt = None  # broadcast, then the node stopped answering: the outcome is unknown
            if receipt is None:
                for item in batch:
                    _resolve(item, self._pending(tx_hash, item.checked))
                return
            await self._resolve_from_receipt(receipt, batch)
            return

    async def _resolve_from_receipt(self, receipt: Receipt, batch: list[_Item]) -> None:
        # One transaction's gas, shared exactly among its payments (settlement.chain.gas).
        split = receipt_shares(receipt, len(batch))
        shares: list[GasShare | None] = list(split) if split is not None else [None] * len(batch)
        if receipt.status != 1:
            # The whole batch reverted (out of gas, wrong caller): nothing moved for anyone.
            for item, share in zip(batch, shares, strict=True):
                outcome = await self.local._outcome(self.chain, receipt, item.checked, self.network)
                extra = {**(outcome.extra or {}), **gas_extra(share)}
                _resolve(item, outcome.model_copy(update={"extra": extra}))
            return
        outcomes = item_outcomes(receipt, self.settler)
        for index, item in enumerate(batch):
            block = {"blockNumber": receipt.block_number, **gas_extra(shares[index])}
            c = item.checked
            base: dict[str, Any] = {"payer": c.payer, "transaction": receipt.tx_hash, "network": self.network}
            settled, reason = outcomes.get(index, (False, b""))
            if settled:
                if receipt.moved_under(c.token, c.auth.from_, c.auth.nonce, c.auth.to, c.auth.value):
                    _resolve(item, SettleResponse(success=True, amount=str(c.auth.value), extra=block, **base))
                else:
                    _resolve(item, SettleResponse(
                        success=False, error_reason="invalid_exact_evm_transfer_event_mismatch", extra=block, **base
                    ))
                continue
            message = decode_revert(reason)
            code = revert_reason_code(message) if message else "transaction_failed"
            failed = SettleResponse(
                success=False, error_reason=code, error_message="the transfer failed on chain; nothing was charged",
                extra=block, **base,
            )
            # "Used": perhaps by a copy of this very item, front-run from our pending transaction.
            _resolve(item, await self.local.used_nonce_outcome(self.chain, c, failed))

    def _drop_expiring(self, items: list[_Item]) -> None:
        """Items that waited in the queue until too close to their validBefore fail before the
        broadcast (``check_offline`` checked them when they were queued): sent, they would only
        fail on chain, on our gas."""
        for item in [i for i in items if self.local.expiring(i.checked.auth)]:
            items.remove(item)
            _resolve(item, SettleResponse(
                success=False, error_reason="invalid_exact_evm_payload_authorization_valid_before",
                error_message="the authorization expired while its batch waited; nothing was charged",
                payer=item.checked.payer, network=self.network,
            ))

    def _pending(self, tx_hash: str, checked: CheckedPayment) -> SettleResponse:
        return SettleResponse(
            success=False,
            error_reason="settlement_pending",
            error_message="the settlement transaction was broadcast but is not final yet",
            payer=checked.payer,
            transaction=tx_hash,
            network=self.network,
        )


def _resolve(item: _Item, response: SettleResponse) -> None:
    if not item.future.done():
        item.future.set_result(response)


def _reject(item: _Item, exc: BaseException) -> None:
    if not item.future.done():
        item.future.set_exception(exc)


@dataclass
class BatchingFacilitator:
    """Settles the networks in ``policies`` in batches; everything else as ``local`` does."""

    local: LocalFacilitator
    chains: dict[str, BatchChain]
    settlers: dict[str, str]
    policies: dict[str, BatchPolicy]
    receipt_timeout: float = 30.0
    # network → the BatchSettlers to choose from (``bind``); a network not here keeps ``settlers``'.
    candidates: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _batchers: dict[str, _NetworkBatcher] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for network, policy in self.policies.items():
            self._batchers[network] = _NetworkBatcher(
                network, self.chains[network], self.settlers[network], policy, self.local, self.receipt_timeout
            )

    @property
    def networks(self) -> set[str]:
        return set(self._batchers)

    async def bind(self) -> None:
        """Start-up: each network settles through the BatchSettler (of its candidates, or the one it
        was given) whose ``settler`` is this process's account, read on chain; ``SettlementError``
        (``batch_settler_not_ours``, ``batch_settler_invalid``) when there is none."""
        for network, batcher in self._batchers.items():
            candidates = self.candidates.get(network) or (batcher.settler,)
            batcher.settler = await choose_settler(network, batcher.chain, candidates)
            self.settlers[network] = batcher.settler

    def supported(self) -> dict[str, Any]:
        return self.local.supported()

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        return await self.local.verify(payload, requirements)

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        batcher = self._batchers.get(requirements.network)
        if batcher is None:
            return await self.local.settle(payload, requirements, before_send=before_send)
        try:
            checked = self.local.check_offline(payload, requirements)
        except Rejected as rej:
            return SettleResponse(
                success=False, error_reason=rej.reason, error_message=rej.message, network=requirements.network
            )
        if checked.wallet is not None or self.local.in_flight.has_code(requirements.network, checked.payer):
            # BatchSettler passes v,r,s and caps an item's gas: a contract wallet, or an account whose code checks
            # the signature (a 7702 delegation, at the simulation's gas), is settled on its own.
            return await self.local.settle(payload, requirements, before_send=before_send)
        network, chain = requirements.network, batcher.chain
        async with self.local.in_flight.hold(chain, network, checked.token, checked.payer, checked.auth.value,
                                             mined_by(chain, checked), checked.auth.nonce) as held:
            if not held.covered:  # the payer's items in flight take its balance: this one would fail in the batch (exact_guards)
                return in_flight_refusal(checked.payer, network, held.reason)
            future: asyncio.Future[SettleResponse] = asyncio.get_running_loop().create_future()
            batcher.submit(_Item(checked, before_send, future))
            # Shielded: a request that goes away must not cancel its item out of a batch being sent.
            return held.judged(await asyncio.shield(future))

    async def drain(self) -> None:
        """Send whatever is queued now and wait for every batch in flight (shutdown)."""
        for batcher in self._batchers.values():
            await batcher.drain()


def build_batching(
    local: LocalFacilitator,
    chains: dict[str, BatchChain],
    policies: dict[str, BatchPolicy],
    contracts: dict[str, Sequence[str]],
    *,
    deployment_file: Path | None = None,
    receipt_timeout: float = 30.0,
) -> BatchingFacilitator:
    """A batching facilitator for ``policies``' networks; a network's BatchSettler is one of its
    ``contracts`` (the one naming this process's account: ``BatchingFacilitator.bind`` picks it at
    start-up), or, on the local chain, the one the dev chain deployment recorded."""
    from settlement.chain.deployment import LOCAL_NETWORK, Deployment, DevchainError

    settlers: dict[str, str] = {}
    candidates: dict[str, tuple[str, ...]] = {}
    for network in policies:
        if network not in chains:
            raise DevchainError(f"batched settlement on {network}, which is not settled locally", code="batch_network")
        listed = tuple(contracts.get(network) or ())
        if listed:
            candidates[network] = listed
        address = listed[0] if listed else None
        if address is None and network == LOCAL_NETWORK and deployment_file is not None:
            address = Deployment.read(deployment_file).batch_settler
        if address is None:
            raise DevchainError(
                f"no BatchSettler contract for {network}: set its \"contract\" in X402GW_BATCH_SETTLEMENT "
                "(or restart `x402gw devchain`, which deploys one)",
                code="batch_settler_missing",
            )
        settlers[network] = address
    return BatchingFacilitator(local, chains, settlers, policies, receipt_timeout=receipt_timeout, candidates=candidates)
