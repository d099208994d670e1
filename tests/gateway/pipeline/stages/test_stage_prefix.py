"""The stages before the 402, one at a time: route, header_limits, body, arguments, offer,
pre_challenge_safety, challenge."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import pytest

from gateway.errors import GatewayError
from gateway.pipeline.compiled import CompiledTool
from gateway.pipeline.context import RequestContext
from gateway.pipeline.stages.arguments import MAX_VALID_ARGUMENTS, Arguments, Body, check_arguments
from gateway.pipeline.stages.challenge import Challenge, OfferStage
from gateway.pipeline.stages.route import Route
from gateway.pipeline.stages.safety import HeaderLimits, PreChallengeSafety
from gateway.safety.checks import Limits, Safety
from gateway.store import MemoryStore
from tests.support.pipeline_parts import (
    compiled_tools,
    context,
    demo_catalogs,
    demo_router,
)

T = TypeVar("T")
CATALOGS = demo_catalogs()
TOOLS = compiled_tools(CATALOGS)
ROUTE = Route(demo_router(CATALOGS), TOOLS)


def run(step: Awaitable[T]) -> T:
    return asyncio.run(step)  # type: ignore[arg-type]


def refusal(step: Awaitable[object]) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        run(step)
    return caught.value


def through(ctx: RequestContext, *stages: object) -> RequestContext:
    for stage in stages:
        assert run(stage(ctx)) is None  # type: ignore[operator]
    return ctx


def test_route_names_the_tool_and_its_parameters() -> None:
    ctx = through(context("GET", "/quotes/AAPL"), ROUTE)
    assert ctx.tool is not None and ctx.tool.name == "get_quote"
    assert ctx.compiled is TOOLS["get_quote"] and ctx.params == {"symbol": "AAPL"}


def test_route_refuses_a_wrong_method_and_an_encoded_separator() -> None:
    wrong = refusal(ROUTE(context("DELETE", "/quotes/AAPL")))
    assert (wrong.code, wrong.status) == ("method_not_allowed", 405) and "GET" in wrong.headers["Allow"]
    assert refusal(ROUTE(context("GET", "/quotes/A%2FB"))).code == "not_found"


def test_header_limits_refuse_headers_over_the_limit() -> None:
    stage = HeaderLimits(Safety(MemoryStore(), CATALOGS, Limits(max_header_bytes=200)))
    assert run(stage(context("GET", "/quotes/AAPL", headers=[("x-small", "y")]))) is None
    big = refusal(stage(context("GET", "/quotes/AAPL", headers=[("x-big", "y" * 300)])))
    assert (big.code, big.status) == ("request_headers_too_large", 431)


def test_body_refuses_one_over_the_limit() -> None:
    assert refusal(Body(8)(context("POST", "/orders", body=b'{"symbol": "AAPL"}'))).code == "request_too_large"
    ctx = through(context("POST", "/orders", body=b"{}"), Body(8))
    assert ctx.body == b"{}"


def test_arguments_are_collected_and_validated_before_any_price() -> None:
    ctx = through(context("GET", "/weather", query="city=Lisbon"), ROUTE, Body(1024), Arguments())
    assert ctx.arguments["city"] == "Lisbon"
    bad = through(context("GET", "/weather"), ROUTE, Body(1024))
    assert refusal(Arguments()(bad)).code == "invalid_arguments"


def test_arguments_that_passed_are_not_validated_again_and_never_stand_for_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """A passing set of arguments is remembered by its canonical JSON: not validated twice, and
    never taken for another set Python calls equal (``True == 1``) or for a refused one."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    compiled = CompiledTool(TOOLS["get_quote"].tool.model_copy(update={"input_schema": schema}))
    asked: list[object] = []
    validator = type(compiled.validator)
    real = validator.iter_errors

    def counted(self: object, instance: object) -> object:
        asked.append(instance)
        return real(self, instance)  # type: ignore[arg-type]

    monkeypatch.setattr(validator, "iter_errors", counted)
    check_arguments(compiled, {"n": 1})
    check_arguments(compiled, {"n": 1})
    assert asked == [{"n": 1}]
    with pytest.raises(GatewayError) as refused:
        check_arguments(compiled, {"n": True})  # equal to {"n": 1} in Python, not in JSON Schema
    assert refused.value.code == "invalid_arguments"
    with pytest.raises(GatewayError):
        check_arguments(compiled, {"n": True})  # a refusal is never remembered as a pass
    assert asked == [{"n": 1}, {"n": True}, {"n": True}]
    for n in range(MAX_VALID_ARGUMENTS + 10):
        check_arguments(compiled, {"n": n})
    assert len(compiled.valid_arguments) == MAX_VALID_ARGUMENTS  # bounded, the oldest dropped


def offered(method: str, path: str, headers: list[tuple[str, str]] | None = None) -> RequestContext:
    return through(context(method, path, headers=headers or []), ROUTE, Body(1024), Arguments(), OfferStage(None, 2))


def test_offer_quotes_the_request_and_says_whether_it_pays() -> None:
    unpaid = offered("GET", "/quotes/AAPL")
    assert unpaid.quote is not None and not unpaid.paying
    assert unpaid.quote.resource_url == "http://gw.test/quotes/AAPL" and unpaid.quote.version == 2
    assert offered("GET", "/quotes/AAPL", [("payment-signature", "x")]).paying
    v1 = offered("GET", "/quotes/AAPL", [("x-payment", "x")])
    assert v1.paying and v1.quote is not None and v1.quote.version == 1
    assert not offered("HEAD", "/quotes/AAPL", [("payment-signature", "x")]).paying  # HEAD is never paid for


def test_pre_challenge_safety_counts_every_client_request() -> None:
    store = MemoryStore()
    safety = Safety(store, CATALOGS)
    stage = PreChallengeSafety(safety)
    ctx = offered("GET", "/quotes/AAPL")
    assert run(stage(ctx)) is None
    assert ctx.safety is not None  # what release_holds gives back


def test_challenge_answers_a_call_without_payment_with_its_402() -> None:
    ctx = offered("GET", "/quotes/AAPL")
    answer = run(Challenge()(ctx))
    assert answer is not None and answer.status_code == 402 and "payment-required" in answer.headers
    assert (ctx.reason, ctx.outcome) == ("payment_required", "challenged")
    assert [event.event for event in ctx.events] == ["challenge_issued"]


def test_challenge_passes_a_paying_call_on() -> None:
    ctx = offered("GET", "/quotes/AAPL", [("payment-signature", "x")])
    assert run(Challenge()(ctx)) is None and ctx.events == []
