"""The stages with a payment, one at a time, on fakes: decode_and_bind, in_flight, payment_window,
verify, settle (its part for upfront tools), respond."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

import pytest

from catalog.models import SETTLE_MARGIN_SECONDS
from gateway.errors import GatewayError
from gateway.pipeline.context import Paid, RequestContext
from gateway.pipeline.stages.arguments import Arguments, Body
from gateway.pipeline.stages.challenge import OfferStage
from gateway.pipeline.stages.decode import DecodeAndBind
from gateway.pipeline.stages.exactly_once import InFlight, release
from gateway.pipeline.stages.respond import Respond
from gateway.pipeline.stages.route import Route
from gateway.pipeline.stages.settle import Settle
from gateway.pipeline.stages.verify import PaymentWindow, Verify
from gateway.protocol.challenge import PaymentChallenge
from gateway.store import MemoryStore
from gateway.upstream.bridge import UpstreamResponse
from settlement.chain.head_clock import HeadClock
from settlement.errors import FacilitatorUnavailable
from settlement.schemes.signatures import SignerCheck
from settlement.x402.codec import encode_header
from settlement.x402.wire import (
    ExactEvmPayload,
    PaymentPayload,
    SettleResponse,
    VerifyResponse,
)
from tests.support.pipeline_parts import (
    FakeFacilitator,
    compiled_tools,
    context,
    demo_catalogs,
    demo_router,
)

T = TypeVar("T")
CATALOGS = demo_catalogs()
ROUTE = Route(demo_router(CATALOGS), compiled_tools(CATALOGS))
PAYER = "0x" + "22" * 20


def run(step: Awaitable[T]) -> T:
    return asyncio.run(step)  # type: ignore[arg-type]


def offered(method: str, path: str, headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> RequestContext:
    ctx = context(method, path, headers=headers or [], body=body)
    for stage in (ROUTE, Body(1024), Arguments(), OfferStage(None, 2)):
        assert run(stage(ctx)) is None
    return ctx


def exact(valid_for: int) -> ExactEvmPayload:
    return ExactEvmPayload.model_validate({
        "signature": "0x" + "11" * 65,
        "authorization": {"from": PAYER, "to": "0x" + "33" * 20, "value": "1000", "validAfter": "0",
                          "validBefore": str(int(time.time()) + valid_for), "nonce": "0x" + "44" * 32},
    })


def paid(ctx: RequestContext, valid_for: int = 3600) -> RequestContext:
    assert ctx.quote is not None
    payload = exact(valid_for)
    wire = PaymentPayload(x402_version=2, accepted=ctx.quote.requirements, payload=payload.model_dump(by_alias=True))
    ctx.paid = Paid(payload=wire, exact=payload, signer=PAYER, nonce=payload.authorization.nonce.lower(),
                    identifier=None, fingerprint="f")
    ctx.payload = wire
    return ctx


def test_decode_refuses_a_header_that_is_no_payment() -> None:
    ctx = offered("GET", "/quotes/AAPL", [("payment-signature", "not base64 json")])
    with pytest.raises(GatewayError) as caught:
        run(DecodeAndBind(SignerCheck())(ctx))
    assert caught.value.status == 400 and ctx.payment_received and ctx.paid is None


def test_decode_refuses_a_payment_made_for_another_offer_with_a_fresh_offer() -> None:
    ctx = offered("GET", "/quotes/AAPL")
    assert ctx.quote is not None
    other = ctx.quote.requirements.model_copy(update={"amount": "1"})
    header = encode_header(PaymentPayload(x402_version=2, accepted=other, payload=exact(3600).model_dump(by_alias=True)))
    ctx = offered("GET", "/quotes/AAPL", [("payment-signature", header)])
    with pytest.raises(PaymentChallenge) as caught:
        run(DecodeAndBind(SignerCheck())(ctx))
    assert (caught.value.code, caught.value.fields["field"]) == ("payment_requirements_mismatch", "amount")


def test_decode_refuses_a_signature_that_does_not_recover_to_the_payer() -> None:
    ctx = offered("GET", "/quotes/AAPL")
    assert ctx.quote is not None
    header = encode_header(PaymentPayload(x402_version=2, accepted=ctx.quote.requirements,
                                          payload=exact(3600).model_dump(by_alias=True)))
    ctx = offered("GET", "/quotes/AAPL", [("payment-signature", header)])
    with pytest.raises(PaymentChallenge) as caught:
        run(DecodeAndBind(SignerCheck())(ctx))
    assert caught.value.code == "invalid_exact_evm_payload_signature" and ctx.paid is None


def test_in_flight_holds_a_payment_for_one_request_at_a_time() -> None:
    store = MemoryStore()
    stage = InFlight(store, 60_000)

    first, second = paid(offered("GET", "/quotes/AAPL")), paid(offered("GET", "/quotes/AAPL"))

    async def scenario() -> None:
        assert await stage(first) is None and len(first.locks) == 1
        with pytest.raises(GatewayError) as caught:
            await stage(second)
        assert (caught.value.code, caught.value.status) == ("payment_in_flight", 409)
        await release(store, first)
        assert first.locks == () and await stage(second) is None

    run(scenario())


def test_payment_window_refuses_a_payment_that_could_expire_mid_call() -> None:
    ctx = paid(offered("GET", "/quotes/AAPL"), valid_for=3600)
    assert run(PaymentWindow()(ctx)) is None
    assert ctx.tool is not None and ctx.tool.settle == "after"
    short = paid(offered("GET", "/quotes/AAPL"), valid_for=ctx.tool.payment_window_seconds - 10)
    with pytest.raises(PaymentChallenge) as caught:
        run(PaymentWindow()(short))
    assert caught.value.code == "payment_window_too_short"


class _ChainAhead:
    """A chain whose latest block is dated ``seconds`` ahead of our clock."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    async def block_timestamp(self, number: int | None = None) -> int:
        return int(time.time()) + self.seconds


def test_payment_window_is_judged_by_the_chains_clock_where_it_is_ahead_of_ours() -> None:
    ctx = paid(offered("GET", "/quotes/AAPL"), valid_for=3600)
    assert ctx.tool is not None and ctx.quote is not None
    needed, network = ctx.tool.payment_window_seconds, ctx.quote.requirements.network
    enough_by_ours = paid(offered("GET", "/quotes/AAPL"), valid_for=needed + 5)
    assert run(PaymentWindow()(enough_by_ours)) is None
    assert run(PaymentWindow({network: HeadClock(_ChainAhead(0))})(enough_by_ours)) is None  # a chain on our clock
    with pytest.raises(PaymentChallenge) as caught:  # a minute ahead: 5 s short of its window, or expired
        run(PaymentWindow({network: HeadClock(_ChainAhead(60))})(enough_by_ours))
    assert caught.value.code == "payment_window_too_short" and "chain's clock" in caught.value.message
    assert int(caught.value.fields["validBeforeAtLeast"]) >= int(time.time()) - 1 + 60 + needed


def test_payment_window_holds_upfront_tools_to_the_settle_margin() -> None:
    body = b'{"symbol": "ACME", "quantity": 1}'
    ctx = paid(offered("POST", "/orders", [("content-type", "application/json")], body), valid_for=3600)
    assert ctx.tool is not None and ctx.tool.settle == "upfront"
    assert ctx.tool.payment_window_seconds == SETTLE_MARGIN_SECONDS and run(PaymentWindow()(ctx)) is None
    short = paid(offered("POST", "/orders", [("content-type", "application/json")], body), valid_for=SETTLE_MARGIN_SECONDS - 7)
    with pytest.raises(PaymentChallenge) as caught:
        run(PaymentWindow()(short))
    assert caught.value.code == "payment_window_too_short"


def test_verify_notes_the_payer_or_passes_the_scheme_reason_on_in_a_402() -> None:
    good = FakeFacilitator(VerifyResponse(is_valid=True, payer=PAYER))
    ctx = paid(offered("GET", "/quotes/AAPL"))
    assert run(Verify(cast(Any, good))(ctx)) is None
    assert (ctx.payer, ctx.outcome) == (PAYER, "verified") and "verify" in ctx.timings
    refused = FakeFacilitator(VerifyResponse(is_valid=False, invalid_reason="insufficient_funds"))
    with pytest.raises(PaymentChallenge) as caught:
        run(Verify(cast(Any, refused))(paid(offered("GET", "/quotes/AAPL"))))
    assert caught.value.code == "insufficient_funds"
    down = FakeFacilitator(FacilitatorUnavailable("down"))
    with pytest.raises(GatewayError) as unavailable:
        run(Verify(cast(Any, down))(paid(offered("GET", "/quotes/AAPL"))))
    assert unavailable.value.code == "facilitator_unavailable"


class StoringLedger:
    def __init__(self) -> None:
        self.stored: list[tuple[int, Any]] = []

    async def run(self, fn: Any, *args: Any) -> Any:
        return fn(*args)

    def store_response(self, payment_id: int, answer: Any) -> None:
        self.stored.append((payment_id, answer))


def test_settle_leaves_an_upfront_payment_alone_and_stores_its_answer_for_a_replay() -> None:
    ctx = paid(offered("POST", "/orders", body=b'{"symbol": "AAPL", "quantity": 5}'))
    ctx.payment_id = 1
    assert ctx.tool is not None and ctx.tool.settle == "upfront" and ctx.paid is not None
    ctx.paid.upstream = UpstreamResponse(201, [("content-type", "application/json")], b'{"id": 7}')
    facilitator, ledger = FakeFacilitator(VerifyResponse(is_valid=True)), StoringLedger()
    assert run(Settle(cast(Any, facilitator), cast(Any, ledger))(ctx)) is None and facilitator.calls == []
    assert ledger.stored == [(1, (201, [("content-type", "application/json")], b'{"id": 7}'))]


def test_respond_serves_the_upstream_answer_privately_with_the_receipt() -> None:
    ctx = paid(offered("GET", "/quotes/AAPL"))
    assert ctx.paid is not None
    ctx.paid.upstream = UpstreamResponse(200, [("content-type", "application/json"), ("set-cookie", "a=b")], b"{}")
    ctx.settlement = SettleResponse(success=True, transaction="0x" + "ab" * 32, network="eip155:84532", payer=PAYER)
    answer = run(Respond()(ctx))
    assert answer is not None and answer.status_code == 200 and answer.body == b"{}"
    assert answer.headers["cache-control"] == "private, no-store"
    assert answer.headers["x-request-id"] == ctx.request_id and "payment-response" in answer.headers


class _HookThenUnknown:
    """A facilitator that writes ahead (its hook gets the hash), broadcasts, then cannot say what
    happened and names no transaction in its answer; ``meanwhile``: what another process does to
    the row before that answer."""

    def __init__(self, meanwhile: Any = None) -> None:
        self.meanwhile = meanwhile

    async def settle(self, payload: PaymentPayload, requirements: Any, *, before_send: Any = None) -> SettleResponse:
        await before_send("0x" + "ab" * 32)
        if self.meanwhile is not None:
            self.meanwhile()
        return SettleResponse(success=False, error_reason=None, network=requirements.network, payer=PAYER)


def _settle_unknown(tmp_path: Any, meanwhile: Any = None) -> tuple[GatewayError, Any]:
    """``settle`` of a verified row through ``_HookThenUnknown``: what it raised and the row after."""
    from gateway.pipeline.stages.settle import settle
    from settlement.schema import open_ledger
    from tests.support.settlement_helpers import ledger_fields

    ctx = paid(offered("GET", "/quotes/AAPL"))
    assert ctx.quote is not None and ctx.payload is not None
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    try:
        row = ledger.record_verified(**ledger_fields(1))
        facilitator = _HookThenUnknown(meanwhile and (lambda: meanwhile(ledger, row.id)))
        with pytest.raises(GatewayError) as answered:
            run(settle(cast(Any, facilitator), ledger, row.id, ctx.quote, ctx.payload, (200, [], b"{}"),
                       hook_writes_ahead=True))
        return answered.value, ledger.get(row.id)
    finally:
        ledger.close()


def test_an_unknown_outcome_without_a_hash_in_the_answer_keeps_the_written_ahead_hash(tmp_path: Any) -> None:
    """The row is pending, and the hash recorded before the broadcast stays: it is what a resolver
    follows (it used to be cleared, leaving a broadcast transaction nobody looks for)."""
    from settlement.ledger import PaymentState

    error, after = _settle_unknown(tmp_path)
    assert error.status == 503
    assert after is not None and after.state == PaymentState.PENDING and after.tx_hash == "0x" + "ab" * 32


def test_a_row_resolved_meanwhile_by_another_process_still_gets_the_503_not_a_500(tmp_path: Any) -> None:
    from settlement.ledger import PaymentState

    def resolved_from_the_chain(ledger: Any, payment_id: int) -> None:  # a worker's start-up, the resolver
        ledger.mark_settled(payment_id, tx_hash="0x" + "ab" * 32, block_number=5)

    error, after = _settle_unknown(tmp_path, resolved_from_the_chain)
    assert error.status == 503 and error.code == "settlement_unknown"
    assert after is not None and after.state == PaymentState.SETTLED  # the other process's write stands
