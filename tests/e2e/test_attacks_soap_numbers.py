"""Attacks by a malicious SOAP upstream on a paid tool, found by review and fixed (``soap._scalar``
bounds a number before building it and keeps what JSON cannot hold as its text; the bridge stage voids
a settle-after payment on a fault of ours), against a real anvil and a real SOAP server on
loopback. Each test asserts the invariant on the chain (balances), the ledger rows and the upstream's
call log, not only the status.

The holes were (both in ``gateway/upstream/soap.py::_scalar``, the XML → JSON conversion of a scalar the
tool's output_schema types as integer or number):

- ``int(Decimal(text))`` of an exponent the upstream wrote (``<quantity>1e600000</quantity>``, 8
  bytes) builds a number of 600,001 digits. CPython's Decimal → int conversion is quadratic and runs
  in C holding the GIL, so the ``asyncio.to_thread`` in ``bridge._soap`` does not help: the whole
  gateway process (every payer's request, /healthz) stops for seconds (1e1000000: about a minute),
  once per paid call, from one short answer well under every size limit.
- a number JSON cannot write (``1e5000`` as an integer: past Python's 4,300-digit str limit;
  ``1e999`` as a number: ``inf``) raises ``ValueError`` in ``bridge._soap_answer``'s ``_dumps``, which
  is no ``GatewayError``: the paid call is a 500 ``internal_error`` (the gateway's own fault, not the
  upstream's) and its payment row is left ``verified`` forever instead of ``voided``.

Refuted in this area (no test): entity expansion, external entities and deep nesting (the parser
resolves no entity, reads no network, refuses depth > 256: clean uncharged 502s); the ``_folded``
cache (it holds the properties mapping itself, so an id is never reused while cached); webhook
replay (the signature covers ``t`` and the body, whose ``id`` is the documented dedup key; the
unsigned ``X402GW-Event-Id`` header is documented as such); ``X-Forwarded-For`` (uvicorn trusts it only
from ``FORWARDED_ALLOW_IPS``, as the README's Safety section documents, and takes the rightmost
untrusted address).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer
from settlement.ledger import Payment, PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.processes import GatewayProcess

pytestmark = pytest.mark.e2e

PAYER = 8
PRICE = 1000  # "0.001" at 6 decimals
ENV = '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body>'
END = "</soap:Body></soap:Envelope>"
ANSWERS = {
    "freeze": f"{ENV}<R><quantity>1e600000</quantity></R>{END}",  # 8 bytes of number
    "bigint": f"{ENV}<R><quantity>1e5000</quantity></R>{END}",
    "inf": f"{ENV}<R><price>1e999</price></R>{END}",
}
FROZEN_SECONDS = 2.0  # /healthz answers in milliseconds; a frozen loop answers after the conversion


class HostileSoap:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def answer(request: Request) -> Response:
            kind = request.path_params["kind"]
            with self.lock:
                self.calls.append(kind)
            return Response(ANSWERS[kind].encode(), media_type="text/xml")

        return Starlette(routes=[Route("/h/{kind}", answer, methods=["POST"])])

    def count(self, kind: str) -> int:
        with self.lock:
            return self.calls.count(kind)


def soap_tool(kind: str) -> str:
    return (f"  - name: soap_{kind}\n    description: d\n    method: GET\n    path: /s/{kind}\n    price: \"0.001\"\n"
            f"    kind: soap\n    settle: after\n"
            f"    soap: {{endpoint: /h/{kind}, version: \"1.1\", namespace: \"urn:t\", operation: Op, result: R}}\n"
            f"    input_schema: {{type: object, additionalProperties: false}}\n"
            f"    output_schema: {{type: object, properties: {{quantity: {{type: integer}}, price: {{type: number}}}}}}\n")


def catalog_file(tmp_path: Path, devchain: Devchain, upstream: str) -> Path:
    path = tmp_path / "hostile-soap.yaml"
    path.write_text(f"""
catalog: 1
owner: review-soap
payment: {{network: "eip155:31337", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default:
    base_url: "{upstream}"
    timeout_seconds: 10
tools:
{"".join(soap_tool(kind) for kind in ANSWERS)}""")
    return path


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[str, HostileSoap]]:
    upstream = HostileSoap()
    with ThreadServer(upstream.app()) as server:
        yield server.url, upstream


def balances(devchain: Devchain) -> tuple[int, int]:
    return devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)


def assert_invariant(paid: httpx.Response, rows: list[Payment], devchain: Devchain, before: tuple[int, int]) -> None:
    """Charged once with the answer, or not charged and voided: never a 500 of the gateway's own."""
    [row] = rows
    if paid.status_code == 200:
        assert receipt_of(paid).success
        assert balances(devchain) == (before[0] - PRICE, before[1] + PRICE)
        assert row.state == PaymentState.SETTLED and row.tx_hash == receipt_of(paid).transaction
    else:
        assert "payment-response" not in paid.headers
        assert balances(devchain) == before
        assert row.state == PaymentState.VOIDED and row.tx_hash is None, (row.state, row.error_reason)


# -- a 26-byte number stops the whole gateway --------------------------------------------------------


@pytest.fixture
def process(devchain: Devchain, tmp_path: Path, hostile: tuple[str, HostileSoap]) -> Iterator[GatewayProcess]:
    env = {
        "X402GW_CATALOG": str(catalog_file(tmp_path, devchain, hostile[0])),
        "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
        "X402GW_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        "X402GW_RECEIPT_TIMEOUT_SECONDS": "10",
    }
    gateway = GatewayProcess(env, tmp_path, tmp_path / "gateway.log").start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_a_soap_number_with_a_huge_exponent_does_not_freeze_the_gateway_for_other_clients(
    process: GatewayProcess, devchain: Devchain, tmp_path: Path, hostile: tuple[str, HostileSoap]
) -> None:
    upstream = hostile[1]
    calls_before = upstream.count("freeze")
    before = balances(devchain)
    outcome: dict[str, httpx.Response | BaseException] = {}

    def paid_call() -> None:
        try:
            with httpx.Client(base_url=process.url, timeout=180) as client:
                outcome["paid"] = pay(client, devchain, "GET", "/s/freeze", payer=PAYER)[1]
        except BaseException as exc:  # reported by the main thread
            outcome["paid"] = exc

    worker = threading.Thread(target=paid_call, daemon=True)
    worker.start()
    slowest = 0.0
    try:
        deadline = time.monotonic() + 60
        while upstream.count("freeze") == calls_before and worker.is_alive():  # the upstream has answered
            assert time.monotonic() < deadline, "the paid call never reached the upstream"
            worker.join(0.02)
        # Another client of the gateway while the answer is converted: /healthz, a free request.
        with httpx.Client(base_url=process.url, timeout=180) as probe:
            while worker.is_alive() and time.monotonic() < deadline + 120:
                started = time.monotonic()
                assert probe.get("/healthz").status_code == 200
                slowest = max(slowest, time.monotonic() - started)
                worker.join(0.05)
    finally:
        worker.join(200)
    assert slowest < FROZEN_SECONDS, f"/healthz of another client waited {slowest:.1f}s behind one upstream answer"
    paid = outcome["paid"]
    assert isinstance(paid, httpx.Response), paid
    assert upstream.count("freeze") == calls_before + 1  # asked once, never retried
    ledger = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    try:
        assert_invariant(paid, ledger.all(), devchain, before)
    finally:
        ledger.close()


# -- a number JSON cannot write: a 500 of the gateway's own, the row left verified ---------------------


@pytest.fixture
def gateway(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain,
            hostile: tuple[str, HostileSoap]) -> RunningGateway:
    return start_gateway(catalog_file(tmp_path, devchain, hostile[0]))


@pytest.mark.parametrize("kind", ["bigint", "inf"])
def test_a_soap_number_json_cannot_hold_is_never_a_500_nor_a_charge_without_its_answer(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[str, HostileSoap], kind: str
) -> None:
    upstream = hostile[1]
    calls_before = upstream.count(kind)
    before = balances(devchain)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", f"/s/{kind}", payer=PAYER)
    assert upstream.count(kind) == calls_before + 1, paid.text  # the upstream was asked, once
    assert_invariant(paid, gateway.ledger.all(), devchain, before)
    assert paid.status_code != 500 and paid.json().get("error") != "internal_error", paid.text  # the upstream's, not ours
