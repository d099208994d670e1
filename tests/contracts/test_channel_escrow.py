"""The batch-settlement escrow (contracts/X402BatchSettlement.sol) at its canonical address on the dev
chain, driven by what the official x402 SDK signs: its client's deposit (ERC-3009 to the collector)
and vouchers, its ``sign_claim_batch`` for the receiver's authorizer. One deposit, claims that move
exactly the claimed amount to the receiver, a replayed claim that claims nothing, refusals of a
forged voucher, a claim above the deposit and another authorizer, and the deposit's unused rest back
to the payer (the receiver's refund, the payer's withdrawal after the delay)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from web3.exceptions import ContractCustomError, ContractLogicError
from x402.mechanisms.evm.batch_settlement.authorizer_signer import LocalAuthorizerSigner, sign_claim_batch
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.types import VoucherClaim
from x402.mechanisms.evm.signers import EthAccountSigner
from x402.schemas import PaymentRequirements

from settlement.schemes.channels_contract import ESCROW_ADDRESS, ChannelPayment, claim_calldata, decode_channel_state, parse_channel
from tests.conftest import Devchain, running_devchain

PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
NETWORK = "eip155:31337"
PRICE, DEPOSIT = 1_000, 100_000


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    # Its own anvil: these tests move chain time and send from the settlement account.
    with running_devchain(tmp_path_factory.mktemp("channels")) as devchain:
        yield devchain


def _requirements(chain: Devchain) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="batch-settlement", network=NETWORK, asset=chain.token, amount=str(PRICE), pay_to=PAY_TO,
        max_timeout_seconds=300,
        extra={"name": "USD Coin", "version": "2", "receiverAuthorizer": chain.deployment.deployer,
               "withdrawDelay": 900, "minDeposit": str(DEPOSIT)},
    )


def _open(chain: Devchain, payer: int, salt: str) -> ChannelPayment:
    """The SDK client's first payment (deposit + voucher), and the deposit sent by the deployer."""
    client = BatchSettlementEvmScheme(Account.from_key(chain.key(payer)), BatchSettlementEvmSchemeOptions(salt=salt))
    payment = parse_channel(client.create_payment_payload(_requirements(chain)))
    assert payment is not None and payment.deposit is not None and payment.deposit.amount == DEPOSIT
    assert _send(chain, payment.deposit_calldata())["status"] == 1
    return payment


def _voucher(chain: Devchain, payer: int, channel: ChannelPayment, cumulative: int) -> ChannelPayment:
    fields = sign_voucher(EthAccountSigner(Account.from_key(chain.key(payer))), channel.channel_id, cumulative, NETWORK)
    return ChannelPayment(channel.config, channel.channel_id, cumulative, fields.signature, None)


def _claim(chain: Devchain, vouchers: list[tuple[ChannelPayment, int]], key: str | None = None) -> bytes:
    signer = LocalAuthorizerSigner(key or chain.deployment.settlement_key)
    entries = [VoucherClaim(channel=p.config, max_claimable_amount=str(p.max_claimable), signature=p.signature,
                            total_claimed=str(total)) for p, total in vouchers]
    signature = bytes.fromhex(sign_claim_batch(signer, entries, NETWORK).removeprefix("0x"))
    return claim_calldata(vouchers, signature, [], [(PAY_TO, chain.token)])


def _send(chain: Devchain, data: bytes) -> dict[str, Any]:
    tx = chain.w3.eth.send_transaction({"from": chain.deployment.deployer, "to": ESCROW_ADDRESS, "data": data, "gas": 600_000})
    return dict(chain.w3.eth.wait_for_transaction_receipt(tx))


def _state(chain: Devchain, channel: ChannelPayment) -> tuple[int, int, int]:
    channels, pending = channel.state_calls()
    return decode_channel_state(chain.w3.eth.call({"to": ESCROW_ADDRESS, "data": channels}),
                                chain.w3.eth.call({"to": ESCROW_ADDRESS, "data": pending}))


def _refused(chain: Devchain, data: bytes) -> None:
    with pytest.raises((ContractCustomError, ContractLogicError)):
        chain.w3.eth.call({"from": chain.deployment.deployer, "to": ESCROW_ADDRESS, "data": data})


def test_one_deposit_then_claims_pay_the_receiver_exactly_what_is_claimed(chain: Devchain) -> None:
    assert chain.deployment.channel_escrow == ESCROW_ADDRESS and chain.w3.eth.get_code(ESCROW_ADDRESS)
    payer_before, payee_before = chain.balance(chain.address(2)), chain.balance(PAY_TO)
    channel = _open(chain, 2, "0x" + "11" * 32)
    assert _state(chain, channel) == (DEPOSIT, 0, 0)
    assert payer_before - chain.balance(chain.address(2)) == DEPOSIT
    ten = _voucher(chain, 2, channel, 10 * PRICE)
    assert _send(chain, _claim(chain, [(ten, 10 * PRICE)]))["status"] == 1
    assert chain.balance(PAY_TO) - payee_before == 10 * PRICE and _state(chain, channel) == (DEPOSIT, 10 * PRICE, 0)
    # The same claim again claims nothing: the escrow skips what is already claimed.
    assert _send(chain, _claim(chain, [(ten, 10 * PRICE)]))["status"] == 1
    assert chain.balance(PAY_TO) - payee_before == 10 * PRICE
    thirty = _voucher(chain, 2, channel, 30 * PRICE)
    assert _send(chain, _claim(chain, [(thirty, 30 * PRICE)]))["status"] == 1
    assert chain.balance(PAY_TO) - payee_before == 30 * PRICE


def test_forged_vouchers_claims_above_the_deposit_and_other_authorizers_are_refused(chain: Devchain) -> None:
    channel = _open(chain, 3, "0x" + "22" * 32)
    forged = _voucher(chain, 4, channel, 5 * PRICE)  # signed by someone else
    _refused(chain, _claim(chain, [(forged, 5 * PRICE)]))
    above = _voucher(chain, 3, channel, DEPOSIT + PRICE)
    _refused(chain, _claim(chain, [(above, DEPOSIT + PRICE)]))
    good = _voucher(chain, 3, channel, 5 * PRICE)
    _refused(chain, _claim(chain, [(good, 6 * PRICE)]))  # more than the voucher allows
    _refused(chain, _claim(chain, [(good, 5 * PRICE)], key=chain.key(5)))  # not the receiver's authorizer
    assert _state(chain, channel) == (DEPOSIT, 0, 0)


def test_the_unused_deposit_goes_back_to_the_payer(chain: Devchain) -> None:
    payer = chain.address(6)
    channel = _open(chain, 6, "0x" + "33" * 32)
    before = chain.balance(payer)
    assert _send(chain, _claim(chain, [(_voucher(chain, 6, channel, 40 * PRICE), 40 * PRICE)]))["status"] == 1
    # The receiver refunds what it has not claimed (asking for more is capped to that).
    assert _send(chain, channel.refund_calldata(DEPOSIT))["status"] == 1
    assert chain.balance(payer) - before == DEPOSIT - 40 * PRICE and _state(chain, channel) == (40 * PRICE, 40 * PRICE, 0)


def test_the_payer_withdraws_alone_after_the_delay(chain: Devchain) -> None:
    payer = chain.address(7)
    channel = _open(chain, 7, "0x" + "44" * 32)
    escrow = chain.w3.eth.contract(address=ESCROW_ADDRESS, abi=WITHDRAW_ABI)
    config = channel.config_tuple()
    chain.w3.eth.wait_for_transaction_receipt(escrow.functions.initiateWithdraw(config, DEPOSIT).transact({"from": payer}))
    assert _state(chain, channel)[2] > 0  # a withdrawal is pending: the gateway stops taking vouchers
    with pytest.raises((ContractCustomError, ContractLogicError)):
        escrow.functions.finalizeWithdraw(config).call({"from": payer})  # not before the delay
    before = chain.balance(payer)
    chain.w3.provider.make_request("evm_increaseTime", [901])  # type: ignore[arg-type]
    chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
    chain.w3.eth.wait_for_transaction_receipt(escrow.functions.finalizeWithdraw(config).transact({"from": payer}))
    assert chain.balance(payer) - before == DEPOSIT and _state(chain, channel) == (0, 0, 0)


_CONFIG_ABI = {"name": "config", "type": "tuple", "components": [
    {"name": n, "type": t} for n, t in (("payer", "address"), ("payerAuthorizer", "address"), ("receiver", "address"),
                                         ("receiverAuthorizer", "address"), ("token", "address"),
                                         ("withdrawDelay", "uint40"), ("salt", "bytes32"))]}
WITHDRAW_ABI = [
    {"type": "function", "name": "initiateWithdraw", "stateMutability": "nonpayable", "outputs": [],
     "inputs": [_CONFIG_ABI, {"name": "amount", "type": "uint128"}]},
    {"type": "function", "name": "finalizeWithdraw", "stateMutability": "nonpayable", "outputs": [], "inputs": [_CONFIG_ABI]},
]
