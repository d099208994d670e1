"""RemoteFacilitator with credentials, against a real server on loopback that demands them: the
right bearer token or CDP JWT gets answers; wrong or missing credentials are a clear refusal, and
the credential appears in no log line and no error message."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.errors import FacilitatorUnavailable
from settlement.schemes.facilitator_auth import CdpJwtAuth, FacilitatorAuth, StaticHeaders
from settlement.schemes.remote import RemoteFacilitator, settlement_outcome_unknown
from tests.settlement.schemes.test_remote_facilitator import REQUIREMENTS, payment
from tests.support.auth_facilitator import RequireAuth, bearer, cdp_jwt
from tests.support.facilitator_double import NETWORK, SUPPORTED, TX_HASH

TOKEN = "s3cret-facilitator-token-7f1d"
KEY_ID = "organizations/test/apiKeys/gateway"


async def supported(request: Request) -> JSONResponse:
    return JSONResponse(SUPPORTED)


async def verify(request: Request) -> JSONResponse:
    return JSONResponse({"isValid": True, "payer": "0x" + "11" * 20})


async def settle(request: Request) -> JSONResponse:
    return JSONResponse({"success": True, "transaction": TX_HASH, "network": NETWORK})


def facilitator_app() -> Starlette:
    return Starlette(routes=[Route("/x402/supported", supported), Route("/x402/verify", verify, methods=["POST"]),
                             Route("/x402/settle", settle, methods=["POST"])])


def es256() -> tuple[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode(), key.public_key()


@pytest.fixture
def bearer_server() -> Iterator[tuple[str, RequireAuth]]:
    guarded = RequireAuth(facilitator_app(), bearer(TOKEN))
    with ThreadServer(guarded) as server:
        yield server.url + "/x402", guarded


@pytest.fixture
def cdp_server() -> Iterator[tuple[str, RequireAuth, str]]:
    secret, public = es256()
    guarded = RequireAuth(facilitator_app(), cdp_jwt(KEY_ID, public))
    with ThreadServer(guarded) as server:
        yield server.url + "/x402", guarded, secret


def call(url: str, auth: FacilitatorAuth | None, method: str) -> Any:
    async def go() -> Any:
        remote = RemoteFacilitator(url, auth=auth, verify_timeout=5, settle_timeout=5)
        try:
            if method == "fetch_supported":
                return await remote.fetch_supported()
            return await getattr(remote, method)(payment(), REQUIREMENTS)
        finally:
            await remote.close()

    return asyncio.run(go())


def assert_never_shown(secret: str, caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    for text in [caplog.text, *texts]:
        assert secret not in text
        assert secret[:12] not in text


def test_the_right_bearer_token_gets_answers(bearer_server: tuple[str, RequireAuth]) -> None:
    url, guarded = bearer_server
    auth = StaticHeaders({"Authorization": f"Bearer {TOKEN}"})
    assert call(url, auth, "fetch_supported")["kinds"]
    assert call(url, auth, "verify").is_valid
    assert call(url, auth, "settle").success
    assert [ok for _, ok in guarded.seen] == [True, True, True]


@pytest.mark.parametrize("auth", [None, StaticHeaders({"Authorization": "Bearer wrong-token-000000000"})])
def test_wrong_or_missing_bearer_is_a_clear_refusal_that_shows_no_credential(
    bearer_server: tuple[str, RequireAuth], auth: FacilitatorAuth | None, caplog: pytest.LogCaptureFixture
) -> None:
    url, guarded = bearer_server
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FacilitatorUnavailable) as raised:
        call(url, auth, "verify")
    assert "refused this gateway's credentials" in raised.value.message
    assert "answered 401: it refused this gateway's credentials" in caplog.text
    result = call(url, auth, "settle")
    # received and refused: whether it acted cannot be known from here, so unknown, never "not sent"
    assert not result.success and settlement_outcome_unknown(result)
    assert [ok for _, ok in guarded.seen] == [False, False]
    assert_never_shown(TOKEN, caplog, raised.value.message, repr(raised.value), result.model_dump_json())
    assert_never_shown("wrong-token-000000000", caplog, raised.value.message, result.model_dump_json())


def test_a_cdp_jwt_per_request_gets_answers(cdp_server: tuple[str, RequireAuth, str]) -> None:
    url, guarded, secret = cdp_server
    auth = CdpJwtAuth(KEY_ID, secret)
    assert call(url, auth, "fetch_supported")["kinds"]
    assert call(url, auth, "verify").is_valid
    assert call(url, auth, "settle").transaction == TX_HASH
    assert [ok for _, ok in guarded.seen] == [True, True, True]


def test_a_cdp_jwt_from_another_key_is_refused(
    cdp_server: tuple[str, RequireAuth, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, guarded, _ = cdp_server
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    raw += key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    other = base64.b64encode(raw).decode()
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FacilitatorUnavailable, match="credentials"):
        call(url, CdpJwtAuth(KEY_ID, other), "verify")
    assert guarded.seen == [("/x402/verify", False)]
    assert_never_shown(other, caplog)
