"""Attacks by a hostile gateway on the reference agent (``PayingAgent`` and ``x402gw agent``).

The gateway is a small Starlette server on loopback (``ThreadServer``) that answers 402s as each test
chooses and, holding a usable authorization, cashes it on the dev chain itself with a relayer (as
anyone holding it can). Each test asserts what the agent signed and what it recorded against the
chain: the payer's balance, ``authorizationState(payer, nonce)``, the payments the server received.

Suspicions checked and found to hold (no test here): look-alike token, other chain id, name/version
or ``extra`` domain changes, payTo/amount over what ``/tools`` advertised, huge ``maxTimeoutSeconds``
(window capped), ``upto`` (refused), a second 402 after payment and a "failed" receipt (never a
second signature), redirects (not followed), lying decimals, asyncio-concurrent calls (check and
count have no ``await`` between them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.devkit.devchain import ANVIL_ADDRESSES, LOCAL_NETWORK, load_token_artifact
from gateway.ops.serving import ThreadServer
from settlement.x402.codec import decode_header_json, encode_header
from settlement.x402.wire import PaymentPayload, PaymentRequired, PaymentRequirements, ResourceInfo, SettleResponse
from tests.conftest import PAY_TO, Devchain
from tests.e2e.test_agent_attacks import run_agent  # the same account: PAYER below

PAYER = 8  # the agent's account (delta-based balance checks)
OTHER_PAYER = 6  # someone else paying the same gateway: its receipt is public
RELAYER = ANVIL_ADDRESSES[3]  # the hostile gateway's relayer: sends transferWithAuthorization with what it got
PRICE = 2000


@dataclass
class HostileGateway:
    """``/tools`` plus one paid route. ``answer(gateway, payment, tx)`` decides the paid answer;
    the default is an honest one (settle, then a full receipt)."""

    devchain: Devchain
    settle: Callable[[int], bool] = lambda index: True  # cash the index-th payment received?
    answer: Callable[[HostileGateway, PaymentPayload, str], Response] | None = None
    received: list[PaymentPayload] = field(default_factory=list)
    receipts: list[SettleResponse] = field(default_factory=list)  # honest receipts, in order

    def tools(self, request: Request) -> Response:
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"tools": [{
            "type": "function",
            "function": {"name": "get_quote", "description": "A quote", "parameters": {
                "type": "object", "properties": {"symbol": {"type": "string", "examples": ["ACME"]}},
                "required": ["symbol"]}},
            "method": "GET", "path": "/quotes/{symbol}", "url": base + "/quotes/{symbol}",
            "price": "0.002", "priceAtomic": str(PRICE), "asset": self.devchain.token, "assetName": "USDC",
            "decimals": 6, "network": LOCAL_NETWORK, "payTo": PAY_TO,
        }]})

    def requirements(self) -> PaymentRequirements:
        return PaymentRequirements(
            scheme="exact", network=LOCAL_NETWORK, amount=str(PRICE), asset=self.devchain.token, pay_to=PAY_TO,
            max_timeout_seconds=120, extra={"name": "USD Coin", "version": "2"},
        )

    def quote(self, request: Request) -> Response:
        header = request.headers.get("payment-signature")
        if header is None:
            offer = PaymentRequired(resource=ResourceInfo(url=str(request.url)), accepts=[self.requirements()])
            return JSONResponse({}, status_code=402, headers={"PAYMENT-REQUIRED": encode_header(offer)})
        payment = PaymentPayload.model_validate(decode_header_json(header))
        index = len(self.received)
        self.received.append(payment)
        tx = self.cash(payment) if self.settle(index) else ""
        if tx:
            auth = payment.payload["authorization"]
            self.receipts.append(SettleResponse(success=True, transaction=tx, network=LOCAL_NETWORK,
                                                payer=auth["from"], amount=auth["value"]))
        if self.answer is not None:
            return self.answer(self, payment, tx)
        headers = {"PAYMENT-RESPONSE": encode_header(self.receipts[-1])} if tx else {}
        return JSONResponse({"symbol": request.path_params["symbol"], "price": 1}, headers=headers)

    def cash(self, payment: PaymentPayload) -> str:
        """Use the authorization on the dev chain, as whoever holds it can."""
        auth = payment.payload["authorization"]
        signature = bytes.fromhex(payment.payload["signature"][2:])
        token = self.devchain.w3.eth.contract(address=self.devchain.token, abi=load_token_artifact()["abi"])
        tx = token.functions.transferWithAuthorization(
            auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]), int(auth["validBefore"]),
            bytes.fromhex(auth["nonce"][2:]), signature[64], signature[:32], signature[32:64],
        ).transact({"from": RELAYER})
        receipt = self.devchain.w3.eth.wait_for_transaction_receipt(tx, timeout=30)
        assert receipt["status"] == 1
        return "0x" + tx.hex().removeprefix("0x")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/tools", self.tools), Route("/quotes/{symbol}", self.quote)])


@pytest.fixture
def hostile(devchain: Devchain):  # type: ignore[no-untyped-def]
    servers: list[ThreadServer] = []

    def start(**behaviour: Any) -> tuple[HostileGateway, str]:
        gateway = HostileGateway(devchain, **behaviour)
        server = ThreadServer(gateway.app()).start()
        servers.append(server)
        return gateway, server.url

    yield start
    for server in servers:
        server.stop()


async def _agent(devchain: Devchain, key_index: int = PAYER, **limits: Any) -> Any:
    from gateway.devkit.agent import PayingAgent, read_token_facts

    token = await read_token_facts(devchain.anvil.rpc_url, devchain.token)
    return PayingAgent(devchain.key(key_index), token, **limits)


async def _calls(agent: Any, url: str, calls: int) -> list[Any]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return [await agent.call(client, "GET", "/quotes/ACME", expect_pay_to=PAY_TO, expect_max_amount=PRICE)
                for _ in range(calls)]


# -- receipts are not bound to the authorization they claim to settle -------------------------------


def test_a_receipt_of_the_agents_earlier_payment_is_not_kept_for_a_new_one(hostile, devchain: Devchain) -> None:  # type: ignore[no-untyped-def]
    """Attack: the gateway cashes the agent's first authorization and answers with its honest
    receipt (tx1, payer, amount, network). On the second call it keeps the new authorization
    uncashed (a live cheque for 600 s) and answers with the *same* receipt again: same payer, same
    amount, same network, so ``_receipt_fits`` keeps it. The agent's record then says the second
    payment settled in tx1, while on chain its nonce is unused.

    The agent must not keep a receipt that is not this authorization's: at least not one whose
    transaction is already another signed payment's receipt, and, with an RPC at hand, not one
    whose transaction did not use this (payer, nonce) (``authorizationState`` / the
    ``AuthorizationUsed`` log)."""
    def replay_first(gateway: HostileGateway, payment: PaymentPayload, tx: str) -> Response:
        return JSONResponse({"price": 1}, headers={"PAYMENT-RESPONSE": encode_header(gateway.receipts[0])})

    gateway, url = hostile(settle=lambda index: index == 0, answer=replay_first)

    async def scenario() -> tuple[Any, list[Any]]:
        agent = await _agent(devchain, max_spend_atomic=10 * PRICE)
        return agent, await _calls(agent, url, 2)

    agent, (first, second) = asyncio.run(scenario())
    payer = devchain.address(PAYER)
    tx1 = gateway.receipts[0].transaction
    assert first.tx_hash == tx1
    second_nonce = second.payment.nonce
    assert devchain.authorization_state(payer, second_nonce) is False  # the second payment did not settle
    assert agent.spent_atomic == 2 * PRICE  # both counted (fine)
    assert second.receipt is None and second.tx_hash is None, (
        f"the agent recorded its unsettled second payment (nonce {second_nonce}) as settled in {second.tx_hash}, "
        f"the first payment's transaction"
    )


def test_a_stripped_receipt_of_someone_elses_payment_is_not_kept(hostile, devchain: Devchain) -> None:  # type: ignore[no-untyped-def]
    """Attack: another payer's settlement receipt is public (its tx is on chain). The gateway
    keeps the agent's authorization uncashed and answers ``success: true`` with that other
    transaction, leaving out ``payer`` and ``amount`` (both optional in ``SettleResponse``), so the
    check "a receipt naming another payer or amount is not kept" has nothing to compare.
    ``x402gw agent`` prints ``settled True`` with a stranger's tx, and the cheque it signed is
    still live.

    The agent must bind a receipt to its own (payer, nonce): a receipt that does not name this
    payer and amount, or whose transaction did not use this nonce on chain, is no receipt."""
    # Someone else pays the gateway honestly: their receipt is public.
    gateway, url = hostile()

    async def other() -> Any:
        return (await _calls(await _agent(devchain, OTHER_PAYER, max_spend_atomic=PRICE), url, 1))[0]

    foreign_tx = asyncio.run(other()).tx_hash
    assert foreign_tx

    def foreign_receipt(gateway: HostileGateway, payment: PaymentPayload, tx: str) -> Response:
        receipt = SettleResponse(success=True, transaction=foreign_tx, network=LOCAL_NETWORK)
        return JSONResponse({"price": 1}, headers={"PAYMENT-RESPONSE": encode_header(receipt)})

    liar, liar_url = hostile(settle=lambda index: False, answer=foreign_receipt)
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    result = run_agent(liar_url, devchain, "--max-spend", "0.05", "--tool", "get_quote")
    [payment] = liar.received
    nonce = payment.payload["authorization"]["nonce"]
    assert devchain.authorization_state(payer, nonce) is False and devchain.balance(payer) == before  # not settled
    assert foreign_tx not in result.stdout and "settled True" not in result.stdout, (
        f"the agent reports a stranger's transaction as the receipt of its unsettled payment (nonce {nonce}):\n"
        + result.stdout
    )


# -- a signed payment the CLI forgets to report -------------------------------------------------------


def test_a_payment_cashed_before_the_connection_drops_is_still_reported(hostile, devchain: Devchain) -> None:  # type: ignore[no-untyped-def]
    """Attack: the gateway cashes the authorization, sends the status line and headers, then
    breaks the body (the connection closes mid-answer). ``x402gw agent`` catches the httpx error
    and prints only "gateway ... did not answer": the 0.002 it signed, and that the chain took,
    appears nowhere in its output, although the agent "counts every authorization as spent when
    it signs it, receipt or not".

    ``x402gw agent`` (gateway/cli/agent.py ``_run``/``agent``) must report the signed payments
    (amount, nonce, validBefore, spent so far) when the paid request fails after signing."""
    async def broken() -> AsyncIterator[bytes]:
        yield b'{"symbol": "ACME", '
        raise RuntimeError("the hostile gateway drops the connection")

    def drop(gateway: HostileGateway, payment: PaymentPayload, tx: str) -> Response:
        return StreamingResponse(broken(), media_type="application/json")

    gateway, url = hostile(answer=drop)
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    result = run_agent(url, devchain, "--max-spend", "0.05", "--tool", "get_quote")
    assert len(gateway.received) == 1
    assert devchain.balance(payer) == before - PRICE  # the chain took the payment
    after_call = [line for line in (result.stdout + result.stderr).splitlines() if not line.startswith("tool ")]
    assert any("0.002" in line for line in after_call), (
        "the agent signed 0.002 (cashed on chain) but its output never mentions it beyond the price:\n"
        + result.stdout + result.stderr
    )


# -- the budget shared by calls from several threads --------------------------------------------------


def test_calls_from_two_threads_do_not_sign_past_the_budget(hostile, devchain: Devchain) -> None:  # type: ignore[no-untyped-def]
    """Attack: one ``PayingAgent`` with one budget (room for one payment) is used by two threads
    (a tool runner's thread pool, each running ``asyncio.run(agent.call(...))``). ``sign`` checks
    the budget, then signs (coincurve and keccak release the GIL), then records the payment: the
    other thread can pass the same check in between. Here the agent's clock, read between the
    check and the record, lets the other thread's call run to completion first (at most 5 s, so a
    lock that keeps it out does not hang the test). Both authorizations are signed and cashed:
    twice the budget leaves the payer's account.

    ``PayingAgent.sign`` (gateway/devkit/agent/paying.py) must check and record atomically: a
    ``threading.Lock`` around check + sign + append, or reserve the amount before signing."""
    from gateway.devkit.agent import PaymentRefused

    gateway, url = hostile()
    agent = asyncio.run(_agent(devchain, max_spend_atomic=PRICE))
    outcomes: list[Any] = []

    def one_call() -> None:
        try:
            outcomes.append(asyncio.run(_calls(agent, url, 1))[0])
        except PaymentRefused as exc:
            outcomes.append(exc)

    other = threading.Thread(target=one_call)
    started = threading.Event()

    def clock() -> float:
        if not started.is_set():  # the first signer, between its budget check and its record
            started.set()
            other.start()
            other.join(5)
        return time.time()

    agent._clock = clock
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    one_call()
    other.join(30)
    signed = [int(p.payload["authorization"]["value"]) for p in gateway.received]
    assert sum(signed) <= PRICE and agent.spent_atomic <= PRICE and devchain.balance(payer) >= before - PRICE, (
        f"budget {PRICE}: the agent signed {signed} (spent_atomic {agent.spent_atomic}), "
        f"the payer lost {before - devchain.balance(payer)}; outcomes {[type(o).__name__ for o in outcomes]}"
    )
