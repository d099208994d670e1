import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from gateway.devkit.samples.rest_upstream import create_app


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "upstream did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def client(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=5) as client:
        client.post("/stats/reset").raise_for_status()
        yield client


def test_quote_is_deterministic(client):
    first = client.get("/api/v1/quote/ACME")
    second = client.get("/api/v1/quote/ACME")
    assert first.status_code == 200
    body = first.json()
    assert body["symbol"] == "ACME" and body["currency"] == "USD"
    assert body["price"] == second.json()["price"]
    assert isinstance(body["price"], str) and "." in body["price"]
    assert body["as_of"].endswith("+00:00")
    assert client.get("/api/v1/quote/acme!").status_code == 404


def test_weather(client):
    metric = client.get("/weather", params={"city": "Lisbon"})
    assert metric.status_code == 200
    assert metric.json()["units"] == "metric"
    imperial = client.get("/weather", params={"city": "Lisbon", "units": "imperial"}).json()
    assert imperial["temperature"] == pytest.approx(metric.json()["temperature"] * 9 / 5 + 32, abs=0.2)
    assert client.get("/weather").status_code == 400
    assert client.get("/weather", params={"city": "x", "units": "kelvin"}).status_code == 400


def test_create_order(client):
    created = client.post("/orders", json={"symbol": "ACME", "quantity": 3})
    assert created.status_code == 201
    order = created.json()
    assert created.headers["location"] == f"/orders/{order['id']}"
    assert order["quantity"] == 3 and order["status"] == "accepted"
    assert client.get(created.headers["location"]).json() == order
    for bad in [{"symbol": "ACME"}, {"symbol": "ACME", "quantity": 0}, {"symbol": "x", "quantity": 1}, {"symbol": "ACME", "quantity": True}, []]:
        assert client.post("/orders", json=bad).status_code == 400
    assert client.post("/orders", content=b"not json").status_code == 400
    assert client.delete(created.headers["location"]).status_code == 204
    assert client.delete(created.headers["location"]).status_code == 404


def test_reports(client):
    ok = client.get("/reports/42")
    assert ok.status_code == 200 and ok.json()["report_id"] == "42"
    assert client.get("/reports/500").status_code == 500
    assert client.get("/reports/404").status_code == 404


def test_unexposed_endpoints_exist(client):
    assert client.get("/admin/users").json()["users"]
    assert client.get("/internal/health").json() == {"status": "ok"}


def test_stats_count_hits(client):
    assert client.get("/stats").json() == {"total": 0, "paths": {}, "requests": {}}
    client.get("/api/v1/quote/ACME")
    client.get("/api/v1/quote/ACME")
    client.get("/reports/500")
    client.get("/nope")
    stats = client.get("/stats").json()
    assert stats["paths"] == {"/api/v1/quote/ACME": 2, "/reports/500": 1, "/nope": 1}
    assert stats["requests"]["GET /api/v1/quote/ACME"] == 2
    assert stats["total"] == 4
    client.post("/stats/reset")
    assert client.get("/stats").json()["total"] == 0
