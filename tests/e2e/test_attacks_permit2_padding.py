"""The Permit2 copy rule (``permit2_outcome.copied_settlement``) and the strike's explanations
(``exact_local._outcome``), attacked in a final review round and fixed: a copy is compared decoded
(``same_call``: padded or re-encoded, it is still this permit's call), looked for before our own
receipt's block when an open row is resolved, and a revert is explained first by the node's tracer
(``debug_traceTransaction``) where it has one. What the review found:

1. A "copy" is only another account's transaction sent *directly* to the proxy with *byte-identical*
   calldata. The exact proxy's ``settle`` ignores trailing calldata (Solidity's ABI decoder does), so
   a griefer who front-runs the gateway's pending settlement with the very calldata plus one padding
   word moves exactly this payment under this permit; the gateway's own transaction reverts on the
   used nonce, ``copied_settlement`` skips the griefer's (``sent[2] != calldata``) and the payment is
   ``permit2_nonce_used``: charged, no answer, no refund owed.
2. ``LocalFacilitator._outcome`` explains a revert with the payer's balance read at *latest*, after
   the block. An honest EIP-7702 payer that moves its balance out in the same block ahead of our
   settlement, and is paid again later in that block, is "unexplained" and struck for an hour.
3. ``resolve_upto`` scans for the copy in the 64 blocks before *now*, not before our own receipt:
   an open row resolved 64+ blocks after the copy is FAILED ``permit_used_elsewhere``, charged.

Private anvil: automining is switched off to order one block deterministically.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import Web3

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.schemes.upto_permit import PERMIT2_ADDRESS
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, offer_of, running_devchain, upstream_hits
from tests.e2e.test_attacks_code_payers import PLAIN_CATALOG, PLAIN_PRICE, SEL_APPROVE
from tests.e2e.test_attacks_gas import FUNDER, QUOTE_PRICE, known, send_tx, spent
from tests.e2e.test_attacks_permit2_copies import (
    _broadcast_then,
    _honest_7702_payer,
    _permit2_header,
    _raw_send,
    _rows,
)
from tests.e2e.test_exactly_once import wait_for
from tests.support import chain_actions

pytestmark = pytest.mark.e2e

SEL_TRANSFER = bytes(Web3.keccak(text="transfer(address,uint256)")[:4])


def _cheap_send(w3: Web3, key: str, to: str, data: bytes) -> str:
    """A transaction anvil orders after the gateway's (it ranks by fee cap: ours is 2 x base fee + a tip)."""
    account = Account.from_key(key)
    base_fee = int(w3.eth.get_block("pending")["baseFeePerGas"])
    tx = {"from": account.address, "to": Web3.to_checksum_address(to), "data": data, "gas": 200_000,
          "nonce": w3.eth.get_transaction_count(account.address, "pending"),
          "maxFeePerGas": base_fee + base_fee // 4 + 1, "maxPriorityFeePerGas": 0, "chainId": 31337}
    return "0x" + bytes(w3.eth.send_raw_transaction(account.sign_transaction(tx).raw_transaction)).hex()


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("review-final-round")) as private:
        yield private


def test_a_padded_copy_of_a_pending_permit2_settlement_is_still_this_payment(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Hole: settlement/schemes/permit2_outcome.py:98 (``sent[2] != calldata``). The griefer sends
    our pending proxy ``settle`` calldata + 32 zero bytes to the exact proxy with a higher tip; it
    executes this very permit (the proxy ignores trailing calldata) and moves the price to payTo.
    Correct: the payment is settled by that copy and answered, or at the least a refund is owed."""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 1)
    address = Account.from_key(key).address
    chain_actions.transfer(chain.w3, plain.address, chain.key(FUNDER), address, PLAIN_PRICE)
    approve = send_tx(chain.w3, key, plain.address,
                      SEL_APPROVE + abi_encode(["address", "uint256"], [Web3.to_checksum_address(PERMIT2_ADDRESS), 2**256 - 1]))
    assert approve["status"] == 1
    griefer = "0x" + bytes(Account.create().key).hex()
    chain_actions.set_eth(chain.w3, Account.from_key(griefer).address)
    pay_to_before = chain_actions.balance_of(chain.w3, plain.address, PAY_TO)
    payer_before = chain_actions.balance_of(chain.w3, plain.address, address)
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/PADA")
    ours: list[str] = []
    copies: list[str] = []

    def copy(tx: Any) -> None:  # our calldata, padded with one zero word, a higher tip
        ours.append("0x" + bytes(tx["hash"]).hex())
        copies.append(_raw_send(chain.w3, griefer, str(tx["to"]), bytes(tx["input"]) + bytes(32), tip=10 * 10**9))

    first = _broadcast_then(chain, gateway, address, lambda: httpx.get(
        f"{gateway.url}/q/PADA", headers={"PAYMENT-SIGNATURE": _permit2_header(gateway, key, plain.address, "/q/PADA")},
        timeout=90), copy)
    copied = chain.w3.eth.get_transaction_receipt(copies[0])  # type: ignore[arg-type]
    our_receipt = chain.w3.eth.get_transaction_receipt(ours[0])  # type: ignore[arg-type]
    assert copied["status"] == 1 and our_receipt["status"] == 0, (copied["status"], our_receipt["status"])
    received = chain_actions.balance_of(chain.w3, plain.address, PAY_TO) - pay_to_before
    paid = payer_before - chain_actions.balance_of(chain.w3, plain.address, address)
    assert received == PLAIN_PRICE and paid == PLAIN_PRICE  # this permit's money moved, once
    rows = _rows(gateway, address)
    settled = [r for r in rows if r.state == PaymentState.SETTLED]
    owed = [r for r in rows if r.refund_owed]
    answered = first.status_code == 200
    assert (answered and len(settled) == 1 and not owed) or (not answered and owed), (
        f"the payer's {PLAIN_PRICE} reached payTo under this very permit (the griefer's padded copy of our pending "
        f"settlement: same function, same arguments, one trailing zero word), yet the answer was {first.status_code} "
        f"{first.text[:200]!r}, upstream calls {upstream_hits(upstream, 'GET /api/v1/quote/PADA') - hits_before}, ledger "
        f"{[(str(r.state), r.error_reason, r.refund_owed) for r in rows]}: charged without the answer it paid for")


def test_an_honest_7702_payer_whose_balance_moved_within_the_block_is_not_struck(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str,
) -> None:
    """Hole: settlement/schemes/exact_local.py:398 reads the payer's balance at *latest*. In one block:
    the honest 7702 payer moves its whole balance to another account of its own (higher tip), then our
    settlement (reverts: balance), then an incoming payment restores the balance (lower tip). The revert
    is called ``transaction_failed`` (exact_guards._UNEXPLAINED) and the payer, having code, is struck.
    Correct: a revert its balance explains strikes nobody; the payer's next payment is served and settled."""
    gateway = start_gateway(deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    key, address = _honest_7702_payer(chain, chain.token, 2 * QUOTE_PRICE)
    chain_actions.set_eth(chain.w3, address)
    sink = Account.create().address
    balance_before = chain.balance(address)
    funder = chain.key(FUNDER)

    def first_call() -> httpx.Response:
        with httpx.Client(base_url=gateway.url, timeout=90) as client:
            offer = offer_of(client.get("/quotes/RACA"))
            payload = Payer(key).sign(offer.accepts[0], resource=offer.resource, valid_before=int(time.time()) + 90)
            return client.get("/quotes/RACA", headers={"PAYMENT-SIGNATURE": encode_header(payload.to_wire())})

    sent: list[str] = []

    def race(_tx: Any) -> None:  # the payer's own transfer first, an incoming payment last, in our block
        out = SEL_TRANSFER + abi_encode(["address", "uint256"], [sink, 2 * QUOTE_PRICE])
        back = SEL_TRANSFER + abi_encode(["address", "uint256"], [address, 2 * QUOTE_PRICE])
        sent.append(_raw_send(chain.w3, key, chain.token, out, tip=10 * 10**9))
        sent.append(_cheap_send(chain.w3, funder, chain.token, back))

    first = _broadcast_then(chain, gateway, address, first_call, race)
    ours = [r for r in _rows(gateway, address) if r.tx_hash]
    assert ours
    receipts = [chain.w3.eth.get_transaction_receipt(h) for h in (sent[0], ours[0].tx_hash, sent[1])]  # type: ignore[arg-type]
    assert [r["status"] for r in receipts] == [1, 0, 1], [(r["status"], r["blockNumber"], r["transactionIndex"], r["gasUsed"]) for r in receipts]
    assert len({r["blockNumber"] for r in receipts}) == 1 and \
        receipts[0]["transactionIndex"] < receipts[1]["transactionIndex"] < receipts[2]["transactionIndex"]
    assert chain.balance(address) == balance_before  # nothing of this payment moved; the balance is back

    hits_before = upstream_hits(upstream, "GET /api/v1/quote/RACB")
    nonce_before, _ = spent(chain)
    with httpx.Client(base_url=gateway.url, timeout=90) as client:
        offer = offer_of(client.get("/quotes/RACB"))
        chain_now = int(chain.w3.eth.get_block("latest")["timestamp"])
        payload = Payer(key).sign(offer.accepts[0], resource=offer.resource,
                                  valid_before=max(chain_now, int(time.time())) + 60)
        second = client.get("/quotes/RACB", headers={"PAYMENT-SIGNATURE": encode_header(payload.to_wire())})
    rows = _rows(gateway, address)
    assert second.status_code == 200 and any(r.state == PaymentState.SETTLED for r in rows) \
        and spent(chain)[0] - nonce_before == 1, (
        f"an honest EIP-7702 payer whose settlement reverted on its balance (moved out and back within the block) "
        f"is locked out: first {first.status_code} {first.text[:160]!r}; next {second.status_code} "
        f"{second.text[:240]!r}; upstream calls {upstream_hits(upstream, 'GET /api/v1/quote/RACB') - hits_before}; "
        f"rows {[(str(r.state), r.error_reason) for r in rows]}")


def test_a_copy_found_when_resolving_late_is_still_this_payment(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Hole: settlement/schemes/upto.py:321 (``resolve_upto``) looks for the copy in the
    ``COPY_SCAN_BLOCKS`` (64) before the *current* block, not before our own receipt's block. The
    gateway's settlement is left open (its receipt not seen in time), a griefer's exact copy (direct,
    byte-identical) is mined ahead of it, and the row is resolved 70 blocks later (a resend; the same
    after a restart or a sweep): ``permit_used_elsewhere``, FAILED. Correct: settled by the copy (the
    resend gets its answer) or a refund owed."""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=2)
    key = chain_actions.fresh_payer(chain.w3, chain.token, chain.key(FUNDER), 1)
    address = Account.from_key(key).address
    chain_actions.transfer(chain.w3, plain.address, chain.key(FUNDER), address, PLAIN_PRICE)
    approve = send_tx(chain.w3, key, plain.address,
                      SEL_APPROVE + abi_encode(["address", "uint256"], [Web3.to_checksum_address(PERMIT2_ADDRESS), 2**256 - 1]))
    assert approve["status"] == 1
    griefer = "0x" + bytes(Account.create().key).hex()
    chain_actions.set_eth(chain.w3, Account.from_key(griefer).address)
    pay_to_before = chain_actions.balance_of(chain.w3, plain.address, PAY_TO)
    header = _permit2_header(gateway, key, plain.address, "/q/LATA")
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/LATA")
    chain.w3.provider.make_request("evm_setAutomine", [False])  # type: ignore[arg-type]
    try:
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(lambda: httpx.get(f"{gateway.url}/q/LATA", headers={"PAYMENT-SIGNATURE": header},
                                                   timeout=90))

            def in_pool() -> Any:
                hashes = [r.tx_hash for r in _rows(gateway, address) if r.tx_hash and known(chain, r.tx_hash)]
                return hashes[0] if hashes else None

            ours = wait_for(in_pool, "the gateway's settlement in the node's pool", attempts=1200)
            tx = chain.w3.eth.get_transaction(ours)
            copy = _raw_send(chain.w3, griefer, str(tx["to"]), bytes(tx["input"]), tip=10 * 10**9)
            first = future.result(90)  # answered while its settlement is still unmined
    finally:
        chain.w3.provider.make_request("evm_setAutomine", [True])  # type: ignore[arg-type]
    chain.w3.provider.make_request("anvil_mine", [hex(70)])  # type: ignore[arg-type]
    assert chain.w3.eth.get_transaction_receipt(copy)["status"] == 1  # type: ignore[arg-type]
    assert chain.w3.eth.get_transaction_receipt(ours)["status"] == 0
    assert chain_actions.balance_of(chain.w3, plain.address, PAY_TO) - pay_to_before == PLAIN_PRICE
    resend = httpx.get(f"{gateway.url}/q/LATA", headers={"PAYMENT-SIGNATURE": header}, timeout=90)
    rows = _rows(gateway, address)
    settled = [r for r in rows if r.state == PaymentState.SETTLED]
    owed = [r for r in rows if r.refund_owed]
    assert (resend.status_code == 200 and settled and not owed) or (resend.status_code != 200 and owed), (
        f"the payer's {PLAIN_PRICE} reached payTo under this very permit (a byte-identical copy of our pending "
        f"settlement, mined ahead of it), the row resolved 70 blocks later: first {first.status_code} "
        f"{first.text[:120]!r}; resend {resend.status_code} {resend.text[:200]!r}; upstream calls "
        f"{upstream_hits(upstream, 'GET /api/v1/quote/LATA') - hits_before}; ledger "
        f"{[(str(r.state), r.error_reason, r.refund_owed) for r in rows]}: charged without the answer it paid for")
