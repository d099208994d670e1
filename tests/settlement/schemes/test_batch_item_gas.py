"""BatchSettler's per-item gas cap, on a real anvil: a payer whose code burns gas (an EIP-7702
delegation to a loop) costs its item ``ITEM_GAS`` and fails alone; legit items, a delegated EOA's
ERC-1271 check and a recipient's first credit included, fit well inside the cap; an item the
batch cannot give its full ``ITEM_GAS`` is skipped, and the batch transaction never reverts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from eth_account import Account
from web3 import Web3

from gateway.devkit.devchain import ANVIL_KEYS
from gateway.devkit.payer import Payer
from settlement.chain.client import JsonRpcChain, Receipt
from settlement.schemes.batch import BATCH_BASE_GAS, BATCH_ITEM_GAS, decode_revert, encode_batch, item_outcomes
from settlement.schemes.exact_local import LocalFacilitator
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse
from tests.conftest import Devchain
from tests.settlement.schemes.test_batch import facilitators, requirements, settle_all
from tests.support import chain_actions

ARTIFACT = Path(__file__).resolve().parents[3] / "contracts" / "build" / "BatchSettler.json"
# Runtime `JUMPDEST PUSH1 0 JUMP`: loops until it has burnt all the gas it was given.
GAS_BURNER_INIT = bytes.fromhex("635b6000566000526004601cf3")
SPONSOR = 9
PRICE = 1000


def constant(devchain: Devchain, name: str) -> int:
    abi = json.loads(ARTIFACT.read_text())["abi"]
    contract = devchain.w3.eth.contract(address=devchain.deployment.batch_settler, abi=abi)
    return int(getattr(contract.functions, name)().call())


def send(devchain: Devchain, key: str, to: str | None, data: bytes, *, gas: int = 1_000_000, **extra: Any) -> Any:
    w3: Web3 = devchain.w3
    account = Account.from_key(key)
    tx: dict[str, Any] = {
        "from": account.address, "data": data, "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "gas": gas, "maxFeePerGas": 50 * 10**9, "maxPriorityFeePerGas": 10**9, "chainId": 31337, **extra,
    }
    if to is not None:
        tx["to"] = Web3.to_checksum_address(to)
    return w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction))


def delegate(devchain: Devchain, key: str, code: str) -> None:
    """``key``'s account delegates (EIP-7702) to ``code``; the sponsor sends the transaction."""
    address = Account.from_key(key).address
    auth = Account.sign_authorization(
        {"chainId": 31337, "address": code, "nonce": devchain.w3.eth.get_transaction_count(address)}, key)
    send(devchain, devchain.key(SPONSOR), "0x000000000000000000000000000000000000dEaD", b"",
         type=4, authorizationList=[auth])
    assert devchain.w3.eth.get_code(address) == bytes.fromhex("ef0100") + bytes.fromhex(code[2:])


def fresh(devchain: Devchain) -> str:
    return chain_actions.fresh_payer(devchain.w3, devchain.token, devchain.key(SPONSOR), 10 * PRICE)


def token_calls(devchain: Devchain, tx_hash: str) -> list[dict[str, Any]]:
    """The batch's calls into the token, in order (callTracer): gas given, gas used, error."""
    trace = devchain.w3.provider.make_request(
        "debug_traceTransaction", [tx_hash, {"tracer": "callTracer"}])  # type: ignore[arg-type]
    return [c for c in trace["result"].get("calls", []) if c["to"].lower() == devchain.token.lower()]


def test_a_gas_burning_payer_costs_one_capped_item_and_the_rest_settles(devchain: Devchain) -> None:
    item_gas = constant(devchain, "ITEM_GAS")
    assert item_gas + item_gas // 63 + constant(devchain, "ITEM_RESERVE") < BATCH_ITEM_GAS + BATCH_BASE_GAS // 2
    burner = send(devchain, devchain.key(SPONSOR), None, GAS_BURNER_INIT)["contractAddress"]
    assert devchain.deployment.eip7702_delegate is not None
    honest, burning, delegated, burning2 = fresh(devchain), fresh(devchain), fresh(devchain), fresh(devchain)
    delegate(devchain, burning, burner)
    delegate(devchain, burning2, burner)
    delegate(devchain, delegated, devchain.deployment.eip7702_delegate)  # a legit 1271 check by the token
    req = requirements(devchain)
    first_credit = PaymentRequirements(**{**req.model_dump(), "pay_to": Account.create().address})
    payments: list[tuple[PaymentPayload, PaymentRequirements]] = [
        (Payer(burning).sign(req), req), (Payer(honest).sign(req), req),
        (Payer(delegated).sign(first_credit), first_credit), (Payer(burning2).sign(req), req),
    ]
    before = [devchain.balance(Account.from_key(k).address) for k in (burning, honest, delegated, burning2)]

    async def run() -> list[SettleResponse | BaseException]:
        chain, _, batching = facilitators(devchain, max_payments=len(payments), max_wait_ms=5_000)
        try:
            return await settle_all(batching, payments, [None] * len(payments))
        finally:
            await chain.close()

    results = asyncio.run(run())
    assert all(isinstance(r, SettleResponse) for r in results), results
    ok = [r.success for r in results if isinstance(r, SettleResponse)]
    assert ok == [False, True, True, False], results
    [tx_hash] = {r.transaction for r in results if isinstance(r, SettleResponse)}
    receipt = devchain.w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["status"] == 1
    assert receipt["gasUsed"] < BATCH_BASE_GAS + BATCH_ITEM_GAS * len(payments)
    after = [devchain.balance(Account.from_key(k).address) for k in (burning, honest, delegated, burning2)]
    assert [b - a for b, a in zip(before, after, strict=True)] == [0, PRICE, PRICE, 0]
    calls = token_calls(devchain, tx_hash)
    assert [int(c["gas"], 16) for c in calls] == [item_gas] * 4  # each call capped, none short-changed
    burnt, legit = [int(c["gasUsed"], 16) for c in calls[0::3]], [int(c["gasUsed"], 16) for c in calls[1:3]]
    assert all(item_gas * 63 // 64 <= used <= item_gas for used in burnt)  # what it was given, no more
    # Legit items, the dearest first (1271 check + first credit), fit with a wide margin.
    assert max(legit) <= item_gas - 15_000, legit


def test_a_batch_of_gas_burners_stays_within_the_gateways_gas_budget(devchain: Devchain) -> None:
    """The dearest batch there is: every item burns its whole cap. The gateway's limit still gives
    each item its full ``ITEM_GAS`` (none skipped), the transaction succeeds, and nothing moves."""
    item_gas = constant(devchain, "ITEM_GAS")
    burner = send(devchain, devchain.key(SPONSOR), None, GAS_BURNER_INIT)["contractAddress"]
    keys = [fresh(devchain) for _ in range(6)]
    for key in keys:
        delegate(devchain, key, burner)
    req = requirements(devchain)
    payments = [(Payer(k).sign(req), req) for k in keys]

    async def run() -> list[SettleResponse | BaseException]:
        chain, _, batching = facilitators(devchain, max_payments=len(payments), max_wait_ms=5_000)
        try:
            return await settle_all(batching, payments, [None] * len(payments))
        finally:
            await chain.close()

    results = asyncio.run(run())
    assert all(isinstance(r, SettleResponse) and not r.success for r in results), results
    assert {r.error_reason for r in results if isinstance(r, SettleResponse)} == {"invalid_exact_evm_payload_signature"}
    [tx_hash] = {r.transaction for r in results if isinstance(r, SettleResponse)}
    receipt = devchain.w3.eth.get_transaction_receipt(tx_hash)
    limit = devchain.w3.eth.get_transaction(tx_hash)["gas"]
    assert receipt["status"] == 1 and limit == BATCH_BASE_GAS + BATCH_ITEM_GAS * len(payments)
    print("GAS burners", receipt["gasUsed"], limit)
    assert [int(c["gas"], 16) for c in token_calls(devchain, tx_hash)] == [item_gas] * len(payments)
    assert [devchain.balance(Account.from_key(k).address) for k in keys] == [10 * PRICE] * len(payments)


def test_an_item_the_batch_cannot_give_its_full_gas_is_skipped_not_reverted(devchain: Devchain) -> None:
    item_gas = constant(devchain, "ITEM_GAS")
    req = requirements(devchain)
    keys = [fresh(devchain) for _ in range(3)]
    local = LocalFacilitator({req.network: JsonRpcChain(devchain.anvil.rpc_url, 31337, None)})
    items = [local.check_offline(Payer(k).sign(req), req) for k in keys]
    data = encode_batch(devchain.token, items)
    # Enough for the transaction and about one item: the first settles, the others are skipped.
    receipt = send(devchain, ANVIL_KEYS[0], str(devchain.deployment.batch_settler), data, gas=BATCH_BASE_GAS + item_gas)
    assert receipt["status"] == 1
    outcomes = item_outcomes(asyncio.run(parsed(devchain, receipt["transactionHash"].to_0x_hex())),
                             str(devchain.deployment.batch_settler))
    assert [outcomes[i][0] for i in range(3)] == [True, False, False]
    assert {decode_revert(outcomes[i][1]) for i in (1, 2)} == {"BatchSettler: out of gas"}
    assert [devchain.balance(Account.from_key(k).address) for k in keys] == [9 * PRICE, 10 * PRICE, 10 * PRICE]


async def parsed(devchain: Devchain, tx_hash: str) -> Receipt:
    chain = JsonRpcChain(devchain.anvil.rpc_url, 31337, None)
    try:
        receipt = await chain.get_receipt(tx_hash)
    finally:
        await chain.close()
    assert receipt is not None
    return receipt
