"""The user-token checker's parts without a network: the JWKS cache's TTL and refetch bound (a
fake clock, no sleeps), the token exchange's refusal, a missing exchange secret, and what a
checked token shows of itself."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from catalog import parse_catalog
from catalog.user_auth import UserAuth
from gateway.devkit.samples.auth_server import AuthServer
from gateway.errors import GatewayConfigError, GatewayError
from gateway.upstream.user_auth import JwksCache, UserAuthority, UserToken, token_digest

ISSUER = "https://auth.test"
AUTH = UserAuth(issuer=ISSUER, audience="orders", jwks_url=f"{ISSUER}/jwks", scopes=("orders:read",))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cache_of(server: AuthServer, clock: Clock) -> tuple[JwksCache, list[str]]:
    fetched: list[str] = []

    async def fetch(url: str) -> Any:
        fetched.append(url)
        return server.jwks()

    return JwksCache(fetch, ttl=300, refetch_seconds=30, clock=clock), fetched


def test_jwks_is_cached_for_its_ttl_and_unknown_kids_refetch_at_most_so_often() -> None:
    server, clock = AuthServer(ISSUER), Clock()
    cache, fetched = cache_of(server, clock)

    async def run() -> None:
        assert (await cache.key(AUTH.jwks_url, server.kid)) is not None
        assert (await cache.key(AUTH.jwks_url, server.kid)) is not None
        assert len(fetched) == 1  # cached
        for _ in range(5):  # junk kids within the refetch interval: no fetch at all
            assert (await cache.key(AUTH.jwks_url, "junk")) is None
        assert len(fetched) == 1
        clock.now += 31
        assert (await cache.key(AUTH.jwks_url, "junk")) is None
        assert (await cache.key(AUTH.jwks_url, "junk")) is None
        assert len(fetched) == 2  # one refetch for a possibly rotated key, then quiet again
        clock.now += 300
        assert (await cache.key(AUTH.jwks_url, server.kid)) is not None
        assert len(fetched) == 3  # the TTL ran out

    asyncio.run(run())


def test_an_unreadable_jwks_is_a_503_not_a_401() -> None:
    async def fetch(url: str) -> Any:
        raise httpx.ConnectError("down")

    authority = UserAuthority([], jwks=JwksCache(fetch))
    token = AuthServer(ISSUER).issue("alice", "orders", "orders:read")
    with pytest.raises(GatewayError) as error:
        asyncio.run(authority.verify(AUTH, f"Bearer {token}"))
    assert (error.value.code, error.value.status) == ("user_auth_unavailable", 503)


def test_a_refused_exchange_is_a_502_naming_no_token() -> None:
    server = AuthServer(ISSUER)
    token = server.issue("alice", "gw", "orders:read")
    text = f"""catalog: 1
owner: acme
payment: {{network: "eip155:31337", asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3", pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"}}
upstreams: {{u: {{base_url: "http://127.0.0.1:9"}}}}
tools:
  - {{name: a, description: d, method: GET, path: /a, price: "0.002", user_auth: {{issuer: {ISSUER}, audience: gw,
      jwks_url: {ISSUER}/jwks, exchange: {{token_url: {ISSUER}/token, audience: orders, client_id: gw, client_secret_env: EX}}}}}}
"""
    [tool] = parse_catalog(text).tools
    assert tool.user_auth is not None
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json={"error": "invalid_grant"}))
    authority = UserAuthority([tool], environ={"EX": "s3cret"}, transport=transport)
    with pytest.raises(GatewayError) as error:
        asyncio.run(authority.upstream_credentials(tool.user_auth, UserToken(ISSUER, "alice", frozenset(), token)))
    assert (error.value.code, error.value.status) == ("user_token_exchange_failed", 502)
    assert token not in str(error.value.body()) and "s3cret" not in str(error.value.body())
    with pytest.raises(GatewayConfigError) as missing:
        UserAuthority([tool], environ={})
    assert missing.value.code == "user_auth_secret_missing" and "EX" in str(missing.value)


def test_a_checked_token_shows_its_subject_and_digest_never_itself() -> None:
    user = UserToken(ISSUER, "alice", frozenset({"orders:read"}), "eyJ.secret.token")
    assert "eyJ.secret.token" not in repr(user) and "alice" in repr(user)
    assert user.digest == token_digest("eyJ.secret.token") and len(user.digest) == 16


def test_an_unreadable_wallet_accounts_file_stops_start_up(tmp_path: Path) -> None:
    for content in ("not json", '{"0x12": "short address"}', '["a list"]'):
        (tmp_path / "accounts.json").write_text(content)
        [tool] = parse_catalog(TOOL.format(file=tmp_path / "accounts.json")).tools
        with pytest.raises(GatewayConfigError) as error:
            UserAuthority([tool])
        assert error.value.code == "wallet_accounts_unreadable" and "short address" not in str(error.value)


def test_a_payer_without_an_account_is_refused_and_a_linked_one_gets_its_credential(tmp_path: Path) -> None:
    payer = "0x" + "ab" * 20
    (tmp_path / "accounts.json").write_text(f'{{"{payer.upper().replace("0X", "0x")}": "alice-secret"}}')
    [tool] = parse_catalog(TOOL.format(file=tmp_path / "accounts.json")).tools
    authority = UserAuthority([tool])
    credentials = asyncio.run(authority.for_call(tool, None, payer))
    assert credentials is not None and credentials.headers == {"Authorization": "Bearer alice-secret"}
    assert "alice-secret" not in repr(credentials)
    for other in ("0x" + "cd" * 20, None):
        with pytest.raises(GatewayError) as error:
            asyncio.run(authority.for_call(tool, None, other))
        assert (error.value.code, error.value.status) == ("wallet_not_linked", 403)


TOOL = """catalog: 1
owner: acme
payment: {{network: "eip155:31337", asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3", pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"}}
upstreams: {{u: {{base_url: "http://127.0.0.1:9"}}}}
tools:
  - {{name: a, description: d, method: GET, path: /a, price: "0.002", wallet_accounts: {{credentials_file: "{file}"}}}}
"""
