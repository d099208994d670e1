"""A small "legacy" REST API to sell through the gateway in demos and tests.

It has more endpoints than the demo catalog exposes (``/admin/users``, ``DELETE /orders/{id}``,
``/internal/health``), so tests can show that only listed endpoints are reachable, and it counts
hits per path (``GET /stats``) so tests can assert whether the upstream was called at all.

    python -m gateway.devkit.samples.rest_upstream --host 127.0.0.1 --port 9101
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.devkit.samples.completions import Completions
from gateway.devkit.samples.user_orders import UserOrders

__all__ = ["create_app", "main"]

_SYMBOL = re.compile(r"[A-Z]{1,5}")
_PAIR = re.compile(r"[A-Z]{6}")
FX_KEY_HEADER = "X-Api-Key"
DEMO_FX_KEY = "demo-fx-key-9c41"  # the demo exports it as ACME_FX_KEY for the gateway
_STATS_PATHS = ("/stats", "/stats/reset")


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _price(symbol: str) -> Decimal:
    # Deterministic so tests can predict it: 1.00 .. 1000.99 USD.
    return Decimal(_seed("quote:" + symbol) % 100_000 + 100) / 100


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class _HitCounter:
    """Counts every request by path and by "METHOD path", including 404s; not /stats itself."""

    def __init__(self, app: ASGIApp, counts: dict[str, Counter[str]]) -> None:
        self.app = app
        self.counts = counts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in _STATS_PATHS:
            self.counts["paths"][scope["path"]] += 1
            self.counts["requests"][f"{scope['method']} {scope['path']}"] += 1
        await self.app(scope, receive, send)


# -- stateless endpoints ---------------------------------------------------------------------------


async def quote(request: Request) -> Response:
    symbol = request.path_params["symbol"]
    if not _SYMBOL.fullmatch(symbol):
        return _error(404, "unknown_symbol", f"no quote for symbol {symbol!r}")
    return JSONResponse({
        "symbol": symbol,
        "price": str(_price(symbol)),
        "currency": "USD",
        "as_of": datetime.now(UTC).replace(microsecond=0).isoformat(),
    })


async def weather(request: Request) -> Response:
    city = request.query_params.get("city", "").strip()
    units = request.query_params.get("units", "metric")
    if not city:
        return _error(400, "missing_city", "query parameter 'city' is required")
    if units not in ("metric", "imperial"):
        return _error(400, "bad_units", "units must be 'metric' or 'imperial'")
    seed = _seed("weather:" + city.lower())
    celsius = Decimal(seed % 400 - 50) / 10  # -5.0 .. 34.9
    temperature = celsius if units == "metric" else celsius * 9 / 5 + 32
    return JSONResponse({
        "city": city,
        "units": units,
        "temperature": float(round(temperature, 1)),
        "temperature_unit": "C" if units == "metric" else "F",
        "humidity": seed % 70 + 20,
        "conditions": ["sunny", "cloudy", "rain", "fog", "wind"][seed % 5],
    })


async def report(request: Request) -> Response:
    report_id = request.path_params["report_id"]
    if report_id == "500":
        return _error(500, "internal_error", "report generator crashed")
    if report_id == "429":  # the owner's quota at this upstream is spent for now
        answer = _error(429, "rate_limited", "too many reports requested; retry later")
        answer.headers["Retry-After"] = "120"
        return answer
    if report_id == "404" or not report_id.isdigit():
        return _error(404, "no_such_report", f"no report {report_id!r}")
    seed = _seed("report:" + report_id)
    return JSONResponse({
        "report_id": report_id,
        "title": f"Quarterly usage report #{report_id}",
        "created": "2024-01-01T00:00:00+00:00",
        "rows": [{"month": m, "calls": (seed >> m) % 10_000} for m in range(1, 4)],
    })


async def request_report(request: Request) -> Response:
    """Queues a report: 202 Accepted with where to find it, as slow legacy back ends do."""
    try:
        data = await request.json()
    except ValueError:
        return _error(400, "bad_json", "body must be JSON")
    if not isinstance(data, dict) or not isinstance(data.get("topic"), str):
        return _error(400, "bad_request", "topic is required")
    report_id = str(_seed("queued:" + data["topic"]) % 100_000)
    return JSONResponse(
        {"report_id": report_id, "status": "queued"},
        status_code=202,
        headers={"Location": f"/reports/{report_id}"},
    )


async def admin_users(request: Request) -> Response:
    return JSONResponse({"users": [
        {"id": 1, "name": "alice", "email": "alice@acme.test", "role": "admin"},
        {"id": 2, "name": "bob", "email": "bob@acme.test", "role": "operator"},
    ]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


# -- endpoints with state (one per app) ------------------------------------------------------------


class _State:
    """One app's orders, FX call counts and hit counts, and the endpoints that use them."""

    def __init__(self, fx_key: str) -> None:
        self.fx_key = fx_key
        self.counts: dict[str, Counter[str]] = {"paths": Counter(), "requests": Counter()}
        self.fx_calls: Counter[str] = Counter()
        self.orders: dict[str, dict[str, Any]] = {}
        self.order_ids = itertools.count(1)

    async def create_order(self, request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "bad_json", "body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "bad_order", "body must be a JSON object")
        symbol, quantity = body.get("symbol"), body.get("quantity")
        if not isinstance(symbol, str) or not _SYMBOL.fullmatch(symbol):
            return _error(400, "bad_symbol", "symbol must be 1-5 capital letters")
        if isinstance(quantity, bool) or not isinstance(quantity, int) or not 1 <= quantity <= 1000:
            return _error(400, "bad_quantity", "quantity must be an integer 1..1000")
        order_id = f"{next(self.order_ids):06d}"
        price = _price(symbol)
        order = {
            "id": order_id,
            "symbol": symbol,
            "quantity": quantity,
            "price": str(price),
            "total": str(price * quantity),
            "status": "accepted",
        }
        self.orders[order_id] = order
        return JSONResponse(order, status_code=201, headers={"Location": f"/orders/{order_id}"})

    async def get_order(self, request: Request) -> Response:
        order = self.orders.get(request.path_params["order_id"])
        return JSONResponse(order) if order else _error(404, "no_such_order", "no such order")

    async def delete_order(self, request: Request) -> Response:
        if self.orders.pop(request.path_params["order_id"], None) is None:
            return _error(404, "no_such_order", "no such order")
        return Response(status_code=204)

    async def fx_rate(self, request: Request) -> Response:
        """Rate-limited, deterministically: every odd call per pair (1st, 3rd, ...) is a 429 with
        Retry-After: 1, every even one succeeds. Needs the X-Api-Key header."""
        if request.headers.get(FX_KEY_HEADER) != self.fx_key:
            return _error(401, "bad_api_key", "missing or wrong X-Api-Key")
        pair = request.path_params["pair"]
        if not _PAIR.fullmatch(pair):
            return _error(404, "unknown_pair", f"no rate for {pair!r}")
        self.fx_calls[pair] += 1
        if self.fx_calls[pair] % 2 == 1:
            return JSONResponse({"error": {"code": "rate_limited", "message": "slow down"}}, status_code=429,
                                headers={"Retry-After": "1"})
        rate = Decimal(_seed("fx:" + pair) % 20_000 + 5_000) / 10_000
        return JSONResponse({"pair": pair, "rate": str(rate), "source": request.headers.get("X-Source", "ecb")})

    async def stats(self, request: Request) -> Response:
        return JSONResponse({
            "total": sum(self.counts["paths"].values()),
            "paths": dict(self.counts["paths"]),
            "requests": dict(self.counts["requests"]),
        })

    async def reset_stats(self, request: Request) -> Response:
        for counter in self.counts.values():
            counter.clear()
        self.fx_calls.clear()
        return JSONResponse({"total": 0, "paths": {}, "requests": {}})


def create_app(
    fx_key: str = DEMO_FX_KEY, users: UserOrders | None = None, first_token_seconds: float = 0.0,
    token_seconds: float = 0.0,
) -> Starlette:
    """``users``: per-user orders behind the issuer's tokens (``/users/{user}/orders``);
    ``first_token_seconds``, ``token_seconds``: the completion endpoint's pace (``samples.completions``)."""
    state = _State(fx_key)
    app = Starlette(routes=[
        *(users.routes() if users is not None else []),
        *Completions(first_token_seconds, token_seconds).routes(),
        Route("/api/v1/quote/{symbol}", quote, methods=["GET"]),
        Route("/weather", weather, methods=["GET"]),
        Route("/orders", state.create_order, methods=["POST"]),
        Route("/orders/{order_id}", state.get_order, methods=["GET"]),
        Route("/orders/{order_id}", state.delete_order, methods=["DELETE"]),
        Route("/reports/{report_id}", report, methods=["GET"]),
        Route("/reports", request_report, methods=["POST"]),
        Route("/limited/fx/{pair}", state.fx_rate, methods=["GET"]),
        Route("/admin/users", admin_users, methods=["GET"]),
        Route("/internal/health", health, methods=["GET"]),
        Route("/stats", state.stats, methods=["GET"]),
        Route("/stats/reset", state.reset_stats, methods=["POST"]),
    ])
    app.add_middleware(_HitCounter, counts=state.counts)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample legacy REST upstream for x402gw demos")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9101)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
