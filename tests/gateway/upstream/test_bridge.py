"""The bridge stage against small real upstreams on loopback: argument mapping, credentials,
failure rules, retries, Retry-After and failover. Waits between retries go through a recording
``sleep`` (the policy is what is tested, not the clock)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from catalog import CatalogError, Tool, parse_catalog
from catalog.bridge import RetryPolicy
from gateway.errors import GatewayError
from gateway.ops.serving import ThreadServer
from gateway.upstream.bridge import (
    AiohttpUpstreamClient,
    Bridge,
    BridgeConfigError,
    UpstreamResponse,
    backoff_seconds,
    retry_after_seconds,
)
from gateway.upstream.credentials import CredentialsError, resolve_credentials
from tests.e2e.conftest import dead_url

SECRET = "s3cr3t-key-value"


def echo_app() -> Starlette:
    calls: Counter[str] = Counter()

    async def echo(request: Request) -> Response:
        calls[request.url.path] += 1
        return JSONResponse({
            "path": request.url.path, "query": request.url.query, "headers": dict(request.headers),
            "body": (await request.body()).decode(),
        })

    async def flag(request: Request) -> Response:
        return JSONResponse({"ok": request.path_params["state"] == "ok", "reason": "quota exhausted"})

    async def leak(request: Request) -> Response:  # an upstream that echoes the key in its error
        return JSONResponse({"error": {"code": "bad", "message": f"key {request.headers.get('x-api-key')} refused"}}, status_code=403)

    async def status(request: Request) -> Response:
        calls[request.url.path] += 1
        code = int(request.path_params["code"])
        headers = {"Retry-After": request.query_params["ra"]} if "ra" in request.query_params else {}
        if calls[request.url.path] >= int(request.query_params.get("ok_after", "99")):
            return JSONResponse({"done": True})
        return JSONResponse({"error": "busy"}, status_code=code, headers=headers)

    async def stats(request: Request) -> Response:
        return JSONResponse(dict(calls))

    return Starlette(routes=[
        Route("/echo/{rest:path}", echo, methods=["GET", "POST", "DELETE"]),
        Route("/flag/{state}", flag), Route("/leak", leak), Route("/status/{code}", status, methods=["GET", "POST"]),
        Route("/stats", stats),
    ])


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    with ThreadServer(echo_app()) as running:
        yield running


def catalog(base_url: str, tools: str, upstream_extra: str = "") -> list[Tool]:
    text = f"""
catalog: 1
owner: test
payment: {{network: "eip155:31337", asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3", asset_name: "USD Coin",
           asset_version: "2", decimals: 6, pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"}}
upstreams:
  up:
    base_url: "{base_url}"
    timeout_seconds: 5
{upstream_extra}
tools:
{tools}
"""
    return list(parse_catalog(text, "t.yaml").tools)


class Run:
    """One Bridge over the real aiohttp client; records the waits instead of sleeping them."""

    def __init__(self, tools: list[Tool], environ: dict[str, str] | None = None) -> None:
        self.waits: list[float] = []

        async def sleep(seconds: float) -> None:
            self.waits.append(seconds)

        self.tools = {t.name: t for t in tools}
        self.bridge = Bridge(tools, environ=environ or {}, sleep=sleep, draw=lambda: 0.5)

    def call(self, name: str, method: str = "GET", params: dict[str, str] | None = None, query: str = "",
             arguments: dict[str, Any] | None = None, body: bytes = b"") -> UpstreamResponse:
        async def go() -> UpstreamResponse:
            client = AiohttpUpstreamClient()
            try:
                return await self.bridge.forward(
                    client, self.tools[name], method, params or {}, query, arguments or {},
                    {"accept": "application/json", "cookie": "c=1", "authorization": "Bearer agent"}, body, "rid", 1 << 20,
                )
            finally:
                await client.close()

        return asyncio.run(go())


def tool(name: str, path: str, extra: str = "", method: str = "GET", upstream_path: str | None = None) -> str:
    props = "{type: object, properties: {id: {type: string}, city: {type: string}, n: {type: integer}, flag: {type: boolean}}}"
    return (f"  - name: {name}\n    description: d\n    method: {method}\n    path: {path}\n    price: \"0.001\"\n"
            + (f"    upstream_path: {upstream_path}\n" if upstream_path else "")
            + f"    input_schema: {props}\n" + extra)


def test_default_mapping_passes_path_query_and_body_through_and_keeps_agent_credentials_out(server: ThreadServer) -> None:
    run = Run(catalog(server.url, tool("t", "/things/{id}", method="POST", upstream_path="/echo/x/{id}")))
    arguments = {"id": "a b", "city": "Lisbon", "n": 1}  # as the challenge stage collected them
    answer = json.loads(run.call("t", "POST", {"id": "a b"}, "city=Lisbon", arguments, body=b'{"n":1}').body)
    assert answer["path"] == "/echo/x/a b" and answer["query"] == "city=Lisbon" and answer["body"] == '{"n":1}'
    assert answer["headers"]["x-request-id"] == "rid"
    assert "cookie" not in answer["headers"] and "authorization" not in answer["headers"]


def test_request_mapping_puts_arguments_in_query_headers_and_a_json_body(server: ThreadServer) -> None:
    extra = ("    request:\n      query: {q: city, active: flag}\n      headers: {X-Count: n}\n"
             "      body: {/filter/city: city, count: n}\n")
    run = Run(catalog(server.url, tool("t", "/things/{id}", extra, method="POST", upstream_path="/echo/{id}")))
    answer = json.loads(run.call("t", "POST", {"id": "7"}, "ignored=1", {"id": "7", "city": "Porto", "n": 3, "flag": True}).body)
    assert answer["query"] == "q=Porto&active=true"
    assert answer["headers"]["x-count"] == "3"
    assert json.loads(answer["body"]) == {"filter": {"city": "Porto"}, "count": 3}


def test_upstream_credentials_are_added_and_redacted_from_what_comes_back(server: ThreadServer) -> None:
    auth = "    auth: {type: header, name: X-Api-Key, value_env: ACME_KEY}\n"
    tools = tool("echo", "/e", upstream_path="/echo/e") + tool("leak", "/l", upstream_path="/leak")
    run = Run(catalog(server.url, tools, auth), {"ACME_KEY": SECRET})
    echoed = run.call("echo")
    assert SECRET not in echoed.body.decode() and b"[redacted]" in echoed.body  # the upstream saw it; the agent does not
    leaked = run.call("leak")
    assert leaked.status == 403
    body = json.loads(leaked.body)
    assert body == {"error": "upstream_client_error", "message": "key [redacted] refused", "retryable": False,
                    "upstreamStatus": 403, "upstreamError": "bad"}


def test_credentials_from_env_and_files_in_every_form(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text("file-pass\n")
    tools = catalog("http://127.0.0.1:1", tool("t", "/t"), f"    auth: {{type: basic, username: svc, password_file: {secret_file}}}\n")
    basic = resolve_credentials(tools[0].upstream.auth, "u")
    assert basic.headers == {"Authorization": "Basic c3ZjOmZpbGUtcGFzcw=="}
    assert "file-pass" not in repr(basic) and basic.redact("x file-pass c3ZjOmZpbGUtcGFzcw==") == "x [redacted] [redacted]"
    bearer = catalog("http://127.0.0.1:1", tool("t", "/t"), "    auth: {type: bearer, token_env: TOK}\n")[0].upstream.auth
    assert resolve_credentials(bearer, "u", {"TOK": "abc"}).headers == {"Authorization": "Bearer abc"}
    with pytest.raises(CredentialsError, match=r"u: environment variable TOK is not set"):
        resolve_credentials(bearer, "u", {})
    with pytest.raises(BridgeConfigError) as info:
        Bridge(catalog("http://127.0.0.1:1", tool("t", "/t"), "    auth: {type: bearer, token_env: TOK}\n"), environ={"OTHER": "v"})
    assert info.value.code == "upstream_secret_missing" and "TOK" in info.value.message


def test_failure_rule_on_a_json_answer_marks_a_200_as_a_failure(server: ThreadServer) -> None:
    extra = "    failure_when:\n      - {pointer: /ok, equals: false, code: quota_exhausted, message_pointer: /reason, status: 503, retryable: true}\n"
    run = Run(catalog(server.url, tool("t", "/flag/{id}", extra)))
    assert json.loads(run.call("t", params={"id": "ok"}).body)["ok"] is True
    with pytest.raises(GatewayError) as info:
        run.call("t", params={"id": "bad"})
    assert info.value.status == 503
    assert {k: v for k, v in info.value.body().items() if k != "next"} == {"error": "quota_exhausted", "message": "quota exhausted", "retryable": True, "upstreamStatus": 200}


def test_idempotent_call_retries_with_backoff_then_passes_the_last_error_on(server: ThreadServer) -> None:
    retry = "    retry: {attempts: 3, backoff_seconds: 0.1}\n"
    run = Run(catalog(server.url, tool("t", "/s/{id}", upstream_path="/status/{id}"), retry))
    answer = run.call("t", params={"id": "503"})
    assert answer.status == 503 and json.loads(answer.body)["retryable"] is True
    assert run.waits == pytest.approx([0.075, 0.15])  # equal jitter at draw 0.5: 0.1 → 0.2, each half fixed, half drawn


def test_post_is_not_retried_unless_the_tool_says_so(server: ThreadServer) -> None:
    retry = "    retry: {attempts: 3, backoff_seconds: 0.1}\n"
    tools = tool("plain", "/p/{id}", method="POST", upstream_path="/status/{id}")
    tools += tool("marked", "/m/{id}", "    retry: true\n", method="POST", upstream_path="/status/{id}")
    run = Run(catalog(server.url, tools, retry))
    assert run.call("plain", "POST", {"id": "502"}).status == 502 and run.waits == []
    assert run.call("marked", "POST", {"id": "502"}, "ok_after=3").status == 200 and len(run.waits) == 1


def test_retry_after_is_honoured_and_capped(server: ThreadServer) -> None:
    retry = "    retry: {attempts: 3, max_retry_after_seconds: 2}\n"
    run = Run(catalog(server.url, tool("t", "/s/{id}", upstream_path="/status/{id}"), retry))
    long_wait = run.call("t", params={"id": "429"}, query="ra=30")
    assert long_wait.status == 429 and run.waits == []  # 30 s is over the cap: the agent hears it now
    assert json.loads(long_wait.body)["retryAfter"] == 30 and long_wait.header("retry-after") == "30"
    assert run.call("t", params={"id": "429"}, query="ra=1&ok_after=3").status == 200 and run.waits == [1.0]


def test_failover_on_an_unreachable_base_url_even_for_a_post(server: ThreadServer) -> None:
    down = dead_url()
    run = Run(catalog(down, tool("t", "/e", method="POST", upstream_path="/echo/f"), f'    failover: ["{server.url}"]\n'))
    assert run.call("t", "POST").status == 200 and run.waits == []
    with pytest.raises(GatewayError) as info:
        Run(catalog(down, tool("t", "/e", upstream_path="/echo/f"))).call("t")
    assert info.value.code == "upstream_unavailable" and info.value.status == 502


def test_retry_after_parsing_and_backoff_bounds() -> None:
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(format_datetime(now + timedelta(seconds=5), usegmt=True), now) == 5.0
    assert retry_after_seconds(format_datetime(now - timedelta(seconds=5), usegmt=True), now) == 0.0
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    policy = RetryPolicy(backoff_seconds=1, max_backoff_seconds=4)
    assert [backoff_seconds(policy, n, lambda: 0.0) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 2.0]
    assert [backoff_seconds(policy, n, lambda: 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]


BAD = [
    ("    auth: {type: header, name: X-Key, value: hunter2}\n", "", "upstreams.up.auth.header.value", "unknown_key"),
    ("    auth: {type: header, name: X-Key}\n", "", "upstreams.up.auth.header", "secret_source"),
    ("    auth: {type: header, name: Authorization, value_env: K}\n", "", "upstreams.up.auth.header.name", "reserved_header"),
    ("    auth: {type: basic, username: u, password_env: 'no-dash'}\n", "", "upstreams.up.auth.basic.password_env", "invalid_env_name"),
    ('    failover: ["ftp://x"]\n', "", "upstreams.up.failover[0]", "invalid_url"),
    ("    retry: {attempts: 0}\n", "", "upstreams.up.retry.attempts", "invalid_value"),
    ("", "    kind: soap\n", "tools[0].soap", "soap_required"),
    ("", "    kind: soap\n    soap: {endpoint: /s, operation: Op}\n", "tools[0].soap", "soap_definition"),
    ("", "    kind: soap\n    soap: {endpoint: /s, operation: Op, namespace: 'urn:x', arguments: [nope]}\n", "tools[0].soap.arguments", "unknown_argument"),
    ("", "    request: {query: {q: nope}}\n", "tools[0].request.query", "unknown_argument"),
    ("", "    request: {body: {a: city}}\n", "tools[0].request.body", "body_not_allowed"),
    ("", "    failure_when: [{equals: 1}]\n", "tools[0].failure_when[0]", "failure_rule"),
]


@pytest.mark.parametrize(("upstream_extra", "tool_extra", "where", "code"), BAD, ids=[b[3] + str(i) for i, b in enumerate(BAD)])
def test_bad_bridge_settings_are_catalog_errors_with_a_line(upstream_extra: str, tool_extra: str, where: str, code: str) -> None:
    with pytest.raises(CatalogError) as info:
        catalog("http://127.0.0.1:1", tool("t", "/t", tool_extra), upstream_extra)
    [issue] = info.value.issues
    assert (issue.path, issue.code) == (where, code), str(issue)
    assert issue.line is not None and issue.line > 1
    assert "hunter2" not in str(info.value)


def test_version_may_be_written_as_a_number_and_wsdl_paths_follow_the_catalog_file() -> None:
    text = Path(__file__).resolve().parents[3].joinpath("catalog/examples/warehouse.yaml").read_text()
    tools = parse_catalog(text.replace('version: "1.1"', "version: 1.1"), "/srv/catalogs/w.yaml").tools
    assert tools[0].soap is not None and tools[0].soap.version == "1.1"
    assert tools[1].soap is not None and tools[1].soap.wsdl == "/srv/catalogs/../../gateway/devkit/samples/warehouse.wsdl"
