"""``exact_guards`` alone: what ``InFlight`` holds and gives back, when it reads the chain, and that
``transfer_refusal`` costs an EOA nothing. Against anvil: tests/e2e/test_attacks_gas.py."""

from __future__ import annotations

import asyncio

import pytest

from settlement.errors import ChainUnavailable
from settlement.schemes.eip712 import TransferAuthorization
from settlement.schemes.exact_guards import InFlight, transfer_refusal

NET, TOKEN, PAYER = "eip155:31337", "0x" + "aa" * 20, "0x" + "bB" * 20


class Balance:
    def __init__(self, balance: int | None) -> None:
        self.balance, self.reads = balance, 0

    async def balance_of(self, token: str, owner: str) -> int:
        self.reads += 1
        if self.balance is None:
            raise ChainUnavailable("the node is away")
        return self.balance


def test_a_payers_first_settlement_reads_nothing_and_later_ones_read_the_balance() -> None:
    flights, chain = InFlight(), Balance(250)

    async def run() -> list[bool]:
        seen = []
        async with flights.hold(chain, NET, TOKEN, PAYER, 100) as first:
            seen.append(first)
            assert chain.reads == 0 and flights.taken(NET, TOKEN.upper(), PAYER.lower()) == 100
            async with flights.hold(chain, NET, TOKEN, PAYER, 100) as second:  # 200 <= 250
                seen.append(second)
                async with flights.hold(chain, NET, TOKEN, PAYER, 100) as third:  # 300 > 250: would revert
                    seen.append(third)
        return seen

    assert asyncio.run(run()) == [True, True, False]
    assert chain.reads == 2 and flights.taken(NET, TOKEN, PAYER) == 0 and not flights._taken  # nothing left behind


def test_a_hold_is_given_back_when_its_settlement_raises() -> None:
    flights = InFlight()

    async def run() -> None:
        async with flights.hold(Balance(0), NET, TOKEN, PAYER, 100):
            raise RuntimeError("the broadcast failed")

    with pytest.raises(RuntimeError):
        asyncio.run(run())
    assert flights.taken(NET, TOKEN, PAYER) == 0


def test_a_balance_read_that_fails_lets_the_settlement_through() -> None:
    flights = InFlight()

    async def run() -> bool:
        async with flights.hold(Balance(None), NET, TOKEN, PAYER, 100), flights.hold(Balance(None), NET, TOKEN, PAYER, 100) as second:
            return second

    assert asyncio.run(run()) is True  # as before the guard: the chain decides


def test_an_account_without_code_is_not_simulated() -> None:
    class NoCalls:
        async def get_code(self, address: str) -> bytes:
            raise AssertionError("verify read the code already")

        async def eth_call(self, to: str, data: bytes, *, gas: int | None = None, sender: str | None = None) -> bytes:
            raise AssertionError("an EOA's transfer is not simulated")

    auth = TransferAuthorization(from_=PAYER, to="0x" + "cc" * 20, value=1, valid_after=0, valid_before=2**40, nonce=bytes(32))
    assert asyncio.run(transfer_refusal(NoCalls(), b"", TOKEN, auth, bytes(65))) is None
