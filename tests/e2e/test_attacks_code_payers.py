"""Attacks by payers whose account has code that tells a simulation from the real transaction,
found by review and fixed: a mined settlement that fails where its nonce, balance and window do not
explain it strikes its payer (if it has code) for an hour in every process
(``exact_guards.InFlight.struck``, 402 ``payer_code_reverted``), so each such account costs the
gateway one reverted settlement, not one per round. What the review found:

Every gas guard of the settlement account that looks at a payer's code is an ``eth_call`` without a
gas price: ``exact_guards.transfer_refusal`` (verify, EIP-3009), ``wallets.WalletSignatures.check``
(the direct ``isValidSignature``), ``UptoEvm._simulate`` (upto, in verify and again in settle). On
the node such a call runs with ``GASPRICE == 0``; a mined transaction never does. Twenty-four bytes
of code (``SIM_BURNER_RUNTIME``) answer the ERC-1271 magic value when ``GASPRICE`` is 0 and otherwise
loop until every unit of gas they were given is gone. The payer sets it up once (a deployment, which
any number of accounts can share, and one EIP-7702 delegation per account, or for a contract wallet
nothing more than holding one price), then signs for free with fresh nonces: every simulation says
yes, every settlement the gateway broadcasts burns its gas limit and reverts (a batch item burns its
``ITEM_GAS`` and fails), nothing moves, and the next round is the same. Nothing remembers that this
payer's code reverted a settlement: no per-payer bound, no breaker, no hold.

The invariant asserted by each test: after the first settlement a payer's code made revert, that
payer cannot make the gateway broadcast another one that reverts (at most one within the test's
rounds, which take well under an hour). Each test also asserts what must hold today and does: no
content served, the payer's balance untouched, no row settled.

Private anvil for the module: the settlement account's nonce and ETH are this module's alone.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import Web3
from x402 import x402Client
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequired as SdkPaymentRequired

from gateway.devkit.payer import Payer
from settlement.chain.client import selector
from settlement.ledger import PaymentState
from settlement.schemes.upto_permit import PERMIT2_ADDRESS
from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentRequirements
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of, running_devchain, upstream_hits
from tests.e2e.test_attacks_gas import FUNDER, QUOTE_PRICE, SPONSOR, fresh_payer, pay_header, send_tx, settler, spent
from tests.e2e.test_upto_paid_call import MAXIMUM as UPTO_MAXIMUM
from tests.e2e.test_upto_paid_call import PRICE as UPTO_PRICE
from tests.e2e.test_upto_paid_call import _gateway as upto_gateway
from tests.e2e.test_upto_paid_call import _offer as upto_offer
from tests.support import chain_actions

pytestmark = pytest.mark.e2e

ROUNDS = 4  # fresh signatures after the setup; the invariant allows one revert among them
# Runtime (24 bytes): GASPRICE ISZERO PUSH1 9 JUMPI | JUMPDEST PUSH1 5 JUMP (loop: burn all gas) |
# JUMPDEST PUSH4 0x1626ba7e PUSH1 0xe0 SHL PUSH0 MSTORE PUSH1 0x20 PUSH0 RETURN (the ERC-1271 magic).
# Every call (isValidSignature whatever its arguments) says yes in an eth_call without a gas price,
# and burns what it is given in a mined transaction.
SIM_BURNER_RUNTIME = bytes.fromhex("3a156009575b6005565b631626ba7e60e01b5f5260205ff3")
SIM_BURNER_INIT = bytes.fromhex("60188060095f395ff3") + SIM_BURNER_RUNTIME
SEL_APPROVE = selector("approve(address,uint256)")


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("code-payers-review")) as private:
        yield private


@pytest.fixture(scope="module")
def sim_burner(chain: Devchain) -> tuple[str, int]:
    """The attacker's code, deployed once (any number of accounts delegate to it): (address, gas paid)."""
    receipt = send_tx(chain.w3, chain.key(SPONSOR), None, SIM_BURNER_INIT)
    address = receipt["contractAddress"]
    assert chain.w3.eth.get_code(address) == SIM_BURNER_RUNTIME
    # It answers a simulation (no gas price) and would burn a transaction's gas.
    probe: Any = {"to": address, "data": "0x1626ba7e" + "00" * 96}
    assert bytes(chain.w3.eth.call(probe))[:4] == bytes.fromhex("1626ba7e")
    return address, _gas(receipt)


def _wei(receipt: Any) -> int:
    return int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])


def _gas(receipt: Any) -> int:
    return int(receipt["gasUsed"])


def _delegate(chain: Devchain, key: str, target: str) -> int:
    """``key``'s EOA delegates (EIP-7702, one type-4 transaction sent by a sponsor) to ``target``; gas paid."""
    w3 = chain.w3
    address = Account.from_key(key).address
    authorization = Account.sign_authorization(
        {"chainId": 31337, "address": target, "nonce": w3.eth.get_transaction_count(address)}, key)
    receipt = send_tx(w3, chain.key(SPONSOR), "0x000000000000000000000000000000000000dEaD", b"", type=4,
                      authorizationList=[authorization])
    assert w3.eth.get_code(address) == bytes.fromhex("ef0100") + bytes.fromhex(target[2:])
    return _gas(receipt)


def _settler_sent(chain: Devchain, start: int) -> list[Any]:
    """Receipts of everything the settlement account sent since block ``start``."""
    me, found = settler(chain).lower(), []
    for number in range(start, chain.w3.eth.block_number + 1):
        for tx in chain.w3.eth.get_block(number, full_transactions=True)["transactions"]:
            if str(tx["from"]).lower() == me:  # type: ignore[index]
                found.append(chain.w3.eth.get_transaction_receipt(tx["hash"]))  # type: ignore[index]
    return found


def _rows(gateway: RunningGateway, payer: str) -> list[Any]:
    return [r for r in gateway.ledger.all() if r.payer.lower() == payer.lower()]


def _summary(chain: Devchain, start: int, eth_before: int) -> tuple[list[Any], list[int], int]:
    """(reverted receipts, gas of each settlement-account transaction, wei the account spent) since ``start``."""
    sent = _settler_sent(chain, start)
    return [r for r in sent if r["status"] == 0], [int(r["gasUsed"]) for r in sent], eth_before - spent(chain)[1]


def _junk_wallet_header(wallet: str, requirements: PaymentRequirements, resource: Any = None) -> dict[str, Any]:
    """An exact payment ``from`` a contract wallet, signed by nobody: the signature is 96 random bytes
    (not ECDSA of anyone, not ERC-6492), which only the wallet's ``isValidSignature`` judges."""
    payload = Payer("0x" + "11" * 32).sign(requirements, resource=resource, overrides={"from_": wallet}).to_wire()
    payload["payload"]["signature"] = "0x" + os.urandom(96).hex()
    return payload


# -- 1. exact (EIP-3009), paid path: an EIP-7702 payer -----------------------------------------------


def test_a_7702_payer_whose_code_passes_only_simulations_cannot_revert_settlement_after_settlement(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, sim_burner: tuple[str, int],
) -> None:
    """Attack: a fresh EOA holding one price delegates (once) to ``SIM_BURNER_RUNTIME``, then pays
    ``/quotes/…`` round after round with ordinary ECDSA signatures over fresh nonces. Verify recovers
    the signature offline, reads nonce and balance, sees code and simulates the transfer
    (``transfer_refusal``): an ``eth_call`` with no gas price, where the code answers the magic value.
    Settle sends ``transferWithAuthorization`` with no new simulation; on chain the token asks the
    code, which burns the 150,000 gas limit, and the transfer reverts. The upstream ran first
    (``settle: after``). Correct: the first revert marks the payer; it cannot make the gateway
    broadcast another settlement that reverts."""
    gateway = start_gateway(deployment_file=chain.deployment_file)
    key = fresh_payer(chain, QUOTE_PRICE)
    address = Account.from_key(key).address
    setup_gas = sim_burner[1] + _delegate(chain, key, sim_burner[0])
    start, (nonce_before, eth_before) = chain.w3.eth.block_number + 1, spent(chain)
    symbols = [f"SMX{chr(65 + i)}" for i in range(ROUNDS)]
    hits_before = sum(upstream_hits(upstream, f"GET /api/v1/quote/{s}") for s in symbols)
    answers = []
    with gateway.client() as client:
        for symbol in symbols:
            path = f"/quotes/{symbol}"
            answers.append(client.get(path, headers={"PAYMENT-SIGNATURE": pay_header(client, key, path)}, timeout=60))

    reverted, gas, wei = _summary(chain, start, eth_before)
    rows = _rows(gateway, address)
    upstream_calls = sum(upstream_hits(upstream, f"GET /api/v1/quote/{s}") for s in symbols) - hits_before
    # What holds today: nothing served, nothing moved, nothing recorded as paid.
    assert all(a.status_code != 200 for a in answers), [(a.status_code, a.text[:160]) for a in answers]
    assert chain.balance(address) == QUOTE_PRICE
    assert not any(r.state == PaymentState.SETTLED for r in rows)
    # The invariant.
    assert len(reverted) <= 1 and spent(chain)[0] - nonce_before <= 1, (
        f"{ROUNDS} rounds of free ECDSA signatures from a payer delegated once to code that passes only "
        f"simulations: {spent(chain)[0] - nonce_before} settlements broadcast, {len(reverted)} reverted "
        f"(gas per transaction {gas}, {wei} wei of the gateway's), {upstream_calls} upstream calls run for "
        f"nothing; statuses {[a.status_code for a in answers]}, rows {[(str(r.state), r.error_reason) for r in rows]}; "
        f"the attacker paid {setup_gas} gas once (deployment + delegation) and 0 per round, its balance intact")


# -- 2. exact, paid path: a contract wallet, no key at all --------------------------------------------


def test_a_contract_wallet_that_passes_only_simulations_cannot_revert_settlement_after_settlement(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str,
) -> None:
    """Attack: the same 24 bytes deployed as a contract wallet holding one price. The attacker needs no
    key: each payment's signature is 96 random bytes. ``wallet_check`` asks ``isValidSignature`` by
    ``eth_call`` (GASPRICE 0: magic), verify simulates the ``bytes`` overload (GASPRICE 0: success),
    settle sends the ``bytes`` overload with a 400,000 gas limit, which the wallet burns on chain.
    Correct: at most one such settlement is broadcast for this wallet."""
    gateway = start_gateway(deployment_file=chain.deployment_file)
    deployed = send_tx(chain.w3, chain.key(SPONSOR), None, SIM_BURNER_INIT)
    wallet = deployed["contractAddress"]
    chain_actions.transfer(chain.w3, chain.token, chain.key(FUNDER), wallet, QUOTE_PRICE)
    start, (nonce_before, eth_before) = chain.w3.eth.block_number + 1, spent(chain)
    symbols = [f"SMW{chr(65 + i)}" for i in range(ROUNDS)]
    hits_before = sum(upstream_hits(upstream, f"GET /api/v1/quote/{s}") for s in symbols)
    answers = []
    with gateway.client() as client:
        for symbol in symbols:
            path = f"/quotes/{symbol}"
            offer = offer_of(client.get(path))
            header = encode_header(_junk_wallet_header(wallet, offer.accepts[0], offer.resource))
            answers.append(client.get(path, headers={"PAYMENT-SIGNATURE": header}, timeout=60))

    reverted, gas, wei = _summary(chain, start, eth_before)
    rows = _rows(gateway, wallet)
    upstream_calls = sum(upstream_hits(upstream, f"GET /api/v1/quote/{s}") for s in symbols) - hits_before
    assert all(a.status_code != 200 for a in answers), [(a.status_code, a.text[:160]) for a in answers]
    assert chain.balance(wallet) == QUOTE_PRICE
    assert not any(r.state == PaymentState.SETTLED for r in rows)
    assert len(reverted) <= 1 and spent(chain)[0] - nonce_before <= 1, (
        f"{ROUNDS} rounds of random-byte signatures from a contract wallet that passes only simulations: "
        f"{spent(chain)[0] - nonce_before} settlements broadcast, {len(reverted)} reverted (gas per transaction "
        f"{gas}, {wei} wei of the gateway's), {upstream_calls} upstream calls; statuses "
        f"{[a.status_code for a in answers]}, rows {[(str(r.state), r.error_reason) for r in rows]}; the attacker "
        f"paid {_gas(deployed)} gas once (the wallet's deployment), holds no key, and pays 0 per round")


# -- 3. exact, batched (BatchSettler): failed items, each its ITEM_GAS -------------------------------


def test_a_7702_payer_whose_code_passes_only_simulations_cannot_fail_batch_item_after_batch_item(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, sim_burner: tuple[str, int],
) -> None:
    """Attack: as in 1, with ``X402GW_BATCH_SETTLEMENT``. The batch transaction itself succeeds, but
    the attacker's item burns its ``ITEM_GAS`` (90,000) inside it and fails (``Failed`` event), on the
    gateway's gas, round after round (and takes a slot of an honest payer's batch). Correct: after
    its first failed item, this payer's payments are not put in a batch again."""
    gateway = start_gateway(deployment_file=chain.deployment_file,
                            batch_settlement={"eip155:31337": {"max_wait_ms": 20, "max_payments": 50}})
    key = fresh_payer(chain, QUOTE_PRICE)
    address = Account.from_key(key).address
    setup_gas = _delegate(chain, key, sim_burner[0])
    start, (nonce_before, eth_before) = chain.w3.eth.block_number + 1, spent(chain)
    symbols = [f"SMB{chr(65 + i)}" for i in range(ROUNDS)]
    answers = []
    with gateway.client() as client:
        for symbol in symbols:
            path = f"/quotes/{symbol}"
            answers.append(client.get(path, headers={"PAYMENT-SIGNATURE": pay_header(client, key, path)}, timeout=60))

    reverted, gas, wei = _summary(chain, start, eth_before)
    rows = _rows(gateway, address)
    batch_settler = chain.deployment.batch_settler
    failed_items = [r for r in rows if r.tx_hash and r.state == PaymentState.FAILED]
    sent_to = {str(chain.w3.eth.get_transaction(r.tx_hash)["to"]).lower() for r in failed_items}  # type: ignore[arg-type]
    assert all(a.status_code != 200 for a in answers), [(a.status_code, a.text[:160]) for a in answers]
    assert chain.balance(address) == QUOTE_PRICE
    assert not any(r.state == PaymentState.SETTLED for r in rows)
    assert len(failed_items) <= 1 and spent(chain)[0] - nonce_before <= 1, (
        f"{ROUNDS} rounds from a payer delegated once to code that passes only simulations: "
        f"{spent(chain)[0] - nonce_before} batches broadcast (to {sent_to}, the BatchSettler is "
        f"{str(batch_settler).lower()}), {len(failed_items)} of its items failed on chain, {len(reverted)} whole "
        f"batches reverted (gas per batch {gas}, {wei} wei of the gateway's); statuses "
        f"{[a.status_code for a in answers]}, rows {[(str(r.state), r.error_reason) for r in rows]}; the attacker "
        f"paid {setup_gas} gas once (its delegation; the code is shared) and 0 per round")


# -- 4. exact through the served /facilitator/settle --------------------------------------------------


def test_the_served_facilitator_does_not_broadcast_settlement_after_settlement_for_a_simulation_only_wallet(
    start_gateway: GatewayFactory, chain: Devchain,
) -> None:
    """Attack: the contract wallet of 2 (no key, random-byte signatures) through ``/facilitator/settle``
    for the gateway's own payTo and asset. /settle runs the full verify (wallet check, nonce, balance,
    the simulated transfer: all pass without a gas price) and broadcasts a 400,000-gas transfer that
    the wallet burns. Anyone can repeat it at the facilitator's rate limit (60 a minute per client
    address), no content involved. Correct: at most one such broadcast for this wallet."""
    gateway = start_gateway(deployment_file=chain.deployment_file, serve_facilitator=True)
    deployed = send_tx(chain.w3, chain.key(SPONSOR), None, SIM_BURNER_INIT)
    wallet = deployed["contractAddress"]
    chain_actions.transfer(chain.w3, chain.token, chain.key(FUNDER), wallet, 3000)
    requirements = {
        "scheme": "exact", "network": "eip155:31337", "amount": "3000", "asset": chain.token, "payTo": PAY_TO,
        "maxTimeoutSeconds": 60, "extra": {"name": "USD Coin", "version": "2"},
    }
    reqs = PaymentRequirements.model_validate(requirements)
    start, (nonce_before, eth_before) = chain.w3.eth.block_number + 1, spent(chain)
    answers = []
    with gateway.client() as client:
        for _ in range(ROUNDS):
            body = {"x402Version": 2, "paymentPayload": _junk_wallet_header(wallet, reqs), "paymentRequirements": requirements}
            verified = client.post("/facilitator/verify", json=body).json()
            answers.append((verified.get("isValid"), client.post("/facilitator/settle", json=body, timeout=60).json()))

    reverted, gas, wei = _summary(chain, start, eth_before)
    assert not any(settled.get("success") for _, settled in answers)
    assert chain.balance(wallet) == 3000
    assert len(reverted) <= 1 and spent(chain)[0] - nonce_before <= 1, (
        f"{ROUNDS} /facilitator/settle calls with random-byte signatures from a wallet that passes only "
        f"simulations: {spent(chain)[0] - nonce_before} transfers broadcast, {len(reverted)} reverted (gas per "
        f"transaction {gas}, {wei} wei of the gateway's); verify said {[v for v, _ in answers]}, settle said "
        f"{[(s.get('success'), s.get('errorReason')) for _, s in answers]}; the attacker paid {_gas(deployed)} gas once")


# -- 5. upto (Permit2), paid path: an EIP-7702 payer --------------------------------------------------


def _upto_header(chain: Devchain, key: str, required: dict[str, Any]) -> str:
    client = x402Client()
    client.register("eip155:31337", UptoEvmClientScheme(Account.from_key(key)))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": chain.token}]})
    payload = asyncio.run(client.create_payment_payload(SdkPaymentRequired.model_validate(required)))
    return base64.b64encode(json.dumps(payload.model_dump(mode="json", by_alias=True, exclude_none=True)).encode()).decode()


def test_an_upto_7702_payer_whose_code_passes_only_simulations_cannot_revert_settlement_after_settlement(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, sim_burner: tuple[str, int],
) -> None:
    """Attack: a fresh EOA holding one signed maximum approves Permit2 and delegates (once each) to
    ``SIM_BURNER_RUNTIME``, then pays the upfront ``/reports/…`` tool with the SDK's upto client (fresh
    Permit2 nonces, ECDSA). Permit2 sees code at the payer and asks ``isValidSignature``. Verify and
    settle both simulate the proxy's ``settle`` from the settlement account (``UptoEvm._simulate``:
    ``from`` set, no gas price), and both pass; the broadcast (200,000 gas) is burnt by the code and
    reverts. Correct: after the first revert this payer gets no further broadcast."""
    gateway = upto_gateway(start_gateway, chain, upstream, tmp_path, deployment_file=chain.deployment_file)
    key = fresh_payer(chain, UPTO_MAXIMUM)
    address = Account.from_key(key).address
    approve = send_tx(chain.w3, key, chain.token,
                      SEL_APPROVE + abi_encode(["address", "uint256"], [Web3.to_checksum_address(PERMIT2_ADDRESS), 2**256 - 1]))
    assert approve["status"] == 1
    setup_gas = _gas(approve) + _delegate(chain, key, sim_burner[0])
    start, (nonce_before, eth_before) = chain.w3.eth.block_number + 1, spent(chain)
    paths = [f"/reports/sim-{i}" for i in range(ROUNDS)]
    answers = [httpx.get(f"{gateway.url}{path}", headers={"PAYMENT-SIGNATURE": _upto_header(chain, key, upto_offer(gateway, path))},
                         timeout=60) for path in paths]

    reverted, gas, wei = _summary(chain, start, eth_before)
    rows = _rows(gateway, address)
    assert all(a.status_code != 200 for a in answers), [(a.status_code, a.text[:160]) for a in answers]
    assert chain.balance(address) == UPTO_MAXIMUM
    assert not any(r.state == PaymentState.SETTLED for r in rows)
    assert len(reverted) <= 1 and spent(chain)[0] - nonce_before <= 1, (
        f"{ROUNDS} upto payments (charge {UPTO_PRICE}, maximum {UPTO_MAXIMUM}) from a payer delegated once to "
        f"code that passes only simulations: {spent(chain)[0] - nonce_before} settlements broadcast, "
        f"{len(reverted)} reverted (gas per transaction {gas}, {wei} wei of the gateway's); statuses "
        f"{[a.status_code for a in answers]}, rows {[(str(r.state), r.error_reason) for r in rows]}; the attacker "
        f"paid {setup_gas} gas once (approve + delegation; the code is shared) and 0 per round")


# -- 6. exact through Permit2 (a token without EIP-3009), paid path: an EIP-7702 payer ---------------

PLAIN_CATALOG = """
catalog: 1
owner: acme-plain
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "Plain Dollar"
  asset_transfer_method: permit2
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  legacy: {{base_url: "{upstream}"}}
tools:
  - name: plain_quote
    description: A quote paid in a token without EIP-3009.
    method: GET
    path: /q/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: "0.0025"
    input_schema:
      type: object
      properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [symbol]
"""
PLAIN_PRICE = 2_500


def test_an_exact_permit2_7702_payer_whose_code_passes_only_simulations_cannot_revert_settlement_after_settlement(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, sim_burner: tuple[str, int],
) -> None:
    """Attack: ``exact`` through Permit2 (``ExactWithPermit2._chain_checks``): the same simulation from
    the settlement account without a gas price, run in verify and again in settle, passes; the
    broadcast proxy ``settle`` (200,000 gas) is burnt by the payer's code in Permit2's ERC-1271 check.
    Correct: after the first revert this payer gets no further broadcast."""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file)
    key = fresh_payer(chain, 1)
    address = Account.from_key(key).address
    chain_actions.transfer(chain.w3, plain.address, chain.key(FUNDER), address, PLAIN_PRICE)
    approve = send_tx(chain.w3, key, plain.address,
                      SEL_APPROVE + abi_encode(["address", "uint256"], [Web3.to_checksum_address(PERMIT2_ADDRESS), 2**256 - 1]))
    assert approve["status"] == 1
    setup_gas = _gas(approve) + _delegate(chain, key, sim_burner[0])
    client = x402Client()
    client.register("eip155:31337", ExactEvmClientScheme(Account.from_key(key)))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": plain.address}]})
    start, (nonce_before, eth_before) = chain.w3.eth.block_number + 1, spent(chain)
    symbols = [f"SMP{chr(65 + i)}" for i in range(ROUNDS)]
    hits_before = sum(upstream_hits(upstream, f"GET /api/v1/quote/{s}") for s in symbols)
    answers = []
    for symbol in symbols:
        path = f"/q/{symbol}"
        required = json.loads(base64.b64decode(httpx.get(f"{gateway.url}{path}").headers["PAYMENT-REQUIRED"]))
        payload = asyncio.run(client.create_payment_payload(SdkPaymentRequired.model_validate(required)))
        header = base64.b64encode(json.dumps(payload.model_dump(mode="json", by_alias=True, exclude_none=True)).encode()).decode()
        answers.append(httpx.get(f"{gateway.url}{path}", headers={"PAYMENT-SIGNATURE": header}, timeout=60))

    reverted, gas, wei = _summary(chain, start, eth_before)
    rows = _rows(gateway, address)
    upstream_calls = sum(upstream_hits(upstream, f"GET /api/v1/quote/{s}") for s in symbols) - hits_before
    assert all(a.status_code != 200 for a in answers), [(a.status_code, a.text[:160]) for a in answers]
    assert chain_actions.balance_of(chain.w3, plain.address, address) == PLAIN_PRICE
    assert not any(r.state == PaymentState.SETTLED for r in rows)
    assert len(reverted) <= 1 and spent(chain)[0] - nonce_before <= 1, (
        f"{ROUNDS} exact-Permit2 payments from a payer delegated once to code that passes only simulations: "
        f"{spent(chain)[0] - nonce_before} settlements broadcast, {len(reverted)} reverted (gas per transaction "
        f"{gas}, {wei} wei of the gateway's), {upstream_calls} upstream calls; statuses "
        f"{[a.status_code for a in answers]}, rows {[(str(r.state), r.error_reason) for r in rows]}; the attacker "
        f"paid {setup_gas} gas once (approve + delegation; the code is shared) and 0 per round")
