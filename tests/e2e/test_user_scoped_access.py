"""User-scoped access (issue 17 item 1) on the real stack: the gateway on loopback, the sample
authorization server and the sample upstream (per-user orders it guards itself) as real HTTP
servers, payments on anvil.

A tool with ``user_auth`` checks the end user's OAuth token before any 402; the user's token, or
one exchanged for the upstream's audience (RFC 8693), is what the upstream receives; a payment's
stored answer is only ever replayed to the user it was made for; no token is written anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jwt
import mcp_types as types
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from gateway.devkit.payer import Payer
from gateway.devkit.samples import rest_upstream
from gateway.devkit.samples.auth_server import DEMO_CLIENTS, AuthServer
from gateway.devkit.samples.user_orders import SAMPLE_ORDERS, UserOrders
from gateway.ops.doctor.plan import plan_from_settings
from gateway.ops.doctor.run import run_doctor
from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentRequired
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of, upstream_hits

PAYER = 6
UPSTREAM_AUDIENCE = "orders-api"
GATEWAY_AUDIENCE = "x402gw-orders"
READ = "orders:read"


@dataclass
class Stack:
    auth: AuthServer
    auth_url: str
    upstream: str
    orders: UserOrders
    gateway: RunningGateway


CATALOG = """\
catalog: 1
owner: acme-orders
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
upstreams:
  orders:
    base_url: "{upstream}"
tools:
  - name: my_orders
    description: The orders of the user whose access token comes with the call.
    method: GET
    path: /me/orders/{{user}}
    upstream: orders
    upstream_path: /users/{{user}}/orders
    price: 0.001
    input_schema:
      type: object
      properties: {{user: {{type: string, pattern: "^[a-z]{{1,20}}$"}}}}
      required: [user]
    user_auth:
      issuer: "{issuer}"
      audience: {upstream_audience}
      jwks_url: "{issuer}/jwks"
      scopes: [{read}]
  - name: my_orders_exchanged
    description: The same orders, the user's token exchanged for the upstream's audience.
    method: GET
    path: /exchanged/orders/{{user}}
    upstream: orders
    upstream_path: /users/{{user}}/orders
    price: 0.001
    input_schema:
      type: object
      properties: {{user: {{type: string, pattern: "^[a-z]{{1,20}}$"}}}}
      required: [user]
    user_auth:
      issuer: "{issuer}"
      audience: {gateway_audience}
      jwks_url: "{issuer}/jwks"
      scopes: [{read}]
      exchange:
        token_url: "{issuer}/token"
        audience: {upstream_audience}
        client_id: x402gw
        client_secret_env: ORDERS_EXCHANGE_SECRET
  - name: wallet_orders
    description: The orders of the account the owner linked to the paying wallet.
    method: GET
    path: /wallet/orders/{{user}}
    upstream: orders
    upstream_path: /users/{{user}}/orders
    price: 0.001
    input_schema:
      type: object
      properties: {{user: {{type: string, pattern: "^[a-z]{{1,20}}$"}}}}
      required: [user]
    wallet_accounts:
      credentials_file: "{accounts}"
  - name: wallet_orders_upfront
    description: The same, settled before the upstream runs.
    method: GET
    path: /wallet/upfront/orders/{{user}}
    upstream: orders
    upstream_path: /users/{{user}}/orders
    price: 0.001
    settle: upfront
    input_schema:
      type: object
      properties: {{user: {{type: string, pattern: "^[a-z]{{1,20}}$"}}}}
      required: [user]
    wallet_accounts:
      credentials_file: "{accounts}"
"""


@pytest.fixture
def stack(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    auth = AuthServer("pending")
    with ThreadServer(auth.app()) as auth_server:
        auth.issuer = auth_server.url
        orders = UserOrders(auth.issuer, UPSTREAM_AUDIENCE, f"{auth.issuer}/jwks")
        with ThreadServer(rest_upstream.create_app(users=orders)) as upstream_server:
            accounts = tmp_path / "accounts.json"  # the owner's secret file: payer -> alice's long-lived token
            accounts.write_text(json.dumps({devchain.address(PAYER): auth.issue("alice", UPSTREAM_AUDIENCE, READ)}))
            catalog = tmp_path / "orders.yaml"
            catalog.write_text(CATALOG.format(accounts=accounts,
                token=devchain.token, pay_to=PAY_TO, upstream=upstream_server.url, issuer=auth.issuer,
                upstream_audience=UPSTREAM_AUDIENCE, gateway_audience=GATEWAY_AUDIENCE, read=READ,
            ))
            monkeypatch.setenv("ORDERS_EXCHANGE_SECRET", DEMO_CLIENTS["x402gw"])
            yield Stack(auth, auth.issuer, upstream_server.url, orders, start_gateway(catalog))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pay(client: httpx.Client, devchain: Devchain, path: str, token: str | None, *, payer: int = PAYER,
        tamper: dict[str, Any] | None = None) -> tuple[httpx.Response, httpx.Response, str]:
    """The user's token (if any) on both calls: 402, then the signed payment."""
    headers = bearer(token) if token else {}
    challenge = client.get(path, headers=headers)
    offer = offer_of(challenge)
    header = encode_header(Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource, overrides=tamper))
    paid = client.get(path, headers={**headers, "PAYMENT-SIGNATURE": header})
    return challenge, paid, header


def orders_hits(stack: Stack, user: str) -> int:
    return upstream_hits(stack.upstream, f"GET /users/{user}/orders")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """A JWT put together by hand (PyJWT refuses to sign HS256 with a PEM key, as it should)."""
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing.encode(), hashlib.sha256).digest() if header["alg"] == "HS256" else b""
    return f"{signing}.{_b64(signature)}"


def bad_tokens(auth: AuthServer) -> dict[str, tuple[str, int, str]]:
    """Each bad token, with the status and code it must get."""
    now = int(time.time())
    claims = {"iss": auth.issuer, "sub": "alice", "aud": UPSTREAM_AUDIENCE, "iat": now, "exp": now + 600, "scope": READ}
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = auth.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "expired": (auth.issue("alice", UPSTREAM_AUDIENCE, READ, expires_in=-120), 401, "user_token_expired"),
        "wrongly signed": (jwt.encode(claims, other_key, algorithm="RS256", headers={"kid": auth.kid}), 401, "user_token_invalid"),
        "wrong audience": (auth.issue("alice", "another-api", READ), 401, "user_token_wrong_audience"),
        "under-scoped": (auth.issue("alice", UPSTREAM_AUDIENCE, "profile:read"), 403, "user_scope_missing"),
        "another issuer": (jwt.encode({**claims, "iss": "https://evil.test"}, auth.key, algorithm="RS256",
                                      headers={"kid": auth.kid}), 401, "user_token_wrong_issuer"),
        "alg none": (forged({"alg": "none", "typ": "JWT", "kid": auth.kid}, claims, b""), 401, "user_token_invalid"),
        "HS256 with the public key": (forged({"alg": "HS256", "typ": "JWT", "kid": auth.kid}, claims, public_pem),
                                      401, "user_token_invalid"),
        "not a JWT": ("not-a-jwt", 401, "user_token_invalid"),
    }


def test_a_user_reads_their_own_orders_and_the_upstream_refuses_another_users(stack: Stack, devchain: Devchain) -> None:
    alice = stack.auth.issue("alice", UPSTREAM_AUDIENCE, READ)
    before = devchain.balance(devchain.address(PAYER))
    with stack.gateway.client() as client:
        _, own, _ = pay(client, devchain, "/me/orders/alice", alice)
        _, other, _ = pay(client, devchain, "/me/orders/bob", alice)
    assert own.status_code == 200, own.text
    assert own.json() == {"user": "alice", "orders": SAMPLE_ORDERS["alice"]}
    # Refused by the upstream's own rule (its code), not by the gateway: it was called, and said no.
    assert other.status_code == 403, other.text
    assert other.json()["upstreamError"] == "not_your_orders"
    assert orders_hits(stack, "bob") == 1
    assert "B-2001" not in other.text
    rows = sorted(stack.gateway.ledger.all(), key=lambda row: row.id)
    assert [row.state for row in rows] == [PaymentState.SETTLED, PaymentState.VOIDED]  # the refusal is not charged
    assert devchain.balance(devchain.address(PAYER)) == before - 1000
    assert stack.orders.seen[-1]["sub"] == "alice" and stack.orders.seen[-1]["aud"] == UPSTREAM_AUDIENCE


def test_bad_tokens_are_refused_before_any_402_ledger_row_or_upstream_call(stack: Stack, devchain: Devchain) -> None:
    with stack.gateway.client() as client:
        missing = client.get("/me/orders/alice")
        assert missing.status_code == 401 and missing.json()["error"] == "user_token_missing"
        good = offer_of(client.get("/me/orders/alice", headers=bearer(stack.auth.issue("alice", UPSTREAM_AUDIENCE, READ))))
        payment = encode_header(Payer(devchain.key(PAYER)).sign(good.accepts[0], resource=good.resource))
        for name, (token, status, code) in bad_tokens(stack.auth).items():
            for headers in (bearer(token), {**bearer(token), "PAYMENT-SIGNATURE": payment}):
                answer = client.get("/me/orders/alice", headers=headers)
                assert answer.status_code == status, (name, answer.text)
                assert answer.json()["error"] == code, name
                assert "payment-required" not in answer.headers, name
                assert answer.headers["www-authenticate"].startswith("Bearer "), name
        scoped = client.get("/me/orders/alice", headers=bearer(stack.auth.issue("alice", UPSTREAM_AUDIENCE, "x")))
    assert scoped.json()["missingScopes"] == [READ]
    assert 'error="insufficient_scope"' in scoped.headers["www-authenticate"]
    assert stack.gateway.ledger.all() == []
    assert orders_hits(stack, "alice") == 0
    assert devchain.authorization_state(devchain.address(PAYER), json.loads(base64.b64decode(payment))["payload"]["authorization"]["nonce"]) is False


def test_token_exchange_gives_the_upstream_a_token_for_its_own_audience(stack: Stack, devchain: Devchain) -> None:
    alice = stack.auth.issue("alice", GATEWAY_AUDIENCE, READ)  # for the gateway, not for the upstream
    with stack.gateway.client() as client:
        direct = client.get("/me/orders/alice", headers=bearer(alice))  # the other tool wants the upstream's audience
        _, paid, _ = pay(client, devchain, "/exchanged/orders/alice", alice)
    assert direct.status_code == 401 and direct.json()["error"] == "user_token_wrong_audience"
    assert paid.status_code == 200, paid.text
    assert paid.json()["orders"] == SAMPLE_ORDERS["alice"]
    seen = stack.orders.seen[-1]
    assert seen["aud"] == UPSTREAM_AUDIENCE and seen["sub"] == "alice" and seen["act"] == {"sub": "x402gw"}
    assert stack.auth.issued["token_exchange"] == 1


def test_a_paid_answer_is_never_replayed_to_another_user(stack: Stack, devchain: Devchain) -> None:
    alice = stack.auth.issue("alice", UPSTREAM_AUDIENCE, READ)
    bob = stack.auth.issue("bob", UPSTREAM_AUDIENCE, READ)
    with stack.gateway.client() as client:
        _, first, header = pay(client, devchain, "/me/orders/alice", alice)
        again = client.get("/me/orders/alice", headers={**bearer(alice), "PAYMENT-SIGNATURE": header})
        stolen = client.get("/me/orders/alice", headers={**bearer(bob), "PAYMENT-SIGNATURE": header})
    assert first.status_code == 200 and again.status_code == 200
    assert again.json() == first.json()  # the same user: the stored answer, replayed
    assert stolen.status_code in (402, 409), stolen.text  # another user: another request, never alice's answer
    assert "A-1001" not in stolen.text
    assert orders_hits(stack, "alice") == 1
    [row] = stack.gateway.ledger.all()
    assert row.state == PaymentState.SETTLED


def test_no_token_appears_in_logs_ledger_audit_or_answers(
    stack: Stack, devchain: Devchain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    answers: list[httpx.Response] = []
    with stack.gateway.client() as client:
        answers += pay(client, devchain, "/me/orders/alice", stack.auth.issue("alice", UPSTREAM_AUDIENCE, READ))[:2]
        answers += pay(client, devchain, "/me/orders/bob", stack.auth.issue("alice", UPSTREAM_AUDIENCE, READ))[:2]
        answers += pay(client, devchain, "/exchanged/orders/bob", stack.auth.issue("bob", GATEWAY_AUDIENCE, READ))[:2]
        answers += pay(client, devchain, "/wallet/orders/alice", None)[:2]  # the owner's linked credential
        bad = [token for token, _, _ in bad_tokens(stack.auth).values()]
        answers += [client.get("/me/orders/alice", headers=bearer(token)) for token in bad]
    database = Path(stack.gateway.settings.database_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in database.parent.glob(database.name + "*"))
    with sqlite3.connect(database) as connection:
        audit = [json.dumps(r) for r in connection.execute("select * from audit_records").fetchall()]
    assert any("user_authenticated" in record and "alice" in record for record in audit)
    assert any(r.name == "x402gw.audit" for r in caplog.records)
    assert stack.auth.issued["token_exchange"] == 1  # the exchanged token is among the issued ones
    tokens = [*stack.auth.tokens, *(token for token in bad if token.count(".") == 2 and not token.endswith("."))]
    assert len(tokens) >= 10
    for token in tokens:
        for part in (token, token.split(".")[2]):
            assert part not in caplog.text
            assert part.encode() not in stored
            assert not any(part in record for record in audit)
            for answer in answers:
                assert part not in answer.text and part not in str(answer.headers)


def test_discovery_says_which_token_a_tool_needs(stack: Stack) -> None:
    with stack.gateway.client() as client:
        tools = {entry["function"]["name"]: entry for entry in client.get("/tools").json()["tools"]}
        openapi = client.get("/openapi.json").json()
        llms = client.get("/llms.txt").text
    assert f"- needs the user's token: send Authorization: Bearer <an access token from {stack.auth.issuer}" in llms
    facts = tools["my_orders"]["userAuth"]
    assert (facts["issuer"], facts["audience"], facts["scopes"]) == (stack.auth.issuer, UPSTREAM_AUDIENCE, [READ])
    assert tools["my_orders_exchanged"]["userAuth"]["audience"] == GATEWAY_AUDIENCE  # what the agent's token is for
    operation = openapi["paths"]["/me/orders/{user}"]["get"]
    assert operation["security"] == [{"x402": [], "user_my_orders": [READ]}]
    assert {"401", "403"} <= set(operation["responses"])
    scheme = openapi["components"]["securitySchemes"]["user_my_orders"]
    assert (scheme["type"], scheme["scheme"], scheme["bearerFormat"]) == ("http", "bearer", "JWT")
    assert stack.auth.issuer in scheme["description"]


def test_over_mcp_the_users_token_on_the_mcp_request_reaches_the_tool(stack: Stack, devchain: Devchain) -> None:
    alice = stack.auth.issue("alice", UPSTREAM_AUDIENCE, READ)

    async def run(token: str | None) -> tuple[types.Tool, types.CallToolResult, types.CallToolResult | None]:
        async with (
            httpx2.AsyncClient(headers=bearer(token) if token else {}, timeout=30) as http,
            streamable_http_client(f"{stack.gateway.url}/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            listed = next(t for t in (await session.list_tools()).tools if t.name == "my_orders")
            unpaid = await session.call_tool("my_orders", {"user": "alice"})
            if token is None:
                return listed, unpaid, None
            offer = PaymentRequired.model_validate(unpaid.structured_content)
            payment = Payer(devchain.key(PAYER)).sign(offer.accepts[0], resource=offer.resource).to_wire()
            return listed, unpaid, await session.call_tool("my_orders", {"user": "alice"}, meta={"x402/payment": payment})

    listed, refused, _ = asyncio.run(run(None))
    assert "acts for its user" in (listed.description or "") and listed.meta is not None
    assert listed.meta["x402gw/userAuth"]["scopes"] == [READ]
    assert refused.is_error and "user_token_missing" in json.dumps(refused.structured_content or refused.model_dump(mode="json"))
    _, unpaid, paid = asyncio.run(run(alice))
    assert unpaid.is_error and paid is not None and not paid.is_error, paid
    assert "A-1001" in json.dumps(paid.model_dump(mode="json"))


def test_a_wallet_linked_account_is_used_only_for_its_verified_payer(stack: Stack, devchain: Devchain) -> None:
    other = PAYER + 1
    before = devchain.balance(devchain.address(other))
    with stack.gateway.client() as client:
        # A signature by another key naming the linked wallet: refused offline, the account never used.
        _, forged_payer, _ = pay(client, devchain, "/wallet/orders/alice", None, payer=other,
                                 tamper={"from_": devchain.address(PAYER)})
        assert forged_payer.status_code == 402 and orders_hits(stack, "alice") == 0
        _, unlinked, _ = pay(client, devchain, "/wallet/orders/alice", None, payer=other)
        _, linked, _ = pay(client, devchain, "/wallet/orders/alice", None)
    assert unlinked.status_code == 403 and unlinked.json()["error"] == "wallet_not_linked", unlinked.text
    assert devchain.balance(devchain.address(other)) == before  # refused before anything was recorded
    assert linked.status_code == 200, linked.text
    assert linked.json() == {"user": "alice", "orders": SAMPLE_ORDERS["alice"]}
    assert orders_hits(stack, "alice") == 1  # only the verified, linked payer's call reached the upstream
    assert [row.state for row in stack.gateway.ledger.all()] == [PaymentState.SETTLED]  # the linked payer's only
    assert stack.orders.seen[-1]["sub"] == "alice"


def test_an_unlinked_payer_of_an_upfront_tool_is_refused_before_settlement(stack: Stack, devchain: Devchain) -> None:
    """Settled before the upstream runs: the account is looked up right after verify, so an unlinked
    payer is refused with nothing settled (no refund needed), no row and no upstream call."""
    other = PAYER + 1
    before = (devchain.balance(devchain.address(other)), devchain.balance(PAY_TO))
    with stack.gateway.client() as client:
        _, unlinked, header = pay(client, devchain, "/wallet/upfront/orders/alice", None, payer=other)
        again = client.get("/wallet/upfront/orders/alice", headers={"PAYMENT-SIGNATURE": header})
        _, linked, _ = pay(client, devchain, "/wallet/upfront/orders/alice", None)
    assert unlinked.status_code == 403 and unlinked.json()["error"] == "wallet_not_linked", unlinked.text
    assert again.status_code == 403 and again.json()["error"] == "wallet_not_linked", again.text
    assert (devchain.balance(devchain.address(other)), devchain.balance(PAY_TO) - 1000) == before
    assert linked.status_code == 200 and linked.json()["orders"] == SAMPLE_ORDERS["alice"], linked.text
    assert orders_hits(stack, "alice") == 1
    assert [(row.payer.lower(), row.state) for row in stack.gateway.ledger.all()] == [
        (devchain.address(PAYER).lower(), PaymentState.SETTLED),
    ]


def test_the_doctor_checks_each_issuers_jwks(stack: Stack) -> None:
    plan = plan_from_settings(stack.gateway.settings, stack.gateway.catalogs)
    assert plan.jwks_urls == (f"{stack.auth.issuer}/jwks",)
    report = asyncio.run(run_doctor(plan))
    [finding] = [f for f in report.findings if f.check == "jwks"]
    assert (finding.status, finding.subject) == ("ok", f"{stack.auth.issuer}/jwks")


def test_the_reference_agent_sends_the_users_token_to_that_tool_only(
    stack: Stack, devchain: Devchain, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``x402gw agent --user-token-env VAR``: the user's token goes with a call to a tool that acts for
    its user (and not to the gateway's other tools); without it the tool refuses before any 402."""
    from tests.e2e.test_agent_cli import PAYER as AGENT_PAYER
    from tests.e2e.test_agent_cli import run_agent

    token = stack.auth.issue("alice", UPSTREAM_AUDIENCE, READ)
    payer = devchain.address(AGENT_PAYER)
    before = devchain.balance(payer)
    monkeypatch.setenv("ALICE_TOKEN", token)
    paid = run_agent(stack.gateway, devchain, "--max-spend", "0.05", "--tool", "my_orders",
                     "--args", '{"user": "alice"}', "--user-token-env", "ALICE_TOKEN")
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert "A-1001" in paid.stdout and token not in paid.stdout + paid.stderr
    assert devchain.balance(payer) == before - 1000
    refused = run_agent(stack.gateway, devchain, "--max-spend", "0.05", "--tool", "my_orders", "--args", '{"user": "alice"}')
    assert refused.returncode == 1 and "user_token_missing" in refused.stdout + refused.stderr
    assert devchain.balance(payer) == before - 1000
    assert orders_hits(stack, "alice") == 1
