"""A ``batch-settlement`` payment, parsed, and the escrow's calls, encoded: offline, no chain.

The payload is the x402 SDK's (``mechanisms.evm.batch_settlement``): ``{type: deposit|voucher,
channelConfig, voucher {channelId, maxClaimableAmount, signature}, deposit? {amount, authorization
{erc3009Authorization {validAfter, validBefore, salt, signature}}}}``, read with the SDK's
``DepositPayload`` / ``VoucherPayload``; the channel id is the SDK's ``compute_channel_id`` (the
EIP-712 digest of the ``ChannelConfig`` under ("x402 Batch Settlement", "1", chainId, the escrow)),
and the voucher and deposit digests are built with eth-account's typed-data encoder over the SDK's
type tables, so the gateway checks exactly what the SDK client signs. The escrow
(``contracts/X402BatchSettlement.sol``) sits at the SDK's canonical address; its calls are encoded
here with eth-abi (selectors as ``batch_settlement/abi.py`` names them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account.messages import encode_typed_data
from eth_hash.auto import keccak
from x402.mechanisms.evm.batch_settlement.constants import (
    BATCH_SETTLEMENT_ADDRESS,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    RECEIVE_AUTHORIZATION_TYPES,
    VOUCHER_TYPES,
)
from x402.mechanisms.evm.batch_settlement.encoding import build_erc3009_collector_data, build_erc3009_deposit_nonce
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig, DepositPayload, RefundPayload, VoucherPayload
from x402.mechanisms.evm.batch_settlement.utils import (
    channel_config_to_signing_message,
    compute_channel_id,
    get_batch_settlement_eip712_domain,
    is_canonical_channel_id,
)

from settlement.chain.addresses import checksum_address
from settlement.chain.client import selector
from settlement.errors import PaymentDecodeError
from settlement.schemes.eip712 import recover_signer
from settlement.x402.digits import is_digits
from settlement.x402.wire import ExactEvmPayload

__all__ = [
    "COLLECTOR_ADDRESS",
    "ESCROW_ADDRESS",
    "ChannelPayment",
    "Deposit",
    "channel_payment",
    "channel_signer",
    "claim_calldata",
    "decode_channel_state",
    "parse_channel",
]

ESCROW_ADDRESS = checksum_address(BATCH_SETTLEMENT_ADDRESS)
COLLECTOR_ADDRESS = checksum_address(ERC3009_DEPOSIT_COLLECTOR_ADDRESS)
_CONFIG = "(address,address,address,address,address,uint40,bytes32)"
_CLAIM = f"(({_CONFIG},uint128),bytes,uint128)"
SEL_DEPOSIT = selector(f"deposit({_CONFIG},uint128,address,bytes)")
SEL_CLAIM_WITH_SIGNATURE = selector(f"claimWithSignature({_CLAIM}[],bytes)")
SEL_SETTLE = selector("settle(address,address)")
SEL_MULTICALL = selector("multicall(bytes[])")
SEL_CHANNELS = selector("channels(bytes32)")
SEL_PENDING_WITHDRAWALS = selector("pendingWithdrawals(bytes32)")
SEL_REFUND = selector(f"refund({_CONFIG},uint128)")
SEL_AUTHORIZATION_STATE = selector("authorizationState(address,bytes32)")


@dataclass(frozen=True, slots=True)
class Deposit:
    """An ERC-3009 ``ReceiveWithAuthorization`` of ``amount`` from the payer to the collector."""

    amount: int
    valid_after: int
    valid_before: int
    salt: str
    signature: str
    nonce: bytes  # keccak(abi.encode(channelId, salt)): the token's authorization nonce


@dataclass(frozen=True, slots=True)
class ChannelPayment:
    """One call's payment on a channel: its config, id, the cumulative voucher and an optional deposit."""

    config: ChannelConfig
    channel_id: str  # as presented (lowercase 0x + 64 hex); ``bound`` says whether it is the config's
    max_claimable: int
    signature: str
    deposit: Deposit | None
    refund: int | None = None  # a refund request (type refund): the amount asked, 0 for everything

    @property
    def payer(self) -> str:
        return checksum_address(self.config.payer)

    @property
    def voucher_signer(self) -> str:
        """Who must have signed the voucher: the payer's authorizer (zero: the payer itself)."""
        authorizer = self.config.payer_authorizer
        return self.payer if int(authorizer, 16) == 0 else checksum_address(authorizer)

    def bound(self, chain_id: int) -> bool:
        return compute_channel_id(self.config, chain_id).lower() == self.channel_id

    def nonce_key(self) -> str:
        """What keys this call's payment (ledger, in-flight lock): one per (channel, cumulative)."""
        packed = bytes.fromhex(self.channel_id[2:]) + self.max_claimable.to_bytes(32, "big")
        return "0x" + keccak(packed).hex()

    def voucher_digest(self, chain_id: int) -> bytes:
        return _digest(get_batch_settlement_eip712_domain(chain_id), VOUCHER_TYPES, {
            "channelId": bytes.fromhex(self.channel_id[2:]), "maxClaimableAmount": self.max_claimable,
        })

    def deposit_digest(self, chain_id: int, token_name: str, token_version: str) -> bytes:
        assert self.deposit is not None
        domain = {"name": token_name, "version": token_version, "chainId": chain_id,
                  "verifyingContract": checksum_address(self.config.token)}
        return _digest(domain, RECEIVE_AUTHORIZATION_TYPES, {
            "from": self.payer, "to": COLLECTOR_ADDRESS, "value": self.deposit.amount,
            "validAfter": self.deposit.valid_after, "validBefore": self.deposit.valid_before, "nonce": self.deposit.nonce,
        })

    def config_tuple(self) -> tuple[Any, ...]:
        m = channel_config_to_signing_message(self.config)
        return (m["payer"], m["payerAuthorizer"], m["receiver"], m["receiverAuthorizer"], m["token"],
                m["withdrawDelay"], m["salt"])

    def deposit_calldata(self) -> bytes:
        assert self.deposit is not None
        d = self.deposit
        data = build_erc3009_collector_data(str(d.valid_after), str(d.valid_before), d.salt, d.signature)
        return SEL_DEPOSIT + abi_encode([_CONFIG, "uint128", "address", "bytes"],
                                        [self.config_tuple(), d.amount, COLLECTOR_ADDRESS, data])

    def deposit_used_call(self) -> bytes:
        assert self.deposit is not None
        return SEL_AUTHORIZATION_STATE + abi_encode(["address", "bytes32"], [self.payer, self.deposit.nonce])

    def state_calls(self) -> tuple[bytes, bytes]:
        """``channels(id)`` and ``pendingWithdrawals(id)``."""
        cid = bytes.fromhex(self.channel_id[2:])
        return SEL_CHANNELS + cid, SEL_PENDING_WITHDRAWALS + cid

    def refund_calldata(self, amount: int) -> bytes:
        return SEL_REFUND + abi_encode([_CONFIG, "uint128"], [self.config_tuple(), amount])


def _digest(domain: dict[str, Any], types: dict[str, list[dict[str, str]]], message: dict[str, Any]) -> bytes:
    signable = encode_typed_data(domain_data=domain, message_types=types, message_data=message)
    return keccak(b"\x19" + signable.version + signable.header + signable.body)


def parse_channel(payload: dict[str, Any]) -> ChannelPayment | None:
    """The payment of a batch-settlement payload (deposit or voucher), or None when it is not one."""
    try:
        kind = payload.get("type")
        parsed: DepositPayload | VoucherPayload | RefundPayload | None = (
            DepositPayload.from_dict(payload) if kind == "deposit" else VoucherPayload.from_dict(payload)
            if kind == "voucher" else RefundPayload.from_dict(payload) if kind == "refund" else None)
        if parsed is None or parsed.channel_config is None or parsed.voucher is None:
            return None
        config, voucher = parsed.channel_config, parsed.voucher
        for address in (config.payer, config.payer_authorizer, config.receiver, config.receiver_authorizer, config.token):
            checksum_address(address)
        if not is_canonical_channel_id(voucher.channel_id) or not is_digits(str(voucher.max_claimable_amount)):
            return None
        bytes.fromhex(str(config.salt).removeprefix("0x"))
        deposit = _deposit(parsed, voucher.channel_id) if isinstance(parsed, DepositPayload) else None
        max_claimable = int(voucher.max_claimable_amount)
        if max_claimable >= 2**128 or not 0 <= int(config.withdraw_delay) < 2**40:
            return None
        refund = None
        if isinstance(parsed, RefundPayload):
            refund = int(parsed.amount) if parsed.amount is not None else 0
            if not 0 <= refund < 2**128:
                return None
        return ChannelPayment(config, voucher.channel_id.lower(), max_claimable, str(voucher.signature), deposit, refund)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _deposit(parsed: DepositPayload, channel_id: str) -> Deposit:
    fields = parsed.deposit
    if fields is None or fields.authorization.erc3009_authorization is None:
        raise ValueError("a deposit needs an ERC-3009 authorization")
    auth = fields.authorization.erc3009_authorization
    amount = int(fields.amount)
    if not 0 < amount < 2**128:
        raise ValueError("deposit amount out of range")
    nonce = bytes.fromhex(build_erc3009_deposit_nonce(channel_id, auth.salt)[2:])
    return Deposit(amount, int(auth.valid_after), int(auth.valid_before), auth.salt, auth.signature, nonce)


def channel_payment(payload: dict[str, Any]) -> ExactEvmPayload:
    """A batch-settlement payload as the pipeline keys every payment (payer, payTo, the voucher's
    cumulative as value, nonce = ``nonce_key``); ``PaymentDecodeError`` when it is not one."""
    payment = parse_channel(payload)
    if payment is None or payment.refund is not None:
        raise PaymentDecodeError("invalid batch-settlement payload", code="invalid_batch_settlement_evm_payload_type")
    return exact_view(payment)


def exact_view(payment: ChannelPayment) -> ExactEvmPayload:
    return ExactEvmPayload.model_validate({
        "signature": payment.signature,
        "authorization": {
            "from": payment.payer, "to": checksum_address(payment.config.receiver), "value": str(payment.max_claimable),
            "validAfter": "0", "validBefore": str(2**63 - 1), "nonce": payment.nonce_key(),
        },
    })


def channel_signer(network: str, payload: dict[str, Any]) -> str | None:
    """The payer when the voucher's signature is its authorizer's over this voucher on ``network``
    and the channel id is its config's (offline); None otherwise."""
    payment = parse_channel(payload)
    if payment is None or not network.startswith("eip155:") or not is_digits(network[7:]):
        return None
    chain_id = int(network[7:])
    if not payment.bound(chain_id):
        return None
    try:
        signer = recover_signer(payment.voucher_digest(chain_id), bytes.fromhex(payment.signature.removeprefix("0x")))
    except ValueError:
        return None
    return payment.payer if signer == payment.voucher_signer else None


def decode_channel_state(channels: bytes, pending: bytes) -> tuple[int, int, int]:
    """(balance, totalClaimed, withdrawal initiatedAt) from the two views' answers."""
    balance, claimed = abi_decode(["uint128", "uint128"], channels)
    _, initiated = abi_decode(["uint128", "uint40"], pending)
    return int(balance), int(claimed), int(initiated)


def claim_calldata(claims: list[tuple[ChannelPayment, int]], authorizer_signature: bytes,
                   deposits: list[ChannelPayment], payees: list[tuple[str, str]]) -> bytes:
    """One transaction: the deposits not yet made, ``claimWithSignature`` of each (voucher,
    totalClaimed), then ``settle(receiver, token)`` per payee: ``multicall`` on the escrow."""
    rows = [((p.config_tuple(), p.max_claimable), bytes.fromhex(p.signature.removeprefix("0x")), total)
            for p, total in claims]
    calls = [p.deposit_calldata() for p in deposits]
    calls.append(SEL_CLAIM_WITH_SIGNATURE + abi_encode([f"{_CLAIM}[]", "bytes"], [rows, authorizer_signature]))
    calls.extend(SEL_SETTLE + abi_encode(["address", "address"], [r, t]) for r, t in payees)
    return SEL_MULTICALL + abi_encode(["bytes[]"], [calls])
