"""The upto scheme on anvil with the official x402 SDK's upto client: verify, settle the usage (below
the signed maximum) exactly once with the ledger written ahead, and resolve an unknown outcome from
the chain. Attacks beside it: mutated fields, a raced duplicate, a signature over another payTo."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequirements as SdkRequirements

from catalog import PaymentTerms
from settlement.chain.client import JsonRpcChain
from settlement.ledger import Ledger, PaymentState
from settlement.ledger.resolve import resolve_open_payments
from settlement.schema import open_ledger
from settlement.schemes import ExactEvm, Schemes, UptoEvm, upto_maximum
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse
from tests.conftest import Devchain, running_devchain

PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"  # anvil account 9
MAX, PRICE = 50_000, 12_345  # the signed maximum; the usage settled (the tool's price)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    # Its own anvil: these tests settle from account 0, whose nonce a session chain's users track.
    with running_devchain(tmp_path_factory.mktemp("upto-scheme")) as devchain:
        yield devchain


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield book
    book.close()


def _terms(chain: Devchain, pay_to: str = PAY_TO) -> PaymentTerms:
    return PaymentTerms(network="eip155:31337", asset=chain.token, asset_name="USD Coin", asset_version="2",
                        decimals=6, pay_to=pay_to, scheme="upto", maximum=Decimal("0.05"))


def _rpc(chain: Devchain) -> JsonRpcChain:
    return JsonRpcChain(chain.anvil.rpc_url, 31337, chain.deployment.settlement_key)


def _pay(chain: Devchain, requirements: PaymentRequirements, payer: int) -> PaymentPayload:
    """The official SDK's upto client signs the offer as any x402 client would."""
    sdk = SdkRequirements.model_validate(requirements.model_dump(by_alias=True))
    signed = UptoEvmClientScheme(Account.from_key(chain.key(payer))).create_payment_payload(sdk)
    return PaymentPayload(x402_version=2, accepted=requirements, payload=signed)


def _charge(requirements: PaymentRequirements, amount: int) -> PaymentRequirements:
    """The offer with another charge (``extra.charge``); its maximum (``amount``) unchanged."""
    extra = {**(requirements.extra or {}), "charge": {"basis": "price", "amount": str(amount)}}
    return requirements.model_copy(update={"extra": extra})


async def _settle_written_ahead(
    scheme: UptoEvm, ledger: Ledger, payload: PaymentPayload, requirements: PaymentRequirements, row_id: int,
) -> SettleResponse:
    """The pipeline's order: ``settling`` with the hash before the broadcast, then the outcome."""

    async def before_send(tx_hash: str) -> None:
        ledger.begin_settlement(row_id, None, tx_hash=tx_hash)

    result = await scheme.settle(payload, requirements, before_send=before_send)  # charges extra.charge
    if result.success:
        ledger.mark_settled(row_id, tx_hash=result.transaction, block_number=(result.extra or {}).get("blockNumber"))
    return result


def _record(ledger: Ledger, payload: PaymentPayload, request_id: str) -> int:
    auth = payload.payload["permit2Authorization"]
    row = ledger.record_verified(
        request_id=request_id, owner="o", tool="t", decimals=6, method="GET", path="/x", payer=auth["from"],
        pay_to=auth["witness"]["to"], amount=PRICE, network="eip155:31337", asset=auth["permitted"]["token"],
        nonce="0x" + int(auth["nonce"]).to_bytes(32, "big").hex(), valid_before=int(auth["deadline"]),
        authorization=json.dumps(payload.payload), settle_mode="after",
    )
    return row.id


def test_the_usage_settles_once_and_the_ledger_equals_the_chain(chain: Devchain, ledger: Ledger) -> None:
    async def run() -> None:
        rpc = _rpc(chain)
        scheme = UptoEvm({"eip155:31337": rpc})
        requirements = scheme.requirements(_terms(chain), PRICE)
        assert requirements.amount == str(MAX) and requirements.extra is not None  # the payer signs the maximum
        assert requirements.extra["facilitatorAddress"] == chain.deployment.deployer
        assert requirements.extra["charge"] == {"basis": "price", "amount": str(PRICE)}
        payload = _pay(chain, requirements, 1)
        verified = await scheme.verify(payload, requirements)
        assert verified.is_valid, verified
        row_id = _record(ledger, payload, "r-once")
        payer, payee = chain.balance(chain.address(1)), chain.balance(PAY_TO)
        result = await _settle_written_ahead(scheme, ledger, payload, requirements, row_id)
        assert result.success and result.amount == str(PRICE)
        again = await scheme.settle(payload, _charge(requirements, PRICE))
        assert not again.success and again.error_reason == "permit2_nonce_used"
        refused = await scheme.verify(payload, requirements)
        assert not refused.is_valid and refused.invalid_reason == "permit2_nonce_used"
        row = ledger.get(row_id)
        assert row is not None and row.state == PaymentState.SETTLED and row.tx_hash == result.transaction
        assert chain.balance(PAY_TO) - payee == PRICE == row.amount == payer - chain.balance(chain.address(1))
        assert upto_maximum(row) == MAX and PRICE < MAX
        await rpc.close()

    asyncio.run(run())


MUTATIONS: dict[str, Any] = {
    "permitted.amount": lambda a: a["permitted"].update(amount=str(MAX * 2)),
    "nonce": lambda a: a.update(nonce=str(int(a["nonce"]) + 1)),
    "deadline": lambda a: a.update(deadline=str(int(a["deadline"]) + 60)),
    "witness.to": lambda a: a["witness"].update(to="0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
    "witness.facilitator": lambda a: a["witness"].update(facilitator="0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
    "witness.validAfter": lambda a: a["witness"].update(validAfter="1"),
    "from": lambda a: a.update(**{"from": "0x23618e81E3f5cdF7f54C3d65f7FBc0aBf5B21E8f"}),
    "spender": lambda a: a.update(spender="0x000000000022D473030F116dDEE9F6B43aC78BA3"),
}


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_a_mutated_field_is_refused_with_nothing_moved(chain: Devchain, field: str) -> None:
    async def run() -> None:
        rpc = _rpc(chain)
        scheme = UptoEvm({"eip155:31337": rpc})
        requirements = scheme.requirements(_terms(chain), PRICE)
        payload = _pay(chain, requirements, 2)
        mutated = copy.deepcopy(payload.payload)
        MUTATIONS[field](mutated["permit2Authorization"])
        bad = payload.model_copy(update={"payload": mutated})
        before = (chain.balance(chain.address(2)), chain.balance(PAY_TO))
        verified = await scheme.verify(bad, requirements)
        settled = await scheme.settle(bad, _charge(requirements, PRICE))
        assert not verified.is_valid and not settled.success and settled.transaction == ""
        assert (chain.balance(chain.address(2)), chain.balance(PAY_TO)) == before
        assert (await scheme.verify(payload, requirements)).is_valid  # the original is still good
        await rpc.close()

    asyncio.run(run())


def test_a_raced_duplicate_settles_once(chain: Devchain) -> None:
    async def run() -> list[SettleResponse]:
        rpc = _rpc(chain)
        scheme = UptoEvm({"eip155:31337": rpc})
        requirements = scheme.requirements(_terms(chain), PRICE)
        payload = _pay(chain, requirements, 3)
        results = await asyncio.gather(*(scheme.settle(payload, _charge(requirements, PRICE)) for _ in range(2)))
        await rpc.close()
        return list(results)

    payer, payee = chain.balance(chain.address(3)), chain.balance(PAY_TO)
    results = asyncio.run(run())
    assert sorted(r.success for r in results) == [False, True]
    assert chain.balance(PAY_TO) - payee == PRICE == payer - chain.balance(chain.address(3))


def test_a_signature_over_another_pay_to_is_refused(chain: Devchain) -> None:
    async def run() -> None:
        rpc = _rpc(chain)
        scheme = UptoEvm({"eip155:31337": rpc})
        ours = scheme.requirements(_terms(chain), PRICE)
        theirs = scheme.requirements(_terms(chain, pay_to=chain.address(6)), MAX)
        signed = _pay(chain, theirs, 4)
        as_is = signed.model_copy(update={"accepted": ours})
        assert (await scheme.verify(as_is, ours)).invalid_reason == "invalid_permit2_recipient_mismatch"
        rewritten = copy.deepcopy(signed.payload)
        rewritten["permit2Authorization"]["witness"]["to"] = PAY_TO  # the witness no longer matches the signature
        forged = as_is.model_copy(update={"payload": rewritten})
        assert (await scheme.verify(forged, ours)).invalid_reason == "invalid_permit2_signature"
        before = chain.balance(chain.address(4))
        assert not (await scheme.settle(forged, _charge(ours, PRICE))).success
        assert chain.balance(chain.address(4)) == before
        await rpc.close()

    asyncio.run(run())


def test_a_charge_above_the_maximum_is_refused_and_zero_moves_nothing(chain: Devchain) -> None:
    async def run() -> None:
        rpc = _rpc(chain)
        scheme = UptoEvm({"eip155:31337": rpc})
        requirements = scheme.requirements(_terms(chain), PRICE)
        payload = _pay(chain, requirements, 5)
        over = await scheme.settle(payload, _charge(requirements, MAX + 1))
        assert over.error_reason == "invalid_upto_evm_payload_settlement_exceeds_amount"
        zero = await scheme.settle(payload, _charge(requirements, 0))
        assert zero.success and zero.transaction == "" and zero.amount == "0"
        assert (await scheme.verify(payload, requirements)).is_valid  # nothing was spent
        await rpc.close()

    asyncio.run(run())


def test_an_unknown_outcome_is_resolved_from_the_chain(chain: Devchain, ledger: Ledger) -> None:
    """A row left ``settling`` with the hash written ahead (the gateway died after the broadcast)
    is settled from its receipt; one whose broadcast never happened fails; exact rows beside upto
    ones are left to the exact scheme."""

    async def run() -> None:
        rpc = _rpc(chain)
        upto = UptoEvm({"eip155:31337": rpc})
        requirements = upto.requirements(_terms(chain), PRICE)
        sent, unsent = _pay(chain, requirements, 6), _pay(chain, requirements, 7)
        sent_id, unsent_id = _record(ledger, sent, "r-sent"), _record(ledger, unsent, "r-unsent")
        hashes: list[str] = []

        async def crash_after_write_ahead(tx_hash: str) -> None:
            ledger.begin_settlement(sent_id, None, tx_hash=tx_hash)
            hashes.append(tx_hash)

        result = await upto.settle(sent, _charge(requirements, PRICE), before_send=crash_after_write_ahead)
        assert result.success  # ... but the ledger never heard: it still says settling
        ledger.begin_settlement(unsent_id, None)
        registry = Schemes([ExactEvm(None, None, chains={"eip155:31337": rpc}), upto])
        resolutions = {r.payment_id: r for r in await resolve_open_payments(ledger, registry)}
        assert resolutions[sent_id].after == "settled" and resolutions[sent_id].tx_hash == hashes[0]
        assert resolutions[unsent_id].after == "failed" and resolutions[unsent_id].reason == "not_broadcast"
        row = ledger.get(sent_id)
        assert row is not None and row.state == PaymentState.SETTLED and row.amount == PRICE
        await rpc.close()

    asyncio.run(run())
