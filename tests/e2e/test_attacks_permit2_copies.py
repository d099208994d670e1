"""Honest payers struck, and a copied Permit2 settlement charged without its answer: holes a review
found in ``InFlight.struck`` and the Permit2 path, fixed (a revert is explained by the chain first:
``permit2_outcome.explain_revert`` reads the nonce, the block's date, the balance and allowance, and
another account's transaction that moved this very payment settles it, ``settled_by_copy``;
``exact_local._outcome`` judges the window by the block it was mined in). What the review found:

The strike (``settlement/schemes/exact_guards.py``) is meant for a payer whose *code* made a mined
settlement revert "where its nonce, balance and window do not explain it". Two of those explanations
are never looked at, so an honest payer with code (an EOA delegated by EIP-7702 to the dev chain's
honest ``Eip7702Delegate``, the kind every smart-account wallet now makes) is refused for an hour in
every process (402 ``payer_code_reverted``):

1. ``exact`` through Permit2: ``upto._send_and_judge`` calls *every* revert
   ``permit2_settlement_reverted`` (in ``_UNEXPLAINED``) without asking Permit2's nonce bitmap.
   ``X402ExactPermit2Proxy.settle`` may be sent by anyone, so a griefer copies the gateway's pending
   settlement from the mempool with a higher tip (the payer's money still goes to payTo): the
   gateway's own transaction reverts on "nonce used", ``Hold.judged`` marks it unexplained, and the
   honest payer is struck. Cost to the griefer: one transaction's gas per victim per hour.
2. ``exact`` (EIP-3009): ``LocalFacilitator._outcome`` explains a revert by nonce and balance only,
   never by the window. A settlement mined after its ``validBefore`` (a slow block, a congested
   chain, a sequencer's pause) is ``transaction_failed``, and its honest payer with code is struck.

Each test fails on the current code and passes once the strike only follows a revert the payer's
code caused. Private anvil: automining is switched off to order blocks deterministically.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import Web3
from x402 import x402Client
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.schemas import PaymentRequired as SdkPaymentRequired

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.schemes.upto_permit import PERMIT2_ADDRESS
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of, running_devchain, upstream_hits
from tests.e2e.test_attacks_code_payers import PLAIN_CATALOG, PLAIN_PRICE, SEL_APPROVE, _delegate
from tests.e2e.test_attacks_gas import FUNDER, QUOTE_PRICE, fresh_payer, known, send_tx, spent
from tests.e2e.test_exactly_once import wait_for
from tests.support import chain_actions

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("review-latest-fixes")) as private:
        yield private


def _rows(gateway: RunningGateway, payer: str) -> list[Any]:
    return [r for r in gateway.ledger.all() if r.payer and r.payer.lower() == payer.lower()]


def _honest_7702_payer(chain: Devchain, token: str, amount: int) -> tuple[str, str]:
    """A fresh EOA holding ``amount`` of ``token``, delegated (EIP-7702) to the dev chain's honest
    ``Eip7702Delegate`` (it accepts exactly the account's own ECDSA signature): (key, address)."""
    key = fresh_payer(chain, 1)
    address = Account.from_key(key).address
    if amount:
        chain_actions.transfer(chain.w3, token, chain.key(FUNDER), address, amount)
    delegate = chain.deployment.eip7702_delegate
    assert delegate is not None
    _delegate(chain, key, delegate)
    return key, address


def _mine(chain: Devchain) -> None:
    chain.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]


def _automine(chain: Devchain, on: bool) -> None:
    chain.w3.provider.make_request("evm_setAutomine", [on])  # type: ignore[arg-type]


def _broadcast_then(chain: Devchain, gateway: RunningGateway, payer: str, call: Callable[[], httpx.Response],
                    before_mining: Callable[[Any], None]) -> httpx.Response:
    """``call`` with automining off: once the gateway's settlement (its hash written ahead) is in the
    node's pool, ``before_mining(tx)`` runs, then one block is mined."""
    _automine(chain, False)
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(call)

            def in_pool() -> Any:
                if future.done():
                    raise AssertionError(f"answered before any broadcast: {future.result().status_code} {future.result().text[:300]}")
                hashes = [r.tx_hash for r in _rows(gateway, payer) if r.tx_hash and known(chain, r.tx_hash)]
                return hashes[0] if hashes else None

            tx_hash = wait_for(in_pool, "the gateway's settlement in the node's pool", attempts=1200)
            before_mining(chain.w3.eth.get_transaction(tx_hash))
            _mine(chain)
            return future.result(90)
    finally:
        _automine(chain, True)
        _mine(chain)


def _raw_send(w3: Web3, key: str, to: str, data: bytes, tip: int) -> str:
    account = Account.from_key(key)
    tx = {"from": account.address, "to": Web3.to_checksum_address(to), "data": data, "gas": 400_000,
          "nonce": w3.eth.get_transaction_count(account.address, "pending"),
          "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": tip, "chainId": 31337}
    return "0x" + bytes(w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)).hex()


# -- 1. exact through Permit2: a griefer's copy of the pending settlement strikes an honest payer ----


def _permit2_header(gateway: RunningGateway, key: str, token: str, path: str) -> str:
    client = x402Client()
    client.register("eip155:31337", ExactEvmClientScheme(Account.from_key(key)))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": token}]})
    required = json.loads(base64.b64decode(httpx.get(f"{gateway.url}{path}").headers["PAYMENT-REQUIRED"]))
    payload = asyncio.run(client.create_payment_payload(SdkPaymentRequired.model_validate(required)))
    return base64.b64encode(json.dumps(payload.model_dump(mode="json", by_alias=True, exclude_none=True)).encode()).decode()


SEL_TRY_AGGREGATE = bytes(Web3.keccak(text="tryAggregate(bool,(address,bytes)[])"))[:4]


def _wrapped(proxy: str, calldata: bytes) -> bytes:
    """Multicall3's ``tryAggregate(true, [(proxy, calldata)])``: our call made by another contract."""
    return SEL_TRY_AGGREGATE + abi_encode(["bool", "(address,bytes)[]"], [True, [(Web3.to_checksum_address(proxy), calldata)]])


def _copied_permit2_settlement(start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
                               path: str, *, wrap: bool = False) -> tuple[RunningGateway, str, str, httpx.Response, int]:
    """The scenario: an honest payer delegated to ``Eip7702Delegate`` (holding two prices, Permit2
    approved) pays ``path``; while the gateway's proxy ``settle`` is pending, a griefer sends the very
    same calldata to the (open) exact proxy with a higher tip (``wrap``: through Multicall3 instead).
    (gateway, key, address, first answer, what payTo received.)"""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    key, address = _honest_7702_payer(chain, plain.address, 2 * PLAIN_PRICE)
    approve = send_tx(chain.w3, key, plain.address,
                      SEL_APPROVE + abi_encode(["address", "uint256"], [Web3.to_checksum_address(PERMIT2_ADDRESS), 2**256 - 1]))
    assert approve["status"] == 1
    griefer = "0x" + bytes(Account.create().key).hex()
    chain_actions.set_eth(chain.w3, Account.from_key(griefer).address)
    pay_to_before = chain_actions.balance_of(chain.w3, plain.address, PAY_TO)
    copies: list[str] = []
    gateways: list[Any] = []

    def copy(tx: Any) -> None:  # the griefer front-runs the gateway's pending settlement with its own calldata
        gateways.append(tx["hash"])
        to, data = (chain.deployment.multicall3 or "", _wrapped(str(tx["to"]), bytes(tx["input"]))) if wrap else (
            str(tx["to"]), bytes(tx["input"]))
        copies.append(_raw_send(chain.w3, griefer, to, data, tip=10 * 10**9))

    first = _broadcast_then(chain, gateway, address, lambda: httpx.get(
        f"{gateway.url}{path}", headers={"PAYMENT-SIGNATURE": _permit2_header(gateway, key, plain.address, path)},
        timeout=90), copy)
    copied = chain.w3.eth.get_transaction_receipt(copies[0])  # type: ignore[arg-type]
    our_receipt = chain.w3.eth.get_transaction_receipt(gateways[0])
    # The scenario holds: the griefer's copy moved the payer's price to payTo; the gateway's own reverted.
    assert copied["status"] == 1 and our_receipt["status"] == 0, (copied["status"], our_receipt["status"])
    return gateway, key, address, first, chain_actions.balance_of(chain.w3, plain.address, PAY_TO) - pay_to_before


def test_a_griefers_copy_of_a_pending_permit2_settlement_does_not_strike_the_honest_7702_payer(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (griefer): the copy of ``_copied_permit2_settlement``. The gateway's own transaction
    reverts on Permit2's used nonce; ``upto._send_and_judge`` calls that ``permit2_settlement_reverted``
    without reading the nonce bitmap, ``Hold.judged`` counts it as unexplained
    (``exact_guards._UNEXPLAINED``) and ``InFlight._strike`` strikes the payer because it has code.
    Correct: a revert the payer's nonce explains strikes nobody; the payer's next, independent
    payment (fresh nonce, funded, approved) is served and settled."""
    plain = chain.deployment.plain_token
    assert plain is not None
    gateway, key, address, first, received = _copied_permit2_settlement(start_gateway, chain, upstream, tmp_path, "/q/GRFA")
    assert received == PLAIN_PRICE
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/GRFB")
    nonce_before, _ = spent(chain)
    second = httpx.get(f"{gateway.url}/q/GRFB",
                       headers={"PAYMENT-SIGNATURE": _permit2_header(gateway, key, plain.address, "/q/GRFB")}, timeout=90)
    rows = _rows(gateway, address)
    settled = [r for r in rows if r.state == PaymentState.SETTLED]
    assert second.status_code == 200 and settled and spent(chain)[0] - nonce_before == 1, (
        f"an honest EIP-7702 payer (honest delegate) is locked out after a griefer copied one pending Permit2 "
        f"settlement (one transaction of the griefer's gas): first answer {first.status_code} "
        f"{first.text[:160]!r}; next payment {second.status_code} {second.text[:240]!r}; upstream calls "
        f"{upstream_hits(upstream, 'GET /api/v1/quote/GRFB') - hits_before}; payer balance "
        f"{chain_actions.balance_of(chain.w3, plain.address, address)}; rows {[(str(r.state), r.error_reason) for r in rows]}")


def test_a_copied_permit2_settlement_is_still_this_payment_not_a_charge_without_its_answer(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Adjacent hole (same scenario, any payer): the README promises "a payment copied from the mempool
    is still this payment", and ``LocalFacilitator.used_nonce_outcome`` keeps it for EIP-3009, but
    the Permit2 path (``upto.send_permit2_settlement`` / ``_send_and_judge``, and ``resolve_upto``'s
    ``permit_used_elsewhere``) never looks for the transaction that used the nonce. The copy moved
    exactly this permit's amount to payTo; the gateway answers 402 ``permit2_settlement_reverted`` and
    records the row ``failed``: the payer is charged, with no answer and no refund owed.
    Correct: the row is settled (by the copy) and the answer served, or at the least a refund owed."""
    plain = chain.deployment.plain_token
    assert plain is not None
    gateway, _, address, first, received = _copied_permit2_settlement(start_gateway, chain, upstream, tmp_path, "/q/CPYA")
    rows = _rows(gateway, address)
    answered_or_owed = first.status_code == 200 or any(r.state == PaymentState.SETTLED or r.refund_owed for r in rows)
    assert received == PLAIN_PRICE
    assert answered_or_owed, (
        f"the payer's {PLAIN_PRICE} reached payTo under this very permit (a copy of the gateway's pending settlement), "
        f"yet the answer was {first.status_code} {first.text[:200]!r} and the ledger says "
        f"{[(str(r.state), r.error_reason, r.refund_owed) for r in rows]}: charged without the answer it paid for")


def test_a_copy_wrapped_in_another_contracts_call_is_still_this_payment(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (griefer), closed after the 2026-12-05 stop left it: the copy of our pending settlement
    is made through Multicall3 (``tryAggregate``), so its transaction is not sent to the proxy and its
    input is not our calldata. The payer's price reached payTo under this permit all the same; before,
    the row went ``failed`` (``permit2_nonce_used``): charged, no answer, nothing owed. Now the
    node's trace (``JsonRpcChain.traced_calls``) shows the wrapper's call to the proxy with our very
    call: settled by that copy, the answer served, one charge."""
    plain = chain.deployment.plain_token
    assert plain is not None
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/WRPA")
    gateway, _, address, first, received = _copied_permit2_settlement(
        start_gateway, chain, upstream, tmp_path, "/q/WRPA", wrap=True)
    rows = _rows(gateway, address)
    assert received == PLAIN_PRICE  # one charge: the copy's
    assert first.status_code == 200, (first.status_code, first.text[:300], [(str(r.state), r.error_reason) for r in rows])
    assert len(rows) == 1 and rows[0].state == PaymentState.SETTLED, [(str(r.state), r.error_reason) for r in rows]
    assert upstream_hits(upstream, "GET /api/v1/quote/WRPA") - hits_before == 1


def test_traced_calls_leaves_out_a_failed_call_and_keeps_those_that_took_effect(chain: Devchain) -> None:
    """``JsonRpcChain.traced_calls`` on anvil's real tracer: Multicall3 ``tryAggregate(false, ...)``
    makes a transfer that fails (more than the sender holds) and a ``balanceOf`` that succeeds; the
    failed one is left out (its effects are undone), the wrapper's own call and the other are kept."""
    from settlement.chain.client import JsonRpcChain

    plain = chain.deployment.plain_token
    multicall = chain.deployment.multicall3
    assert plain is not None and multicall is not None
    key = fresh_payer(chain, 0)
    token = Web3.to_checksum_address(plain.address)
    failing = bytes(Web3.keccak(text="transfer(address,uint256)"))[:4] + abi_encode(["address", "uint256"], [PAY_TO, 10**30])
    reading = bytes(Web3.keccak(text="balanceOf(address)"))[:4] + abi_encode(["address"], [PAY_TO])
    data = SEL_TRY_AGGREGATE + abi_encode(["bool", "(address,bytes)[]"], [False, [(token, failing), (token, reading)]])
    receipt = send_tx(chain.w3, key, multicall, data)
    assert receipt["status"] == 1
    tx_hash = "0x" + bytes(receipt["transactionHash"]).hex()
    calls = asyncio.run(JsonRpcChain(chain.anvil.rpc_url, 31337, None).traced_calls(tx_hash))
    assert calls is not None
    made = [(to.lower(), data[:4]) for _, to, data in calls]
    assert (multicall.lower(), SEL_TRY_AGGREGATE) in made
    assert (token.lower(), reading[:4]) in made
    assert (token.lower(), failing[:4]) not in made, made


# -- 2. exact (EIP-3009): a settlement mined after its window strikes the honest payer ---------------


def test_a_settlement_mined_after_its_valid_before_does_not_strike_the_honest_7702_payer(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str,
) -> None:
    """Hole: ``LocalFacilitator._outcome`` (settlement/schemes/exact_local.py) explains a mined revert
    by the nonce and the balance only; a transfer mined after its ``validBefore`` ("authorization is
    expired") stays ``transaction_failed``, which ``exact_guards._UNEXPLAINED`` takes for the payer's
    code refusing. An honest payer delegated to ``Eip7702Delegate`` signs a short (valid) window; the
    block that includes the gateway's settlement comes after it (a slow or congested chain; here
    anvil's next timestamp). Nothing moved, which is right; but the payer is then refused for an
    hour in every process. Correct: a revert its window explains strikes nobody; the payer's next
    payment (ordinary window) is served and settled."""
    gateway = start_gateway(deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    key, address = _honest_7702_payer(chain, chain.token, 2 * QUOTE_PRICE)
    balance_before = chain.balance(address)
    valid_before: list[int] = []

    def first_call() -> httpx.Response:
        with httpx.Client(base_url=gateway.url, timeout=90) as client:
            offer = offer_of(client.get("/quotes/WNDA"))
            valid_before.append(int(time.time()) + 25)  # >= the gateway's 6 s margin: a valid, short window
            payload = Payer(key).sign(offer.accepts[0], resource=offer.resource, valid_before=valid_before[0])
            return client.get("/quotes/WNDA", headers={"PAYMENT-SIGNATURE": encode_header(payload.to_wire())})

    def late_block(_tx: Any) -> None:  # the block that includes it comes after the window
        chain.w3.provider.make_request("evm_setNextBlockTimestamp", [valid_before[0] + 1])  # type: ignore[arg-type]

    first = _broadcast_then(chain, gateway, address, first_call, late_block)
    ours = [r for r in _rows(gateway, address) if r.tx_hash]
    assert ours and chain.w3.eth.get_transaction_receipt(ours[0].tx_hash)["status"] == 0
    assert chain.balance(address) == balance_before  # nothing moved

    hits_before = upstream_hits(upstream, "GET /api/v1/quote/WNDB")
    nonce_before, _ = spent(chain)
    with httpx.Client(base_url=gateway.url, timeout=90) as client:
        offer = offer_of(client.get("/quotes/WNDB"))
        # An ordinary window, counted from the chain's clock (it is now ahead of ours).
        chain_now = int(chain.w3.eth.get_block("latest")["timestamp"])
        payload = Payer(key).sign(offer.accepts[0], resource=offer.resource,
                                  valid_before=max(chain_now, int(time.time())) + 60)
        second = client.get("/quotes/WNDB", headers={"PAYMENT-SIGNATURE": encode_header(payload.to_wire())})
    rows = _rows(gateway, address)
    assert second.status_code == 200 and any(r.state == PaymentState.SETTLED for r in rows) \
        and spent(chain)[0] - nonce_before == 1, (
        f"an honest EIP-7702 payer whose settlement was mined after its validBefore is locked out: first "
        f"{first.status_code} {first.text[:160]!r}; next payment {second.status_code} {second.text[:240]!r}; "
        f"upstream calls {upstream_hits(upstream, 'GET /api/v1/quote/WNDB') - hits_before}; rows "
        f"{[(str(r.state), r.error_reason) for r in rows]}")
