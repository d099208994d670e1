"""The exact scheme's guards of the settlement account's gas: what a payer could otherwise make it spend
on transactions that revert, for nothing.

- ``transfer_refusal``: an account with code (a contract, or an EOA with an EIP-7702 delegation) that
  signed with its ECDSA key. The token (FiatToken v2.2's ``SignatureChecker``) asks that code whether
  the signature holds, and the code may refuse or burn every unit of gas it is given: the payer signs
  for free, verify (offline recovery, nonce, balance) says yes, and each settlement reverts on the
  gateway's gas. Verify simulates the transfer (one gas-capped ``eth_call``) for such a payer first.
- ``InFlight``: what each payer's settlements in flight take from its balance, in this process. One
  balance signed over many times at once (fresh nonces, no transaction of the payer's) passes as many
  verifies against the same balance, and every settlement but the first would revert. A settlement is
  refused, nothing broadcast, when the payer's other settlements in flight already take what its
  balance holds; verify refuses it too when it can already tell.

  With a shared store (``SharedHolds``: Redis, bound at start-up), the holds of every worker and
  replica count: a burst spread over N processes is refused as it is in one. One ``InFlight`` serves
  every scheme that takes a payer's token balance (EIP-3009 and Permit2 alike).

  The balance verify read a moment ago (``balance_mark``, ``saw_balance``) spares the settlement
  its own read when, less all that this process's settlements (and channel deposits: ``spending``)
  of that asset gave back since the read was sent (spent or not), it still covers them all: the
  estimate never exceeds the balance as read, less our own spending since. Other processes'
  spending is not seen here, so with a shared store bound (even one that cannot answer now) the
  balance is always read.

- ``InFlight.struck``: code can tell a simulation from the mined transaction (``GASPRICE`` is 0 in
  an ``eth_call``; ``ORIGIN``, the block, the gas left differ too), so a payer whose code says yes to
  every check and no on chain would have each settlement revert, round after round, for one
  delegation or deployment. A mined settlement that fails where its nonce, balance and window do
  not explain it, of a payer with code, strikes that payer: its payments are refused
  (``payer_code_reverted``) for an hour, in every process. Its cost is one revert per account, and
  a new account costs it a delegation or a deployment and a balance of one price.

What is left: a delegation made between verify and settlement costs the payer a transaction of its
own for each revert it causes. A payer's settlement whose state read and balance read straddle a
block may be refused one it could pay (402, retryable). A payer that moves its balance away itself
(its own transfer, another facilitator) makes the settlements then in flight revert, as it always
could between our last read and their block; verify's read standing in for the settlement's own
widens that window by at most ``BALANCE_REUSE_SECONDS`` from when it was sent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from settlement.chain.authorization import Eip3009Authorization, split_signature
from settlement.chain.broadcast import TRANSFER_GAS_LIMIT
from settlement.chain.client import (
    WALLET_TRANSFER_GAS_LIMIT,
    transfer_with_authorization_calldata,
    transfer_with_signature_bytes_calldata,
)
from settlement.chain.rpc import RpcError
from settlement.errors import ChainUnavailable
from settlement.schemes.remote import settlement_outcome_unknown
from settlement.x402.wire import SettleResponse

__all__ = ["HOLD_TTL_MS", "INSUFFICIENT_BALANCE", "PAYER_CODE_REVERTED", "STRUCK_MESSAGE", "InFlight", "Mined", "SharedHolds",
           "in_flight_refusal", "is_revert", "revert_reason_code", "transfer_refusal"]

INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
PAYER_CODE_REVERTED = "payer_code_reverted"
STRIKE_TTL_MS = 3_600_000  # how long a payer whose code made a settlement revert is refused
_STRIKES_HELD = 10_000  # in this process's memory (each one cost a revert: bounded by the gas it took)
BALANCE_REUSE_SECONDS = 0.25  # how long verify's balance read may stand in for a settlement's own


def _payer_key(network: str, payer: str) -> str:
    return f"{network}:{payer.lower()}"


def _put_held(held: dict[str, Any], key: str, value: Any) -> None:
    """``held[key] = value``, the oldest entries dropped past ``_STRIKES_HELD``."""
    held[key] = value
    while len(held) > _STRIKES_HELD:
        del held[next(iter(held))]
_SIGNATURE = "invalid_exact_evm_payload_signature"
# A mined settlement's failure that its nonce, balance and window do not explain (each scheme's name
# for it; a batch item's is the token's "invalid signature"): the payer's code refused on chain.
_UNEXPLAINED = frozenset({"transaction_failed", _SIGNATURE, "upto_settlement_reverted", "permit2_settlement_reverted"})
log = logging.getLogger("x402gw.settlement")
# What a token's revert message says, as the x402 reason code (a refused broadcast, a batch item, a simulation).
REVERT_CODES = (
    ("authorization is expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("authorization is not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("authorization is used", "invalid_exact_evm_nonce_already_used"),
    ("transfer amount exceeds balance", "invalid_exact_evm_insufficient_balance"),
    ("invalid signature", "invalid_exact_evm_payload_signature"),
)


def revert_reason_code(message: str) -> str:
    lowered = message.lower()
    for needle, code in REVERT_CODES:
        if needle in lowered:
            return code
    return "transaction_failed"


class CodeReader(Protocol):
    @property
    def settlement_address(self) -> str | None: ...

    async def get_code(self, address: str) -> bytes: ...

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes: ...


class BalanceReader(Protocol):
    async def balance_of(self, token: str, owner: str) -> int: ...

    async def get_code(self, address: str) -> bytes: ...


def is_revert(message: str | None) -> bool:
    """Whether a node's JSON-RPC error says the call itself failed (a revert, out of gas, a bad
    opcode): a verdict, not that the node could not run it now (a rate limit, a lagging or
    overloaded node). Only the first says a transaction would fail."""
    lowered = (message or "").lower()
    return any(word in lowered for word in ("revert", "out of gas", "outofgas", "gas required", "invalid opcode", "stack"))


STRUCK_MESSAGE = ("this payer's code made a settlement revert on chain after every check passed: its payments "
                  "are refused for an hour; pay from another account")


def in_flight_refusal(payer: str, network: str, reason: str = INSUFFICIENT_BALANCE) -> SettleResponse:
    """A settlement refused before its broadcast: the payer's settlements in flight take its balance,
    or the payer is struck (``reason`` ``payer_code_reverted``)."""
    message = STRUCK_MESSAGE if reason == PAYER_CODE_REVERTED else "the payer's settlements in flight already take its balance; retry"
    return SettleResponse(success=False, error_reason=reason, payer=payer, network=network, error_message=message)


async def transfer_refusal(
    chain: CodeReader, code: bytes, token: str, auth: Eip3009Authorization, signature: bytes,
    *, wallet_signature: bytes | None = None,
) -> str | None:
    """For a payer whose account has ``code``: the reason its transfer would fail (its code refused the
    signature or ran out of the settlement's gas), or None when the simulation succeeds. An account
    without code: None, no call (the token checks the ECDSA signature itself, as verify did). A node
    that cannot run the simulation now: ``ChainUnavailable`` (unknown, retryable), never a refusal.
    ``wallet_signature``: a contract wallet's (what the token passes to its ``isValidSignature``),
    simulated through the ``bytes`` overload the settlement sends: a wallet that says yes when the
    gateway asks it directly and no when the token asks (``CALLER``) is refused here. Sent from the
    settlement account, as the settlement is (``ORIGIN``); code that tells a simulation apart still
    (``GASPRICE``) costs one revert per account (``InFlight.struck``)."""
    if not code:
        return None
    if wallet_signature is not None:
        calldata, gas = transfer_with_signature_bytes_calldata(auth, wallet_signature), WALLET_TRANSFER_GAS_LIMIT
    else:
        v, r, s = split_signature(signature)
        calldata, gas = transfer_with_authorization_calldata(auth, v, r, s), TRANSFER_GAS_LIMIT
    try:
        await chain.eth_call(token, calldata, gas=gas, sender=chain.settlement_address)
    except RpcError as exc:
        if not is_revert(exc.rpc_message):
            raise
        reason = revert_reason_code(exc.rpc_message or "")
        # Nonce, balance and window were checked already: what is left to fail is the code's signature check.
        return _SIGNATURE if reason == "transaction_failed" else reason
    return None


# Whether a settlement in flight is mined already (its authorization's nonce used): the balance read
# then shows it spent, and it must not be counted again.
Mined = Callable[[], Awaitable[bool]]


# How long another process's hold counts when it is never dropped (its process killed mid-settlement),
# at the least: a settlement's wait for its receipt (receipt_timeout) twice over, a minute more.
HOLD_TTL_MS = 180_000


class SharedHolds(Protocol):
    """Holds of every process on one payer's balance, in the shared state store (``gateway.store``).
    None where the store cannot say (unreachable): this process's own holds still count."""

    async def hold_share(self, key: str, entry: str, amount: int, ttl_ms: int) -> list[int] | None:
        """Adds this hold; the amounts of the others alive, in every process."""
        ...

    async def drop_share(self, key: str, entry: str, amount: int) -> None: ...

    async def keep_held(self, key: str, ttl_ms: int) -> None:
        """Names one authorization whose settlement's outcome is unknown, for every process, for ``ttl_ms``."""
        ...

    async def is_held(self, key: str) -> bool | None:
        """Whether ``keep_held`` named it and it has not lapsed; None when the store cannot say."""
        ...


async def _not_mined() -> bool:
    return False


def _kept_key(key: tuple[str, str, str], nonce: bytes) -> str:
    return ":".join(key) + ":" + nonce.hex()


class Hold:
    """One settlement's hold on its payer's balance (``InFlight.hold``)."""

    covered = False
    unknown = False
    reverted = False  # mined, and failed where nonce, balance and window do not explain it
    reason = INSUFFICIENT_BALANCE  # why it is not covered

    def judged(self, response: SettleResponse) -> SettleResponse:
        """``response``, noting whether its outcome is unknown (the hold then outlives the block) or an
        unexplained revert (its payer's code is asked about: ``InFlight.struck``)."""
        self.unknown = settlement_outcome_unknown(response)
        self.reverted = not response.success and bool(response.transaction) and response.error_reason in _UNEXPLAINED
        return response


class InFlight:
    """Per (network, token, payer): its settlements in flight in this process, each with its value and
    how to tell it mined; and, once ``share`` bound a store, those of every process."""

    def __init__(self, shared: SharedHolds | None = None, *, ttl_ms: int = HOLD_TTL_MS) -> None:
        self._held: dict[tuple[str, str, str], dict[int, tuple[int, Mined]]] = {}
        self._authorizations: dict[int, bytes] = {}  # entry -> the authorization's nonce, when told
        self._next = 0
        self.shared = shared
        self.ttl_ms = ttl_ms  # of this process's holds in the shared store
        self._process = os.urandom(6).hex()  # names this process's entries in the shared store
        self._struck: dict[str, float] = {}  # network:payer -> until (monotonic), this process's strikes
        self._coded: dict[str, None] = {}  # network:payer whose account verify found code in (oldest first)
        # Per (network, token): the value of every hold given back so far, never less; per payer of
        # it, the latest balance read with that total as it was when the read was sent, and when.
        self._given_back: dict[tuple[str, str], int] = {}
        self._balances: dict[str, tuple[int, int, float]] = {}
        self.clock = time.monotonic

    @staticmethod
    def ttl_for(receipt_timeout: float) -> int:
        """The lifetime of a shared hold for settlements that wait ``receipt_timeout`` for their receipt
        (a batch waits for its window first): a hold must not lapse while its settlement is in flight."""
        return max(HOLD_TTL_MS, int(receipt_timeout * 2000) + 60_000)

    def share(self, shared: SharedHolds | None) -> None:
        self.shared = shared

    def taken(self, network: str, token: str, payer: str, *, besides: int | None = None) -> int:
        """What the payer's settlements in flight (``besides`` the caller's own) take, mined or not: no
        read. A balance that covers this covers what ``pending`` would say (it is never more)."""
        entries = self._held.get((network, token.lower(), payer.lower()), {})
        return sum(value for entry, (value, _) in entries.items() if entry != besides)

    async def pending(self, network: str, token: str, payer: str, *, besides: int | None = None) -> int:
        """What the payer's settlements in flight (``besides`` the entry of the caller's own) take that
        its balance does not show spent yet: those not mined (their state read before the balance, so
        one mined in between counts twice, which refuses rather than reverts). None in flight: 0, no read."""
        entries = self._held.get((network, token.lower(), payer.lower()), {})
        held = [held for entry, held in entries.items() if entry != besides]
        if not held:
            return 0
        mined = await asyncio.gather(*(is_mined() for _, is_mined in held), return_exceptions=True)
        return sum(value for (value, _), done in zip(held, mined, strict=True) if done is not True)

    async def holds(self, network: str, token: str, payer: str, nonce: bytes) -> bool:
        """Whether a settlement of this very authorization is in flight here, or kept (its outcome
        unknown) here or, with a shared store, in any process: a replica's settlement still in the
        pool, its request answered 503 and its payment lock released, would revert beside a second
        broadcast. A shared store that cannot say: held (refused, retryable; never our gas spent)."""
        key = (network, token.lower(), payer.lower())
        if any(self._authorizations.get(entry) == nonce for entry in self._held.get(key, {})):
            return True
        return self.shared is not None and await self.shared.is_held(_kept_key(key, nonce)) is not False

    async def struck(self, network: str, payer: str) -> bool:
        """Whether this payer's code made one of our settlements revert in the last hour (here, or in any
        process sharing the store; a store that cannot say: this process's own strikes only)."""
        key = _payer_key(network, payer)
        until = self._struck.get(key)
        if until is not None:
            if until > time.monotonic():
                return True
            del self._struck[key]
        return self.shared is not None and await self.shared.is_held(f"struck:{key}") is True

    def balance_mark(self, network: str, token: str) -> tuple[int, float]:
        """Taken before a balance read is sent (for ``saw_balance``): what holds of the asset gave back so far, and when."""
        return self._given_back.get((network, token.lower()), 0), self.clock()

    def saw_balance(self, network: str, token: str, payer: str, balance: int, mark: tuple[int, float]) -> None:
        """``balance``: what the chain answered to a read sent when ``balance_mark`` said ``mark``."""
        _put_held(self._balances, f"{network}:{token.lower()}:{payer.lower()}", (balance, *mark))

    def _estimate(self, network: str, token: str, payer: str) -> int | None:
        """The payer's balance as this process knows it without a read: the latest one read, less all
        that holds of the asset gave back since it was sent (spent or not); None when none was sent
        in the last ``BALANCE_REUSE_SECONDS``."""
        seen = self._balances.get(f"{network}:{token.lower()}:{payer.lower()}")
        if seen is None or self.clock() - seen[2] > BALANCE_REUSE_SECONDS:
            return None
        return seen[0] - (self._given_back.get((network, token.lower()), 0) - seen[1])  # read, less given back since

    def saw_code(self, network: str, payer: str) -> None:
        """Verify found code in this (verified) payer's account: its transfer asks that code about the
        signature, at whatever gas it takes (``has_code``)."""
        _put_held(self._coded, _payer_key(network, payer), None)

    def has_code(self, network: str, payer: str) -> bool:
        """Whether verify found code in this payer's account here: a batch gives each item's transfer
        ``ITEM_GAS``, less than the simulation's, so such a payer is settled on its own (an honest
        signature check between the two would fail in the batch and strike its payer)."""
        return _payer_key(network, payer) in self._coded

    async def _strike(self, chain: BalanceReader, network: str, payer: str) -> None:
        """After an unexplained revert: the payer is struck if it has code (an account without any
        cannot refuse on chain what it signed; a chain that cannot say: not struck)."""
        try:
            if not await chain.get_code(payer):
                return
        except (ChainUnavailable, RpcError):
            return
        key = _payer_key(network, payer)
        _put_held(self._struck, key, time.monotonic() + STRIKE_TTL_MS / 1000)
        log.warning("payer %s on %s: its code made a settlement revert after its checks passed; refused for an hour",
                    payer, network)
        if self.shared is not None:
            await self.shared.keep_held(f"struck:{key}", STRIKE_TTL_MS)

    @asynccontextmanager
    async def hold(self, chain: BalanceReader, network: str, token: str, payer: str, value: int,
                   mined: Mined, nonce: bytes | None = None) -> AsyncIterator[Hold]:
        """Holds ``value`` of the payer's balance while the block runs (its settlement is sent and
        awaited there); ``Hold.covered``: whether the balance covers it beside what the payer's other
        settlements in flight take: read on chain only when there are any (verify read it otherwise)
        and verify's read, less what was given back since, does not cover them all;
        a read that fails lets it through, as before this guard. A settlement whose outcome is not
        known (``Hold.judged``) keeps its hold past the block, for the lifetime of a shared hold, or
        until mined: its transaction may still land, and one more against the same balance would revert."""
        key = (network, token.lower(), payer.lower())
        entry, self._next = self._next, self._next + 1
        self._held.setdefault(key, {})[entry] = (value, mined)  # before any await: a concurrent settlement counts this one
        if nonce is not None:
            self._authorizations[entry] = nonce
        shared, shared_key, shared_entry = self.shared, ":".join(key), f"{self._process}-{entry}"
        held = Hold()
        try:
            elsewhere = None if shared is None else await shared.hold_share(shared_key, shared_entry, value, self.ttl_ms)
            if await self.struck(network, payer):  # asked again here: its verify may have raced the strike
                held.reason = PAYER_CODE_REVERTED
            else:
                held.covered = await self._covered(chain, network, token, payer, value, entry, elsewhere, shared is not None)
            try:
                yield held
            except asyncio.CancelledError:
                held.unknown = True  # cancelled mid-settlement (a batch item stays in its batch): it may still land
                raise
        finally:
            if held.unknown:  # dropped later; the shared entry lapses by itself
                asyncio.get_running_loop().call_later(self.ttl_ms / 1000, self._drop, key, entry)
                if shared is not None and nonce is not None:
                    await shared.keep_held(_kept_key(key, nonce), self.ttl_ms)
            else:
                self._drop(key, entry)
                if shared is not None:
                    await shared.drop_share(shared_key, shared_entry, value)
            if held.reverted:
                await self._strike(chain, network, payer)

    @asynccontextmanager
    async def spending(self, network: str, token: str, payer: str, value: int) -> AsyncIterator[Hold]:
        """What this process spends of a payer's balance outside a settlement's hold (a channel's deposit):
        held while it runs, given back when it ends, or after a hold's lifetime if its outcome is unknown
        (``Hold.unknown``, True until the block says otherwise)."""
        key, entry, held = (network, token.lower(), payer.lower()), self._next, Hold()
        self._next, held.unknown = entry + 1, True
        self._held.setdefault(key, {})[entry] = (value, _not_mined)  # counted until given back
        try:
            yield held
        finally:
            if held.unknown:
                asyncio.get_running_loop().call_later(self.ttl_ms / 1000, self._drop, key, entry)
            else:
                self._drop(key, entry)

    def _drop(self, key: tuple[str, str, str], entry: int) -> None:
        entries = self._held.get(key, {})
        dropped = entries.pop(entry, None)
        if dropped is not None:
            asset = (key[0], key[1])
            self._given_back[asset] = self._given_back.get(asset, 0) + dropped[0]
        self._authorizations.pop(entry, None)
        if not entries:
            self._held.pop(key, None)

    async def _covered(self, chain: BalanceReader, network: str, token: str, payer: str, value: int, entry: int,
                       elsewhere: list[int] | None, shared: bool) -> bool:
        """When others are in flight: verify's read (``_estimate``) if it covers them all, in a process
        with no store to share holds through (``shared``: one is bound, answering or not); else one
        balance read, and their mined states only when the
        balance does not cover them all (a payer with room to spare costs no more reads).
        ``elsewhere``: the shared store's other holds, this process's among them (their mined states
        are known only here: another process's counts until it drops it)."""
        here = self.taken(network, token, payer, besides=entry)
        others = here if elsewhere is None else max(here, sum(elsewhere))
        if not others:
            return True
        if not shared and (estimate := self._estimate(network, token, payer)) is not None and estimate >= others + value:
            return True  # verify's read, less what was given back since: covers them all without a read
        try:
            if await chain.balance_of(token, payer) >= others + value:
                return True
            # states first, then the balance again: this process's mined ones are not counted twice
            others -= here - await self.pending(network, token, payer, besides=entry)
            return await chain.balance_of(token, payer) >= others + value
        except ChainUnavailable:
            return True
