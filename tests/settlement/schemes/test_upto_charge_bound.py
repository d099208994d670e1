"""UptoEvm.verify's backstop: an offer whose charge (``extra.charge.amount``) is above the maximum the
payer signs (``amount``) could never settle, so it is refused before any chain call, and before the
pipeline would call the upstream (the offer stage already refuses to make such an offer)."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

import pytest
from eth_account import Account
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequirements as SdkRequirements

from catalog import PaymentTerms
from settlement.schemes import UptoEvm
from settlement.x402.wire import PaymentPayload, PaymentRequirements

TOKEN = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
FACILITATOR = Account.from_key("0x" + "33" * 32).address
PAYER = Account.from_key("0x" + "44" * 32)


class ReachedChain(Exception):
    """The offline checks passed: verify asked the chain."""


class OfflineChain:
    chain_id = 31337
    settlement_address = FACILITATOR

    async def eth_call(self, *_: Any, **__: Any) -> bytes:
        raise ReachedChain

    async def get_code(self, *_: Any) -> bytes:
        raise ReachedChain


def _offer(scheme: UptoEvm, charge: int) -> tuple[PaymentPayload, PaymentRequirements]:
    terms = PaymentTerms(network="eip155:31337", asset=TOKEN, asset_name="USD Coin", asset_version="2", decimals=6,
                         pay_to=PAY_TO, scheme="upto", maximum=Decimal("0.005"))
    requirements = scheme.requirements(terms, charge)
    sdk = SdkRequirements.model_validate(requirements.model_dump(by_alias=True))
    signed = UptoEvmClientScheme(PAYER).create_payment_payload(sdk)
    return PaymentPayload(x402_version=2, accepted=requirements, payload=signed), requirements


def test_a_charge_above_the_signed_maximum_is_refused_before_the_chain() -> None:
    scheme = UptoEvm({"eip155:31337": OfflineChain()})  # type: ignore[dict-item]
    payload, requirements = _offer(scheme, 9_000)
    assert requirements.amount == "5000" and requirements.extra is not None
    assert requirements.extra["charge"]["amount"] == "9000"
    verified = asyncio.run(scheme.verify(payload, requirements))
    assert not verified.is_valid and verified.invalid_reason == "invalid_upto_evm_payload_settlement_exceeds_amount"
    assert verified.payer == PAYER.address


@pytest.mark.parametrize("charge", [1, 5_000])
def test_a_charge_within_the_maximum_goes_on_to_the_chain(charge: int) -> None:
    scheme = UptoEvm({"eip155:31337": OfflineChain()})  # type: ignore[dict-item]
    payload, requirements = _offer(scheme, charge)
    with pytest.raises(ReachedChain):
        asyncio.run(scheme.verify(payload, requirements))
