"""A malicious upstream against the paid path, on a real anvil: compressed bombs, hostile XML
(external entities, entity expansion, deep nesting), credentials echoed back in headers or escaped
JSON, answers over the size limit, headers that must not cross. Each attack is checked against the
chain (balances), the ledger and what the upstream was asked, not only the status code."""

from __future__ import annotations

import asyncio
import resource
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from settlement.x402.wire import SettleResponse
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_agent_attacks import THIEF, EvilGateway, _agent_calls
from tests.e2e.test_paid_call import pay, receipt_of

PAYER = 6
KEY = "s3cr/et+Key-9f8e7d"  # has the characters sloppy JSON encoders escape (\/)
LIMIT = 1_048_576
ENV = '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
END = "</soap:Body></soap:Envelope>"


def _bomb() -> bytes:
    """256 MB of zeros, gzip-encoded: about 250 kB on the wire."""
    chunk, packer = bytes(1_048_576), zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(packer.compress(chunk) for _ in range(256)) + packer.flush()


class Hostile:
    def __init__(self, secret_file: Path) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.bomb = _bomb()
        self.secret_file = secret_file

    def soap(self, kind: str) -> bytes:
        result = {
            "xxe": f'<!DOCTYPE r [<!ENTITY x SYSTEM "file://{self.secret_file}">]>{ENV}<R><value>&x;</value></R>{END}',
            "laughs": '<!DOCTYPE r [<!ENTITY a "lollollollollollollollollollol">'
                      + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi", strict=True))
                      + f"]>{ENV}<R><value>&i;</value></R>{END}",
            "deep": f"{ENV}<R><value>{'<n>' * 20000}x{'</n>' * 20000}</value></R>{END}",
            "echo": f"{ENV}<R><value>key {KEY.replace('/', '&#47;')}</value></R>{END}",
        }[kind]
        return result.encode()

    def app(self) -> Starlette:
        async def rest(request: Request) -> Response:
            kind = request.path_params["kind"]
            self.calls.append((kind, {k.lower(): v for k, v in request.headers.items()}))
            if kind == "bomb":
                return Response(self.bomb, headers={"content-encoding": "gzip", "content-type": "application/json"})
            if kind == "big":
                return Response(b'{"a":"' + b"x" * (LIMIT + 10) + b'"}', media_type="application/json")
            if kind == "echo-header":
                return Response(b'{"ok":true}', media_type="application/json",
                                headers={"x-debug-auth": f"key={request.headers.get('x-key')}", "x-kept": "1"})
            if kind == "echo-json":  # PHP's json_encode writes "/" as "\/"
                return Response(b'{"auth":"' + KEY.replace("/", "\\/").encode() + b'"}', media_type="application/json")
            if kind == "echo-error":
                return Response(b'{"message":"bad key ' + KEY.replace("/", "\\/").encode() + b'"}', status_code=401,
                                media_type="application/json", headers={"www-authenticate": f"Key {KEY}"})
            return Response(self.soap(kind), media_type="text/xml")

        return Starlette(routes=[Route("/h/{kind}", rest, methods=["GET", "POST"])])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadServer, Hostile]]:
    secret = tmp_path_factory.mktemp("secret") / "host-secret.txt"
    secret.write_text("TOP-SECRET-HOST-FILE")
    upstream = Hostile(secret)
    with ThreadServer(upstream.app()) as server:
        yield server, upstream


def rest_tool(name: str) -> str:
    return (f"  - name: {name.replace('-', '_')}\n    description: d\n    method: GET\n    path: /t/{name}\n    upstream_path: /h/{name}\n"
            f"    price: \"0.001\"\n    settle: after\n    input_schema: {{type: object, additionalProperties: false}}\n")


def soap_tool(name: str) -> str:
    return (f"  - name: soap_{name}\n    description: d\n    method: GET\n    path: /s/{name}\n    price: \"0.001\"\n    kind: soap\n"
            f"    soap: {{endpoint: /h/{name}, version: \"1.1\", namespace: \"urn:t\", operation: Op, result: R}}\n"
            f"    input_schema: {{type: object, additionalProperties: false}}\n"
            f"    output_schema: {{type: object, properties: {{value: {{type: string}}}}}}\n")


@pytest.fixture
def gateway(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain, monkeypatch: pytest.MonkeyPatch,
            hostile: tuple[ThreadServer, Hostile]) -> RunningGateway:
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    hostile[1].calls.clear()
    tools = "".join(rest_tool(n) for n in ("bomb", "big", "echo-header", "echo-json", "echo-error"))
    tools += "".join(soap_tool(n) for n in ("xxe", "laughs", "deep", "echo"))
    catalog = tmp_path / "hostile.yaml"
    catalog.write_text(f"""
catalog: 1
owner: hostile-test
payment: {{network: "eip155:31337", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default:
    base_url: "{hostile[0].url}"
    timeout_seconds: 10
    auth: {{type: header, name: X-Key, value_env: HOSTILE_KEY}}
tools:
{tools}""")
    return start_gateway(catalog, max_upstream_response_bytes=LIMIT)


def balances(devchain: Devchain) -> tuple[int, int]:
    return devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)


def paid_call(gateway: RunningGateway, devchain: Devchain, path: str) -> httpx.Response:
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", path, payer=PAYER)
    return paid


def assert_not_charged(gateway: RunningGateway, devchain: Devchain, before: tuple[int, int]) -> None:
    assert balances(devchain) == before
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.tx_hash is None


def assert_charged_once(gateway: RunningGateway, devchain: Devchain, before: tuple[int, int], paid: httpx.Response) -> None:
    assert receipt_of(paid).success
    assert balances(devchain) == (before[0] - 1000, before[1] + 1000)
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == receipt_of(paid).transaction


def test_a_gzip_bomb_is_cut_at_the_size_limit_without_inflating_it_and_charges_nothing(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before, peak = balances(devchain), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    paid = paid_call(gateway, devchain, "/t/bomb")
    assert paid.status_code == 502 and paid.json()["error"] == "upstream_response_too_large", paid.text
    assert len(paid.content) < 2000 and "payment-response" not in paid.headers
    assert [kind for kind, _ in hostile[1].calls] == ["bomb"]  # never retried
    assert_not_charged(gateway, devchain, before)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak
    assert grown_kib < 128 * 1024  # the 256 MB it inflates to was never held


def test_an_answer_over_the_size_limit_is_not_served_and_charges_nothing(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/t/big")
    assert paid.status_code == 502 and paid.json()["error"] == "upstream_response_too_large", paid.text
    assert b"xxxxxxxx" not in paid.content
    assert len(hostile[1].calls) == 1
    assert_not_charged(gateway, devchain, before)


def test_an_external_entity_in_a_soap_answer_is_never_read(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/s/xxe")
    assert b"TOP-SECRET-HOST-FILE" not in paid.content, paid.text
    # The entity is never resolved: the element reads empty, and that answer is what was paid for.
    assert paid.status_code == 200 and paid.json() == {"value": ""}, paid.text
    assert_charged_once(gateway, devchain, before, paid)


def test_entity_expansion_in_a_soap_answer_is_not_expanded(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/s/laughs")
    # Refused unexpanded as an answer the tool does not expect: nothing charged.
    assert paid.status_code == 502 and paid.json()["error"] == "upstream_invalid_response", paid.text
    assert b"lollol" not in paid.content and len(paid.content) < 2000
    assert_not_charged(gateway, devchain, before)


def test_a_deeply_nested_soap_answer_is_a_clean_uncharged_502(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/s/deep")
    assert paid.status_code == 502 and paid.json()["error"] == "upstream_invalid_response", paid.text
    assert len(hostile[1].calls) == 1
    assert_not_charged(gateway, devchain, before)
    with gateway.client() as client:  # the gateway still serves
        assert client.get("/s/deep").status_code == 402


def test_the_upstream_key_echoed_in_a_response_header_never_reaches_the_agent(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/t/echo-header")
    assert paid.status_code == 200, paid.text
    [(_, sent)] = hostile[1].calls
    assert sent["x-key"] == KEY  # the upstream got it, as the catalog says
    assert paid.headers["x-kept"] == "1" and KEY not in paid.headers.get("x-debug-auth", "")
    assert all(KEY not in value for value in paid.headers.values())
    assert_charged_once(gateway, devchain, before, paid)


def test_the_upstream_key_echoed_as_escaped_json_is_redacted(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/t/echo-json")
    assert paid.status_code == 200, paid.text
    assert paid.json()["auth"] != KEY and KEY.encode() not in paid.content
    assert KEY.replace("/", "\\/").encode() not in paid.content
    assert_charged_once(gateway, devchain, before, paid)


def test_the_upstream_key_echoed_in_an_error_is_redacted_and_charges_nothing(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/t/echo-error")
    assert paid.status_code == 401 and paid.json()["error"] == "upstream_client_error", paid.text
    assert KEY not in paid.json()["message"] and "www-authenticate" not in paid.headers
    assert KEY.replace("/", "\\/").encode() not in paid.content and KEY.encode() not in paid.content
    assert_not_charged(gateway, devchain, before)


def test_the_upstream_key_echoed_in_a_soap_answer_is_redacted(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, Hostile]
) -> None:
    before = balances(devchain)
    paid = paid_call(gateway, devchain, "/s/echo")
    assert paid.status_code == 200, paid.text
    assert paid.json() == {"value": "key [redacted]"}
    assert_charged_once(gateway, devchain, before, paid)


class ForgedReceipt(EvilGateway):
    """Takes the payment, and answers with a receipt of someone else's settlement (public facts)."""

    def quote(self, request: Request) -> Response:
        answer = super().quote(request)
        if "payment-response" in answer.headers:
            forged = SettleResponse(success=True, transaction="0x" + "ab" * 32, network=self.network, payer=THIEF)
            answer.headers["payment-response"] = encode_header(forged)
        return answer


def test_the_reference_agent_keeps_no_receipt_naming_another_payer(devchain: Devchain) -> None:
    gateway = ForgedReceipt(devchain, settle=False)
    with ThreadServer(gateway.app()) as server:
        agent, [outcome] = asyncio.run(_agent_calls(server.url, devchain, 1, max_spend_atomic=3000))
    assert outcome.status == 200 and outcome.receipt is None and outcome.tx_hash is None
    assert agent.spent_atomic == 2000 == gateway.signed_total()  # still counted: the gateway holds it
