"""batch-settlement offline: what the SDK client signs parses and binds; anything else is refused
with a code, never an exception; a claim by count that fails never undoes an accepted voucher."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from eth_account import Account
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.schemas import PaymentRequirements

from gateway.store.memory import MemoryStore
from settlement.chain.rpc import RpcError
from settlement.errors import ChainUnavailable, PaymentDecodeError
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from settlement.schemes.channels import ChannelPolicy, ChannelsEvm
from settlement.schemes.channels_claims import Claimer
from settlement.schemes.channels_contract import channel_payment, channel_signer, parse_channel
from settlement.schemes.channels_policy import Refused, make_deposit
from settlement.schemes.exact_guards import InFlight

KEY = "0x59c6995e998f97a5a0044966f0945389dc9c86dae88c7a8412f4603b6b78690d"  # anvil account 1
TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
AUTHORIZER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"


def _signed() -> dict[str, Any]:
    requirements = PaymentRequirements(
        scheme="batch-settlement", network="eip155:31337", asset=TOKEN, amount="1000", pay_to=PAY_TO,
        max_timeout_seconds=300, extra={"name": "USD Coin", "version": "2", "receiverAuthorizer": AUTHORIZER,
                                        "withdrawDelay": 900, "minDeposit": "100000"},
    )
    client = BatchSettlementEvmScheme(Account.from_key(KEY), BatchSettlementEvmSchemeOptions(salt="0x" + "01" * 32))
    payload: dict[str, Any] = client.create_payment_payload(requirements)
    return payload


def test_the_sdk_clients_deposit_and_voucher_parse_and_bind() -> None:
    payload = _signed()
    payment = parse_channel(payload)
    assert payment is not None and payment.deposit is not None and payment.deposit.amount == 100_000
    assert payment.max_claimable == 1000 and payment.payer == Account.from_key(KEY).address and payment.bound(31337)
    assert channel_signer("eip155:31337", payload) == payment.payer
    assert channel_signer("eip155:8453", payload) is None  # another chain: another channel id
    assert channel_payment(payload).authorization.nonce == payment.nonce_key()


@pytest.mark.parametrize("mutate", [
    lambda p: p.update(type="claim"),
    lambda p: p["voucher"].update(maxClaimableAmount="-1"),
    lambda p: p["voucher"].update(maxClaimableAmount=str(2**128)),
    lambda p: p["voucher"].update(channelId="0x1234"),
    lambda p: p["channelConfig"].update(payer="not an address"),
    lambda p: p["channelConfig"].update(salt="0xzz"),
    lambda p: p["deposit"].update(amount="0"),
    lambda p: p.pop("channelConfig"),
    lambda p: p["deposit"]["authorization"].pop("erc3009Authorization"),
], ids=["type", "negative", "above-uint128", "short-id", "payer", "salt", "zero-deposit", "no-config", "no-deposit-auth"])
def test_a_malformed_payload_is_not_a_channel_payment(mutate: Any) -> None:
    payload = copy.deepcopy(_signed())
    mutate(payload)
    assert parse_channel(payload) is None
    with pytest.raises(PaymentDecodeError) as refused:
        channel_payment(payload)
    assert refused.value.code == "invalid_batch_settlement_evm_payload_type"


def test_a_forged_voucher_does_not_recover_to_the_payer() -> None:
    payload = _signed()
    payload["voucher"]["maxClaimableAmount"] = "2000"  # signed for 1000
    assert parse_channel(payload) is not None and channel_signer("eip155:31337", payload) is None


class _DownChain:
    chain_id = 31337
    settlement_address = AUTHORIZER

    async def eth_call(self, *args: Any, **kwargs: Any) -> bytes:
        raise ChainUnavailable("down", code="chain_unavailable")

    async def wait_for_receipt(self, *args: Any, **kwargs: Any) -> None:
        raise ChainUnavailable("down", code="chain_unavailable")


def test_a_claim_by_count_that_fails_leaves_the_accepted_voucher_accrued(tmp_path: Path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    payload = _signed()
    payment = parse_channel(payload)
    assert payment is not None
    row = ledger.record_verified(
        request_id="r1", owner="o", tool="t", method="GET", path="/x", payer=payment.payer, pay_to=PAY_TO,
        amount=1000, network="eip155:31337", asset=TOKEN, nonce=payment.nonce_key(), valid_before=2**62,
        authorization=json.dumps(payload),
    )
    ledger.begin_settlement(row.id, None)
    scheme = ChannelsEvm({"eip155:31337": _DownChain()}, ChannelPolicy(claim_every_calls=1))  # type: ignore[dict-item]
    claimer = Claimer(scheme, ledger, MemoryStore())
    asyncio.run(claimer.note("eip155:31337"))  # the claim fails on the chain; no exception escapes
    stored = ledger.get(row.id)
    assert stored is not None and stored.state == PaymentState.SETTLING and stored.tx_hash is None
    ledger.close()


class _DepositChain:
    """A deposit's broadcast and receipt as a test sets them: ``send`` raises or returns the hash,
    ``receipt`` raises or returns (None: not mined in time)."""

    chain_id = 31337
    settlement_address = AUTHORIZER

    def __init__(self, send: Exception | None, receipt: Exception | Any) -> None:
        self.send, self.receipt = send, receipt

    async def eth_call(self, *args: Any, **kwargs: Any) -> bytes:
        return b""  # the simulation goes through

    async def send_call(self, *args: Any, **kwargs: Any) -> str:
        if self.send is not None:
            raise self.send
        return "0x" + "ab" * 32

    async def wait_for_receipt(self, *args: Any, **kwargs: Any) -> Any:
        if isinstance(self.receipt, Exception):
            raise self.receipt
        return self.receipt


@pytest.mark.parametrize(("send", "receipt", "still_counted"), [
    (RpcError("eth_sendRawTransaction", "nonce too low"), None, False),  # refused: never sent
    (ChainUnavailable("down", code="chain_unavailable"), None, True),  # maybe sent
    (None, RpcError("eth_getTransactionReceipt", "boom"), True),  # sent, its receipt unknown
    (None, None, True),  # sent, not mined in time
    (None, SimpleNamespace(status=0, tx_hash="0x" + "ab" * 32), False),  # mined, reverted: nothing spent
], ids=["refused", "maybe-sent", "receipt-error", "not-mined", "reverted"])
def test_a_deposit_whose_outcome_is_unknown_stays_counted_against_the_payers_balance(
    send: Exception | None, receipt: Any, still_counted: bool,
) -> None:
    """A channel's deposit spends the payer's token balance outside any settlement's hold
    (``make_deposit``, ``InFlight.spending``): refused, it counts no more; when it may still land,
    the payer's other settlements keep counting it (a hold's lifetime), so no balance read from
    before it stands in for theirs."""
    payment = SimpleNamespace(deposit=SimpleNamespace(amount=10_000), deposit_calldata=lambda: b"",
                              config=SimpleNamespace(token=TOKEN), payer=PAY_TO)
    flights = InFlight(ttl_ms=60_000)

    async def run() -> int:
        with pytest.raises(Refused) as refused:
            await make_deposit(_DepositChain(send, receipt), payment, "eip155:31337", flights, 1.0)  # type: ignore[arg-type]
        assert refused.value.reason == "invalid_batch_settlement_evm_deposit_transaction_failed"
        return flights.taken("eip155:31337", TOKEN, PAY_TO)

    assert asyncio.run(run()) == (10_000 if still_counted else 0)
