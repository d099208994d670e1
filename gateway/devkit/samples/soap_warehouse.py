"""A sample "legacy" SOAP warehouse service to sell through the gateway in demos and tests.

It has the quirks of the real ones, on purpose and deterministically:

- a custom auth header, ``X-Warehouse-Token`` (a wrong or missing one: a Client fault in HTTP 500);
- faults inside HTTP 200 (an unknown SKU: ``ZZZ-…``), and an ``<Error>`` element in a 200 (a
  discontinued one: ``OLD-…``);
- answers that differ from ``warehouse.wsdl``: a ``<Payload>`` wrapper where the WSDL says
  ``<GetStockLevelResult>``, and fields in another order;
- ``GetInventoryReport`` is slow (``slow_seconds``), ``GetShippingQuote`` is flaky: every odd call
  (1st, 3rd, ...) fails with a Server fault in HTTP 500, every even one succeeds.

SOAP 1.1 and 1.2 on one endpoint, answered in the version asked; the WSDL at ``/soap/warehouse?wsdl``;
``GET /stats`` counts calls per operation (``POST /stats/reset`` clears them). Answers are built by
hand: this is the thing being wrapped, not the gateway.

    python -m gateway.devkit.samples.soap_warehouse --host 127.0.0.1 --port 9102
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
from collections import Counter
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from xml.sax.saxutils import escape

import uvicorn
from lxml import etree
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["DEMO_TOKEN", "TOKEN_HEADER", "WSDL_PATH", "create_app", "main"]

WSDL_PATH = Path(__file__).resolve().with_name("warehouse.wsdl")
TOKEN_HEADER = "X-Warehouse-Token"
DEMO_TOKEN = "demo-warehouse-token-5f3a"  # the demo exports it as WAREHOUSE_TOKEN for the gateway
NS = "urn:acme:warehouse"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
_SKU = re.compile(r"[A-Z]{3}-[0-9]{3}")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True)
_ITEMS = [
    ("BLT-100", "Hex bolt M8", "0.35"), ("BLT-200", "Hex bolt M10", "0.55"), ("NUT-100", "Hex nut M8", "0.12"),
    ("WSH-100", "Washer M8", "0.05"), ("SCR-300", "Wood screw 4x40", "0.09"), ("BRK-010", "Angle bracket", "2.40"),
]


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _envelope(version: str, body: str) -> str:
    ns = SOAP12 if version == "1.2" else SOAP11
    return f'<?xml version="1.0" encoding="utf-8"?>\n<soap:Envelope xmlns:soap="{ns}"><soap:Body>{body}</soap:Body></soap:Envelope>'


def _fault(version: str, code: str, message: str) -> str:
    if version == "1.2":
        value = {"Client": "Sender", "Server": "Receiver"}[code]
        return _envelope(version, f"<soap:Fault><soap:Code><soap:Value>soap:{value}</soap:Value></soap:Code>"
                                  f'<soap:Reason><soap:Text xml:lang="en">{escape(message)}</soap:Text></soap:Reason></soap:Fault>')
    return _envelope(version, f"<soap:Fault><faultcode>soap:{code}</faultcode><faultstring>{escape(message)}</faultstring>"
                              "<detail><ErrorInfo xmlns=\"urn:acme:warehouse\"><Retry>later</Retry></ErrorInfo></detail></soap:Fault>")


def _arguments(operation: etree._Element) -> dict[str, str]:
    return {etree.QName(child).localname: (child.text or "").strip() for child in operation if isinstance(child.tag, str)}


def _answer(version: str, xml: str, status: int = 200) -> Response:
    media = "application/soap+xml; charset=utf-8" if version == "1.2" else "text/xml; charset=utf-8"
    return Response(xml, status_code=status, media_type=media)


# -- operations --------------------------------------------------------------------------------------


async def _stock_level(version: str, args: dict[str, str]) -> Response:
    sku = args.get("Sku", "")
    if sku.startswith("OLD-"):
        # Quirk: a business error as a normal 200 answer with an <Error> element.
        return _answer(version, _envelope(version, f'<GetStockLevelResponse xmlns="{NS}"><Error code="DISCONTINUED">'
                                                   f"item {escape(sku)} is discontinued</Error></GetStockLevelResponse>"))
    if not _SKU.fullmatch(sku) or sku.startswith("ZZZ"):
        # Quirk: a fault, but in HTTP 200.
        return _answer(version, _fault(version, "Client", f"unknown SKU {sku!r}"))
    seed = _seed(sku + args.get("Warehouse", "MAIN"))
    bins = "".join(f"<Bin>{chr(65 + (seed >> i) % 6)}{(seed >> (i + 3)) % 20 + 1}</Bin>" for i in range(seed % 3 + 1))
    quantity, reserved = seed % 500, seed % 17
    # Quirk: <Payload> where the WSDL says <GetStockLevelResult>, and Available comes first.
    return _answer(version, _envelope(version,
        f'<GetStockLevelResponse xmlns="{NS}"><Payload><StockLevel sku="{sku}" unit="pcs">'
        f"<Available>{'true' if quantity > reserved else 'false'}</Available><Bins>{bins}</Bins>"
        f"<Reserved>{reserved}</Reserved><Quantity>{quantity}</Quantity></StockLevel></Payload></GetStockLevelResponse>"))


async def _search_items(version: str, args: dict[str, str]) -> Response:
    query = args.get("Query", "").lower()
    limit = int(args["MaxResults"]) if args.get("MaxResults", "").isdigit() else 10
    found = [item for item in _ITEMS if query in item[1].lower() or query in item[0].lower()][:limit]
    items = "".join(
        f'<Item sku="{sku}"><Price>{price}</Price><Name>{escape(name)}</Name>'
        f"<InStock>{'1' if _seed(sku) % 4 else '0'}</InStock></Item>"
        for sku, name, price in found
    )
    return _answer(version, _envelope(version,
        f'<SearchItemsResponse xmlns="{NS}"><SearchItemsResult>{items}</SearchItemsResult></SearchItemsResponse>'))


class _Warehouse:
    """One app's token, call counts and slowness, its stateful operations, and its endpoints."""

    def __init__(self, token: str, slow_seconds: float) -> None:
        self.token = token
        self.slow_seconds = slow_seconds
        self.counts: Counter[str] = Counter()
        self.flaky = Counter[str]()
        self.operations: dict[str, Callable[[str, dict[str, str]], Awaitable[Response]]] = {
            "GetStockLevel": _stock_level, "SearchItems": _search_items,
            "GetShippingQuote": self.shipping_quote, "GetInventoryReport": self.inventory_report,
        }

    async def shipping_quote(self, version: str, args: dict[str, str]) -> Response:
        self.flaky["GetShippingQuote"] += 1
        if self.flaky["GetShippingQuote"] % 2 == 1:
            return _answer(version, _fault(version, "Server", "carrier backend temporarily unavailable"), status=500)
        quantity = int(args["Quantity"]) if args.get("Quantity", "").isdigit() else 1
        seed = _seed(args.get("Postcode", "") + args.get("Sku", ""))
        cost = Decimal(seed % 2000 + 500) / 100 + quantity * Decimal("0.25")
        return _answer(version, _envelope(version,
            f'<GetShippingQuoteResponse xmlns="{NS}"><Days>{seed % 5 + 1}</Days><Cost currency="EUR">{cost}</Cost>'
            f"<Carrier>{['DHL', 'UPS', 'CTT'][seed % 3]}</Carrier></GetShippingQuoteResponse>"))

    async def inventory_report(self, version: str, args: dict[str, str]) -> Response:
        await asyncio.sleep(self.slow_seconds)  # the slow one: a report that takes its time
        warehouse = args.get("Warehouse", "MAIN")
        seed = _seed("report:" + warehouse)
        return _answer(version, _envelope(version,
            f'<GetInventoryReportResponse xmlns="{NS}"><Warehouse>{escape(warehouse)}</Warehouse>'
            f"<Lines>{seed % 900 + 100}</Lines><Units>{seed % 90_000 + 10_000}</Units></GetInventoryReportResponse>"))

    async def soap(self, request: Request) -> Response:
        if request.method == "GET":
            if "wsdl" in request.query_params or request.url.query.lower() == "wsdl":
                return Response(WSDL_PATH.read_bytes(), media_type="text/xml; charset=utf-8")
            return Response("use POST (SOAP 1.1 or 1.2), or ?wsdl", status_code=405)
        version = "1.2" if "application/soap+xml" in request.headers.get("content-type", "") else "1.1"
        try:
            root = etree.fromstring(await request.body(), _PARSER)
        except etree.XMLSyntaxError:
            return _answer(version, _fault(version, "Client", "the request is not XML"), status=500)
        body = next((c for c in root if isinstance(c.tag, str) and etree.QName(c).localname == "Body"), None)
        operation = next((c for c in body if isinstance(c.tag, str)), None) if body is not None else None
        name = etree.QName(operation).localname if operation is not None else "?"
        self.counts[name] += 1
        if request.headers.get(TOKEN_HEADER) != self.token:
            return _answer(version, _fault(version, "Client", "authentication failed: missing or wrong token"), status=500)
        handler = self.operations.get(name)
        if handler is None:
            return _answer(version, _fault(version, "Client", f"no operation {name!r}"), status=500)
        return await handler(version, _arguments(operation))

    async def stats(self, request: Request) -> Response:
        return JSONResponse({"total": sum(self.counts.values()), "operations": dict(self.counts)})

    async def reset_stats(self, request: Request) -> Response:
        self.counts.clear()
        self.flaky.clear()
        return JSONResponse({"total": 0, "operations": {}})


def create_app(token: str = DEMO_TOKEN, slow_seconds: float = 2.0) -> Starlette:
    warehouse = _Warehouse(token, slow_seconds)
    return Starlette(routes=[
        Route("/soap/warehouse", warehouse.soap, methods=["GET", "POST"]),
        Route("/stats", warehouse.stats, methods=["GET"]),
        Route("/stats/reset", warehouse.reset_stats, methods=["POST"]),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample legacy SOAP warehouse for x402gw demos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9102)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(os.environ.get("WAREHOUSE_TOKEN", DEMO_TOKEN)), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
