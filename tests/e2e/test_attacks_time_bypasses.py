"""Bypasses of the day's TIME fixes (a review of HeadClock, stream deadlines, BroadcastHead, remote_confirm).

Each test failed on the code it was written against (a bypass review, 2026-12-05, evening) and
names the invariant it holds. Fixed: ``validAfter`` must be before the earlier of our clock and the
chain's (``HeadClock.behind``; ``valid_after >=`` refuses, as the token's ``block.timestamp >
validAfter`` does), and a Permit2 row read back scans for copies from the first block dated at its
creation (``permit2_outcome.block_since``, bisected on block dates) instead of 64 blocks back.

1. ``test_a_payment_not_yet_valid_by_the_chains_clock_is_refused_before_the_upstream``: HeadClock
   takes the *later* of our clock and the chain's, which guards ``validBefore`` only. ``validAfter``
   is judged by our clock alone (``LocalFacilitator._authorization``: ``valid_after > now``, ``now``
   never behind ours), while the token requires ``block.timestamp > validAfter``. With the chain's
   clock behind ours (the mirror of the fixed skew: a gateway host whose clock is fast, or a block
   dated at its slot's start, before our broadcast), a payment whose ``validAfter`` is past by our
   clock and future by the chain's verifies, the upstream runs, and the settlement reverts on the
   gateway's gas; the payer is not struck, so it repeats for free.

2. ``test_a_permit2_copy_found_late_by_the_resolver_is_still_this_payment``: BroadcastHead's scan
   from our broadcast's head serves only a receipt read within ``receipt_timeout`` (30 s). The case
   the fix was for (ours waiting more than 64 blocks) takes 64 blocks: 13 minutes on Ethereum,
   2 on Base, so ours is answered pending first, and the row is read back later
   (``resolve_upto``, on a resend or by the resolver) with the old ``COPY_SCAN_BLOCKS`` window: the
   copy is missed, the row fails ``permit_used_elsewhere``, the payer is charged without its answer.

3. ``test_a_payment_valid_only_from_this_second_is_refused_before_the_upstream``: the same check
   is off by one as well: ``valid_after > now`` refuses, the token requires ``block.timestamp >
   validAfter``. A payment with ``validAfter`` = the current second verifies and is settled in a
   block dated that second (a block dated at its slot's start, or any same-second block): reverted,
   the upstream unpaid, the gateway's gas.

Private anvils only (one whose clock runs behind ours, one whose blocks the test mines by hand):
no other module is affected.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from web3 import Web3

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.schemes.permit2_outcome import COPY_SCAN_BLOCKS
from settlement.x402.codec import encode_header
from tests.conftest import (
    PAY_TO,
    Devchain,
    GatewayFactory,
    demo_catalog,
    offer_of,
    running_devchain,
    upstream_hits,
)
from tests.e2e.test_attacks_code_payers import PLAIN_CATALOG, PLAIN_PRICE
from tests.e2e.test_attacks_gas import known, settler
from tests.e2e.test_attacks_permit2_copies import _automine, _broadcast_then, _mine, _permit2_header, _rows
from tests.e2e.test_exactly_once import wait_for
from tests.support import chain_actions

pytestmark = pytest.mark.e2e

CHAIN_BEHIND_SECONDS = 120  # the lagging chain's blocks are dated two minutes behind the gateway's clock


@pytest.fixture(scope="module")
def behind_chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil whose clock runs behind the gateway's (equivalently: a gateway host whose clock is fast)."""
    with running_devchain(tmp_path_factory.mktemp("review-time-behind")) as private:
        private.w3.provider.make_request("evm_setTime", [int(time.time()) - CHAIN_BEHIND_SECONDS])  # type: ignore[arg-type]
        private.w3.provider.make_request("evm_mine", [])  # type: ignore[arg-type]
        yield private


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    """A private anvil on our clock, whose blocks one test mines by hand (automining restored after)."""
    with running_devchain(tmp_path_factory.mktemp("review-time-manual")) as private:
        yield private


def _settlement_nonce(chain: Devchain) -> int:
    return chain.w3.eth.get_transaction_count(settler(chain))


# -- 1. validAfter judged by our clock only ------------------------------------------------------------------


def test_a_payment_not_yet_valid_by_the_chains_clock_is_refused_before_the_upstream(
    start_gateway: GatewayFactory, behind_chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (free-rider/griefer): the chain's clock is behind the gateway's (its clock is public in
    every ``Date`` header). The attacker, with a funded account, signs ``get_quote`` (settle: after)
    with ``validAfter`` 30 s in the past by the gateway's clock, which the chain's head has not
    reached. ``payment_window`` reads ``validBefore`` only; the local facilitator refuses
    ``validAfter > now`` with ``now = max(ours, the chain's)``: it passes. The upstream runs, the
    settlement is broadcast and the token reverts it (``authorization is not yet valid``): the
    upstream call is unpaid, the gas is the gateway's, and the payer is not struck (the revert is
    "explained"), so every fresh nonce does it again. Correct: a payment the chain would not take
    yet (``validAfter`` not below the chain's clock) is refused before the upstream and any broadcast."""
    chain = behind_chain
    gateway = start_gateway(demo_catalog(tmp_path, upstream), deployment_file=chain.deployment_file)
    payer = Payer(chain.key(3))
    attempts = 2
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/LAG"))
        nonce_before, eth_before = _settlement_nonce(chain), chain.w3.eth.get_balance(settler(chain))
        payer_before, payee_before = chain.balance(payer.address), chain.balance(PAY_TO)
        hits_before = upstream_hits(upstream, "GET /api/v1/quote/LAG")
        answers = []
        for _ in range(attempts):
            valid_after = int(time.time()) - 30  # past by the gateway's clock
            head = int(chain.w3.eth.get_block("latest")["timestamp"])
            assert head + 60 < valid_after, (head, valid_after)  # the scenario: future by the chain's clock
            header = encode_header(payer.sign(offer.accepts[0], resource=offer.resource, valid_after=valid_after).to_wire())
            answers.append(client.get("/quotes/LAG", headers={"PAYMENT-SIGNATURE": header}))
    broadcasts = _settlement_nonce(chain) - nonce_before
    gas = eth_before - chain.w3.eth.get_balance(settler(chain))
    upstream_calls = upstream_hits(upstream, "GET /api/v1/quote/LAG") - hits_before
    rows = [(str(r.state), r.error_reason, r.gas_cost) for r in gateway.ledger.all()]
    assert chain.balance(payer.address) == payer_before and chain.balance(PAY_TO) == payee_before  # nothing moved
    assert all(a.status_code == 402 for a in answers), [(a.status_code, a.text[:160]) for a in answers]
    assert not any(r[0] == str(PaymentState.SETTLED) for r in rows), rows
    assert broadcasts == 0 and upstream_calls == 0, (
        f"{attempts} payments not yet valid by the chain's clock (validAfter ~30 s past by ours, the chain "
        f"{CHAIN_BEHIND_SECONDS} s behind) were verified: {upstream_calls} unpaid upstream call(s), {broadcasts} "
        f"settlement broadcast(s) reverting on {gas} wei of the gateway's gas; answers "
        f"{[(a.status_code, a.text[:120]) for a in answers]}; ledger {rows}")


# -- 2. a Permit2 copy more than 64 blocks before our revert, found by the resolver ----------------------------


def test_a_permit2_copy_found_late_by_the_resolver_is_still_this_payment(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (griefer, on a congested chain): the gateway's exact-through-Permit2 settlement waits in
    the pool (its fee cap below a climbing base fee); the griefer sends the very same calldata to the
    (open) exact proxy with a fee that clears: the payer's price moves to payTo under this permit.
    The gateway's receipt wait (``receipt_timeout``) ends first, as it does on any real chain where
    64 blocks take minutes: the payer is answered "pending". The congestion lasts
    ``COPY_SCAN_BLOCKS`` + 2 blocks, then ours is mined and reverts (nonce used). The payer resends
    its payment to learn the outcome: the row is resolved by ``resolve_upto``, which knows no
    broadcast head and looks for the copy only in the 64 blocks before our receipt: not found, so
    the row fails (``permit_used_elsewhere``) and the payer, whose money is at payTo, gets no answer.
    Correct: the copy is this payment however the outcome is read (synchronously or later):
    settled by the copy, the stored answer served."""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=2,
                            resolve_pending_seconds=0)
    payer_index, griefer_index = 4, 7
    key, address = chain.key(payer_index), chain.address(payer_index)
    chain_actions.set_eth(chain.w3, chain.address(griefer_index), 10**22)
    griefer = chain.w3.eth.account.from_key(chain.key(griefer_index))
    path = "/q/LATER"
    header = _permit2_header(gateway, key, plain.address, path)
    pay_to_before = chain_actions.balance_of(chain.w3, plain.address, PAY_TO)
    payer_before = chain_actions.balance_of(chain.w3, plain.address, address)
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/LATER")
    set_base = "anvil_setNextBlockBaseFeePerGas"
    w3 = chain.w3

    _automine(chain, False)
    try:
        with ThreadPoolExecutor(1) as pool:
            first_call = pool.submit(lambda: httpx.get(f"{gateway.url}{path}", headers={"PAYMENT-SIGNATURE": header}, timeout=60))

            def in_pool() -> Any:
                assert not first_call.done(), first_call.result().text[:300]
                hashes = [r.tx_hash for r in _rows(gateway, address) if r.tx_hash and known(chain, r.tx_hash)]
                return hashes[0] if hashes else None

            tx = w3.eth.get_transaction(wait_for(in_pool, "the gateway's settlement in the node's pool", attempts=1200))
            raw = w3.provider.make_request("eth_getRawTransactionByHash", [tx["hash"].to_0x_hex()])["result"]  # type: ignore[arg-type]
            high = int(tx["maxFeePerGas"]) * 10**5  # far above our fee cap, for every block below
            w3.provider.make_request(set_base, [hex(high)])  # type: ignore[arg-type]
            copy_tx = {"from": griefer.address, "to": Web3.to_checksum_address(str(tx["to"])), "data": bytes(tx["input"]),
                       "gas": 400_000, "nonce": w3.eth.get_transaction_count(griefer.address, "pending"),
                       "maxFeePerGas": 2 * high, "maxPriorityFeePerGas": 10**9, "chainId": 31337}
            copy_hash = "0x" + bytes(w3.eth.send_raw_transaction(griefer.sign_transaction(copy_tx).raw_transaction)).hex()
            _mine(chain)  # the copy lands; ours waits in the pool, its fee cap below the base fee
            copy_block = int(w3.eth.get_transaction_receipt(copy_hash)["blockNumber"])  # type: ignore[arg-type]
            for _ in range(COPY_SCAN_BLOCKS + 2):
                w3.provider.make_request(set_base, [hex(high)])  # type: ignore[arg-type]
                _mine(chain)
            first = first_call.result(60)  # the gateway's receipt wait is over: the payer is told "pending"
        w3.provider.make_request(set_base, [hex(1)])  # type: ignore[arg-type]  # the congestion passes
        w3.provider.make_request("eth_sendRawTransaction", [raw])  # type: ignore[arg-type]  # ours, as signed
        _mine(chain)
    finally:
        _automine(chain, True)
        _mine(chain)
    ours = w3.eth.get_transaction_receipt(tx["hash"])
    assert ours["status"] == 0 and ours["blockNumber"] - copy_block > COPY_SCAN_BLOCKS, (ours["status"], ours["blockNumber"], copy_block)
    received = chain_actions.balance_of(chain.w3, plain.address, PAY_TO) - pay_to_before
    paid = payer_before - chain_actions.balance_of(chain.w3, plain.address, address)
    assert received == PLAIN_PRICE and paid == PLAIN_PRICE  # the payer paid, once, under this permit (the copy)
    with gateway.client() as http:
        resend = http.get(path, headers={"PAYMENT-SIGNATURE": header})  # the payer asks for its outcome
    rows = _rows(gateway, address)
    assert len(rows) == 1 and rows[0].state == PaymentState.SETTLED and resend.status_code == 200, (
        f"payTo received the payer's {received} under this permit (a copy mined {ours['blockNumber'] - copy_block} "
        f"blocks before our reverted settlement); the payer was first told {first.status_code} "
        f"{first.text[:120]!r}, then on its resend {resend.status_code} {resend.text[:200]!r}; the ledger says "
        f"{[(str(r.state), r.error_reason, r.refund_owed) for r in rows]}: charged without its answer")
    assert upstream_hits(upstream, "GET /api/v1/quote/LATER") - hits_before == 1


# -- 3. validAfter off by one: valid from this very second ---------------------------------------------------


def test_a_payment_valid_only_from_this_second_is_refused_before_the_upstream(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (free-rider/griefer): sign ``get_quote`` (settle: after) with ``validAfter`` = the
    gateway's current second. ``LocalFacilitator._authorization`` refuses only ``valid_after > now``;
    FiatToken requires ``block.timestamp > validAfter``. The block that takes the settlement is dated
    that same second (on Ethereum a block is dated at its slot's start, before the transactions it
    takes were sent; anvil and L2s date several blocks alike): the transfer reverts "not yet valid",
    the upstream ran unpaid, the gas is the gateway's, the payer is not struck. Correct: a payment
    the next block cannot take is refused before the upstream and any broadcast."""
    gateway = start_gateway(demo_catalog(tmp_path, upstream), deployment_file=chain.deployment_file)
    payer = Payer(chain.key(8))
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/EDGE"))
    nonce_before, eth_before = _settlement_nonce(chain), chain.w3.eth.get_balance(settler(chain))
    payee_before, hits_before = chain.balance(PAY_TO), upstream_hits(upstream, "GET /api/v1/quote/EDGE")
    valid_after = int(time.time())
    assert int(chain.w3.eth.get_block("latest")["timestamp"]) <= valid_after
    header = encode_header(payer.sign(offer.accepts[0], resource=offer.resource, valid_after=valid_after).to_wire())

    def same_second(_: Any) -> None:  # the block that takes our settlement is dated the second it was signed for
        chain.w3.provider.make_request("evm_setNextBlockTimestamp", [valid_after])  # type: ignore[arg-type]

    try:
        answer = _broadcast_then(chain, gateway, payer.address, lambda: httpx.get(
            f"{gateway.url}/quotes/EDGE", headers={"PAYMENT-SIGNATURE": header}, timeout=60), same_second)
    except AssertionError as refused:  # answered before any broadcast: what a fixed gateway does
        assert "answered before any broadcast" in str(refused), refused
        answer = None
    broadcasts = _settlement_nonce(chain) - nonce_before
    gas = eth_before - chain.w3.eth.get_balance(settler(chain))
    upstream_calls = upstream_hits(upstream, "GET /api/v1/quote/EDGE") - hits_before
    rows = [(str(r.state), r.error_reason, r.gas_cost) for r in gateway.ledger.all()]
    assert chain.balance(PAY_TO) == payee_before  # nothing moved either way
    assert broadcasts == 0 and upstream_calls == 0, (
        f"a payment valid only after {valid_after} (the block taking it dated {valid_after}) was verified: "
        f"{upstream_calls} unpaid upstream call(s), {broadcasts} settlement broadcast(s) reverting on {gas} wei of "
        f"the gateway's gas; answer {answer.status_code if answer is not None else None} "
        f"{answer.text[:120] if answer is not None else ''!r}; ledger {rows}")
