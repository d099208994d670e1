"""The unpaid fast path and a tool priced by a rule: its 402 depends on the arguments, and the fast
path keys what it keeps by method, path, query and Host (a body goes to the pipeline), so each
argument set gets its own price, the same as the pipeline's, and a price above max_price is the
pipeline's 422, never a kept 402 of another request."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from starlette.applications import Starlette

from gateway.app import create_app
from gateway.settings import Settings
from gateway.store import MemoryStore
from tests.gateway.conftest import FakeClock
from tests.gateway.pipeline.test_fastpath import (
    NoFacilitator,
    RecordingAudit,
    Request,
    audit_trail,
    count_pipeline_calls,
    counters,
    send_all,
)

CATALOG = """catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
upstreams:
  u: {base_url: "http://127.0.0.1:9"}
tools:
  - name: forecast
    description: d
    method: GET
    path: /forecast
    price: {base: "$0.002", per: days, each: "$0.0005"}
    max_price: "0.01"
    input_schema:
      type: object
      properties: {city: {type: string}, days: {type: integer, minimum: 0}}
      required: [city, days]
"""


def build(tmp_path: Path) -> tuple[Starlette, Starlette]:
    path = tmp_path / "rule.yaml"
    path.write_text(CATALOG)
    pair = []
    for fast in (True, False):
        clock = FakeClock()
        settings = Settings(catalog=[path], database_url=f"sqlite:///{tmp_path / f'ledger-{fast}.sqlite3'}")
        pair.append(create_app(settings, facilitator=NoFacilitator(), store=MemoryStore(clock=clock, wall_clock=clock),
                               audit=RecordingAudit(), fast_path=fast))
    return pair[0], pair[1]


def amount(body: bytes) -> str:
    return str(json.loads(body)["accepts"][0]["amount"])


def test_each_argument_set_gets_its_own_price_as_the_pipeline_gives_it(tmp_path: Path) -> None:
    fast, slow = build(tmp_path)
    try:
        calls = count_pipeline_calls(fast)
        priced: list[Request] = [("GET", f"/forecast?city=Oslo&days={days}", {}, None) for days in (1, 4, 1, 4, 0, 16)]
        dear: list[Request] = [("GET", "/forecast?city=Oslo&days=17", {}, None)] * 2  # 0.0105 > max_price 0.01
        requests = priced + dear + priced[:2]
        answers = send_all(fast, requests)
        assert answers == send_all(slow, requests)
        assert audit_trail(fast) == audit_trail(slow) and counters(fast) == counters(slow)
        assert [status for status, _, _ in answers] == [402] * 6 + [422, 422] + [402, 402]
        assert [amount(body) for _, _, body in answers[:6] + answers[8:]] == [
            "2500", "4000", "2500", "4000", "2000", "10000", "2500", "4000"]
        for _, headers, body in answers[:6]:  # the header states the body's amount
            assert json.loads(base64.b64decode(dict(headers)["payment-required"]))["accepts"][0]["amount"] == amount(body)
        status, headers, body = answers[6]
        assert json.loads(body)["error"] == "price_above_max"
        assert not any(name == "payment-required" for name, _ in headers)
        assert calls == [0]  # the fast path answered all, each with its own query's price or refusal
    finally:
        for app in (fast, slow):
            app.state.ledger.close()
