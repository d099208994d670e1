"""The protocol bridge end to end: an agent pays for SOAP and legacy REST calls on a real anvil,
against the sample services on loopback; failures are never charged, retries are charged once."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from gateway.app import GatewayConfigError, create_app
from gateway.settings import Settings
from settlement.ledger import PaymentState
from tests.conftest import (
    PAY_TO,
    Devchain,
    GatewayFactory,
    RunningGateway,
    upstream_hits,
)
from tests.e2e.conftest import dead_url, warehouse_catalog
from tests.e2e.test_paid_call import pay, receipt_of

PAYER = 4


def warehouse_hits(warehouse: str, operation: str) -> int:
    return int(httpx.get(f"{warehouse}/stats").json()["operations"].get(operation, 0))


def output_schema(gateway: RunningGateway, tool: str) -> Draft202012Validator:
    schema = gateway.catalogs.tool(tool).output_schema
    assert schema is not None
    return Draft202012Validator(schema)


@pytest.fixture
def bridge_gateway(
    start_gateway: GatewayFactory, tmp_path: Path, upstream: str, warehouse: str, bridge_secrets: dict[str, str]
) -> RunningGateway:
    return start_gateway(warehouse_catalog(tmp_path, upstream, warehouse))


def without_next(body: dict[str, Any]) -> dict[str, Any]:
    """The error model's own fields (the gateway may add hints such as ``next``)."""
    return {k: v for k, v in body.items() if k != "next"}


def balances(devchain: Devchain) -> tuple[int, int]:
    return devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)


def test_paid_soap_call_returns_the_json_its_output_schema_describes(
    bridge_gateway: RunningGateway, devchain: Devchain, warehouse: str
) -> None:
    before = balances(devchain)
    with bridge_gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/warehouse/stock/BLT-100?warehouse=LIS", payer=PAYER)
    assert paid.status_code == 200, paid.text
    assert paid.headers["content-type"] == "application/json"
    body = paid.json()
    output_schema(bridge_gateway, "warehouse_stock_level").validate(body)
    assert body["sku"] == "BLT-100" and body["unit"] == "pcs"  # attributes; the <Payload> wrapper is gone
    assert isinstance(body["quantity"], int) and isinstance(body["available"], bool)
    assert isinstance(body["bins"], list) and all(isinstance(b, str) for b in body["bins"])
    assert receipt_of(paid).success
    assert balances(devchain) == (before[0] - 2000, before[1] + 2000)
    [row] = bridge_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tool == "warehouse_stock_level"
    assert warehouse_hits(warehouse, "GetStockLevel") == 1


def test_wsdl_operation_over_soap_12_returns_arrays_and_typed_scalars(
    bridge_gateway: RunningGateway, devchain: Devchain
) -> None:
    with bridge_gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/warehouse/items?query=hex&max_results=5", payer=PAYER)
    assert paid.status_code == 200, paid.text
    body = paid.json()
    output_schema(bridge_gateway, "warehouse_search_items").validate(body)
    assert [item["sku"] for item in body["items"]] == ["BLT-100", "BLT-200", "NUT-100"]
    assert body["items"][0] == {"sku": "BLT-100", "name": "Hex bolt M8", "price": 0.35, "in_stock": body["items"][0]["in_stock"]}
    assert all(isinstance(item["in_stock"], bool) for item in body["items"])


def test_soap_fault_in_http_200_is_not_charged_and_reaches_the_agent_normalised(
    bridge_gateway: RunningGateway, devchain: Devchain, warehouse: str
) -> None:
    before = balances(devchain)
    with bridge_gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/warehouse/stock/ZZZ-999", payer=PAYER)
    assert paid.status_code == 502
    assert "payment-response" not in paid.headers
    assert without_next(paid.json()) == {
        "error": "upstream_fault", "message": "unknown SKU 'ZZZ-999'", "retryable": False,
        "upstreamStatus": 200, "faultCode": "Client",
    }
    assert balances(devchain) == before
    [row] = bridge_gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.error_reason == "upstream_fault" and row.tx_hash is None
    assert warehouse_hits(warehouse, "GetStockLevel") == 1  # a fault in a 200 is not retried


def test_error_element_in_http_200_matches_a_failure_rule_and_is_not_charged(
    bridge_gateway: RunningGateway, devchain: Devchain
) -> None:
    before = balances(devchain)
    with bridge_gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/warehouse/stock/OLD-100", payer=PAYER)
    assert paid.status_code == 422
    assert without_next(paid.json()) == {
        "error": "item_unavailable", "message": "item OLD-100 is discontinued", "retryable": False, "upstreamStatus": 200,
    }
    assert balances(devchain) == before
    [row] = bridge_gateway.ledger.all()
    assert row.state == PaymentState.VOIDED and row.error_reason == "item_unavailable"


def test_flaky_soap_operation_is_retried_and_charged_once(
    bridge_gateway: RunningGateway, devchain: Devchain, warehouse: str
) -> None:
    before = balances(devchain)
    with bridge_gateway.client() as client:
        _, paid, _ = pay(client, devchain, "POST", "/warehouse/shipping-quote", payer=PAYER,
                         json={"sku": "BLT-100", "quantity": 40, "postcode": "1000-001"})
    assert paid.status_code == 200, paid.text
    body = paid.json()
    output_schema(bridge_gateway, "warehouse_shipping_quote").validate(body)
    assert body["cost"]["currency"] == "EUR" and isinstance(body["cost"]["value"], float)
    assert warehouse_hits(warehouse, "GetShippingQuote") == 2  # the first answer was a 500 Server fault
    assert balances(devchain) == (before[0] - 3000, before[1] + 3000)
    assert [row.state for row in bridge_gateway.ledger.all()] == [PaymentState.SETTLED]


def test_429_with_retry_after_is_waited_out_retried_and_charged_once(
    bridge_gateway: RunningGateway, devchain: Devchain, upstream: str
) -> None:
    before = balances(devchain)
    with bridge_gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/fx/EURUSD?source=fed", payer=PAYER)
    assert paid.status_code == 200, paid.text
    assert paid.json()["pair"] == "EURUSD"
    assert paid.json()["source"] == "fed"  # the argument went into the X-Source header, as mapped
    assert upstream_hits(upstream, "GET /limited/fx/EURUSD") == 2
    assert balances(devchain) == (before[0] - 1000, before[1] + 1000)
    [row] = bridge_gateway.ledger.all()
    assert row.state == PaymentState.SETTLED


def test_failover_base_url_takes_over_when_the_first_is_down(
    start_gateway: GatewayFactory, tmp_path: Path, upstream: str, warehouse: str, bridge_secrets: dict[str, str],
    devchain: Devchain,
) -> None:
    down = dead_url()
    catalog = warehouse_catalog(tmp_path, upstream, warehouse, replace={
        f'base_url: "{upstream}"\n    failover: ["{upstream.replace("127.0.0.1", "localhost")}"]':
        f'base_url: "{down}"\n    failover: ["{upstream}"]',
    })
    gateway = start_gateway(catalog)
    before = balances(devchain)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/fx/GBPUSD", payer=PAYER)
    assert paid.status_code == 200, paid.text
    assert upstream_hits(upstream, "GET /limited/fx/GBPUSD") == 2  # 429, then the answer, both on the failover
    assert balances(devchain) == (before[0] - 1000, before[1] + 1000)


def test_slow_operation_past_the_timeout_is_a_504_and_not_charged(
    start_gateway: GatewayFactory, tmp_path: Path, upstream: str, warehouse: str, bridge_secrets: dict[str, str],
    devchain: Devchain,
) -> None:
    catalog = warehouse_catalog(tmp_path, upstream, warehouse, replace={"    timeout_seconds: 5\n    retry: {attempts: 3, backoff_seconds: 0.2, max_backoff_seconds: 2":
                                                                       "    timeout_seconds: 0.3\n    retry: {attempts: 3, backoff_seconds: 0.2, max_backoff_seconds: 2"})
    gateway = start_gateway(catalog)
    before = balances(devchain)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/warehouse/reports/MAIN", payer=PAYER)
    assert paid.status_code == 504
    assert paid.json()["error"] == "upstream_timeout" and paid.json()["retryable"] is True
    assert balances(devchain) == before
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.VOIDED


def test_credentials_never_appear_in_logs_ledger_audit_or_answers(
    bridge_gateway: RunningGateway, devchain: Devchain, bridge_secrets: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    answers: list[httpx.Response] = []
    with bridge_gateway.client() as client:
        for method, path, body in [
            ("GET", "/warehouse/stock/BLT-200", None),        # success
            ("GET", "/warehouse/stock/ZZZ-001", None),        # fault in a 200
            ("POST", "/warehouse/shipping-quote", {"sku": "NUT-100", "quantity": 1, "postcode": "4000"}),  # 500, retried
            ("GET", "/fx/USDJPY", None),                     # 429, retried
        ]:
            challenge, paid, _ = pay(client, devchain, method, path, payer=PAYER, json=body)
            answers += [challenge, paid]
    assert [a.status_code for a in answers[1::2]] == [200, 502, 200, 200]
    rows = bridge_gateway.ledger.all()
    assert len(rows) == 4
    assert any(r.name == "x402gw.audit" for r in caplog.records)  # the audit log was captured too
    for secret in bridge_secrets.values():
        assert secret not in caplog.text
        for answer in answers:
            assert secret not in answer.text and secret not in str(answer.headers)
        for row in rows:
            assert secret not in repr(row.__dict__)


def test_missing_credential_refuses_to_start_naming_the_variable(
    tmp_path: Path, upstream: str, warehouse: str, devchain: Devchain, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WAREHOUSE_TOKEN", raising=False)
    monkeypatch.setenv("ACME_FX_KEY", "fx-secret-value-123")
    settings = Settings(
        catalog=[warehouse_catalog(tmp_path, upstream, warehouse)], deployment_file=devchain.deployment_file,
        database_url=f"sqlite:///{tmp_path / 'l.sqlite3'}",
    )
    with pytest.raises(GatewayConfigError) as info:
        create_app(settings)
    assert info.value.code == "upstream_secret_missing"
    assert "WAREHOUSE_TOKEN" in str(info.value) and "upstream warehouse" in str(info.value)
    assert "fx-secret-value-123" not in str(info.value)


def test_wrong_credential_is_a_normalised_fault_and_not_charged(
    start_gateway: GatewayFactory, tmp_path: Path, upstream: str, warehouse: str, devchain: Devchain,
    bridge_secrets: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WAREHOUSE_TOKEN", "not-the-token")
    gateway = start_gateway(warehouse_catalog(tmp_path, upstream, warehouse))
    before = balances(devchain)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/warehouse/stock/BLT-100", payer=PAYER)
    assert paid.status_code == 502
    body: dict[str, Any] = paid.json()
    assert body["error"] == "upstream_fault" and body["faultCode"] == "Client" and body["upstreamStatus"] == 500
    assert "not-the-token" not in paid.text
    assert balances(devchain) == before
