"""Numbers a caller writes to hurt the gateway, against a running one (no payment needed): each gets its
4xx at once and the gateway goes on serving. Before: ``?x=1e9999999`` on a number argument built a
whole number of ten million digits on the event loop (every other request waited); ``?x=1.5`` against a
catalog's ``multipleOf: 0.01`` was a 500 on every call (jsonschema divided a Decimal by a float); an
integer argument of "²" or 5,000 digits, and a JSON body's integer of 5,000 digits, were 500s."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import Devchain, GatewayFactory, RunningGateway, demo_catalog

pytestmark = pytest.mark.e2e

TOOL = """
  - name: convert_amount
    description: Convert an amount, in cents, for a number of days.
    method: GET
    path: /convert
    upstream_path: /api/v1/quote/ACME
    price: "0.001"
    input_schema:
      type: object
      properties:
        x: {type: number, multipleOf: 0.01}
        days: {type: integer}
"""


def test_hostile_numbers_are_4xx_at_once_and_the_gateway_goes_on_serving(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + TOOL)
    gateway = start_gateway(catalog=catalog)
    with httpx.Client(base_url=gateway.url, timeout=60) as client:  # the timeout guards a hang; nothing is timed
        assert client.get("/convert", params={"x": "1.5", "days": "3"}).status_code == 402  # was a 500
        for params in ({"x": "1e9999999"}, {"x": "1.505"}, {"days": "\u00b2"}, {"days": "--5"}, {"days": "1" * 5000}):
            answer = client.get("/convert", params=params)
            assert answer.status_code == 422 and answer.json()["error"] == "invalid_arguments", (params, answer.text[:200])
        body = b'{"symbol": "ACME", "quantity": ' + b"1" * 5000 + b"}"
        answer = client.post("/orders", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"] == "invalid_json_body", answer.text[:200]
        assert client.get("/quotes/ACME").status_code == 402  # still serving
    assert gateway.ledger.all() == []  # nothing was recorded for any of them


def test_digits_of_other_scripts_in_public_parameters_and_headers_are_refused_not_a_500(gateway: RunningGateway) -> None:
    """``str.isdigit()`` says yes to "²" and "٣", which ``int()`` refuses or reads: a query
    parameter of the public discovery listing and the receipt endpoint's time header were 500s."""
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        for params in ({"limit": "\u00b2"}, {"offset": "\u0663"}, {"limit": "1" * 5000}):
            answer = client.get("/discovery/resources", params=params)
            assert answer.status_code == 400 and answer.json()["error"] == "invalid_parameter", (params, answer.text[:200])
        headers = {"X402GW-Receipt-Time": b"\xb2", "X402GW-Receipt-Signature": b"0x" + b"11" * 65}  # "²" read as latin-1
        answer = client.get("/receipts/1", headers=headers)
        assert 400 <= answer.status_code < 500, answer.text[:200]
        assert client.get("/discovery/resources").status_code == 200  # still serving
