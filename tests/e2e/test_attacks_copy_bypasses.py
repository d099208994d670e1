"""Ways around two of the day's fixes (b0bee52, c7ed6ab), found by an attack review (2026-12-05,
evening), and closed: the ``Settled`` rule is gone (a use of the authorization that moved this very
payment to payTo settles it, through whatever contract; gateways that sell on one payTo share their
store and ledger, README), and ``traced_calls`` reads every frame of the trace (the node's answer is
in memory whole already).

Both holes let a griefer — anyone who watches the mempool, spending only its own gas — turn a
copy of the gateway's pending settlement into a charge with no answer for an honest payer. The
payer's price reaches payTo under its own authorization, yet the gateway answers 402 and records
the row ``failed``, with no refund owed:

1. EIP-3009 (c7ed6ab, ``exact_resolve.taken_for_ours``): a use of the authorization that carries a
   ``Settled(index, payer, nonce)`` log is taken for "another gateway's batch". The log's emitter is
   never checked, and anyone can deploy a BatchSettler (contracts/BatchSettler.sol) with itself as
   ``settler``. So the griefer sends our pending ``transferWithAuthorization`` through a BatchSettler
   of its own, with a higher tip. Our transaction reverts on "authorization used", and
   ``settled_elsewhere`` finds the griefer's transaction, which moved this very payment to payTo.
   Because that transaction carries a ``Settled`` log, the copy is not taken for ours.
2. Permit2 (b0bee52, ``JsonRpcChain.traced_calls``): a copy wrapped in another contract's call is
   found in the node's trace, but only the first 4,096 frames were read. They
   are read depth first from the LAST child, so a wrapper that makes our call to the proxy and then
   4,200 empty calls (≈0.6 M gas) hides it. ``_wrapped_call`` then says "no copy", and the payment
   fails as ``permit2_nonce_used``.

Private anvil: automining is switched off to put the copy ahead of the gateway's own transaction in
one block (``_broadcast_then`` from tests/e2e/test_attacks_permit2_copies.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi import decode as abi_decode
from eth_abi import encode as abi_encode
from eth_account import Account
from web3 import Web3
from web3.utils.address import get_create_address

from gateway.devkit.devchain import deploy_batch_settler
from settlement.chain.client import JsonRpcChain
from settlement.ledger import PaymentState
from settlement.schemes.batch import SEL_BATCH_SETTLE
from settlement.schemes.upto_permit import PERMIT2_ADDRESS
from tests.conftest import PAY_TO, Devchain, GatewayFactory, demo_catalog, running_devchain, upstream_hits
from tests.e2e.test_attacks_code_payers import PLAIN_CATALOG, PLAIN_PRICE, SEL_APPROVE
from tests.e2e.test_attacks_gas import QUOTE_PRICE, fresh_payer, pay_header, send_tx
from tests.e2e.test_attacks_permit2_copies import _broadcast_then, _permit2_header, _raw_send, _rows
from tests.support import chain_actions

pytestmark = pytest.mark.e2e

AUTH_TYPES = ["address", "address", "uint256", "uint256", "uint256", "bytes32", "uint8", "bytes32", "bytes32"]
AUTH_TUPLE = "(" + ",".join(AUTH_TYPES) + ")"
PADDING_CALLS = 4_200  # empty calls made after our call to the proxy (the first fix read 4,096 frames)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devchain]:
    with running_devchain(tmp_path_factory.mktemp("review-fix-bypasses-2")) as private:
        yield private


def _griefer(chain: Devchain) -> tuple[str, str]:
    key = "0x" + bytes(Account.create().key).hex()
    address = Account.from_key(key).address
    chain_actions.set_eth(chain.w3, address)
    return key, address


def _answered_or_owed(first: httpx.Response, rows: list[Any]) -> bool:
    return first.status_code == 200 or any(r.state == PaymentState.SETTLED or r.refund_owed for r in rows)


# -- 1. EIP-3009: a copy sent through the griefer's own BatchSettler is "another gateway's batch" ----------


def test_a_copy_sent_through_a_griefers_own_batch_settler_is_still_this_payment(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (griefer): deploy BatchSettler with yourself as its settler (one transaction, once).
    For every pending ``transferWithAuthorization`` the gateway broadcasts, send the same signed
    authorization through ``BatchSettler.settle`` with a higher tip. The token moves the payer's price
    to payTo under that authorization (AuthorizationUsed, then Transfer), and the settler logs
    ``Settled(0, payer, nonce)``. The gateway's own transaction then reverts on "authorization used".
    ``settled_elsewhere`` finds the griefer's transaction and checks ``moved``, which passes, but
    ``taken_for_ours`` sees the ``Settled`` log (from any address) and calls it another gateway's
    batch. Result: the refusal stands (402), the row is ``failed``, the payer is charged with no
    answer and nothing is owed. The same read makes ``resolve_exact`` fail the row.

    Correct: this is our payment, settled by a copy (as for a copy sent straight to the token): the
    answer is served, or at the least the row is settled or a refund owed."""
    gateway = start_gateway(demo_catalog(tmp_path, upstream), deployment_file=chain.deployment_file,
                            receipt_timeout_seconds=60)
    key = fresh_payer(chain, 2 * QUOTE_PRICE)
    payer = Account.from_key(key).address
    griefer_key, griefer = _griefer(chain)
    own_settler = deploy_batch_settler(chain.anvil.rpc_url, griefer, deployer_key=griefer_key)
    with gateway.client() as client:
        header = pay_header(client, key, "/quotes/AAPL")
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/AAPL")
    pay_to_before, payer_before = chain.balance(PAY_TO), chain.balance(payer)
    copies: list[str] = []
    ours: list[str] = []

    def copy(tx: Any) -> None:  # the griefer's copy of the pending settlement, through its own BatchSettler
        ours.append(tx["hash"].to_0x_hex())
        data = bytes(tx["input"])
        authorization = abi_decode(AUTH_TYPES, data[4:])
        batch = SEL_BATCH_SETTLE + abi_encode(["address", f"{AUTH_TUPLE}[]"], [chain.token, [authorization]])
        copies.append(_raw_send(chain.w3, griefer_key, own_settler, batch, tip=10 * 10**9))

    first = _broadcast_then(chain, gateway, payer, lambda: httpx.get(
        f"{gateway.url}/quotes/AAPL", headers={"PAYMENT-SIGNATURE": header}, timeout=90), copy)

    copied = chain.w3.eth.get_transaction_receipt(copies[0])  # type: ignore[arg-type]
    our_receipt = chain.w3.eth.get_transaction_receipt(ours[0])  # type: ignore[arg-type]
    assert copied["status"] == 1 and our_receipt["status"] == 0, (copied["status"], our_receipt["status"])
    received = chain.balance(PAY_TO) - pay_to_before
    charged = payer_before - chain.balance(payer)
    assert received == QUOTE_PRICE and charged == QUOTE_PRICE  # this very authorization paid payTo, once
    rows = _rows(gateway, payer)
    hits = upstream_hits(upstream, "GET /api/v1/quote/AAPL") - hits_before
    assert _answered_or_owed(first, rows), (
        f"the payer's {charged} reached payTo under its own authorization (the griefer's copy {copies[0]} through "
        f"a BatchSettler it deployed itself, {own_settler}), yet the answer was {first.status_code} "
        f"{first.text[:200]!r} after {hits} upstream call(s), and the ledger says "
        f"{[(str(r.state), r.error_reason, r.refund_owed) for r in rows]}: charged without the answer it paid for")


# -- 2. Permit2: a wrapped copy hidden behind more than 4,096 frames -------------------------


def _padding_wrapper_code(proxy: str, junk: str, padding: int) -> bytes:
    """Init code of a contract whose every call forwards its calldata to ``proxy`` (our very call),
    then makes ``padding`` empty calls to ``junk``. Raw EVM (Shanghai+: PUSH0)."""
    head = bytes.fromhex("365f5f37" "5f5f365f5f73") + bytes.fromhex(proxy[2:]) + bytes.fromhex("5af150")
    head += b"\x61" + padding.to_bytes(2, "big")
    loop = len(head)
    body = bytes.fromhex("5b8015") + b"\x61" + b"\x00\x00" + bytes.fromhex("57" "5f5f5f5f5f73") + bytes.fromhex(junk[2:])
    body += bytes.fromhex("5af150" "600190" "03") + b"\x61" + loop.to_bytes(2, "big") + b"\x56"
    end = loop + len(body)
    body = body[:4] + end.to_bytes(2, "big") + body[6:]
    runtime = head + body + bytes.fromhex("5b00")
    init = b"\x61" + len(runtime).to_bytes(2, "big") + bytes.fromhex("80600a5f395ff3")
    assert len(init) == 10
    return init + runtime


def test_a_wrapped_permit2_copy_hidden_behind_padding_frames_is_still_this_payment(
    start_gateway: GatewayFactory, chain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Attack (griefer): a wrapper contract (raw bytecode, ~80 bytes) that makes the gateway's
    pending proxy ``settle`` call, then 4,200 empty calls. The griefer sends our calldata to it with a
    higher tip (≈0.6 M gas). The copy moves exactly this permit's amount to payTo, and our own
    transaction reverts on Permit2's used nonce. ``traced_calls`` reads the callTracer frames depth
    first from the last child and stopped after 4,096, so it never reaches our call to
    the proxy (the wrapper's first child). ``_wrapped_call`` says False and ``copied_settlement``
    None. The row goes ``failed`` (``permit2_nonce_used``) and the answer is a 402: the payer is
    charged with no answer and nothing is owed. b0bee52 closed this hole for a Multicall3 copy only.

    Correct: a trace that was not read whole proves no "not a copy" (unknown, pending), or the
    proxy's frame is searched for without a cap that hides it."""
    plain = chain.deployment.plain_token
    assert plain is not None
    catalog = tmp_path / "plain.yaml"
    catalog.write_text(PLAIN_CATALOG.format(token=plain.address, pay_to=PAY_TO, upstream=upstream))
    gateway = start_gateway(catalog, deployment_file=chain.deployment_file, receipt_timeout_seconds=60)
    key = fresh_payer(chain, 0)
    payer = Account.from_key(key).address
    chain_actions.transfer(chain.w3, plain.address, chain.key(8), payer, 2 * PLAIN_PRICE)
    approve = send_tx(chain.w3, key, plain.address,
                      SEL_APPROVE + abi_encode(["address", "uint256"], [Web3.to_checksum_address(PERMIT2_ADDRESS), 2**256 - 1]))
    assert approve["status"] == 1
    griefer_key, _ = _griefer(chain)
    header = _permit2_header(gateway, key, plain.address, "/q/PADA")  # type: ignore[arg-type]
    hits_before = upstream_hits(upstream, "GET /api/v1/quote/PADA")
    pay_to_before = chain_actions.balance_of(chain.w3, plain.address, PAY_TO)
    copies: list[str] = []
    ours: list[str] = []

    def copy(tx: Any) -> None:
        ours.append(tx["hash"].to_0x_hex())
        code = _padding_wrapper_code(str(tx["to"]), "0x000000000000000000000000000000000000dEaD", PADDING_CALLS)
        # Deployed now, in the same (not yet mined) block, ahead of the copy that calls it.
        account = Account.from_key(griefer_key)
        nonce = chain.w3.eth.get_transaction_count(account.address, "pending")
        deploy = {"from": account.address, "data": code, "gas": 300_000, "nonce": nonce,
                  "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": 20 * 10**9, "chainId": 31337}
        chain.w3.eth.send_raw_transaction(account.sign_transaction(deploy).raw_transaction)
        wrapper = get_create_address(account.address, nonce)
        send = {"from": account.address, "to": wrapper, "data": bytes(tx["input"]), "gas": 3_000_000,
                "nonce": nonce + 1, "maxFeePerGas": 200 * 10**9, "maxPriorityFeePerGas": 10 * 10**9, "chainId": 31337}
        copies.append("0x" + bytes(chain.w3.eth.send_raw_transaction(account.sign_transaction(send).raw_transaction)).hex())

    first = _broadcast_then(chain, gateway, payer, lambda: httpx.get(
        f"{gateway.url}/q/PADA", headers={"PAYMENT-SIGNATURE": header}, timeout=90), copy)

    copied = chain.w3.eth.get_transaction_receipt(copies[0])  # type: ignore[arg-type]
    our_receipt = chain.w3.eth.get_transaction_receipt(ours[0])  # type: ignore[arg-type]
    assert copied["status"] == 1 and our_receipt["status"] == 0, (copied["status"], our_receipt["status"])
    received = chain_actions.balance_of(chain.w3, plain.address, PAY_TO) - pay_to_before
    assert received == PLAIN_PRICE  # the copy moved this permit's amount to payTo, once
    calls = asyncio.run(JsonRpcChain(chain.anvil.rpc_url, 31337, None).traced_calls(copies[0]))
    assert calls is not None and len(calls) > PADDING_CALLS  # every frame read: the padding and our call
    rows = _rows(gateway, payer)
    hits = upstream_hits(upstream, "GET /api/v1/quote/PADA") - hits_before
    assert _answered_or_owed(first, rows), (
        f"the payer's {PLAIN_PRICE} reached payTo under this very permit (a copy made through a wrapper that pads "
        f"its trace past 4,096 frames, gas {copied['gasUsed']}), yet the answer was "
        f"{first.status_code} {first.text[:200]!r} after {hits} upstream call(s) and the ledger says "
        f"{[(str(r.state), r.error_reason, r.refund_owed) for r in rows]}: charged without the answer it paid for")
