"""The 402 built from the per-tool template equals the one built through the wire models."""

from __future__ import annotations

import pytest

from catalog.loader import load_catalogs
from gateway.offers import Offer, Quote, payment_required, request_binding
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
