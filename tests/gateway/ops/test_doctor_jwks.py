"""The doctor's JWKS check (tools with user_auth): a usable key set passes; an issuer that is down,
answers an error or something that is no JWKS fails with its code."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.devkit.samples.auth_server import AuthServer
from gateway.ops.doctor.user_auth_checks import check_jwks

URL = "https://auth.test/jwks"


def verdict(handler: httpx.MockTransport) -> tuple[str, str]:
    async def run() -> tuple[str, str]:
        async with httpx.AsyncClient(transport=handler) as client:
            finding = await check_jwks(URL, client)
        return finding.status, finding.code

    return asyncio.run(run())


def test_a_usable_jwks_passes() -> None:
    keys = AuthServer("https://auth.test").jwks()
    assert verdict(httpx.MockTransport(lambda request: httpx.Response(200, json=keys))) == ("ok", "ok")


def _down(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused", request=request)


@pytest.mark.parametrize(("transport", "code"), [
    (httpx.MockTransport(_down), "jwks_unreachable"),
    (httpx.MockTransport(lambda request: httpx.Response(503)), "jwks_unreachable"),
    (httpx.MockTransport(lambda request: httpx.Response(200, json={"keys": "none"})), "jwks_invalid"),
    (httpx.MockTransport(lambda request: httpx.Response(200, text="<html>")), "jwks_invalid"),
])
def test_an_unusable_issuer_fails_with_its_code(transport: httpx.MockTransport, code: str) -> None:
    assert verdict(transport) == ("fail", code)
