"""The gateway settling through a REMOTE facilitator that is faulty, on a real anvil: six holes a
review found (2026-12-05, evening), each closed:

- a ``success`` naming another payment's transaction, or one never mined, served the content
  unpaid; a ``success: false`` naming a transaction that landed was a plain 402 for a charged
  payer. Where the gateway has a chain client for the network, every settle answer that claims
  success or names a transaction is held to the chain (``settlement/schemes/remote_confirm.py``):
  settled only by a transaction that moved this very authorization to payTo, unknown (503,
  pending) while nothing moved;
- the ledger, refunds, budgets and limits took the payer the facilitator named (its spelling, or
  another address): they take the signer recovered offline now, and a verification naming another
  payer is no verification (503);
- the signed value and recipient were left to the facilitator: the gateway checks them itself at
  decode (an underpayment is a 402, before any facilitator is asked).

Each facilitator here is a real one (our facilitator API over the test chain, or the official x402
SDK's facilitator) on loopback; where it is faulty, a proxy in front of it rewrites one thing the
way a buggy facilitator (or the load balancer before it) does. Every test asserts the invariant on
chain balances, ledger rows and upstream hits:

* no content without this request's own payment settled (or certain to settle);
* never a charge without the answer (an unknown or settled outcome is never a plain 402);
* the ledger agrees with the chain.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_typing import HexStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.ledger import Payment, PaymentState
from tests.conftest import (
    PAY_TO,
    Devchain,
    GatewayFactory,
    RunningGateway,
    body_json,
    demo_catalog,
    upstream_hits,
)
from tests.e2e.test_exactly_once import UPFRONT_TOOL
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.local_facilitator import local_facilitator_app

NETWORK = "eip155:31337"
PRICE = 2000  # /quotes/AAPL: 0.002 USDC
QUOTE = "GET /api/v1/quote/AAPL"

Json = dict[str, Any]
Handler = Callable[[Json], Awaitable[tuple[int, Json]]]


class ProxiedFacilitator:
    """A real facilitator behind a proxy: by default every request and answer passes unchanged;
    a test replaces ``verify`` or ``settle`` with its own handler (which may ``forward``)."""

    def __init__(self, behind: str) -> None:
        self.behind = behind.rstrip("/")
        self.verify: Handler = self.forward_verify
        self.settle: Handler = self.forward_settle
        self.real_settles: list[Json] = []  # what the real facilitator answered to /settle
        self.server = ThreadServer(
            Starlette(
                routes=[
                    Route("/supported", self._supported, methods=["GET"]),
                    Route("/verify", self._verify, methods=["POST"]),
                    Route("/settle", self._settle, methods=["POST"]),
                ]
            )
        )

    @property
    def url(self) -> str:
        return self.server.url

    async def forward(self, path: str, body: Json) -> tuple[int, Json]:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(f"{self.behind}{path}", json=body)
        return response.status_code, response.json()

    async def forward_verify(self, body: Json) -> tuple[int, Json]:
        return await self.forward("/verify", body)

    async def forward_settle(self, body: Json) -> tuple[int, Json]:
        status, answer = await self.forward("/settle", body)
        self.real_settles.append(answer)
        return status, answer

    async def _supported(self, request: Request) -> Response:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{self.behind}/supported")
        return JSONResponse(response.json(), status_code=response.status_code)

    async def _verify(self, request: Request) -> Response:
        status, answer = await self.verify(await request.json())
        return JSONResponse(answer, status_code=status)

    async def _settle(self, request: Request) -> Response:
        status, answer = await self.settle(await request.json())
        return JSONResponse(answer, status_code=status)


@pytest.fixture
def ours(devchain: Devchain) -> Iterator[str]:
    """Our facilitator API over the test anvil (settles with the deployment's settlement key)."""
    with ThreadServer(local_facilitator_app(devchain.deployment)) as server:
        yield f"{server.url}/facilitator"


@pytest.fixture
def proxied(ours: str) -> Iterator[ProxiedFacilitator]:
    proxy = ProxiedFacilitator(ours)
    proxy.server.start()
    yield proxy
    proxy.server.stop()


def remote_gateway(start_gateway: GatewayFactory, url: str, **overrides: Any) -> RunningGateway:
    """A gateway wired from settings, as production runs it (X402GW_FACILITATORS): the remote
    facilitator settles; the gateway keeps a read-only client of the chain (and the refund key's)."""
    return start_gateway(facilitators={NETWORK: url}, **overrides)


def paid_call(gateway: RunningGateway, devchain: Devchain, payer: int, path: str = "/quotes/AAPL",
              **kwargs: Any) -> httpx.Response:
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", path, payer=payer, **kwargs)
    return paid


def settled_rows(gateway: RunningGateway) -> list[Payment]:
    return [row for row in gateway.ledger.all() if row.state == PaymentState.SETTLED]


def assert_ledger_agrees_with_chain(gateway: RunningGateway, devchain: Devchain, pay_to_before: int) -> None:
    """Every settled row is its own authorization used on chain, in a transaction of its own, and
    the payee received exactly what the ledger says was settled."""
    rows = settled_rows(gateway)
    for row in rows:
        assert devchain.authorization_state(row.payer, row.nonce), f"row {row.id} settled, its nonce unused on chain"
    hashes = [row.tx_hash for row in rows]
    assert len(hashes) == len(set(hashes)), f"one transaction settles several ledger rows: {hashes}"
    assert devchain.balance(PAY_TO) - pay_to_before == sum(row.amount for row in rows), (
        "the payee's balance on chain differs from what the ledger settled"
    )


# ------------------------------------------------------------------------ settle: a success that is not ours


def test_a_success_naming_another_payments_transaction_serves_the_content_unpaid(
    start_gateway: GatewayFactory, proxied: ProxiedFacilitator, devchain: Devchain, upstream: str
) -> None:
    """A facilitator whose idempotency cache answers a later /settle with an earlier payment's
    success (same network, a real mined transaction, status 200) without broadcasting anything.
    The gateway takes ``success: true`` on trust: the second payer's content is served, its row is
    ``settled`` with the first payment's transaction, and nothing moved for it on chain."""
    first_payer, second_payer = 3, 4

    async def stale_cache(body: Json) -> tuple[int, Json]:
        if not proxied.real_settles:
            return await proxied.forward_settle(body)
        return 200, proxied.real_settles[0]  # the cached answer of another authorization

    proxied.settle = stale_cache
    gateway = remote_gateway(start_gateway, proxied.url)
    pay_to_before = devchain.balance(PAY_TO)
    first = paid_call(gateway, devchain, first_payer)
    assert first.status_code == 200, first.text
    second_before = devchain.balance(devchain.address(second_payer))

    second = paid_call(gateway, devchain, second_payer)

    moved = devchain.balance(devchain.address(second_payer)) - second_before
    assert upstream_hits(upstream, QUOTE) == 2
    assert not (second.status_code == 200 and moved == 0), (
        f"content served to payer {second_payer} for a payment that never moved on chain "
        f"(receipt names {receipt_of(second).transaction}, the first payment's transaction)"
    )
    assert_ledger_agrees_with_chain(gateway, devchain, pay_to_before)


def test_a_success_that_never_happened_on_chain_serves_the_content_and_books_revenue(
    start_gateway: GatewayFactory, proxied: ProxiedFacilitator, devchain: Devchain, upstream: str
) -> None:
    """A facilitator (or a proxy answering for it) that says ``success: true`` with a well-formed
    transaction hash and never broadcast: the content is served and the ledger books the revenue,
    although the gateway has this network's chain and the authorization is unused there."""
    payer = 6
    never_mined = "0x" + "5e" * 32

    async def says_settled(body: Json) -> tuple[int, Json]:
        auth = body["paymentPayload"]["payload"]["authorization"]
        return 200, {"success": True, "transaction": never_mined, "network": body["paymentRequirements"]["network"],
                     "payer": auth["from"]}

    proxied.settle = says_settled
    gateway = remote_gateway(start_gateway, proxied.url)
    pay_to_before, payer_before = devchain.balance(PAY_TO), devchain.balance(devchain.address(payer))

    paid = paid_call(gateway, devchain, payer)

    assert devchain.balance(devchain.address(payer)) == payer_before  # nothing moved
    assert not (paid.status_code == 200 and "symbol" in body_json(paid)), "content served for a transfer that never happened"
    assert_ledger_agrees_with_chain(gateway, devchain, pay_to_before)


# ------------------------------------------------------------------------ settle: a failure that moved money


def test_a_failure_naming_a_transaction_that_landed_is_a_plain_402_for_a_charged_payer(
    start_gateway: GatewayFactory, proxied: ProxiedFacilitator, devchain: Devchain, upstream: str
) -> None:
    """The official SDK's facilitator answers ``success: false, errorReason: transaction_failed``
    WITH the transaction hash when it broadcast, could not confirm the receipt and could not record
    it as pending (``x402.mechanisms.evm.settle_receipt``: "downgraded to failed_reason, preserving
    tx_hash for manual reconciliation"): the transfer may well land. Here it did. The gateway reads
    the reason as a definite refusal: 402 with a fresh offer ("nothing was charged; pay again"),
    the row ``failed``, while the payer was charged and never gets the answer."""
    payer = 2

    async def downgraded(body: Json) -> tuple[int, Json]:
        _, real = await proxied.forward_settle(body)
        assert real["success"] is True  # it landed
        return 200, {"success": False, "errorReason": "transaction_failed",
                     "errorMessage": "settlement_pending, but failed to persist for retry: store unavailable",
                     "transaction": real["transaction"], "network": real["network"], "payer": real.get("payer")}

    proxied.settle = downgraded
    gateway = remote_gateway(start_gateway, proxied.url)
    pay_to_before, payer_before = devchain.balance(PAY_TO), devchain.balance(devchain.address(payer))

    paid = paid_call(gateway, devchain, payer)

    [tx] = [answer["transaction"] for answer in proxied.real_settles]
    assert devchain.w3.eth.get_transaction_receipt(HexStr(tx))["status"] == 1
    assert devchain.balance(devchain.address(payer)) == payer_before - PRICE  # the payer WAS charged
    assert upstream_hits(upstream, QUOTE) == 1
    assert paid.status_code != 402 and "payment-required" not in paid.headers, (
        f"charged payer told to pay again: {paid.status_code} {paid.text[:200]}"
    )
    [row] = gateway.ledger.all()
    assert row.state != PaymentState.FAILED, f"ledger says failed ({row.error_reason}); the chain moved {PRICE}"
    assert_ledger_agrees_with_chain(gateway, devchain, pay_to_before)


# ------------------------------------------------------------------------ verify: the payer the facilitator names


def test_a_payer_the_facilitator_spells_in_lower_case_never_gets_its_answer_again(
    start_gateway: GatewayFactory, proxied: ProxiedFacilitator, devchain: Devchain, upstream: str
) -> None:
    """The gateway records the ledger row under the remote facilitator's ``payer`` (verify.py,
    ``payer=paid.verified.payer or paid.signer``) but looks payments up by the checksummed signer it
    recovered itself (``by_authorization(..., paid.signer, ...)``, an exact string match). A
    facilitator that spells addresses in lower case (as many store them; the x402 SDKs echo
    ``authorization.from`` as the payer wrote it, so a lower-case ``from`` does the same) breaks the
    replay of every payment: the payer is charged, its answer is lost on the way, it resends the very
    same payment, the resend is verified as fresh, the facilitator says the nonce is used, and the
    payer gets a plain 402 inviting a second payment instead of the answer it paid for."""
    payer = 1

    async def lower_case_payer(body: Json) -> tuple[int, Json]:
        status, answer = await proxied.forward_verify(body)
        return status, {**answer, "payer": str(answer.get("payer", "")).lower()}

    proxied.verify = lower_case_payer
    gateway = remote_gateway(start_gateway, proxied.url)
    payer_before = devchain.balance(devchain.address(payer))
    with gateway.client() as client:
        _, first, header = pay(client, devchain, "GET", "/quotes/AAPL", payer=payer)
        assert first.status_code == 200, first.text
        resend = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": header})  # the first answer was lost

    assert devchain.balance(devchain.address(payer)) == payer_before - PRICE  # charged once
    assert upstream_hits(upstream, QUOTE) == 1
    assert resend.status_code == 200 and resend.headers.get("x402gw-replay") == "true", (
        f"the resend of a settled payment got {resend.status_code} {resend.text[:160]} instead of its answer"
    )
    assert resend.json() == first.json()


def test_a_refund_goes_to_the_payer_the_facilitator_names_not_the_signer(
    start_gateway: GatewayFactory, proxied: ProxiedFacilitator, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    """An upfront tool's upstream fails after the payment settled: the refund key paid the refund
    to ``ctx.payer``, which was the remote facilitator's ``/verify`` answer's ``payer``, not the
    signer the gateway itself recovered offline. A facilitator naming another address (a bug, or
    a facilitator helping itself) got the seller's refund; the real payer stayed charged.
    Fixed: a verification naming another payer than the signer is no verification of this payment
    (503 ``facilitator_unavailable``, before anything is recorded, settled or called); the payer the
    gateway records, refunds and limits is always the signer."""
    payer = 5
    elsewhere = "0x000000000000000000000000000000000000bEEF"

    async def names_another_payer(body: Json) -> tuple[int, Json]:
        status, answer = await proxied.forward_verify(body)
        return status, {**answer, "payer": elsewhere}

    proxied.verify = names_another_payer
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = remote_gateway(start_gateway, proxied.url, catalog=catalog, refund_key=devchain.key(9))
    payer_before, elsewhere_before = devchain.balance(devchain.address(payer)), devchain.balance(elsewhere)
    hits_before = upstream_hits(upstream, "GET /reports/500")

    refused = paid_call(gateway, devchain, payer, "/paid-first/reports/500")

    assert refused.status_code == 503 and refused.json()["error"] == "facilitator_unavailable", refused.text
    assert devchain.balance(elsewhere) == elsewhere_before, "the seller's money went to the facilitator's payer"
    assert devchain.balance(devchain.address(payer)) == payer_before, "the payer was charged"
    assert upstream_hits(upstream, "GET /reports/500") == hits_before
    assert gateway.ledger.all() == []


# ------------------------------------------------------------------------ verify: what the payment pays


def test_a_lax_facilitator_settles_an_underpayment_and_the_ledger_books_the_full_price(
    start_gateway: GatewayFactory, proxied: ProxiedFacilitator, devchain: Devchain, upstream: str
) -> None:
    """The gateway binds ``accepted`` to its offer but leaves the signed authorization's value to
    the remote facilitator. One that checks the signature and not the amount (modelled here by a
    proxy that quotes the signed value as the price) settles 1 atomic unit for a 2000 unit call:
    the content is served and the ledger books 2000 that never arrived."""
    payer = 7

    async def lax(body: Json) -> tuple[int, Json]:
        value = body["paymentPayload"]["payload"]["authorization"]["value"]
        body = {**body, "paymentRequirements": {**body["paymentRequirements"], "amount": value}}
        return await proxied.forward_verify(body)

    async def lax_settle(body: Json) -> tuple[int, Json]:
        value = body["paymentPayload"]["payload"]["authorization"]["value"]
        body = {**body, "paymentRequirements": {**body["paymentRequirements"], "amount": value}}
        return await proxied.forward_settle(body)

    proxied.verify, proxied.settle = lax, lax_settle
    gateway = remote_gateway(start_gateway, proxied.url)
    pay_to_before, payer_before = devchain.balance(PAY_TO), devchain.balance(devchain.address(payer))

    paid = paid_call(gateway, devchain, payer, tamper={"value": 1})

    paid_on_chain = payer_before - devchain.balance(devchain.address(payer))
    assert not (paid.status_code == 200 and paid_on_chain < PRICE), (
        f"content served for {paid_on_chain} of {PRICE} atomic units"
    )
    assert_ledger_agrees_with_chain(gateway, devchain, pay_to_before)

