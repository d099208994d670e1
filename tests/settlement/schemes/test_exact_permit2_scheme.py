"""``exact`` through Permit2 below the gateway, on its own anvil: the SDK's exact client's Permit2 payload
parsed and keyed offline (an upto one is not taken for it; an upto offer of such a token names no
version), a payment settled with the hash written ahead and open rows resolved from the chain
(settled, used elsewhere, never sent), and the start-up probe's verdict on each kind of token."""

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
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.schemas import PaymentRequirements as SdkRequirements

from catalog import PaymentTerms
from settlement.chain.client import JsonRpcChain
from settlement.ledger import Ledger, PaymentState
from settlement.ledger.resolve import resolve_open_payments
from settlement.schema import open_ledger
from settlement.schemes import ExactEvm, Schemes
from settlement.schemes.exact_permit2 import ExactWithPermit2, permit2_requirements, token_problem
from settlement.schemes.exact_permit2_payload import moved_by_permit2, parse_exact_permit2, payment_view
from settlement.schemes.upto import upto_requirements
from settlement.x402.wire import PaymentPayload, PaymentRequirements
from tests.conftest import Devchain, running_devchain

PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"  # anvil account 9
PRICE = 7_000


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    # Its own anvil: these tests settle from account 0, whose nonce a session chain's users track.
    with running_devchain(tmp_path_factory.mktemp("exact-permit2")) as devchain:
        yield devchain


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield book
    book.close()


def _terms(chain: Devchain, **changes: Any) -> PaymentTerms:
    assert chain.deployment.plain_token is not None
    values: dict[str, Any] = {"network": "eip155:31337", "asset": chain.deployment.plain_token.address,
                              "asset_name": "Plain Dollar", "decimals": 6, "pay_to": PAY_TO,
                              "asset_transfer_method": "permit2", **changes}
    return PaymentTerms(**values)


def _pay(chain: Devchain, requirements: PaymentRequirements, payer: int) -> PaymentPayload:
    sdk = SdkRequirements.model_validate(requirements.model_dump(by_alias=True))
    signed = ExactEvmClientScheme(Account.from_key(chain.key(payer))).create_payment_payload(sdk)
    return PaymentPayload(x402_version=2, accepted=requirements, payload=signed)


def _scheme(chain: Devchain) -> tuple[ExactWithPermit2, JsonRpcChain]:
    rpc = JsonRpcChain(chain.anvil.rpc_url, 31337, chain.deployment.settlement_key)
    inner = ExactEvm(None, {"eip155:31337"}, chains={"eip155:31337": rpc}, writes_ahead=True)
    return ExactWithPermit2(inner, {"eip155:31337": rpc}), rpc


def test_the_sdk_payload_is_parsed_and_keyed_offline_and_an_upto_one_is_not(chain: Devchain) -> None:
    requirements = permit2_requirements(_terms(chain), PRICE)
    assert requirements.extra == {"name": "Plain Dollar", "assetTransferMethod": "permit2"}
    upto = upto_requirements(_terms(chain, scheme="upto", maximum=Decimal("0.01")), PRICE, chain.address(9))
    assert "version" not in (upto.extra or {})  # no EIP-712 domain, no version: never "version": null
    payload = _pay(chain, requirements, 1).payload
    permit = parse_exact_permit2(payload)
    assert permit is not None and (permit.payer, permit.amount, permit.to) == (chain.address(1), PRICE, PAY_TO)
    view = payment_view(payload).authorization
    assert (view.from_, view.value, view.nonce) == (chain.address(1), str(PRICE), "0x" + permit.nonce.to_bytes(32, "big").hex())
    upto = copy.deepcopy(payload)
    upto["permit2Authorization"]["witness"]["facilitator"] = chain.address(2)
    for name, bad in (("upto", upto), ("nonce", {**payload, "permit2Authorization": {
            **payload["permit2Authorization"], "nonce": "0x12"}}), ("signature", {**payload, "signature": "zz"})):
        assert parse_exact_permit2(bad) is None, name


def test_settled_written_ahead_and_open_rows_resolved_from_the_chain(chain: Devchain, ledger: Ledger) -> None:
    scheme, rpc = _scheme(chain)
    requirements = permit2_requirements(_terms(chain), PRICE)
    rows: list[int] = []
    for payer in (3, 4, 5):
        payment = _pay(chain, requirements, payer)
        auth = payment_view(payment.payload).authorization
        rows.append(ledger.record_verified(
            request_id=f"r{payer}", owner="o", tool="t", decimals=6, method="GET", path="/t", network="eip155:31337",
            asset=requirements.asset, pay_to=PAY_TO, payer=auth.from_, nonce=auth.nonce, amount=PRICE,
            valid_before=int(auth.valid_before), authorization=json.dumps(payment.payload), settle_mode="after").id)
        assert asyncio.run(scheme.verify(payment, requirements)).is_valid
        if payer == 3:  # broadcast with the hash written ahead; the answer lost (a crash): row left settling

            async def ahead(tx_hash: str, row: int = rows[-1]) -> None:
                ledger.begin_settlement(row, None, tx_hash=tx_hash)

            assert asyncio.run(scheme.settle(payment, requirements, before_send=ahead)).success
        if payer == 4:  # settled by someone else through the proxy (it takes anyone's transaction)
            asyncio.run(scheme.settle(payment, requirements))
            ledger.begin_settlement(rows[-1], None)
        if payer == 5:  # never broadcast
            ledger.begin_settlement(rows[-1], None)
    assert all(moved_by_permit2(row) for row in ledger.all())
    resolved = asyncio.run(resolve_open_payments(ledger, Schemes([scheme])))
    assert {(r.payment_id, r.after, r.reason) for r in resolved} == {
        (rows[0], PaymentState.SETTLED.value, "receipt_success"),
        # our own account's other transaction used it (its request answers for it): failed here
        (rows[1], PaymentState.FAILED.value, "permit_used_elsewhere"),
        (rows[2], PaymentState.FAILED.value, "not_broadcast"),
    }
    asyncio.run(rpc.close())


def test_the_start_up_probe_says_what_a_token_lacks(chain: Devchain) -> None:
    _, rpc = _scheme(chain)
    usdc = PaymentTerms(network="eip155:31337", asset=chain.token, asset_name="USD Coin", asset_version="2",
                        decimals=6, pay_to=PAY_TO)
    plain_as_3009 = _terms(chain, asset_transfer_method="eip3009", asset_version="1")

    async def verdicts() -> list[str | None]:
        cases = [(usdc, False), (_terms(chain), True), (plain_as_3009, True), (plain_as_3009, False),
                 (_terms(chain, decimals=18), True), (_terms(chain, asset=chain.address(1)), True)]
        found = [await token_problem(rpc, terms, path) for terms, path in cases]
        await rpc.close()
        return [None if f is None else f[0] for f in found]

    assert asyncio.run(verdicts()) == [
        None, None, "asset_not_eip3009", "no_payment_path", "asset_mismatch", "asset_not_erc20"]
