"""Attacks on the 429 back-off and what surrounds it, on a real anvil and gateway.

An upstream's 429 to the owner's credentials is meant to open the upstream's breaker for its
Retry-After, so later paid calls are refused before any payment instead of being settled and
refunded one by one on the gateway's gas (``gateway.safety.breaker.Breakers.back_off``, called from
``gateway.pipeline.stages.bridge.CallUpstream._forward``). Each test here is an attack that gets
around it, asserted on the chain (payer balance, settlement and refund account nonces), the ledger
and the upstream's own call log."""

from __future__ import annotations

import json
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
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_exactly_once import signed
from tests.e2e.test_paid_call import receipt_of

pytestmark = pytest.mark.e2e

PAYER = 5
REFUNDER = 9  # the payTo account pays refunds back (as in test_attacks_refunds)
PRICE = 4000
OWNER_KEY = "owner-quota-key"
SOAP_QUOTA_FAULT = (
    '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><soap:Fault>'
    "<faultcode>soap:Server</faultcode><faultstring>Rate limit exceeded for this account; retry later</faultstring>"
    "</soap:Fault></soap:Body></soap:Envelope>"
)


class QuotaUpstream:
    """An upstream whose owner quota is spent: every call gets HTTP 429, with the Retry-After the test
    names. Records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def app(self) -> Starlette:
        async def rest(request: Request) -> Response:
            kind = request.path_params["kind"]
            self.calls.append(kind)
            if kind == "soap-quota":  # a SOAP service's 429 carries its fault envelope, as most do
                return Response(SOAP_QUOTA_FAULT.encode(), status_code=429, media_type="text/xml",
                                headers={"retry-after": "120"})
            retry_after = {
                "huge-retry-after": "9" * 400,  # a delta-seconds of 400 digits: float() says inf
                # U+00B2 SUPERSCRIPT TWO sent as UTF-8 (Starlette writes headers as latin-1, aiohttp
                # reads them as UTF-8): str.isdigit() says yes, float() says no.
                "superscript-retry-after": "\u00c2\u00b2",
            }[kind]
            return Response(b'{"error":"rate_limited","message":"quota spent"}', status_code=429,
                            media_type="application/json", headers={"retry-after": retry_after})

        return Starlette(routes=[Route("/h/{kind}", rest, methods=["GET", "POST"])])


@pytest.fixture(scope="module")
def quota_upstream() -> Iterator[tuple[ThreadServer, QuotaUpstream]]:
    upstream = QuotaUpstream()
    with ThreadServer(upstream.app()) as server:
        yield server, upstream


def _rest_tool(name: str) -> str:
    return (f"  - name: {name.replace('-', '_')}\n    description: d\n    method: GET\n    path: /t/{name}\n"
            f"    upstream_path: /h/{name}\n    price: \"0.004\"\n    settle: upfront\n"
            f"    input_schema: {{type: object, additionalProperties: false}}\n")


def _soap_tool(name: str) -> str:
    return (f"  - name: soap_{name.replace('-', '_')}\n    description: d\n    method: GET\n    path: /s/{name}\n"
            f"    price: \"0.004\"\n    settle: upfront\n    kind: soap\n"
            f"    soap: {{endpoint: /h/{name}, version: \"1.1\", namespace: \"urn:t\", operation: Op, result: R}}\n"
            f"    input_schema: {{type: object, additionalProperties: false}}\n"
            f"    output_schema: {{type: object, properties: {{value: {{type: string}}}}}}\n")


@pytest.fixture
def gateway(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain, monkeypatch: pytest.MonkeyPatch,
            quota_upstream: tuple[ThreadServer, QuotaUpstream]) -> RunningGateway:
    """Upfront tools (settled before the call, refunded when the upstream fails) on the owner's key."""
    monkeypatch.setenv("QUOTA_KEY", OWNER_KEY)
    quota_upstream[1].calls.clear()
    tools = "".join(_rest_tool(n) for n in ("huge-retry-after", "superscript-retry-after")) + _soap_tool("soap-quota")
    catalog = tmp_path / "quota.yaml"
    catalog.write_text(f"""
catalog: 1
owner: quota-test
payment: {{network: "eip155:31337", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default:
    base_url: "{quota_upstream[0].url}"
    timeout_seconds: 10
    auth: {{type: header, name: X-Key, value_env: QUOTA_KEY}}
tools:
{tools}""")
    return start_gateway(catalog, refund_key=devchain.key(REFUNDER))


def _refund_of(answer: httpx.Response) -> str:
    """What the answer says of its refund: the ``X402GW-Refund`` header (an upstream answer passed on)
    or the error body's ``refund`` field (a gateway error)."""
    if "x402gw-refund" in answer.headers:
        return answer.headers["x402gw-refund"]
    try:
        body = json.loads(answer.content)
    except ValueError:
        return ""
    return str(body.get("refund")) if isinstance(body, dict) else ""


def _nonces(devchain: Devchain) -> tuple[int, int]:
    """The settlement account's and the refund account's transaction counts."""
    w3 = devchain.w3
    settler, refunder = w3.to_checksum_address(devchain.deployment.deployer), w3.to_checksum_address(devchain.address(REFUNDER))
    return w3.eth.get_transaction_count(settler), w3.eth.get_transaction_count(refunder)


def test_a_soap_upstreams_429_is_refunded_call_after_call_instead_of_backing_off(
    gateway: RunningGateway, devchain: Devchain, quota_upstream: tuple[ThreadServer, QuotaUpstream]
) -> None:
    """Attack: a SOAP upstream over the owner's quota answers HTTP 429 with its fault envelope
    (``soap:Server``, Retry-After: 120), as SOAP stacks do. The bridge turns any fault into an
    ``UpstreamFailure`` (502 ``upstream_fault``) before the 429 is looked at, so ``CallUpstream._forward``
    takes its ``except GatewayError`` branch: no ``back_off``, and a fault is not even a breaker
    failure. Every later paid call of an ``upfront`` tool is settled, gets the same 429 and is
    refunded: a griefer loops for free (the price comes back) while the gateway pays two transactions'
    gas per call and the owner's spent quota is hit again each time.

    Correct: as for a REST 429, the first call is settled and refunded once and the upstream's breaker
    opens for the Retry-After; the next calls get 503 ``upstream_circuit_open`` before any payment:
    one settlement, one refund, one upstream call."""
    _, upstream = quota_upstream
    path = "/s/soap-quota"
    payer = devchain.address(PAYER)
    with gateway.client() as client:
        headers = [signed(client, devchain, path, payer=PAYER) for _ in range(3)]
        payer_before, (settled_before, refunds_before) = devchain.balance(payer), _nonces(devchain)
        answers = [client.get(path, headers={"PAYMENT-SIGNATURE": h}) for h in headers]
    first, later = answers[0], answers[1:]
    assert receipt_of(first).success and _refund_of(first).startswith("refunded"), first.text  # the owner's quota: refunded
    settled_after, refunds_after = _nonces(devchain)
    rows = [r for r in gateway.ledger.all() if r.payer.lower() == payer.lower()]
    assert devchain.balance(payer) == payer_before
    assert (settled_after - settled_before, refunds_after - refunds_before, upstream.calls.count("soap-quota"),
            len(rows)) == (1, 1, 1, 1), (
        f"{settled_after - settled_before} settlements and {refunds_after - refunds_before} refunds on the gateway's "
        f"gas, the over-quota upstream called {upstream.calls.count('soap-quota')} times, for "
        f"{[(a.status_code, a.json().get('error'), a.json().get('upstreamStatus'), _refund_of(a)) for a in answers]}")
    for answer in later:
        assert answer.status_code == 503 and answer.json()["error"] == "upstream_circuit_open", answer.text


@pytest.mark.parametrize("kind", ["huge-retry-after", "superscript-retry-after"])
def test_a_429_with_an_unparsable_retry_after_leaves_the_payer_charged_without_answer_or_refund(
    gateway: RunningGateway, devchain: Devchain, quota_upstream: tuple[ThreadServer, QuotaUpstream], kind: str
) -> None:
    """Attack (hostile or sloppy upstream): a 429 whose Retry-After is 400 digits long (``float`` gives
    inf, and ``error_response``'s ``int(inf + 0.999)`` raises OverflowError) or a Unicode digit such as
    "²" (``str.isdigit`` accepts it, ``float`` raises ValueError in ``retry_after_seconds``). The
    exception is neither a ``GatewayError`` nor caught anywhere on the way, so an ``upfront`` call
    (already settled) ends as a 500 ``internal_error``: no refund owed, none paid, the breaker not
    backed off. The payer is charged for an answer it never gets.

    Correct: an unreadable Retry-After is no Retry-After (None: the breaker's cool-down); the call is
    the 429 the owner's quota deserves, refunded (``X402GW-Refund: refunded``), the payer's balance
    back where it was, the ledger row refunded."""
    path = f"/t/{kind}"
    payer = devchain.address(PAYER)
    with gateway.client() as client:
        header = signed(client, devchain, path, payer=PAYER)
        payer_before, pay_to_before = devchain.balance(payer), devchain.balance(PAY_TO)
        answer = client.get(path, headers={"PAYMENT-SIGNATURE": header})
    [row] = [r for r in gateway.ledger.all() if r.payer.lower() == payer.lower()]
    charged = payer_before - devchain.balance(payer)
    assert row.state == PaymentState.SETTLED and row.tx_hash  # settled before the upstream call, as upfront is
    assert (charged, row.refund_owed, bool(row.refund_tx)) == (0, PRICE, True), (
        f"payer charged {charged} with no refund (owed {row.refund_owed}, tx {row.refund_tx}); the answer was "
        f"{answer.status_code} {answer.text[:200]}")
    assert devchain.balance(PAY_TO) == pay_to_before
    assert answer.status_code < 500 or answer.json().get("error") != "internal_error", answer.text
    assert _refund_of(answer).startswith("refunded"), answer.text
