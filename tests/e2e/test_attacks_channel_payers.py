"""Review of the batch-settlement (channel) scheme as a free-rider and a griefer, against the real
stack: a private anvil with the escrow at its canonical address, the sample upstream, in-process
gateways paid by the official SDK client. Each test asserts chain balances or the settlement
account's transactions, ledger rows and upstream hits, not only status codes.

1. A cooperative refund request's ``amount`` is not signed, and the voucher it needs (one at what is
   charged) is public once a claim lands (the claim's calldata). Anyone can then ask for a refund of
   1 atomic unit, again and again: each request is a ``refund`` transaction on the gateway's gas
   (the README promises "once per claim").
2. A channel with no ``payerAuthorizer`` has its vouchers checked by the escrow through ERC-1271 as
   soon as the payer has code. The gateway checks them by ECDSA only, offline: a payer that delegated
   its EOA (EIP-7702) to code refusing every signature still gets its calls served, on vouchers the
   escrow refuses at that very moment.
3. The claim simulation that keeps such a channel out of the network's claim (``Claimer._would_land``)
   runs as an ``eth_call`` without a gas price: code that answers ERC-1271 only when ``GASPRICE`` is
   0 passes it, and the real claim (the honest channels' calls with it) reverts on the gateway's gas.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from eth_abi import decode as abi_decode
from eth_account import Account
from web3 import Web3
from x402 import x402Client
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id

from gateway.store.memory import MemoryStore
from gateway.wiring import build_schemes
from settlement.ledger import PaymentState
from settlement.schemes.channels_claims import Claimer
from settlement.schemes.channels_contract import (
    _CLAIM,
    ESCROW_ADDRESS,
    SEL_CHANNELS,
    SEL_CLAIM_WITH_SIGNATURE,
    SEL_MULTICALL,
)
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, running_devchain
from tests.e2e.test_attacks_gas import SPONSOR, delegate_to_gas_burner, fresh_payer, send_tx, settler, spent
from tests.e2e.test_channel_paid_calls import PRICE, channel_gateway, pay_calls, upstream_calls

pytestmark = pytest.mark.e2e

ZERO = "0x" + "00" * 20
NEVER_BY_TIME = {"channel_claim_every_seconds": 600}
# EIP-7702 delegate whose every call answers the ERC-1271 magic value when GASPRICE is 0 (an
# eth_call without a gas price: a simulation) and reverts otherwise (a real transaction):
#   GASPRICE ISZERO PUSH1 8 JUMPI  PUSH0 PUSH0 REVERT
#   JUMPDEST PUSH4 0x1626ba7e PUSH1 0xe0 SHL PUSH0 MSTORE PUSH1 0x20 PUSH0 RETURN
# prefixed by the init code that returns it (CODECOPY of 0x17 bytes from offset 9).
SIMULATION_ONLY_RUNTIME = bytes.fromhex("3a156008575f5ffd5b631626ba7e60e01b5f5260205ff3")
SIMULATION_ONLY_INIT = bytes.fromhex("60178060095f395ff3") + SIMULATION_ONLY_RUNTIME


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: the escrow and the settlement account serve only this module's channels."""
    with running_devchain(tmp_path_factory.mktemp("channels-review-2")) as private:
        yield private


def _gateway(start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, **settings: Any) -> RunningGateway:
    return channel_gateway(start_gateway, chain, upstream, tmp_path, deployment_file=chain.deployment_file, **settings)


def _client(chain: Devchain, key: str, salt: str, deposit: int, payer_authorizer: str | None = None) -> x402Client:
    options = BatchSettlementEvmSchemeOptions(salt=salt, payer_authorizer=payer_authorizer,
                                              deposit_strategy=lambda ctx: str(deposit))
    client = x402Client()
    client.register("eip155:31337", BatchSettlementEvmScheme(Account.from_key(key), options))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": chain.token}]})
    return client


def _rows_of(gateway: RunningGateway, payer: str) -> list[Any]:
    return [r for r in gateway.ledger.all() if r.payer.lower() == payer.lower()]


def _settler_transactions(chain: Devchain, start: int) -> list[tuple[dict[str, Any], Any]]:
    """(transaction, receipt) of everything the settlement account sent since block ``start``."""
    me, found = settler(chain).lower(), []
    for number in range(start, chain.w3.eth.block_number + 1):
        for mined in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            tx = cast(dict[str, Any], dict(mined))  # type: ignore[arg-type]
            if str(tx["from"]).lower() == me:
                found.append((tx, chain.w3.eth.get_transaction_receipt(tx["hash"])))
    return found


def _channel_state(chain: Devchain, channel_id: str) -> tuple[int, int]:
    raw = chain.w3.eth.call({"to": ESCROW_ADDRESS, "data": SEL_CHANNELS + bytes.fromhex(channel_id[2:])})
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")


def _public_vouchers(chain: Devchain, start: int) -> list[tuple[ChannelConfig, int, str]]:
    """What anyone reads in the claims mined since ``start``: each claimed (config, maxClaimable, signature)."""
    found = []
    for tx, receipt in _settler_transactions(chain, start):
        data = bytes(tx["input"])
        if tx["to"] != ESCROW_ADDRESS or data[:4] != SEL_MULTICALL or receipt["status"] != 1:
            continue
        [calls] = abi_decode(["bytes[]"], data[4:])
        for call in calls:
            if call[:4] != SEL_CLAIM_WITH_SIGNATURE:
                continue
            rows, _ = abi_decode([f"{_CLAIM}[]", "bytes"], call[4:])
            for (config, max_claimable), signature, _total in rows:
                payer, payer_authorizer, receiver, receiver_authorizer, token = map(Web3.to_checksum_address, config[:5])
                delay, salt = config[5:]
                found.append((ChannelConfig(payer=payer, payer_authorizer=payer_authorizer, receiver=receiver,
                                            receiver_authorizer=receiver_authorizer, token=token,
                                            withdraw_delay=int(delay), salt="0x" + salt.hex()),
                              int(max_claimable), "0x" + signature.hex()))
    return found


def _claim_now(gateway: RunningGateway) -> str:
    """One claim round of the network's accrued calls, as start-up and the claim by time run it."""

    async def claim() -> str:
        wiring = build_schemes(gateway.settings, gateway.catalogs)
        assert wiring.channels is not None
        try:
            return (await Claimer(wiring.channels, gateway.ledger, MemoryStore()).claim("eip155:31337")).reason
        finally:
            for chain in wiring.chains.values():
                await chain.close()

    return asyncio.run(claim())


def _delegate(chain: Devchain, key: str, init_code: bytes) -> None:
    """``key``'s EOA delegates (EIP-7702, one type-4 transaction sent by a sponsor) to ``init_code``'s contract."""
    w3 = chain.w3
    target = send_tx(w3, chain.key(SPONSOR), None, init_code)["contractAddress"]
    address = Account.from_key(key).address
    authorization = Account.sign_authorization(
        {"chainId": 31337, "address": target, "nonce": w3.eth.get_transaction_count(address)}, key)
    send_tx(w3, chain.key(SPONSOR), "0x000000000000000000000000000000000000dEaD", b"", type=4,
            authorizationList=[authorization])
    assert w3.eth.get_code(address) == bytes.fromhex("ef0100") + bytes.fromhex(target[2:])


# -- 1. unsigned partial refunds of a public voucher: a refund transaction per request -------------------


def test_a_public_voucher_cannot_make_the_gateway_send_a_refund_transaction_per_request(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack: an honest payer buys 2 calls on a 20-price channel; the claim (by count) lands and its
    calldata shows the voucher at 2 prices, which is what is charged. A third party, holding no key,
    wraps that voucher in a ``refund`` payload with ``amount: "1"`` (the amount is not signed) and
    sends it 5 times. ``refund_request`` checks the voucher is at what is charged (it is), the claim
    finds nothing to claim, and ``Claimer.close`` sends ``refund(config, 1)`` from the settlement
    account: 5 refund transactions on the gateway's gas, each giving back 1 atomic unit (and holding
    the honest payer's channel lock meanwhile). Unbounded: one HTTP request, one transaction, at no
    cost to the attacker, for as long as the channel holds anything unclaimed. Correct (the README:
    "the gas is the gateway's, once per claim"): a public voucher costs the gateway at most one
    refund transaction: a refund returns everything unclaimed, or a partial one is refused."""
    gateway = _gateway(start_gateway, chain, upstream, tmp_path, channel_claim_every_calls=2, **NEVER_BY_TIME,
                       channel_min_deposit_calls=1)  # a refund after 2 calls (the default waits for 10)
    payer_key = fresh_payer(chain, 20 * PRICE)
    payer = Account.from_key(payer_key).address
    start = chain.w3.eth.block_number + 1
    assert asyncio.run(pay_calls(gateway.url, _client(chain, payer_key, "0x" + "f7" * 32, 20 * PRICE), 2)) == [200] * 2
    assert {r.state for r in _rows_of(gateway, payer)} == {PaymentState.SETTLED}  # the claim landed
    [(config, charged, signature)] = _public_vouchers(chain, start)
    assert charged == 2 * PRICE and config.payer == payer
    channel_id = compute_channel_id(config, 31337)

    with gateway.client() as http:
        required = json.loads(base64.b64decode(http.get("/quotes/ACME").headers["PAYMENT-REQUIRED"]))
    payload = {"type": "refund", "channelConfig": config.to_dict(), "amount": "1",
               "voucher": {"channelId": channel_id, "maxClaimableAmount": str(charged), "signature": signature}}
    wire = {"x402Version": 2, "resource": required["resource"], "accepted": required["accepts"][0], "payload": payload}
    header = base64.b64encode(json.dumps(wire).encode()).decode()
    calls, rows = upstream_calls(upstream), sorted((r.id, r.state) for r in gateway.ledger.all())
    payer_before, nonce_before, eth_before = chain.balance(payer), *spent(chain)
    spam_start = chain.w3.eth.block_number + 1

    statuses = [httpx.get(f"{gateway.url}/quotes/ACME", headers={"PAYMENT-SIGNATURE": header}, timeout=60).status_code
                for _ in range(5)]

    sent = _settler_transactions(chain, spam_start)
    gas = sum(int(receipt["gasUsed"]) for _, receipt in sent)
    returned = chain.balance(payer) - payer_before
    balance, claimed = _channel_state(chain, channel_id)
    assert upstream_calls(upstream) == calls  # a refund buys nothing
    assert sorted((r.id, r.state) for r in gateway.ledger.all()) == rows
    assert spent(chain)[0] - nonce_before <= 1, (
        f"5 unsigned refund requests replaying the public voucher (statuses {statuses}) made the settlement "
        f"account send {spent(chain)[0] - nonce_before} transactions ({gas} gas, "
        f"{eth_before - spent(chain)[1]} wei of the gateway's) to give back {returned} atomic units in total; "
        f"the channel still holds {balance - claimed} unclaimed for the next request")


# -- 2. a zero-authorizer payer whose code already refuses its vouchers is still served ------------------


def test_a_payer_whose_code_already_refuses_its_vouchers_gets_no_more_calls(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack: the free-rider opens a channel with ``payerAuthorizer`` zero and 10 prices (one call,
    its deposit made by the gateway), then delegates its EOA (EIP-7702) to code whose
    ``isValidSignature`` burns all its gas. From now on the escrow checks its vouchers through
    ERC-1271 and refuses every one of them, but the gateway checks them by ECDSA against the payer,
    offline, and never looks at the payer's code: the next 3 calls are served (upstream hit, rows
    ``settling``) on vouchers that cannot be claimed. Their claim is later left out as unclaimable and
    the attacker withdraws its whole deposit after 900 s: every call free, again with each new channel.
    Correct: a voucher the escrow would refuse now is refused now (a zero-authorizer payer with code
    is checked as the escrow checks it, or zero-authorizer channels are refused): after the
    delegation no call reaches the upstream and no row is accepted."""
    gateway = _gateway(start_gateway, chain, upstream, tmp_path, channel_claim_every_calls=1000, **NEVER_BY_TIME)
    attacker = fresh_payer(chain, 10 * PRICE)
    address = Account.from_key(attacker).address
    client = _client(chain, attacker, "0x" + "f8" * 32, 10 * PRICE, ZERO)
    opened = asyncio.run(pay_calls(gateway.url, client, 1))  # the deposit, while a plain EOA
    assert opened in ([200], [402])  # 402: zero-authorizer channels refused, which also closes this hole
    delegate_to_gas_burner(chain, attacker)
    calls, payee_before = upstream_calls(upstream), chain.balance(PAY_TO)

    statuses = asyncio.run(pay_calls(gateway.url, client, 3))

    accepted = [r for r in _rows_of(gateway, address) if r.state in (PaymentState.SETTLING, PaymentState.SETTLED)]
    served = upstream_calls(upstream) - calls
    assert chain.balance(PAY_TO) == payee_before  # nothing was claimed for them
    assert served == 0 and len(accepted) <= 1, (
        f"after {address} delegated to code that refuses every voucher signature, {served} more calls reached "
        f"the upstream (statuses {statuses}) and {len(accepted)} rows are accepted: the escrow refuses these "
        "vouchers (ERC-1271 on the payer's code) but the gateway only recovered ECDSA offline")


# -- 3. the claim simulation is evaded by code that looks at GASPRICE -----------------------------------


def test_a_claim_that_passes_only_in_simulation_cannot_revert_the_honest_channels_claims(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack: the griefer opens a zero-authorizer channel (10 prices, one call), then delegates its
    EOA to 23 bytes of code whose ``isValidSignature`` answers the ERC-1271 magic value when
    ``GASPRICE`` is 0 and reverts otherwise. ``Claimer._would_land`` simulates the network's claim
    with an ``eth_call`` that sets no gas price (GASPRICE 0 on the node): the attacker's entry
    passes, the claim is broadcast, and on chain (GASPRICE > 0) its entry fails, reverting the whole
    ``multicall``: an honest payer's 3 calls in the same claim are not claimed, the payee gets
    nothing, the rows stay ``settling`` and the gateway pays for the revert, again at every claim
    (by count, by time, at start-up), while the attacker can withdraw its deposit after 900 s. Cost:
    one type-4 transaction. Correct: no claim of ours reverts because of one payer's code: the
    simulation runs as the transaction will (its gas price), or a code-dependent (zero-authorizer)
    channel never shares a claim with others / is refused; here the honest calls are claimed
    (payee +3 prices, rows settled), and the coded channel's own claim reverts at most once."""
    gateway = _gateway(start_gateway, chain, upstream, tmp_path, channel_claim_every_calls=1000, **NEVER_BY_TIME)
    attacker = fresh_payer(chain, 10 * PRICE)
    honest = fresh_payer(chain, 10 * PRICE)
    honest_address = Account.from_key(honest).address
    opened = asyncio.run(pay_calls(gateway.url, _client(chain, attacker, "0x" + "f9" * 32, 10 * PRICE, ZERO), 1))
    assert opened in ([200], [402])  # 402: zero-authorizer channels refused, which also closes this hole
    _delegate(chain, attacker, SIMULATION_ONLY_INIT)
    # The code answers a simulation and refuses a transaction.
    probe = {"to": Account.from_key(attacker).address, "data": "0x1626ba7e"}
    assert chain.w3.eth.call(probe)[:4] == bytes.fromhex("1626ba7e")  # type: ignore[arg-type]
    assert asyncio.run(pay_calls(gateway.url, _client(chain, honest, "0x" + "fa" * 32, 10 * PRICE), 3)) == [200] * 3
    start, payee_before, eth_before = chain.w3.eth.block_number + 1, chain.balance(PAY_TO), spent(chain)[1]

    reason = _claim_now(gateway)  # the network's claim round (by time, or at start-up)
    again = _claim_now(gateway)  # the next round: the coded channel is not tried again

    reverted = [(tx["hash"].hex(), int(receipt["gasUsed"])) for tx, receipt in _settler_transactions(chain, start)
                if receipt["status"] == 0]
    honest_rows = _rows_of(gateway, honest_address)
    gained = chain.balance(PAY_TO) - payee_before
    assert upstream_calls(upstream) == 3 + opened.count(200) and len(honest_rows) == 3
    # The payer's code is asked on chain only in a claim of its own: once (it may be an honest wallet
    # delegated since), never in the honest channels' claim, never again once it reverted.
    assert gained == 3 * PRICE and all(r.state == PaymentState.SETTLED for r in honest_rows) and len(reverted) <= 1, (
        f"the honest payer's 3 calls were not claimed (payee +{gained}, rows {sorted(r.state for r in honest_rows)}): "
        f"the claims ({reason}, then {again}) reverted on chain {len(reverted)} time(s) "
        f"{reverted} on the gateway's gas ({eth_before - spent(chain)[1]} wei)")
