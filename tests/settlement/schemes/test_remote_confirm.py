"""``remote_confirm.confirm_settlement`` alone, on a fake chain: a remote facilitator's settle answer
is counted only as the chain shows it. Against anvil and a lying facilitator:
tests/e2e/test_attacks_remote_facilitator.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from settlement.chain.receipts import TOPIC_AUTHORIZATION_USED, TOPIC_TRANSFER, LogEntry, Receipt
from settlement.errors import ChainUnavailable
from settlement.schemes.remote_confirm import UNCONFIRMED, confirm_settlement
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse

NETWORK = "eip155:31337"
TOKEN, PAY_TO = "0x" + "70" * 20, "0x" + "b2" * 20
PAYER = "0x" + "a1" * 20
NONCE = bytes(range(32))
AMOUNT = 2000
NAMED, OTHER = "0x" + "11" * 32, "0x" + "22" * 32

REQUIREMENTS = PaymentRequirements(scheme="exact", network=NETWORK, amount=str(AMOUNT), asset=TOKEN, pay_to=PAY_TO,
                                   max_timeout_seconds=60, extra={"name": "USDC", "version": "2"})
PAYLOAD = PaymentPayload(x402_version=2, accepted=REQUIREMENTS, payload={
    "signature": "0x" + "ab" * 65,
    "authorization": {"from": PAYER, "to": PAY_TO, "value": str(AMOUNT), "validAfter": "0", "validBefore": "9999999999",
                      "nonce": "0x" + NONCE.hex()},
})


def _word(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def _paying(tx_hash: str, to: str = PAY_TO) -> Receipt:
    """A receipt whose logs are this authorization's use and its transfer to ``to``."""
    used = LogEntry(TOKEN, (TOPIC_AUTHORIZATION_USED, _word(PAYER), NONCE), b"")
    moved = LogEntry(TOKEN, (TOPIC_TRANSFER, _word(PAYER), _word(to)), AMOUNT.to_bytes(32, "big"))
    return Receipt(tx_hash, 1, 7, (used, moved))


class Chain:
    def __init__(self, receipts: dict[str, Receipt], used_by: Receipt | None = None, down: bool = False) -> None:
        self.receipts, self.used_by, self.down = receipts, used_by, down

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        if self.down:
            raise ChainUnavailable("the node does not answer")
        return self.receipts.get(tx_hash)

    async def knows_transaction(self, tx_hash: str) -> bool:
        return False

    async def authorization_state(self, token: str, authorizer: str, nonce: bytes) -> bool:
        return self.used_by is not None

    async def find_authorization_used(self, token: str, authorizer: str, nonce: bytes) -> Receipt | None:
        return self.used_by


def _confirm(chain: Any, result: SettleResponse) -> SettleResponse:
    return asyncio.run(confirm_settlement(chain, PAYLOAD, REQUIREMENTS, result))


SUCCESS = SettleResponse(success=True, transaction=NAMED, network=NETWORK, payer=PAYER)


def test_a_success_the_named_transaction_bears_out_is_settled() -> None:
    confirmed = _confirm(Chain({NAMED: _paying(NAMED)}), SUCCESS)
    assert confirmed.success and confirmed.transaction == NAMED and confirmed.extra == {"blockNumber": 7}


def test_a_success_naming_the_wrong_transaction_is_settled_by_the_one_that_paid() -> None:
    confirmed = _confirm(Chain({NAMED: _paying(NAMED, to="0x" + "cc" * 20)}, used_by=_paying(OTHER)), SUCCESS)
    assert confirmed.success and confirmed.transaction == OTHER


@pytest.mark.parametrize("chain", [
    Chain({}),  # never mined, the authorization unused: nothing moved (yet)
    Chain({NAMED: _paying(NAMED)}, down=True),  # the chain cannot say
], ids=["not-on-chain", "chain-down"])
def test_a_success_the_chain_does_not_bear_out_is_unknown_never_settled(chain: Chain) -> None:
    confirmed = _confirm(chain, SUCCESS)
    assert not confirmed.success and confirmed.error_reason == UNCONFIRMED and confirmed.transaction == NAMED


def test_an_authorization_used_without_paying_this_offer_is_refused() -> None:
    confirmed = _confirm(Chain({}, used_by=_paying(OTHER, to="0x" + "cc" * 20)), SUCCESS)
    assert not confirmed.success and confirmed.error_reason == "invalid_exact_evm_nonce_already_used"


def test_a_refusal_whose_transaction_landed_is_settled() -> None:
    refusal = SettleResponse(success=False, error_reason="transaction_failed", transaction=NAMED, network=NETWORK)
    confirmed = _confirm(Chain({NAMED: _paying(NAMED)}), refusal)
    assert confirmed.success and confirmed.transaction == NAMED


def test_a_refusal_whose_transaction_reverted_stands() -> None:
    refusal = SettleResponse(success=False, error_reason="transaction_failed", transaction=NAMED, network=NETWORK)
    assert _confirm(Chain({NAMED: Receipt(NAMED, 0, 7)}), refusal) == refusal


def test_without_a_chain_a_refusal_naming_a_transaction_is_unknown_and_a_plain_refusal_stands() -> None:
    named = SettleResponse(success=False, error_reason="transaction_failed", transaction=NAMED, network=NETWORK)
    plain = SettleResponse(success=False, error_reason="insufficient_funds", network=NETWORK)
    assert _confirm(None, named).error_reason == UNCONFIRMED
    assert _confirm(None, plain) == plain
    assert _confirm(None, SUCCESS) == SUCCESS  # taken on the facilitator's word: no chain to read
