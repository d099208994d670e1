"""Who may see the dashboard, and its two routes: ``GET /admin`` (HTML) and ``GET /admin/data.json``.

Without a configured token the dashboard does not exist (404). Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
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

__all__ = ["COOKIE", "AdminAuth", "admin_routes"]

COOKIE = "x402gw_admin"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


# -- access -------------------------------------------------------------------------------------


class AdminAuth:
    """Bearer header, session cookie, or a one-time ``?token=`` that becomes the cookie."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token.get_secret_value().encode()
        # The cookie holds a value derived from the token, not the token: a leaked cookie
        # does not give the token (for Bearer use elsewhere), and rotating the token ends sessions.
        self._session = hmac.new(self._token, b"x402gw admin session v1", hashlib.sha256).hexdigest()

    def _is_token(self, candidate: str) -> bool:
        return hmac.compare_digest(candidate.encode(), self._token)

    def decide(self, request: Request) -> Literal["ok", "redirect", "denied"]:
        query_token = request.query_params.get("token")
        if query_token is not None:
            return "redirect" if self._is_token(query_token) else "denied"
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._is_token(credentials.strip()):
            return "ok"
        cookie = request.cookies.get(COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), self._session.encode()):
            return "ok"
        return "denied"

    def redirect(self, request: Request) -> Response:
        rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
        target = request.url.path + (f"?{urlencode(rest)}" if rest else "")
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(
            COOKIE, self._session, path="/admin", httponly=True, samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response


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
