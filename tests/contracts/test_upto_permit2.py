"""Permit2 and the x402 upto proxy on the dev chain: the official x402 SDK's ``upto`` client signs for
the local network, and its signature spends through our contracts at the canonical addresses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from eth_account import Account
from web3 import Web3
from web3.exceptions import ContractCustomError
from x402.mechanisms.evm.constants import PERMIT2_ADDRESS, X402_UPTO_PERMIT2_PROXY_ABI, X402_UPTO_PERMIT2_PROXY_ADDRESS
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequirements

from gateway.devkit.permit2 import MAX_UINT256
from tests.conftest import Devchain, running_devchain

PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
MAX = 50_000


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    # Its own anvil: these tests send from the settlement account, whose nonce others track.
    with running_devchain(tmp_path_factory.mktemp("upto")) as devchain:
        yield devchain


def _requirements(chain: Devchain, pay_to: str = PAY_TO) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="upto", network="eip155:31337", asset=chain.token, amount=str(MAX), pay_to=pay_to,
        max_timeout_seconds=300,
        extra={"name": "USD Coin", "version": "2", "facilitatorAddress": chain.deployment.deployer},
    )


def _sign(chain: Devchain, payer: int, pay_to: str = PAY_TO) -> dict[str, Any]:
    client = UptoEvmClientScheme(Account.from_key(chain.key(payer)))
    payload: dict[str, Any] = client.create_payment_payload(_requirements(chain, pay_to))
    return payload


def _settle_args(payload: dict[str, Any], amount: int) -> tuple[Any, ...]:
    auth = payload["permit2Authorization"]
    permit = ((auth["permitted"]["token"], int(auth["permitted"]["amount"])), int(auth["nonce"]), int(auth["deadline"]))
    w = auth["witness"]
    witness = (w["to"], w["facilitator"], int(w["validAfter"]))
    return permit, amount, auth["from"], witness, bytes.fromhex(payload["signature"][2:])


def _proxy(chain: Devchain) -> Any:
    return chain.w3.eth.contract(address=X402_UPTO_PERMIT2_PROXY_ADDRESS, abi=X402_UPTO_PERMIT2_PROXY_ABI)


def _send(chain: Devchain, args: tuple[Any, ...]) -> dict[str, Any]:
    tx = _proxy(chain).functions.settle(*args).transact({"from": chain.deployment.deployer})
    return dict(chain.w3.eth.wait_for_transaction_receipt(tx))


def test_contracts_sit_at_the_canonical_addresses_and_payers_approved_permit2(chain: Devchain) -> None:
    assert chain.deployment.permit2 == PERMIT2_ADDRESS
    assert chain.deployment.upto_proxy == Web3.to_checksum_address(X402_UPTO_PERMIT2_PROXY_ADDRESS)
    assert chain.w3.eth.get_code(PERMIT2_ADDRESS) and chain.w3.eth.get_code(X402_UPTO_PERMIT2_PROXY_ADDRESS)
    allowance = chain.w3.eth.contract(address=chain.token, abi=[{
        "type": "function", "name": "allowance", "stateMutability": "view",
        "inputs": [{"name": "o", "type": "address"}, {"name": "s", "type": "address"}],
        "outputs": [{"name": "", "type": "uint256"}]}]).functions.allowance
    assert all(allowance(a.address, PERMIT2_ADDRESS).call() == MAX_UINT256 for a in chain.deployment.accounts)


def test_sdk_signature_settles_the_actual_amount_once(chain: Devchain) -> None:
    payload = _sign(chain, 2)
    args = _settle_args(payload, 12_345)
    _proxy(chain).functions.settle(*args).call({"from": chain.deployment.deployer})  # verifies as is
    payer, before = chain.address(2), chain.balance(PAY_TO)
    payer_before = chain.balance(payer)
    assert _send(chain, args)["status"] == 1
    assert chain.balance(PAY_TO) - before == 12_345 and payer_before - chain.balance(payer) == 12_345
    with pytest.raises(ContractCustomError) as replay:  # the nonce is spent: once only
        _proxy(chain).functions.settle(*args).call({"from": chain.deployment.deployer})
    assert "0x756688fe" in str(replay.value)  # InvalidNonce()


@pytest.mark.parametrize("mutate", ["amount_over_max", "permitted", "deadline", "to", "owner", "nonce", "facilitator"])
def test_a_mutated_field_is_refused(chain: Devchain, mutate: str) -> None:
    permit, amount, owner, witness, sig = _settle_args(_sign(chain, 3), 1_000)
    (token, permitted), nonce, deadline = permit
    if mutate == "amount_over_max":
        amount = permitted + 1
    elif mutate == "permitted":
        permit = ((token, permitted + 1), nonce, deadline)
    elif mutate == "deadline":
        permit = ((token, permitted), nonce, deadline + 1)
    elif mutate == "to":
        witness = (chain.address(4), witness[1], witness[2])
    elif mutate == "owner":
        owner = chain.address(4)
    elif mutate == "nonce":
        permit = ((token, permitted), nonce + 1, deadline)
    elif mutate == "facilitator":
        witness = (witness[0], chain.address(5), witness[2])
    with pytest.raises(ContractCustomError):
        _proxy(chain).functions.settle(permit, amount, owner, witness, sig).call({"from": chain.deployment.deployer})


def test_only_the_witness_facilitator_may_settle(chain: Devchain) -> None:
    args = _settle_args(_sign(chain, 3), 1_000)
    with pytest.raises(ContractCustomError) as refused:
        _proxy(chain).functions.settle(*args).call({"from": chain.address(5)})
    assert "0x0f6fae87" in str(refused.value)  # UnauthorizedFacilitator()


def test_a_signature_over_another_pay_to_is_refused(chain: Devchain) -> None:
    other = _sign(chain, 3, pay_to=chain.address(6))
    permit, amount, owner, _, sig = _settle_args(other, 1_000)
    ours = (PAY_TO, chain.deployment.deployer, 0)
    with pytest.raises(ContractCustomError):
        _proxy(chain).functions.settle(permit, amount, owner, ours, sig).call({"from": chain.deployment.deployer})

