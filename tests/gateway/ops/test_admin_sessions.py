"""The admin session: the cookie the one-time ``?token=`` becomes expires, is bound to the token, and
opens no state-changing request sent from another origin (a sibling site of the same domain passes
SameSite=Strict). A Bearer token is not a browser's: it works from anywhere."""

from __future__ import annotations

from pydantic import SecretStr
from starlette.requests import Request

from gateway.ops.admin.routes import COOKIE, SESSION_SECONDS, AdminAuth

TOKEN = "an-admin-token-of-enough-length"


def request(method: str = "GET", *, cookie: str | None = None, query: str = "", **headers: str) -> Request:
    raw = [(k.replace("_", "-").lower().encode(), v.encode()) for k, v in headers.items()]
    if cookie is not None:
        raw.append((b"cookie", f"{COOKIE}={cookie}".encode()))
    return Request({"type": "http", "method": method, "path": "/admin/webhooks/1/replay", "query_string": query.encode(),
                    "headers": raw, "scheme": "https", "server": ("gw.example", 443)})


def session(auth: AdminAuth) -> str:
    set_cookie = auth.redirect(request(query=f"token={TOKEN}")).headers["set-cookie"]
    assert f"Max-Age={SESSION_SECONDS}" in set_cookie and TOKEN not in set_cookie
    return set_cookie.split(";", 1)[0].split("=", 1)[1]


def test_a_session_lasts_its_lifetime_then_is_refused() -> None:
    now = [1_800_000_000.0]
    auth = AdminAuth(SecretStr(TOKEN), clock=lambda: now[0])
    cookie = session(auth)
    assert auth.decide(request(cookie=cookie)) == "ok"
    now[0] += SESSION_SECONDS - 1
    assert auth.decide(request(cookie=cookie)) == "ok"
    now[0] += 2
    assert auth.decide(request(cookie=cookie)) == "denied"


def test_a_session_of_another_token_or_a_forged_time_is_refused() -> None:
    auth = AdminAuth(SecretStr(TOKEN))
    cookie = session(auth)
    issued, _, mac = cookie.partition(".")
    assert AdminAuth(SecretStr(TOKEN + "-rotated")).decide(request(cookie=cookie)) == "denied"
    assert auth.decide(request(cookie=f"{int(issued) + 3600}.{mac}")) == "denied"  # its time pushed on
    for junk in ("", ".", mac, f"x.{mac}", f"{'9' * 40}.{mac}", TOKEN):
        assert auth.decide(request(cookie=junk)) == "denied"


def test_a_cookie_opens_no_state_change_sent_from_another_origin() -> None:
    auth = AdminAuth(SecretStr(TOKEN))
    cookie = session(auth)
    assert auth.decide(request("POST", cookie=cookie, origin="https://evil.example.com")) == "denied"
    assert auth.decide(request("POST", cookie=cookie, sec_fetch_site="same-site")) == "denied"
    assert auth.decide(request("POST", cookie=cookie, origin="https://gw.example", sec_fetch_site="same-origin")) == "ok"
    assert auth.decide(request("POST", cookie=cookie)) == "ok"  # a client that is not a browser sends neither
    bearer = {"authorization": f"Bearer {TOKEN}"}
    assert auth.decide(request("POST", origin="https://evil.example.com", **bearer)) == "ok"
