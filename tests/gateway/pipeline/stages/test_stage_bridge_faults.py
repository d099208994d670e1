"""Stage ``bridge`` when the gateway itself fails past an ``upfront`` settlement (a fault of ours while
calling the upstream or reading its answer, not the upstream's error): the payer paid before the call
and gets no answer, so a refund is owed, never a plain 500 that leaves it charged. On fakes; against
a real gateway, a hostile upstream's Retry-After used to cause it (tests/e2e/test_attacks_upstream_429.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from gateway.errors import GatewayError
from gateway.pipeline.context import RequestContext
from gateway.pipeline.refunds import Refunds
from gateway.pipeline.stages.bridge import CallUpstream
from gateway.protocol.offers import Quote
from gateway.safety.checks import Safety
from gateway.upstream.bridge import Bridge, UpstreamClient
from gateway.upstream.failures import UpstreamFailure
from settlement.ledger import Ledger
from settlement.x402.wire import SettleResponse
from tests.gateway.pipeline.stages.test_stage_payment import offered, paid


class Broken:
    """A bridge whose call fails with an error that is not the upstream's answer (a bug of ours)."""

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise OverflowError("cannot convert float infinity to integer")


class Owed:
    def __init__(self) -> None:
        self.owed: list[tuple[int, str]] = []

    async def owe(self, ctx: RequestContext, quote: Quote, payment_id: int, reason: str) -> dict[str, Any]:
        self.owed.append((payment_id, reason))
        return {"refund": "owed"}


class Voids:
    """The ledger's part the stage uses when nothing settled: ``void``."""

    def __init__(self) -> None:
        self.voided: list[tuple[int, str | None]] = []

    async def run(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        return call(*args, **kwargs)

    def void(self, payment_id: int, reason: str | None, **kwargs: Any) -> None:
        self.voided.append((payment_id, reason))


def stage(refunds: Owed, ledger: Voids | None = None) -> CallUpstream:
    return CallUpstream(cast(Bridge, Broken()), cast(UpstreamClient, None), safety=cast(Safety, None),
                        ledger=cast(Ledger, ledger), refunds=cast(Refunds, refunds), max_response_bytes=1024)


def settled_call(method: str, path: str, body: bytes = b"") -> RequestContext:
    ctx = paid(offered(method, path, [("content-type", "application/json")], body))
    ctx.payment_id = 7
    ctx.settlement = SettleResponse(success=True, transaction="0x" + "ab" * 32, network="eip155:31337", payer="0x" + "22" * 20)
    return ctx


def test_a_fault_of_ours_after_an_upfront_settlement_owes_the_refund() -> None:
    ctx, refunds = settled_call("POST", "/orders", b'{"symbol": "ACME", "quantity": 1}'), Owed()
    assert ctx.tool is not None and ctx.tool.settle == "upfront"
    with pytest.raises(GatewayError) as failed:
        asyncio.run(stage(refunds)(ctx))
    assert refunds.owed == [(7, "internal_error")]
    assert failed.value.status == 500 and failed.value.fields["refund"] == "owed"
    assert "payment-response" in {name.lower() for name in failed.value.headers}  # the receipt of what settled


def test_a_fault_of_ours_before_a_settle_after_payment_voids_it_and_owes_nothing() -> None:
    """Nothing settled: the payment is let go (``voided``), never left ``verified`` for ever."""
    ctx, refunds, ledger = settled_call("GET", "/quotes/AAPL"), Owed(), Voids()
    ctx.settlement = None  # settle: after: nothing settled yet
    assert ctx.tool is not None and ctx.tool.settle == "after"
    with pytest.raises(OverflowError):
        asyncio.run(stage(refunds, ledger)(ctx))
    assert refunds.owed == [] and ledger.voided == [(7, "internal_error")] and ctx.outcome == "upstream_failed"


class Refusing(Voids):
    """A ledger whose answer claim loses: the refund of an answer lost is owed already (the sweep)."""

    def __init__(self, claim: bool) -> None:
        super().__init__()
        self.claim, self.stored = claim, False

    def record_upstream_status(self, payment_id: int, status: int) -> bool:
        return self.claim

    def store_response(self, payment_id: int, answer: Any) -> None:
        self.stored = True


class Refuses:
    """A bridge whose upstream refused the caller's own request (404: the caller's failure, kept charged)."""

    async def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise UpstreamFailure("upstream_error", "no such order", status=404, upstreamStatus=404)


@pytest.mark.parametrize("claimed", [True, False])
def test_a_kept_charge_is_claimed_as_the_answer_before_it_is_stored(claimed: bool) -> None:
    """An upfront call whose caller's own request failed stays charged and its error is its stored
    answer, once claimed; when the claim loses (the refund of an answer lost is owed already), the
    refund stands and no answer is stored: never an answer and its refund."""
    ctx, refunds, ledger = settled_call("POST", "/orders", b'{"symbol": "ACME", "quantity": 1}'), Owed(), Refusing(claimed)

    class NoSafety:
        async def upstream_result(self, *args: Any) -> None:
            return None

    call = CallUpstream(cast(Bridge, Refuses()), cast(UpstreamClient, None), safety=cast(Safety, NoSafety()),
                        ledger=cast(Ledger, ledger), refunds=cast(Refunds, refunds), max_response_bytes=1024)
    with pytest.raises(GatewayError) as failed:
        asyncio.run(call(ctx))
    if claimed:
        assert ledger.stored and refunds.owed == [] and failed.value.fields["refund"] == "none"
    else:
        assert not ledger.stored and refunds.owed == [(7, "upstream_error")]
