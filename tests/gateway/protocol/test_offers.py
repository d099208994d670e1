"""The 402 built from the per-tool template equals the one built through the wire models."""

from __future__ import annotations

import pytest

from catalog.loader import load_catalogs
from gateway.protocol.offers import Offer, Quote, payment_required, request_binding
from gateway.settings import DEFAULT_CATALOG


@pytest.mark.parametrize("query", ["", "b=2&a=1", "a=&a=x"])
@pytest.mark.parametrize("error", ["payment_required", "invalid_exact_evm_payload_signature"])
def test_template_challenge_matches_the_models(query: str, error: str) -> None:
    for tool in load_catalogs([DEFAULT_CATALOG]).tools:
        offer = Offer.for_tool(tool)
        binding = request_binding("GET", "/x/y", query)
        requirements = offer.bound(binding)
        url = f"http://gw/x/y?{query}"
        fast = Quote(offer, requirements, url, 2, binding).challenge(error)
        slow = Quote(offer, requirements, url, 2).challenge(error)
        assert fast == slow
        assert fast[1] == payment_required(offer, requirements, url, error).to_wire()


def test_empty_query_binds_as_before() -> None:
    assert request_binding("GET", "/a", "") == request_binding("GET", "/a", "&")


def test_compiled_tools_are_built_on_first_use_and_share_validators() -> None:
    from catalog import format_amount
    from gateway.pipeline.pipeline import CompiledTool

    tools = load_catalogs([DEFAULT_CATALOG]).tools
    validators: dict[str, object] = {}
    compiled = [CompiledTool(tool, validators) for tool in tools]  # type: ignore[arg-type]
    assert not any({"offer", "validator", "price_text"} & set(vars(c)) for c in compiled)  # nothing built yet
    for one, tool in zip(compiled, tools, strict=True):
        assert one.offer.requirements == Offer.for_tool(tool).requirements
        assert one.offer is one.offer  # built once
        assert one.price_text == format_amount(tool.price_atomic, tool.payment.decimals)
        assert one.validator.schema == tool.input_schema
    twin = CompiledTool(tools[0].model_copy(update={"name": "twin"}), validators)  # type: ignore[arg-type]
    assert twin.validator is compiled[0].validator  # an equal schema: the same validator
