"""The catalog: which upstream endpoints are sold, at what price, to whom the money goes.

A leaf package: it imports nothing else of x402gw and does no I/O beyond reading the file.
"""

from catalog.errors import CatalogError, CatalogIssue
from catalog.loader import load_catalog, load_catalogs, parse_catalog
from catalog.models import (
    Catalog,
    Catalogs,
    HttpMethod,
    PaymentTerms,
    SettleMode,
    Tool,
    Upstream,
)
from catalog.pricing import format_amount, to_atomic
from catalog.routing import RouteMatch, Router
from catalog.templates import parse_template, route_shape

__all__ = [
    "Catalog",
    "CatalogError",
    "CatalogIssue",
    "Catalogs",
    "HttpMethod",
    "PaymentTerms",
    "RouteMatch",
    "Router",
    "SettleMode",
    "Tool",
    "Upstream",
    "format_amount",
    "load_catalog",
    "load_catalogs",
    "parse_catalog",
    "parse_template",
    "route_shape",
    "to_atomic",
]
