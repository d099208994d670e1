"""Discovery: every format an agent reads, generated from the one catalog the pipeline serves.

    GET /tools                 OpenAI-style function definitions, with price, URL and pay terms
    GET /tools?q=&limit=&budget=  the best tools for a few words (gateway.surfaces.search)
    GET /openapi.json          OpenAPI 3.1, the 402 documented, the price in ``x-x402-price``
    GET /.well-known/x402      where everything is (bazaar-style resource list and links)
    GET /discovery/resources   bazaar listing with paging (x402 facilitator discovery shape)
    GET /llms.txt              the same in plain text for a model to read

Nothing here keeps its own copy of a tool: each answer is built from ``pipeline.tools`` (the
compiled catalog), so a catalog change shows in every format and none can go stale. A document is
built on its first request and kept for the life of the app (a catalog changes with a restart):
with thousands of tools, building one takes longer than thousands of paid requests. The ``bazaar``
extension of each 402 challenge lives below both, in ``gateway.protocol.bazaar``.

    endpoints.py  ``Discovery``: the routes, the document cache, /tools and the bazaar listing
    openapi.py    the OpenAPI 3.1 document
    llms.py       the plain-text document
    offers.py     every offer of a tool with several ways to pay (``offer_prices``); a price or its rule (``price_facts``)
    requests.py   one tool call as an HTTP request (``tool_request``), shared with MCP and the agent
"""

from __future__ import annotations

from gateway.surfaces.discovery.endpoints import X402_VERSION, Discovery
from gateway.surfaces.discovery.llms import llms_text
from gateway.surfaces.discovery.offers import offer_prices, price_facts
from gateway.surfaces.discovery.openapi import (
    COMPONENTS,
    HOW_TO_PAY,
    openapi_document,
    operation,
)
from gateway.surfaces.discovery.requests import ToolRequest, advertised_schema, tool_request

__all__ = [
    "COMPONENTS",
    "HOW_TO_PAY",
    "X402_VERSION",
    "Discovery",
    "advertised_schema",
    "ToolRequest",
    "llms_text",
    "offer_prices",
    "price_facts",
    "openapi_document",
    "operation",
    "tool_request",
]
