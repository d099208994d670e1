"""Which BatchSettler a process settles through (``settlement.schemes.batch_settlers``), on a real
anvil: of several listed, the one whose ``settler`` is the process's own account; none of them, or an
address that is no BatchSettler, is refused with its code before any payment."""

from __future__ import annotations

import asyncio

import pytest
from eth_account import Account

from gateway.devkit.devchain import ANVIL_ADDRESSES, ANVIL_KEYS, LOCAL_NETWORK, deploy_batch_settler
from settlement.chain.client import JsonRpcChain
from settlement.errors import SettlementError
from settlement.schemes.batch import BatchingFacilitator, BatchPolicy
from settlement.schemes.batch_settlers import choose_settler, settler_of
from settlement.schemes.exact_local import LocalFacilitator
from tests.conftest import Devchain


def run_with(devchain: Devchain, key: str, call):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, key)
        try:
            return await call(chain)
        finally:
            await chain.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def settlers(devchain: Devchain) -> list[str]:
    """BatchSettlers for anvil accounts 3 and 4 (not the dev deployment's own, account 0's)."""
    return [deploy_batch_settler(devchain.anvil.rpc_url, ANVIL_ADDRESSES[i]) for i in (3, 4)]


def test_each_account_takes_the_batch_settler_that_names_it(devchain: Devchain, settlers: list[str]) -> None:
    assert run_with(devchain, ANVIL_KEYS[3], lambda c: settler_of(c, settlers[1])) == ANVIL_ADDRESSES[4]
    assert run_with(devchain, ANVIL_KEYS[3], lambda c: choose_settler(LOCAL_NETWORK, c, settlers)) == settlers[0]
    assert run_with(devchain, ANVIL_KEYS[4], lambda c: choose_settler(LOCAL_NETWORK, c, settlers)) == settlers[1]
    # the order of the list does not matter: the contract's own settler decides
    assert run_with(devchain, ANVIL_KEYS[4], lambda c: choose_settler(LOCAL_NETWORK, c, settlers[::-1])) == settlers[1]


def test_an_account_no_listed_contract_names_is_refused(devchain: Devchain, settlers: list[str]) -> None:
    with pytest.raises(SettlementError) as refused:
        run_with(devchain, ANVIL_KEYS[5], lambda c: choose_settler(LOCAL_NETWORK, c, settlers))
    assert refused.value.code == "batch_settler_not_ours"
    assert ANVIL_ADDRESSES[5] in refused.value.message and ANVIL_ADDRESSES[3] in refused.value.message
    assert ANVIL_KEYS[5][2:] not in refused.value.message  # the account, never its key


@pytest.mark.parametrize("what", ["no code", "the token"])
def test_an_address_that_is_no_batch_settler_is_refused(devchain: Devchain, what: str) -> None:
    address = Account.create().address if what == "no code" else devchain.token  # the token has no settler()
    with pytest.raises(SettlementError) as refused:
        run_with(devchain, ANVIL_KEYS[3], lambda c: choose_settler(LOCAL_NETWORK, c, [address]))
    assert refused.value.code == "batch_settler_invalid"


def test_bind_points_the_network_at_the_chosen_contract(devchain: Devchain, settlers: list[str]) -> None:
    async def bound(chain: JsonRpcChain) -> tuple[str, str]:
        batching = BatchingFacilitator(
            LocalFacilitator({LOCAL_NETWORK: chain}), {LOCAL_NETWORK: chain}, {LOCAL_NETWORK: settlers[0]},
            {LOCAL_NETWORK: BatchPolicy()}, candidates={LOCAL_NETWORK: tuple(settlers)},
        )
        await batching.bind()
        return batching.settlers[LOCAL_NETWORK], batching._batchers[LOCAL_NETWORK].settler

    assert run_with(devchain, ANVIL_KEYS[4], bound) == (settlers[1], settlers[1])
    assert run_with(devchain, ANVIL_KEYS[3], bound) == (settlers[0], settlers[0])


def test_bind_checks_a_single_contract_too(devchain: Devchain) -> None:
    """The dev deployment's BatchSettler takes account 0's settlements: account 0 binds, another is refused."""
    assert devchain.deployment.batch_settler is not None
    contract = devchain.deployment.batch_settler

    async def bind(chain: JsonRpcChain) -> str:
        batching = BatchingFacilitator(LocalFacilitator({LOCAL_NETWORK: chain}), {LOCAL_NETWORK: chain},
                                       {LOCAL_NETWORK: contract}, {LOCAL_NETWORK: BatchPolicy()})
        await batching.bind()
        return batching.settlers[LOCAL_NETWORK]

    assert run_with(devchain, ANVIL_KEYS[0], bind) == contract
    with pytest.raises(SettlementError) as refused:
        run_with(devchain, ANVIL_KEYS[6], bind)
    assert refused.value.code == "batch_settler_not_ours"
