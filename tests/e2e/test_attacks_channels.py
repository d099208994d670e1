"""Attacks on the batch-settlement (channel) scheme as a free-rider and a griefer, against the real
stack: a private anvil with the escrow at its canonical address, the sample upstream, in-process
gateways paid by the official SDK client. Each test asserts chain balances, ledger rows and
upstream hits.

1. A payer whose channel has no payerAuthorizer (vouchers checked by the escrow through ERC-1271
   when the payer has code) delegates its EOA (EIP-7702) to a gas burner after its calls were
   accepted: its claim would revert the network's one claim transaction, every honest channel's
   calls with it, at every claim. Each claim is simulated first; a channel whose claim would revert
   is left out (channels_claims.Claimer._would_land).
2. The same payer asks for its refund: the claim of its accrued calls does not land, and a refund
   sent anyway gave back the whole deposit, the served calls included. No refund is sent until what
   is charged is claimed on chain (Claimer.close).
3. The local escrow's ``deposit`` took any ``collector`` and only checked its token balance after
   the call: a collector re-entering ``deposit`` had one transfer credited twice, and the gateway's
   refund paid the double credit out of the other payers' deposits. The escrow refuses re-entrant
   deposits (contracts/X402BatchSettlement.sol).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from x402 import x402Client
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.types import ChannelConfig
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.mechanisms.evm.signers import EthAccountSigner

from settlement.ledger import PaymentState
from settlement.schemes.channels import row_payment
from settlement.schemes.channels_contract import (
    _CONFIG,
    ESCROW_ADDRESS,
    SEL_CHANNELS,
    SEL_DEPOSIT,
)
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, running_devchain
from tests.e2e.test_attacks_gas import delegate_to_gas_burner, fresh_payer, send_tx, settler, spent
from tests.e2e.test_channel_paid_calls import PRICE, channel_gateway, pay_calls, upstream_calls

pytestmark = pytest.mark.e2e

ZERO = "0x" + "00" * 20
NEVER_BY_TIME = {"channel_claim_every_seconds": 600}
# The attacker's deposit collector (solc 0.8.37, optimizer 200, cancun), source:
#   contract ReentrantCollector {
#     address constant ESCROW = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
#     function collect(address, address token, uint256 amount, bytes32, bytes calldata data) external {
#       require(msg.sender == ESCROW, "escrow only");
#       if (data.length > 0) { (bool ok, ) = ESCROW.call(data); require(ok, "reentry failed"); }  // deposit again
#       else { require(IERC20(token).transfer(ESCROW, amount), "transfer failed"); }             // pay once
#     }
#   }
REENTRANT_COLLECTOR_INIT = bytes.fromhex(
    "6080604052348015600e575f5ffd5b506103428061001c5f395ff3fe608060405234801561000f575f5ffd5b5060043610610029575f"
    "3560e01c8063e416d8d31461002d575b5f5ffd5b61004061003b366004610236565b610042565b005b33734020074e9df2ce1dee5a9c1b"
    "5c3f541d02a10003146100985760405162461bcd60e51b815260206004820152600b60248201526a657363726f77206f6e6c7960a81b60"
    "448201526064015b60405180910390fd5b8015610153575f734020074e9df2ce1dee5a9c1b5c3f541d02a100036001600160a01b031683"
    "836040516100cd9291906102d7565b5f604051808303815f865af19150503d805f8114610106576040519150601f19603f3d011682016040"
    "523d82523d5f602084013e61010b565b606091505b505090508061014d5760405162461bcd60e51b815260206004820152600e6024820152"
    "6d1c99595b9d1c9e4819985a5b195960921b604482015260640161008f565b50610213565b60405163a9059cbb60e01b8152734020074e9d"
    "f2ce1dee5a9c1b5c3f541d02a100036004820152602481018590526001600160a01b0386169063a9059cbb906044016020604051808303815f"
    "875af11580156101b1573d5f5f3e3d5ffd5b505050506040513d601f19601f820116820180604052508101906101d591906102e6565b6102"
    "135760405162461bcd60e51b815260206004820152600f60248201526e1d1c985b9cd9995c8819985a5b1959608a1b604482015260640161"
    "008f565b505050505050565b80356001600160a01b0381168114610231575f5ffd5b919050565b5f5f5f5f5f5f60a0878903121561024b57"
    "5f5ffd5b6102548761021b565b95506102626020880161021b565b94506040870135935060608701359250608087013567ffffffffffffff"
    "ff81111561028b575f5ffd5b8701601f8101891361029b575f5ffd5b803567ffffffffffffffff8111156102b1575f5ffd5b896020828401"
    "0111156102c2575f5ffd5b60208201935080925050509295509295509295565b818382375f9101908152919050565b5f602082840312156102"
    "f6575f5ffd5b81518015158114610305575f5ffd5b939250505056fea2646970667358221220292e1619a3eba5b19ab2fea3893c5419b372"
    "f6a6b55e5e0c644d2f4728eb2dfb64736f6c63430008250033"
)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: the escrow holds only this module's channels (its balance is asserted)."""
    with running_devchain(tmp_path_factory.mktemp("channels-review")) as private:
        yield private


def _gateway(start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, **settings: Any) -> RunningGateway:
    return channel_gateway(start_gateway, chain, upstream, tmp_path, deployment_file=chain.deployment_file, **settings)


def _client(chain: Devchain, key: str, salt: str, deposit: int | None = None,
            payer_authorizer: str | None = None) -> x402Client:
    options = BatchSettlementEvmSchemeOptions(
        salt=salt, payer_authorizer=payer_authorizer,
        deposit_strategy=(lambda ctx: str(deposit)) if deposit is not None else None)
    client = x402Client()
    client.register("eip155:31337", BatchSettlementEvmScheme(Account.from_key(key), options))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": chain.token}]})
    return client


def _rows_of(gateway: RunningGateway, payer: str) -> list[Any]:
    return [r for r in gateway.ledger.all() if r.payer.lower() == payer.lower()]


def _transactions(chain: Devchain, start: int) -> Iterator[dict[str, Any]]:
    """Every transaction mined since block ``start`` (anvil mines one per block)."""
    for number in range(start, chain.w3.eth.block_number + 1):
        for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            yield cast(dict[str, Any], dict(tx))  # type: ignore[arg-type]


def _reverted_from_settler(chain: Devchain, start: int) -> list[tuple[str, int]]:
    """(tx hash, gas used) of every transaction the settlement account sent since ``start`` that reverted."""
    found = []
    me = settler(chain).lower()
    for tx in _transactions(chain, start):
        if str(tx["from"]).lower() == me:
            receipt = chain.w3.eth.get_transaction_receipt(tx["hash"])
            if receipt["status"] == 0:
                found.append((tx["hash"].hex(), int(receipt["gasUsed"])))
    return found


def _channel_state(chain: Devchain, channel_id: str) -> tuple[int, int]:
    raw = chain.w3.eth.call({"to": ESCROW_ADDRESS, "data": SEL_CHANNELS + bytes.fromhex(channel_id[2:])})
    return int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big")


def _refund_request(gateway: RunningGateway, key: str, config: ChannelConfig, charged: int) -> httpx.Response:
    """The payer's cooperative refund (x402 ``refund`` payload: its voucher at what is charged so far)."""
    with gateway.client() as http:
        required = json.loads(base64.b64decode(http.get("/quotes/ACME").headers["PAYMENT-REQUIRED"]))
    channel_id = compute_channel_id(config, 31337)
    voucher = sign_voucher(EthAccountSigner(Account.from_key(key)), channel_id, charged, "eip155:31337")
    payload = {"type": "refund", "channelConfig": config.to_dict(), "voucher": voucher.to_dict()}
    wire = {"x402Version": 2, "resource": required["resource"], "accepted": required["accepts"][0], "payload": payload}
    header = base64.b64encode(json.dumps(wire).encode()).decode()
    return httpx.get(f"{gateway.url}/quotes/ACME", headers={"PAYMENT-SIGNATURE": header}, timeout=60)


# -- 1. one channel whose payer has code reverts every claim of the network -----------------------------


def test_a_payer_delegating_to_code_after_its_calls_cannot_revert_every_claim_on_the_network(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack: the griefer opens a channel whose ``payerAuthorizer`` is zero (the SDK client allows
    it; the gateway then checks the voucher by ECDSA against the payer, offline), deposits 10 prices,
    buys 3 calls, then delegates its EOA (EIP-7702) to code whose ``isValidSignature`` burns all its
    gas. The escrow checks a zero-authorizer voucher through ERC-1271 when the payer has code, so its
    ``claimWithSignature`` entry reverts, and with it the network's single claim ``multicall``: an
    honest payer's 3 calls in the same claim are never claimed, the payee gets nothing, the rows stay
    ``settling``, and the gateway pays the whole claim gas limit for a revert at every claim (by
    count, by time, at start-up, at each refund), while the griefer can walk away with its deposit
    (``initiateWithdraw`` after 900 s: nothing was claimed). Cost to the attacker: one type-4
    transaction. Correct: one channel cannot stop the others' claims and no claim reverts on our
    gas: the claim is simulated and a channel whose entry fails is left out (and the payer refused
    further calls), or payers with code are refused at the voucher for zero-authorizer channels;
    here the honest payer's 3 calls are claimed (payee +3 prices, rows settled) and the settlement
    account sends no reverting transaction."""
    gateway = _gateway(start_gateway, chain, upstream, tmp_path, channel_claim_every_calls=6, **NEVER_BY_TIME)
    attacker = fresh_payer(chain, 10 * PRICE)
    honest = fresh_payer(chain, 100 * PRICE)
    attacker_address, honest_address = Account.from_key(attacker).address, Account.from_key(honest).address
    start = chain.w3.eth.block_number + 1
    attacker_client = _client(chain, attacker, "0x" + "e1" * 32, 10 * PRICE, ZERO)
    assert asyncio.run(pay_calls(gateway.url, attacker_client, 3)) == [200] * 3
    delegate_to_gas_burner(chain, attacker)
    payee_before, eth_before = chain.balance(PAY_TO), spent(chain)[1]

    # The honest payer's third call is the sixth voucher: it claims, in the request.
    assert asyncio.run(pay_calls(gateway.url, _client(chain, honest, "0x" + "e2" * 32, 10 * PRICE), 3)) == [200] * 3

    reverted = _reverted_from_settler(chain, start)
    honest_rows = _rows_of(gateway, honest_address)
    gained = chain.balance(PAY_TO) - payee_before
    assert upstream_calls(upstream) == 6
    assert len(honest_rows) == 3
    assert gained == 3 * PRICE and all(r.state == PaymentState.SETTLED for r in honest_rows) and not reverted, (
        f"the honest payer's 3 accepted calls were not claimed (payee +{gained}, rows "
        f"{sorted(r.state for r in honest_rows)}): the network's claim reverted {len(reverted)} time(s) "
        f"{reverted} on the gateway's gas ({eth_before - spent(chain)[1]} wei) because {attacker_address}'s "
        "channel (payerAuthorizer 0) now has code that fails ERC-1271")
    # Its channel was left out of the claim and takes no more calls: nothing more served on it.
    assert asyncio.run(pay_calls(gateway.url, attacker_client, 1)) == [402]
    assert upstream_calls(upstream) == 6


# -- 2. the refund after a failed claim gives back what was served -------------------------------------


def test_a_refund_request_never_gives_back_calls_already_served(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack: the free-rider opens a zero-authorizer channel with 10 prices, buys 5 calls (5
    answers from the upstream), delegates its EOA to a gas burner, then sends the cooperative refund
    request (its voucher at 5 prices, signed with its key). ``refund_request`` checks the voucher
    against what is charged (5 prices), then ``Claimer.close`` claims (the claim reverts: ERC-1271
    on the payer's code) and sends ``refund(config, 2**128-1)`` anyway; the escrow refunds
    everything not *claimed on chain*, i.e. all 10 prices. The attacker got 5 answers for nothing;
    the gateway paid the deposit, a reverted claim and the refund, and its ledger keeps 5 rows
    ``settling`` against a channel that is empty. Correct: a refund never takes back what is
    charged: the refund is at most ``balance - charged`` (or is refused unless the claim covering
    the channel landed): the attacker gets back 5 prices, not 10."""
    gateway = _gateway(start_gateway, chain, upstream, tmp_path, channel_claim_every_calls=1000, **NEVER_BY_TIME,
                       channel_min_deposit_calls=1)  # a refund after the first calls (the default waits for 10)
    attacker = fresh_payer(chain, 10 * PRICE)
    address = Account.from_key(attacker).address
    salt = "0x" + "e3" * 32
    assert asyncio.run(pay_calls(gateway.url, _client(chain, attacker, salt, 10 * PRICE, ZERO), 5)) == [200] * 5
    assert upstream_calls(upstream) == 5 and chain.balance(address) == 0
    [config] = {json.dumps(p.config.to_dict(), sort_keys=True) for p in map(row_payment, _rows_of(gateway, address)) if p}
    channel = ChannelConfig.from_dict(json.loads(config))
    delegate_to_gas_burner(chain, attacker)
    payee_before = chain.balance(PAY_TO)

    response = _refund_request(gateway, attacker, channel, 5 * PRICE)

    got_back = chain.balance(address)
    rows = _rows_of(gateway, address)
    balance, claimed = _channel_state(chain, compute_channel_id(channel, 31337))
    assert upstream_calls(upstream) == 5  # the refund bought nothing
    assert got_back <= 5 * PRICE, (
        f"the refund ({response.status_code} {response.text[:200]}) gave back {got_back} of the 10-price "
        f"deposit after 5 calls were served: the payee got {chain.balance(PAY_TO) - payee_before}, the channel "
        f"holds {balance} (claimed {claimed}) and the ledger still has {len(rows)} rows "
        f"{sorted({r.state for r in rows})} it can never claim")


# -- 3. the escrow credits a re-entrant deposit twice ---------------------------------------------------


def test_a_reentrant_deposit_collector_cannot_credit_a_channel_twice_and_have_the_gateway_refund_it(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack: ``X402BatchSettlement.deposit`` calls whatever ``collector`` it is given and credits
    ``amount`` when its token balance rose by ``amount`` since before the call. The attacker deploys
    a collector that, called by the escrow, calls ``deposit`` again for the same channel (inner call:
    it transfers ``amount`` once); the inner deposit sees +amount and credits it, then the outer
    deposit sees the same +amount and credits it again: 2 × amount in the channel for one transfer
    (k nested calls: k × amount). The attacker then sends the gateway a cooperative refund request
    (voucher at 0): the gateway refunds the channel's whole balance on its gas, paying the attacker
    the double credit out of an honest payer's deposit; the escrow is left holding less than the
    honest channel's unclaimed balance (its refund or withdrawal, and later claims' ``settle``, now
    revert). Cost: gas of three transactions. Correct: the escrow refuses re-entrant deposits
    (a reentrancy guard on ``deposit``, or only its own deposit collectors), so the channel holds
    what was paid in and the attacker gets back exactly what it put in."""
    gateway = _gateway(start_gateway, chain, upstream, tmp_path, channel_claim_every_calls=1000, **NEVER_BY_TIME,
                       channel_min_deposit_calls=1)  # a refund after the first calls (the default waits for 10)
    w3 = chain.w3
    honest = fresh_payer(chain, 20 * PRICE)
    assert asyncio.run(pay_calls(gateway.url, _client(chain, honest, "0x" + "e4" * 32, 20 * PRICE), 2)) == [200] * 2
    honest_rows = _rows_of(gateway, Account.from_key(honest).address)
    honest_channel = row_payment(honest_rows[0])
    assert honest_channel is not None

    stake = 18 * PRICE
    attacker = fresh_payer(chain, stake)
    address = Account.from_key(attacker).address
    collector = send_tx(w3, attacker, None, REENTRANT_COLLECTOR_INIT)["contractAddress"]
    transfer = bytes.fromhex("a9059cbb") + abi_encode(["address", "uint256"], [collector, stake])
    assert send_tx(w3, attacker, chain.token, transfer)["status"] == 1
    config = ChannelConfig(payer=address, payer_authorizer=address, receiver=PAY_TO,
                           receiver_authorizer=chain.deployment.deployer, token=chain.token, withdraw_delay=900,
                           salt="0x" + os.urandom(32).hex())
    config_tuple = (address, address, PAY_TO, chain.deployment.deployer, chain.token, 900,
                    bytes.fromhex(config.salt[2:]))
    inner = SEL_DEPOSIT + abi_encode([_CONFIG, "uint128", "address", "bytes"], [config_tuple, stake, collector, b""])
    outer = SEL_DEPOSIT + abi_encode([_CONFIG, "uint128", "address", "bytes"], [config_tuple, stake, collector, inner])
    escrow_before = chain.balance(ESCROW_ADDRESS)
    assert send_tx(w3, attacker, ESCROW_ADDRESS, outer)["status"] == 0  # the escrow refuses it (Reentrancy)
    credited, _ = _channel_state(chain, compute_channel_id(config, 31337))
    paid_in = chain.balance(ESCROW_ADDRESS) - escrow_before

    response = _refund_request(gateway, attacker, config, 0)

    honest_balance, honest_claimed = _channel_state(chain, honest_channel.channel_id)
    owed_to_honest = honest_balance - honest_claimed
    assert upstream_calls(upstream) == 2
    assert (credited, paid_in) == (0, 0) and chain.balance(address) == 0, (
        f"the escrow credited {credited} for {paid_in} paid in; the gateway's refund ({response.status_code} "
        f"{response.text[:160]}) paid the attacker {chain.balance(address)} for a stake of {stake}, and the "
        f"escrow now holds {chain.balance(ESCROW_ADDRESS)} against the honest channel's unclaimed {owed_to_honest}")
    assert chain.balance(ESCROW_ADDRESS) >= owed_to_honest  # the honest payer's deposit is whole
