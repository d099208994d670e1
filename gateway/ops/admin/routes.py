"""Who may see the dashboard, and its two routes: ``GET /admin`` (HTML) and ``GET /admin/data.json``.

Without a configured token the dashboard does not exist (404). Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlencode

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.errors import GatewayError
from gateway.ops.admin.dashboard import Dashboard
from gateway.ops.admin.page import render_page
from gateway.ops.admin.queries import RANGES
from settlement.x402.digits import is_digits

__all__ = ["COOKIE", "AdminAuth", "admin_routes"]

COOKIE = "x402gw_admin"
SESSION_SECONDS = 12 * 3600  # an admin session (the cookie's lifetime)
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


# -- access -------------------------------------------------------------------------------------


class AdminAuth:
    """Bearer header, session cookie, or a one-time ``?token=`` that becomes the cookie.

    A session lasts ``SESSION_SECONDS`` (the cookie says when it was issued, under an HMAC of the
    token: a leaked cookie does not give the token, expires, and rotating the token ends every
    session). A cookie opens no state-changing request sent from another origin (``Origin``,
    ``Sec-Fetch-Site``): SameSite=Strict alone lets a sibling site of the same domain send one."""

    def __init__(self, token: SecretStr, clock: Callable[[], float] = time.time) -> None:
        self._token = token.get_secret_value().encode()
        self._clock = clock

    def _is_token(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token)

    def _mac(self, issued: int) -> str:
        return hmac.new(self._token, f"x402gw admin session v2|{issued}".encode(), hashlib.sha256).hexdigest()

    def _session_ok(self, cookie: str) -> bool:
        issued, _, mac = cookie.partition(".")
        if not is_digits(issued, 12) or not 0 <= self._clock() - int(issued) < SESSION_SECONDS:
            return False
        return hmac.compare_digest(mac.encode(), self._mac(int(issued)).encode())

    def decide(self, request: Request) -> Literal["ok", "redirect", "denied"]:
        query_token = request.query_params.get("token")
        if query_token is not None:
            return "redirect" if self._is_token(query_token) else "denied"
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._is_token(credentials.strip()):
            return "ok"
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and self._session_ok(cookie) and (request.method in ("GET", "HEAD") or _same_origin(request)):
            return "ok"
        return "denied"

    def redirect(self, request: Request) -> Response:
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        issued = int(self._clock())
        response.set_cookie(
            COOKIE, f"{issued}.{self._mac(issued)}", max_age=SESSION_SECONDS, path="/admin", httponly=True,
            samesite="strict", secure=request.url.scheme == "https",
        )
        return response


def _same_origin(request: Request) -> bool:
    """A browser's request from this origin (or a client that sends neither header)."""
    if request.headers.get("sec-fetch-site", "same-origin") != "same-origin":
        return False
    origin = request.headers.get("origin")
    return origin is None or origin == f"{request.url.scheme}://{request.url.netloc}"


def _denied() -> Response:
    response = GatewayError("admin_unauthorized", "the admin token is missing or wrong", status=401).to_response()
    response.headers["WWW-Authenticate"] = 'Bearer realm="x402gw-admin"'
    return response


def admin_routes(dashboard: Dashboard, token: SecretStr | None) -> list[Route]:
    """``/admin`` and ``/admin/data.json``; both 404 when no admin token is configured."""
    auth = AdminAuth(token) if token is not None and token.get_secret_value() else None

    def gate(request: Request) -> Response | None:
        if auth is None:
            return GatewayError("not_found", "no tool is exposed at this path").to_response()
        decision = auth.decide(request)
        if decision == "redirect":
            return auth.redirect(request)
        return _denied() if decision == "denied" else None

    def range_of(request: Request) -> str:
        key = request.query_params.get("range", "24h")
        if key not in RANGES:
            raise GatewayError("invalid_range", f"range is one of {', '.join(RANGES)}", status=422)
        return key

    async def page(request: Request) -> Response:
        stop = gate(request)
        if stop is not None:
            return stop
        try:
            data = await dashboard.data(range_of(request))
        except GatewayError as err:
            return err.to_response()
        return HTMLResponse(render_page(data), headers=SECURITY_HEADERS)

    async def data_json(request: Request) -> Response:
        stop = gate(request)
        if stop is not None:
            return stop
        try:
            data = await dashboard.data(range_of(request))
        except GatewayError as err:
            return err.to_response()
        return JSONResponse(data, headers=SECURITY_HEADERS)

    return [Route("/admin", page, methods=["GET"]), Route("/admin/data.json", data_json, methods=["GET"])]
