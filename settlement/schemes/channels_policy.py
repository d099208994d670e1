"""The parts of the ``batch-settlement`` scheme (``settlement.schemes.channels``) that its claims
and the gateway share: names, the policy, what it needs of a chain and of the shared store, and the
small values its checks pass around."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from x402.mechanisms.evm.batch_settlement import errors as E
from x402.mechanisms.evm.batch_settlement.constants import MIN_WITHDRAW_DELAY

from settlement.chain.client import BeforeSend, Receipt
from settlement.chain.rpc import RpcError
from settlement.errors import BroadcastUncertain, ChainUnavailable
from settlement.schemes.channels_contract import ESCROW_ADDRESS, ChannelPayment
from settlement.schemes.exact_guards import InFlight
from settlement.x402.wire import SettleResponse

__all__ = [
    "ACCRUED_KEY", "BATCH", "DEPOSIT_GAS", "ERR_CHANNEL_CLOSED", "ERR_CHANNEL_WITHDRAWING", "ERR_CUMULATIVE_NOT_INCREASING",
    "ERR_PAYER_HAS_CODE", "ERR_REFUND_TOO_EARLY", "LOCK_TTL_MS", "VOUCHER_ACCEPTED", "ChainView", "ChannelChain", "ChannelPolicy", "ChannelStore", "Refused", "accrued",
    "make_deposit", "signed_by_code", "simulate_deposit",
]

BATCH = "batch-settlement"
ACCRUED_KEY = "accrued"  # SettleResponse.extra: the voucher is accepted; its claim comes later
VOUCHER_ACCEPTED = "voucher_accepted"  # Resolution.reason of an accrued row: open, its answer paid for
DEPOSIT_GAS = 250_000
ERR_CHANNEL_WITHDRAWING = "invalid_batch_settlement_evm_channel_withdrawing"
ERR_CHANNEL_CLOSED = "invalid_batch_settlement_evm_channel_closed"
ERR_CUMULATIVE_NOT_INCREASING = "invalid_batch_settlement_evm_cumulative_not_increasing"
ERR_PAYER_HAS_CODE = "invalid_batch_settlement_evm_payer_has_code"
ERR_REFUND_TOO_EARLY = "invalid_batch_settlement_evm_refund_too_early"
LOCK_TTL_MS = 60_000  # longer than a deposit's wait for its receipt (receipt_timeout, 30 s by default)


class ChannelStore(Protocol):
    """The shared state store's part that serialises a channel across replicas (``gateway.store``)."""

    async def acquire(self, key: str, owner: str, ttl_ms: int) -> bool: ...

    async def release(self, key: str, owner: str) -> bool: ...

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_ms: int | None = None, *, only_if_absent: bool = False) -> bool: ...


class ChannelChain(Protocol):
    chain_id: int

    @property
    def settlement_address(self) -> str | None: ...

    async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes: ...

    async def get_code(self, address: str) -> bytes: ...

    async def send_call(self, to: str, calldata: bytes, before_send: BeforeSend | None = None, *, gas: int = ...) -> str: ...

    async def wait_for_receipt(self, tx_hash: str, timeout: float) -> Receipt | None: ...

    def sign_digest(self, digest: bytes) -> bytes: ...


async def signed_by_code(chain: ChannelChain, payment: ChannelPayment) -> bool:
    """Whether the escrow checks this channel's vouchers through code: no payerAuthorizer (the payer
    signs) and the payer has code now (a contract, an EIP-7702 delegation), so ERC-1271, which may
    answer one way here and another on chain. A chain that does not answer: as before, no."""
    if int(payment.config.payer_authorizer, 16) != 0:
        return False
    try:
        return bool(await chain.get_code(payment.payer))
    except (RpcError, ChainUnavailable):
        return False


async def simulate_deposit(chain: ChannelChain, payment: ChannelPayment) -> None:
    try:
        await chain.eth_call(ESCROW_ADDRESS, payment.deposit_calldata(), gas=DEPOSIT_GAS, sender=chain.settlement_address)
    except RpcError:
        raise Refused(E.ERR_DEPOSIT_SIMULATION_FAILED, "the deposit would not go through") from None


async def make_deposit(chain: ChannelChain, payment: ChannelPayment, network: str, in_flight: InFlight,
                  receipt_timeout: float) -> str:
    """The deposit, sent by our settlement account and confirmed (its receipt) before the voucher is
    accepted against it. It spends the payer's token balance outside any settlement's hold: counted
    among the payer's spending in flight meanwhile (``InFlight.spending``), or a balance read just
    before it would stand in for a settlement's own read after it."""
    assert payment.deposit is not None
    await simulate_deposit(chain, payment)
    receipt: Receipt | None = None
    async with in_flight.spending(network, payment.config.token, payment.payer, payment.deposit.amount) as spent:
        try:
            tx_hash = await chain.send_call(ESCROW_ADDRESS, payment.deposit_calldata(), gas=DEPOSIT_GAS)
        except RpcError:
            spent.unknown = False  # refused by the node: never sent
        except (BroadcastUncertain, ChainUnavailable):
            pass  # it may have been sent
        else:
            try:
                receipt = await chain.wait_for_receipt(tx_hash, receipt_timeout)
            except (RpcError, BroadcastUncertain, ChainUnavailable):
                pass  # sent: its outcome is not known
            spent.unknown = receipt is None
    if receipt is None or receipt.status != 1:
        raise Refused(E.ERR_DEPOSIT_TRANSACTION_FAILED, "the deposit did not go through; nothing was charged")
    return receipt.tx_hash


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    """When vouchers are claimed (whichever comes first) and what a channel asks for."""

    claim_every_calls: int = 100  # accepted vouchers waiting on a network
    claim_every_seconds: float = 300.0  # the oldest accepted voucher's wait
    deposit_calls: int = 100  # extra.minDeposit = price × this
    withdraw_delay: int = MIN_WITHDRAW_DELAY
    min_deposit_calls: int = 10  # a deposit below price × this is refused: the seller pays its gas


class Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(reason)
        self.reason, self.message = reason, message


def accrued(result: SettleResponse) -> bool:
    """Whether a successful settle accepted a voucher whose claim is still to come."""
    return bool(result.success and (result.extra or {}).get(ACCRUED_KEY))


@dataclass(frozen=True, slots=True)
class ChainView:
    balance: int
    claimed: int
    withdrawing: int
