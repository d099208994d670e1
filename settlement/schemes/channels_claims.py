"""Claims of accepted ``batch-settlement`` vouchers: many calls settled in one transaction.

A call's ledger row is ``settling`` from the moment its voucher is written ahead
(``begin_settlement``, with the answer it bought) until a claim that covers it lands; then it is
``settled`` with the claim's transaction hash, block and its share of the claim's gas. A claim is
one escrow ``multicall``: any deposit of a channel not made yet (a crash between writing a voucher
ahead and making its deposit), ``claimWithSignature`` of each channel's highest accepted voucher
(signed as a ``ClaimBatch`` by our settlement key, the channels' receiverAuthorizer, with the SDK's
``sign_claim_batch``), then ``settle(receiver, token)``, which pays the receivers.

When: ``ChannelPolicy.claim_every_calls`` accepted vouchers on a network (counted per process; the
call that reaches the count claims), or the oldest open voucher older than
``claim_every_seconds`` (``tick``, run periodically), and at start-up (``claim_all``): a restart
claims what a crash left accrued. One claim at a time per network across replicas (a lock in the
shared store); the escrow itself skips a voucher at or below what a channel has claimed, so a
claim sent twice never claims twice.

The claim's transaction hash is written on every row it covers before it is broadcast (the
ledger's ``record_tx_hash``): a crash after the broadcast leaves rows that ``ChannelsEvm.resolve``
settles once the receipt is there, and a claim that did not land leaves them for the next claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from x402.mechanisms.evm.batch_settlement.authorizer_signer import sign_claim_batch
from x402.mechanisms.evm.batch_settlement.types import VoucherClaim

from settlement.chain.client import Receipt, RpcError
from settlement.chain.gas import receipt_shares
from settlement.errors import BroadcastUncertain, ChainUnavailable
from settlement.ledger import Ledger, Payment, PaymentState
from settlement.schemes.channels import ChannelsEvm, row_payment
from settlement.schemes.channels_contract import ESCROW_ADDRESS, ChannelPayment, claim_calldata
from settlement.schemes.channels_policy import LOCK_TTL_MS, ChannelChain, ChannelStore, signed_by_code
from settlement.schemes.exact_guards import is_revert

__all__ = ["ChainAuthorizer", "ClaimLoop", "ClaimOutcome", "Claimer", "start_claims"]

log = logging.getLogger("x402gw.channels")

CLAIM_BASE_GAS = 120_000
CLAIM_PER_CHANNEL_GAS = 90_000
CLAIM_PER_DEPOSIT_GAS = 200_000
CLAIM_LOCK_TTL_MS = 120_000
REFUND_GAS = 150_000
ACCEPTANCE_SECONDS = LOCK_TTL_MS / 1000 + 5  # a voucher's acceptance holds the channel's lock at most this long


@dataclass
class ClaimOutcome:
    network: str
    tx_hash: str | None = None
    settled: list[int] = field(default_factory=list)  # payment ids
    claimed: int = 0  # atomic units claimed by this transaction
    channels: int = 0
    reason: str = ""


class ChainAuthorizer:
    """The SDK's ``AuthorizerSigner`` over our settlement account: the chain client signs the
    digest, so the key never leaves it."""

    def __init__(self, chain: ChannelChain) -> None:
        self._chain = chain

    @property
    def address(self) -> str:
        return self._chain.settlement_address or ""

    def sign_typed_data(self, domain: dict[str, Any], types: dict[str, list[dict[str, str]]], primary_type: str,
                        message: dict[str, Any]) -> str:
        signable = encode_typed_data(domain_data=domain, message_types=types, message_data=message)
        return "0x" + self._chain.sign_digest(keccak(b"\x19" + signable.version + signable.header + signable.body)).hex()


@dataclass
class _Channel:
    rows: list[tuple[Payment, ChannelPayment]] = field(default_factory=list)


class Claimer:
    def __init__(self, scheme: ChannelsEvm, ledger: Ledger, store: ChannelStore, *,
                 receipt_timeout: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.scheme, self.ledger, self.store = scheme, ledger, store
        self._receipt_timeout = receipt_timeout
        self._clock = clock
        self._counts: dict[str, int] = {}
        scheme.on_accepted = self.note
        scheme.closer = self._close_for_refund

    async def note(self, network: str) -> None:
        """One more accepted voucher on ``network``; at the policy's count, claim now."""
        self._counts[network] = self._counts.get(network, 0) + 1
        if self._counts[network] >= self.scheme.policy.claim_every_calls:
            try:
                await self.claim(network)
            except Exception:  # the voucher is accepted whatever the claim does: a later claim takes it
                log.warning("batch-settlement claim by count failed; the next claim takes its vouchers", exc_info=True)

    async def tick(self) -> list[ClaimOutcome]:
        """Claim each network whose oldest open voucher has waited ``claim_every_seconds``."""
        outcomes = []
        for network in self.scheme.networks:
            rows = await self._open_rows(network)
            oldest = min((_epoch(row.created_at) for row, _ in rows), default=None)
            if oldest is not None and self._clock() - oldest >= self.scheme.policy.claim_every_seconds:
                outcomes.append(await self.claim(network))
        return outcomes

    async def claim_all(self) -> list[ClaimOutcome]:
        """Every network's open vouchers, now (start-up: what a crash left accrued)."""
        return [await self.claim(network) for network in self.scheme.networks]

    async def _open_rows(self, network: str) -> list[tuple[Payment, ChannelPayment]]:
        rows = await self.ledger.run(self.ledger.open_payments)
        found = []
        for row in rows:
            payment = row_payment(row) if row.network == network else None
            if payment is not None:
                found.append((row, payment))
        return found

    async def claim(self, network: str) -> ClaimOutcome:
        """One claim transaction for ``network``'s open vouchers (under the network's claim lock)."""
        owner, lock = uuid.uuid4().hex, f"chanclaim:{network}"
        if not await self.store.acquire(lock, owner, CLAIM_LOCK_TTL_MS):
            return ClaimOutcome(network, reason="claim_in_progress")
        try:
            self._counts[network] = 0
            return await self._claim(network)
        finally:
            await self.store.release(lock, owner)

    async def _claim(self, network: str) -> ClaimOutcome:
        channels: dict[str, _Channel] = {}
        for row, payment in await self._open_rows(network):
            if row.tx_hash:  # a claim was sent for it: settled if it landed, else claimed again below
                resolution = await self.scheme.resolve(row)
                if resolution is not None and resolution.after == PaymentState.SETTLED:
                    await self.ledger.run(self.ledger.mark_settled, row.id, tx_hash=resolution.tx_hash,
                                          block_number=resolution.block_number)
                    continue
            channels.setdefault(payment.channel_id, _Channel()).rows.append((row, payment))
        plans = [plan for channel in channels.values() if (plan := await self._plan(network, channel)) is not None]
        # A channel whose payer has code since its vouchers (and no payerAuthorizer) is checked by the escrow
        # through that code, which may pass a simulation and revert on chain (GASPRICE, the block): claimed on
        # its own, after the others, never in their transaction; once it fails, not tried again.
        coded = [plan for plan in plans if await signed_by_code(self.scheme.chain(network), plan[0])]
        plans = [plan for plan in plans if plan not in coded]
        outcome = await self._claim_plans(network, plans)
        for plan in coded:
            alone = await self._claim_plans(network, [plan])
            if alone.reason == "claim_reverted":
                # Its payer's code refused its own vouchers on chain: nothing moved, and nothing will. Its rows are
                # failed (served, not paid: on the books), so no process asks that code again on our gas.
                log.warning("channel %s: its claim reverted; its %d call(s) failed, no more calls on it",
                            plan[0].channel_id, len(plan[2]))
                for row in plan[2]:
                    await self.ledger.run(self.ledger.fail, row.id, "claim_reverted", tx_hash=alone.tx_hash)
                await self._update_record(network, plan[0].channel_id, unclaimable=True)
        return outcome

    async def _claim_plans(self, network: str, plans: list[tuple[ChannelPayment, ChannelPayment | None, list[Payment]]]) -> ClaimOutcome:
        call = self._claim_call(network, plans) if plans else None
        if call is not None and not await self._would_land(network, call):
            # One channel's claim would revert the whole batch (a payer whose code refuses its vouchers: an
            # EIP-7702 delegation made after its calls), at every attempt, on our gas: each is tried alone.
            landing = [plan for plan in plans if await self._would_land(network, self._claim_call(network, [plan]))]
            for best, _, _ in (plan for plan in plans if plan not in landing):
                log.warning("channel %s: its claim would revert; left out of the claim, no more calls on it", best.channel_id)
                await self._update_record(network, best.channel_id, unclaimable=True)
            plans = landing
            call = self._claim_call(network, plans) if plans else None
        if call is None:
            return ClaimOutcome(network, reason="nothing_to_claim")
        outcome = await self._send(network, call, sum(best.max_claimable for best, _, _ in plans),
                                   [row for _, _, rows in plans for row in rows])
        outcome.channels = len(plans)
        return outcome

    async def _would_land(self, network: str, call: tuple[bytes, int]) -> bool:
        """A claim transaction (``_claim_call``) simulated, as our settlement account sends it. Only a
        revert says no: a node that cannot run it now (rate-limited, lagging, away) says nothing, True
        (the send finds out, as before), or a griefer's load on our provider would mark honest channels."""
        chain = self.scheme.chain(network)
        try:
            await chain.eth_call(ESCROW_ADDRESS, call[0], gas=call[1], sender=chain.settlement_address)
        except RpcError as exc:
            return not is_revert(exc.rpc_message)
        except ChainUnavailable:
            pass
        return True

    def _claim_call(self, network: str, plans: list[tuple[ChannelPayment, ChannelPayment | None, list[Payment]]]) -> tuple[bytes, int]:
        """The claim transaction of ``plans`` (each channel's best voucher, and the deposits still to
        make): its calldata, the batch signed by our receiverAuthorizer key, and its gas limit."""
        claims = [(best, best.max_claimable) for best, _, _ in plans]
        deposits = [deposit for _, deposit, _ in plans if deposit is not None]
        signer = ChainAuthorizer(self.scheme.chain(network))
        entries = [VoucherClaim(channel=p.config, max_claimable_amount=str(p.max_claimable), signature=p.signature,
                                total_claimed=str(total)) for p, total in claims]
        signature = bytes.fromhex(sign_claim_batch(signer, entries, network).removeprefix("0x"))
        payees = sorted({(p.config.receiver, p.config.token) for p, _ in claims})
        gas = CLAIM_BASE_GAS + CLAIM_PER_CHANNEL_GAS * len(claims) + CLAIM_PER_DEPOSIT_GAS * len(deposits)
        return claim_calldata(claims, signature, deposits, payees), gas

    async def _plan(self, network: str, channel: _Channel) -> tuple[ChannelPayment, ChannelPayment | None, list[Payment]] | None:
        """A channel's claim: its highest accepted voucher (the store's charged total; without it,
        after a restart of a memory store, the highest written ahead), the deposit still to make,
        and the rows it covers. None when there is nothing above what the chain has claimed or the
        deposit cannot cover it (a claim above the balance would revert the whole batch)."""
        chain = self.scheme.chain(network)
        sample = channel.rows[0][1]
        view = await self.scheme.chain_view(chain, sample)
        raw = await self.store.get(f"chan:{network}:{sample.channel_id}")
        stored = int(json.loads(raw)["charged"]) if raw is not None else None
        # Above the store's total: a voucher written ahead whose acceptance is over without it (its
        # lock lapsed: a crash in between). It was verified and its answer stored: it is claimed too.
        over = self._clock() - ACCEPTANCE_SECONDS
        total = max((p.max_claimable for row, p in channel.rows
                     if stored is None or p.max_claimable <= stored or _epoch(row.updated_at) < over), default=0)
        best = next((p for _, p in channel.rows if p.max_claimable == total), None)
        if stored is not None and total > stored:
            await self._update_record(network, sample.channel_id, charged=total)
        if best is None or total <= view.claimed:
            return None
        balance, deposit = view.balance, None
        if balance < total:
            deposit = next((p for _, p in channel.rows if p.deposit is not None), None)
            if deposit is None or not await self.scheme.deposit_pending(chain, deposit):
                return None
            assert deposit.deposit is not None
            balance += deposit.deposit.amount
        if total > balance:
            return None
        return best, deposit, [row for row, p in channel.rows if p.max_claimable <= total]

    async def _update_record(self, network: str, channel_id: str, *, charged: int = 0, unclaimable: bool = False) -> None:
        """The channel's record in the store, under the channel's lock (skipped if busy: a voucher is
        being accepted, which sets the charged total; the next claim round marks it): its charged total
        raised to ``charged``, or marked ``unclaimable`` (``ChannelsEvm.charged`` refuses its vouchers)."""
        owner, lock = uuid.uuid4().hex, f"chanlock:{network}:{channel_id}"
        if await self.store.acquire(lock, owner, LOCK_TTL_MS):
            try:
                key = f"chan:{network}:{channel_id}"
                raw = await self.store.get(key)
                record = json.loads(raw) if raw is not None else {"charged": "0"}
                if int(record["charged"]) < charged or (unclaimable and not record.get("unclaimable")):
                    record["charged"] = str(max(int(record["charged"]), charged))
                    record.update({"unclaimable": True} if unclaimable else {})
                    await self.store.put(key, json.dumps(record).encode())
            finally:
                await self.store.release(lock, owner)

    async def _send(self, network: str, call: tuple[bytes, int], claimed: int, rows: list[Payment]) -> ClaimOutcome:
        calldata, gas = call
        ids = [row.id for row in rows]

        async def before_send(tx_hash: str) -> None:
            for payment_id in ids:
                await self.ledger.run(self.ledger.record_tx_hash, payment_id, tx_hash)

        chain_ = self.scheme.chain(network)
        outcome = ClaimOutcome(network, claimed=claimed)
        try:
            outcome.tx_hash = await chain_.send_call(ESCROW_ADDRESS, calldata, before_send, gas=gas)
            receipt: Receipt | None = await chain_.wait_for_receipt(outcome.tx_hash, self._receipt_timeout)
        except BroadcastUncertain as exc:
            outcome.tx_hash, outcome.reason = exc.tx_hash, "claim_pending"
            return outcome
        except (RpcError, ChainUnavailable):
            outcome.reason = "claim_not_sent"
            return outcome
        if receipt is None or receipt.status != 1:
            outcome.reason = "claim_pending" if receipt is None else "claim_reverted"
            return outcome
        shares = receipt_shares(receipt, len(ids))
        for i, payment_id in enumerate(ids):
            gas_fields = shares[i].ledger_fields() if shares is not None else None
            await self.ledger.run(self.ledger.mark_settled, payment_id, tx_hash=receipt.tx_hash,
                                  block_number=receipt.block_number, gas=gas_fields)
            outcome.settled.append(payment_id)
        outcome.reason = "claimed"
        return outcome

    async def close(self, network: str, payment: ChannelPayment, amount: int = 2**128 - 1,
                    charged: int = 0) -> tuple[ClaimOutcome, Receipt | None]:
        """Close ``payment``'s channel from the receiver's side (spec: a cooperative refund): claim
        what is accrued on the network, then give the payer back ``amount`` (default: everything
        not claimed; ``refund``, sent by our settlement account, the channel's receiverAuthorizer).
        Only once the chain shows ``charged`` (what the payer's calls already served cost) claimed:
        the escrow refunds whatever is unclaimed, so a claim that did not land (reverted, pending, a
        payer whose code refuses its vouchers) would otherwise hand the served calls back. Not
        claimed: no refund is sent (None)."""
        outcome = await self.claim(network)
        chain = self.scheme.chain(network)
        if charged and (await self.scheme.chain_view(chain, payment)).claimed < charged:
            log.warning("channel %s: refund not sent, %d charged is not claimed on chain (%s)",
                        payment.channel_id, charged, outcome.reason)
            return outcome, None
        tx_hash = await chain.send_call(ESCROW_ADDRESS, payment.refund_calldata(amount), gas=REFUND_GAS)
        return outcome, await chain.wait_for_receipt(tx_hash, self._receipt_timeout)

    async def _close_for_refund(self, network: str, payment: ChannelPayment, amount: int, charged: int) -> Receipt | None:
        try:
            return (await self.close(network, payment, amount, charged))[1]
        except (RpcError, BroadcastUncertain, ChainUnavailable):
            return None


def _epoch(moment: datetime) -> float:
    """Seconds since the epoch; a naive time (SQLite) is UTC, as the ledger writes it."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


def is_accrued(row: Payment) -> bool:
    """An accrued call: its voucher accepted, its claim not landed yet."""
    return row.state == PaymentState.SETTLING and row_payment(row) is not None


class ClaimLoop:
    """The claimer of a running gateway: bound to its store and ledger, what a crash left accrued
    claimed at start, then ``tick`` every quarter of ``claim_every_seconds`` until ``stop``."""

    def __init__(self, claimer: Claimer) -> None:
        self.claimer = claimer
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> list[ClaimOutcome]:
        outcomes = await self.claimer.claim_all()
        self._task = asyncio.create_task(self._run())
        return outcomes

    async def _run(self) -> None:
        interval = max(self.claimer.scheme.policy.claim_every_seconds / 4, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.claimer.tick()
            except Exception:  # a chain or store outage: the next tick tries again
                log.warning("batch-settlement claim failed; retrying at the next tick", exc_info=True)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def start_claims(channels: ChannelsEvm | None, ledger: Ledger, store: ChannelStore,
                       *, receipt_timeout: float = 30.0) -> ClaimLoop | None:
    """Bind ``channels`` to the gateway's store and ledger and start its claims (None: no channels)."""
    if channels is None:
        return None
    channels.bind(store)
    loop = ClaimLoop(Claimer(channels, ledger, store, receipt_timeout=receipt_timeout))
    for outcome in await loop.start():
        if outcome.settled:
            log.info("start-up batch-settlement claim: %s settled %d calls in %s", outcome.network,
                     len(outcome.settled), outcome.tx_hash)
    return loop
