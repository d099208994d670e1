"""Attacks on the settlement account's gas, against the real stack (a private anvil, the sample
upstream, in-process gateways): a griefer who signs for free must not make the gateway broadcast
settlements that revert. Each test asserts the settlement account's nonce and ETH on chain, the
ledger rows and the upstream's own hit counts (settlement.schemes.exact_guards).

- A payer whose account has code (an EIP-7702 delegation to code that burns all the gas in its
  ``isValidSignature``) is refused at verify: the transfer is simulated first.
- One balance signed over many times at once (EIP-3009, or Permit2 through ``upto``): only what the
  balance covers is broadcast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from web3 import Web3
from web3.exceptions import TransactionNotFound

from gateway.devkit.payer import Payer
from settlement.ledger import Ledger, PaymentState
from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentRequirements
from tests.conftest import PAY_TO, Devchain, GatewayFactory, demo_catalog, offer_of, running_devchain, upstream_hits
from tests.e2e.test_exactly_once import UPFRONT_TOOL, wait_for
from tests.e2e.test_upto_paid_call import MAXIMUM as UPTO_MAXIMUM
from tests.e2e.test_upto_paid_call import _gateway as upto_gateway
from tests.e2e.test_upto_paid_call import _header as upto_header
from tests.e2e.test_upto_paid_call import _offer as upto_offer
from tests.support import chain_actions

pytestmark = pytest.mark.e2e

FUNDER = 8  # funds the attackers' fresh keys
SPONSOR = 7  # sends the attacker's one-off transactions (the burner's deployment, the delegation)
QUOTE_PRICE = 2000  # get_quote, settle: after
UPFRONT_PRICE = 4000  # UPFRONT_TOOL (tests.e2e.test_exactly_once)
# Runtime `JUMPDEST PUSH1 0 JUMP`: loops until it has burnt all the gas it was given.
GAS_BURNER_INIT = bytes.fromhex("635b6000566000526004601cf3")



@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil: one test switches automining off and on (``manual_mining``)."""
    with running_devchain(tmp_path_factory.mktemp("gas-review")) as private:
        yield private


def settler(chain: Devchain) -> str:
    return Web3.to_checksum_address(chain.deployment.deployer)  # the dev settlement key's account


def spent(chain: Devchain) -> tuple[int, int]:
    """The settlement account's (nonce, ETH balance): what it has sent and what it has left."""
    address = settler(chain)
    return chain.w3.eth.get_transaction_count(address), chain.w3.eth.get_balance(address)


def send_tx(w3: Web3, key: str, to: str | None, data: bytes, **extra: Any) -> Any:
    account = Account.from_key(key)
    tx: dict[str, Any] = {
        "from": account.address, "data": data, "nonce": w3.eth.get_transaction_count(account.address, "pending"),
        "gas": 1_000_000, "maxFeePerGas": 50 * 10**9, "maxPriorityFeePerGas": 10**9, "chainId": 31337, **extra,
    }
    if to is not None:
        tx["to"] = Web3.to_checksum_address(to)
    tx_hash = w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)
    return w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30)


def fresh_payer(chain: Devchain, amount: int) -> str:
    return chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), amount)


def delegate_to_gas_burner(chain: Devchain, key: str) -> None:
    """``key``'s EOA delegates (EIP-7702, one type-4 transaction, sent by a sponsor) to code whose
    ``isValidSignature`` loops until its gas is gone."""
    w3 = chain.w3
    burner = send_tx(w3, chain.key(SPONSOR), None, GAS_BURNER_INIT)["contractAddress"]
    address = Account.from_key(key).address
    authorization = Account.sign_authorization(
        {"chainId": 31337, "address": burner, "nonce": w3.eth.get_transaction_count(address)}, key)
    send_tx(w3, chain.key(SPONSOR), "0x000000000000000000000000000000000000dEaD", b"", type=4,
            authorizationList=[authorization])
    assert w3.eth.get_code(address) == bytes.fromhex("ef0100") + bytes.fromhex(burner[2:])


def gas_burning_7702_payer(chain: Devchain, amount: int) -> str:
    """A fresh EOA holding ``amount``, delegated to a gas burner: the token (FiatToken v2.2's
    SignatureChecker) asks an account with code, so every transferWithAuthorization from it reverts
    after eating its gas."""
    key = fresh_payer(chain, amount)
    delegate_to_gas_burner(chain, key)
    return key


def pay_header(client: httpx.Client, key: str, path: str) -> str:
    offer = offer_of(client.get(path))
    return encode_header(Payer(key).sign(offer.accepts[0], resource=offer.resource).to_wire())


def known(chain: Devchain, tx_hash: str) -> bool:
    """Whether the node has this transaction (in its pool or mined): a hash written ahead may not be sent yet."""
    try:
        return chain.w3.eth.get_transaction(tx_hash) is not None  # type: ignore[arg-type]
    except TransactionNotFound:
        return False

def at_once_then_mined(chain: Devchain, ledger: Ledger, url: str, paths: list[str], headers: list[str],
                       mine: Callable[[], None]) -> list[httpx.Response]:
    """Each paid request on a connection of its own, all at once (automining off); one block mined once
    every request is either broadcast (its written-ahead transaction in the node's pool) or answered."""
    def call(i: int) -> httpx.Response:
        return httpx.get(f"{url}{paths[i]}", headers={"PAYMENT-SIGNATURE": headers[i]}, timeout=90)

    with ThreadPoolExecutor(len(paths)) as pool:
        futures = [pool.submit(call, i) for i in range(len(paths))]

        def broadcast_or_answered() -> bool:
            in_pool = [r for r in ledger.all() if r.tx_hash and known(chain, r.tx_hash)]
            return len(in_pool) + sum(f.done() for f in futures) >= len(paths)

        wait_for(broadcast_or_answered, "every request broadcast or answered")
        mine()
        return [f.result(90) for f in futures]



# -- 1. an EIP-7702 payer whose code burns gas: every payment reverts on the gateway's gas ------------


def test_a_7702_payer_whose_code_burns_gas_cannot_make_each_settlement_revert_on_the_gateways_gas(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str
) -> None:
    """The attacker delegates its EOA once (EIP-7702) to code whose ``isValidSignature`` loops, and
    keeps a balance of one price. Then it pays again and again with plain ECDSA signatures over fresh
    nonces: verify recovers each offline (an EOA's signature: no wallet check), reads the balance and
    the nonce, and passes; the upstream runs (unpaid); the settlement ``transferWithAuthorization``
    (150,000 gas) reverts out of gas in the token's ERC-1271 call. The payer loses nothing (a revert
    moves nothing) and signs for free, forever; the gateway pays a whole gas limit and an upstream call
    per request. The Permit2 paths simulate the transfer at verify and refuse this; EIP-3009 does not.
    Correct: a payment whose transfer cannot succeed is refused before anything is broadcast (and
    before the upstream runs): no settlement transaction, the settlement account's nonce and ETH
    untouched."""
    gateway = start_gateway(deployment_file=chain.deployment_file)
    attacker = gas_burning_7702_payer(chain, QUOTE_PRICE)
    address = Account.from_key(attacker).address
    nonce_before, eth_before = spent(chain)
    answers = []
    with gateway.client() as client:
        for symbol in ("BRNA", "BRNB", "BRNC"):
            path = f"/quotes/{symbol}"
            answers.append(client.get(path, headers={"PAYMENT-SIGNATURE": pay_header(client, attacker, path)}))
    assert all(a.status_code == 402 for a in answers), [(a.status_code, a.text[:200]) for a in answers]
    assert chain.balance(address) == QUOTE_PRICE  # the attacker lost nothing
    rows = [r for r in gateway.ledger.all() if r.payer.lower() == address.lower()]
    reverted = [r for r in rows if r.tx_hash and chain.w3.eth.get_transaction_receipt(r.tx_hash)["status"] == 0]
    nonce_after, eth_after = spent(chain)
    assert (nonce_after - nonce_before, len(reverted)) == (0, 0), (
        f"the gateway broadcast {nonce_after - nonce_before} settlements for a payer whose transfers cannot "
        f"succeed, {len(reverted)} reverted, costing it {eth_before - eth_after} wei of gas "
        f"(gas on the rows: {[r.gas_used for r in rows]}); the attacker spent nothing")
    assert sum(upstream_hits(upstream, f"GET /api/v1/quote/{s}") for s in ("BRNA", "BRNB", "BRNC")) == 0


def test_the_served_facilitator_does_not_broadcast_a_7702_gas_burners_payment(
    start_gateway: GatewayFactory, chain: Devchain
) -> None:
    """The same payer through ``/facilitator/settle`` (served, for the gateway's own payee and asset):
    /settle verifies on chain first (nonce, balance), which this payment passes, then broadcasts a
    transfer that reverts out of gas. Anyone can repeat it at the facilitator's rate limit (60 a
    minute per client address) with one funded, delegated key. Correct: refused, nothing broadcast."""
    gateway = start_gateway(deployment_file=chain.deployment_file, serve_facilitator=True)
    attacker = gas_burning_7702_payer(chain, 3000)
    requirements = {
        "scheme": "exact", "network": "eip155:31337", "amount": "3000", "asset": chain.token, "payTo": PAY_TO,
        "maxTimeoutSeconds": 60, "extra": {"name": "USD Coin", "version": "2"},
    }
    reqs = PaymentRequirements.model_validate(requirements)
    nonce_before, eth_before = spent(chain)
    with gateway.client() as client:
        body = {"x402Version": 2, "paymentPayload": Payer(attacker).sign(reqs).to_wire(), "paymentRequirements": requirements}
        verified = client.post("/facilitator/verify", json=body).json()
        settled = client.post("/facilitator/settle", json=body, timeout=60).json()
    nonce_after, eth_after = spent(chain)
    assert settled.get("success") is not True
    assert (nonce_after - nonce_before, eth_before - eth_after) == (0, 0), (
        f"/facilitator/settle broadcast a reverting transfer (verify said {verified}, settle said {settled}): "
        f"{nonce_after - nonce_before} transaction(s), {eth_before - eth_after} wei of the gateway's gas")


# -- 2. one balance, many signatures at once: every settlement but one reverts -------------------------


@pytest.mark.parametrize(("room", "first"), [(1, 11), (2, 21)], ids=["one-price", "two-prices"])
def test_one_balance_signed_over_many_times_at_once_does_not_buy_reverted_settlements(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, request: pytest.FixtureRequest,
    room: int, first: int,
) -> None:
    """The attacker holds exactly one price and signs five authorizations over it (fresh nonces, no
    transaction of its own), and sends the five paid requests at once. Each verify reads the same
    balance (nothing is mined yet: on a real chain, the same block) and passes; each settlement is
    broadcast; one moves the money and four revert for want of balance, each on the gateway's gas.
    The attacker paid one price for one answer; the four extra requests cost it nothing. Correct: the
    gateway counts what a payer's in-flight settlements already take from its balance, so at most
    balance / price settlements are broadcast and the others are refused (402) before any broadcast:
    the settlement account sends exactly one transaction and none reverts.

    With room for two, through the path where verify's balance read may stand in for a settlement's
    own (``InFlight.saw_balance``; that it does is tests/settlement/schemes/test_exact_guards.py's):
    the second hold is covered by that read, the third's estimate falls short, so it reads the chain
    and is refused with the rest. Two answers, two transfers, none reverted, the payer at zero."""
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog=catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    attacker = fresh_payer(chain, room * UPFRONT_PRICE)
    address = Account.from_key(attacker).address
    paths = [f"/paid-first/reports/{n}" for n in range(first, first + 5)]
    with gateway.client() as client:
        headers = [pay_header(client, attacker, path) for path in paths]
    nonce_before, eth_before = spent(chain)
    pay_to_before = chain.balance(PAY_TO)
    mine: Callable[[], None] = request.getfixturevalue("manual_mining")  # automining off from here (funded above)
    answers = at_once_then_mined(chain, gateway.ledger, gateway.url, paths, headers, mine)
    assert [a.status_code for a in answers].count(200) == room, [(a.status_code, a.text[:120]) for a in answers]
    assert chain.balance(address) == 0 and chain.balance(PAY_TO) - pay_to_before == room * UPFRONT_PRICE
    rows = [r for r in gateway.ledger.all() if r.payer.lower() == address.lower()]
    assert [r.state for r in rows].count(PaymentState.SETTLED) == room
    reverted = [r for r in rows if r.tx_hash and chain.w3.eth.get_transaction_receipt(r.tx_hash)["status"] == 0]
    nonce_after, eth_after = spent(chain)
    assert (nonce_after - nonce_before, len(reverted)) == (room, 0), (
        f"{nonce_after - nonce_before} settlements broadcast for one balance of {room} price(s), {len(reverted)} reverted "
        f"({[(r.state, r.error_reason) for r in rows]}); the gateway paid {eth_before - eth_after} wei of gas")
    assert sum(upstream_hits(upstream, f"GET /reports/{n}") for n in range(first, first + 5)) == room


def test_one_permit2_balance_signed_over_many_times_at_once_does_not_buy_reverted_settlements(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path, request: pytest.FixtureRequest,
) -> None:
    """The same through ``upto`` (Permit2): the payer holds exactly one signed maximum (five charges)
    and sends six paid calls of an upfront tool at once. Each verify passes (balance >= maximum) and
    each settlement's simulation runs on the latest block, which holds none of the others: six were
    broadcast and the sixth reverted on the gateway's gas. Correct: five settle, the sixth is
    refused before its broadcast (402), nothing reverts."""
    payer_index = 5
    payer = chain.address(payer_index)
    chain_actions.drain(chain.w3, chain.token, chain.key(payer_index), chain.address(FUNDER))
    chain_actions.transfer(chain.w3, chain.token, chain.key(FUNDER), payer, UPTO_MAXIMUM)
    gateway = upto_gateway(start_gateway, chain, upstream, tmp_path, deployment_file=chain.deployment_file,
                           receipt_timeout_seconds=60)
    paths = [f"/reports/{n}" for n in range(21, 27)]
    headers = [upto_header(chain, payer_index, upto_offer(gateway, path)) for path in paths]
    nonce_before, _ = spent(chain)
    pay_to_before = chain.balance(PAY_TO)
    mine: Callable[[], None] = request.getfixturevalue("manual_mining")
    answers = at_once_then_mined(chain, gateway.ledger, gateway.url, paths, headers, mine)
    assert sorted(a.status_code for a in answers) == [200] * 5 + [402], [(a.status_code, a.text[:120]) for a in answers]
    assert chain.balance(payer) == 0 and chain.balance(PAY_TO) - pay_to_before == UPTO_MAXIMUM
    rows = gateway.ledger.all()
    reverted = [r for r in rows if r.tx_hash and chain.w3.eth.get_transaction_receipt(r.tx_hash)["status"] == 0]
    assert (spent(chain)[0] - nonce_before, reverted) == (5, [])
