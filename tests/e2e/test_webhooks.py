"""Webhooks end to end on a real anvil: a paid call's settlement reaches a real receiver on loopback,
signed; deliveries are listed and replayed in /admin and the CLI; a gateway process killed with
SIGKILL after the payment settled but before the receiver took the event delivers it after a
restart, with one idempotency key per event; the endpoint's secret is in no log, audit record,
admin answer or error body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import settlement.ledger.outbox as outbox
from gateway.cli.main import main
from settlement.audit import AuditTrail
from tests.conftest import Devchain, GatewayFactory, demo_catalog
from tests.e2e.test_paid_call import pay
from tests.support.ledger_rows import force_row
from tests.support.processes import GatewayProcess
from tests.support.webhook_receiver import Receiver

SECRET = "whsec-e2e-5d0c1a9b2f47-must-never-appear"
SECRET_ENV = "ACME_WEBHOOK_SECRET_E2E"
ADMIN = "admin-token-webhooks"


def webhooks_config(url: str) -> dict[str, list[dict[str, object]]]:
    return {"acme-legacy": [{"name": "erp", "url": url, "secret_env": SECRET_ENV}]}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hooks = Receiver(SECRET.encode()).start()
    yield hooks
    hooks.stop()


def test_a_settled_payment_reaches_the_receiver_signed_and_can_be_replayed(
    start_gateway: GatewayFactory, devchain: Devchain, receiver: Receiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    gateway = start_gateway(webhooks=webhooks_config(receiver.url), webhook_poll_seconds=0.05, admin_token=ADMIN)
    with gateway.client() as client:
        paid = pay(client, devchain, "GET", "/quotes/HOOK", payer=3)[1]
    assert paid.status_code == 200, paid.text
    [row] = gateway.ledger.all()

    [delivery] = receiver.wait_accepted(1)
    assert delivery.signed and delivery.event_type == "payment.settled"
    assert delivery.body["data"]["paymentId"] == row.id and delivery.body["data"]["transaction"] == row.tx_hash
    assert delivery.body["id"] == delivery.event_id and delivery.body["owner"] == "acme-legacy"

    admin = httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN}"})
    with admin:
        listing = admin.get("/admin/webhooks")
        [shown] = listing.json()["deliveries"]
        assert (shown["eventId"], shown["status"], shown["type"]) == (delivery.event_id, "delivered", "payment.settled")
        shown_url = receiver.url.rsplit("/", 1)[0]  # scheme://host:port only: a hook's path may be its credential
        assert listing.json()["endpoints"] == [{"name": "erp", "owner": "acme-legacy", "url": shown_url,
                                                "events": sorted(listing.json()["endpoints"][0]["events"])}]
        assert admin.post(f"/admin/webhooks/{shown['id']}/replay").json() == {"replayed": shown["id"]}
        again = receiver.wait_accepted(2)[1]
        assert (again.event_id, again.body, again.signed) == (delivery.event_id, delivery.body, True)
        errors = [admin.post("/admin/webhooks/999999/replay"), admin.get("/admin/webhooks?status=lost"),
                  httpx.get(f"{gateway.url}/admin/webhooks")]
        assert [e.status_code for e in errors] == [404, 422, 401]
        # the dashboard shows the latest deliveries too (data.json and the page)
        board, page = admin.get("/admin/data.json").json(), admin.get("/admin").text
        assert [(d["eventId"], d["status"], d["type"]) for d in board["webhookDeliveries"]] == [
            (delivery.event_id, "delivered", "payment.settled")]
        assert "Webhook deliveries" in page and delivery.event_id in page
        answers = listing.text + "".join(e.text for e in errors) + json.dumps(board) + page

    # The CLI reads and replays the same rows.
    cli = CliRunner()
    listed = cli.invoke(main, ["webhooks", "list", "--json", "--database-url", gateway.settings.database_url])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line)["eventId"] for line in listed.output.splitlines()] == [delivery.event_id]
    replayed = cli.invoke(main, ["webhooks", "replay", str(shown["id"]), "--database-url", gateway.settings.database_url])
    assert replayed.exit_code == 0, replayed.output
    assert receiver.wait_accepted(3)[2].event_id == delivery.event_id
    missing = cli.invoke(main, ["webhooks", "replay", "999999", "--database-url", gateway.settings.database_url])
    assert missing.exit_code == 1

    trail = AuditTrail(gateway.settings.database_url)
    try:
        audit_text = "".join(json.dumps(r.data) for r in trail.records())
    finally:
        trail.close()
    for text in (answers, audit_text, listed.output, replayed.output, missing.output):
        assert SECRET not in text


def test_a_gateway_killed_before_delivery_delivers_after_restart(
    devchain: Devchain, upstream: str, tmp_path: Path, receiver: Receiver,
) -> None:
    """SIGKILL after the payment settled (its event committed with it) while the receiver is down:
    the restarted process delivers it; every attempt carried the one event id."""
    receiver.down = True
    env = {
        "X402GW_CATALOG": str(demo_catalog(tmp_path, upstream)),
        "X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file),
        "X402GW_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}",
        "X402GW_RECEIPT_TIMEOUT_SECONDS": "10",
        "X402GW_WEBHOOKS": json.dumps(webhooks_config(receiver.url)),
        "X402GW_WEBHOOK_POLL_SECONDS": "0.05",
        "X402GW_WEBHOOK_LEASE_SECONDS": "1",
        SECRET_ENV: SECRET,
    }
    log = tmp_path / "gateway.log"
    gateway = GatewayProcess(env, tmp_path, log).start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            assert pay(client, devchain, "GET", "/quotes/KILL", payer=5)[1].status_code == 200
        with receiver.changed:  # the event was committed and tried: the receiver refused it
            assert receiver.changed.wait_for(lambda: len(receiver.deliveries) >= 1, 20)
        gateway.kill9()
        assert receiver.accepted() == []

        receiver.down = False
        gateway = GatewayProcess(env, tmp_path, log).start()
        [delivery] = receiver.wait_accepted(1)
    finally:
        gateway.stop()
    assert delivery.signed and delivery.event_type == "payment.settled"
    assert {d.event_id for d in receiver.deliveries} == {delivery.event_id}  # one idempotency key per event
    assert SECRET not in log.read_text(errors="replace")


def test_a_breaker_opening_and_a_budget_running_out_are_events(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path, receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    catalog = demo_catalog(tmp_path, upstream)
    text = catalog.read_text()
    catalog.write_text(text.replace("    timeout_seconds: 10\n", "    timeout_seconds: 10\n    breaker: {failures: 1}\n", 1))
    config = {"acme-legacy": [{"name": "ops", "url": receiver.url, "secret_env": SECRET_ENV,
                               "events": ["breaker.opened", "budget.exhausted"]}]}
    gateway = start_gateway(catalog=catalog, webhooks=config, webhook_poll_seconds=0.05,
                            budget_per_payer="0.005/1d")
    with gateway.client() as client:
        for path in ("/quotes/BUDF", "/quotes/BUDG"):  # 0.004 of the payer's 0.005
            assert pay(client, devchain, "GET", path, payer=6)[1].status_code == 200
        refused = [pay(client, devchain, "GET", path, payer=6)[1] for path in ("/quotes/BUDH", "/quotes/BUDI")]
        assert [r.status_code for r in refused] == [403, 403]  # the second refusal: no second event
        failed = pay(client, devchain, "GET", "/reports/500", payer=7)[1]  # the upstream fails: breaker opens
    assert failed.status_code >= 500
    events = receiver.wait_accepted(2)
    assert sorted(d.event_type for d in events) == ["breaker.opened", "budget.exhausted"]
    by_type = {d.event_type: d.body["data"] for d in events}
    assert by_type["breaker.opened"]["upstream"] == "legacy"
    assert by_type["budget.exhausted"]["tool"] == "get_quote" and by_type["budget.exhausted"]["budget"] == "per_payer"
    assert all(d.signed and d.body["owner"] == "acme-legacy" for d in events)
    with gateway.ledger.outbox_transaction() as connection:  # one event per window, not per refusal
        assert sorted(r["event_type"] for r in outbox.list_rows(connection)) == ["breaker.opened", "budget.exhausted"]


def test_x402gw_reconcile_writes_the_events_of_what_it_resolves(
    start_gateway: GatewayFactory, devchain: Devchain,
) -> None:
    """A payment left pending (outcome unknown) and resolved by the command, not by the gateway:
    its payment.settled event is in the outbox for the gateway's dispatcher (no secret needed here)."""
    gateway = start_gateway()
    with gateway.client() as client:
        assert pay(client, devchain, "GET", "/quotes/RECO", payer=8)[1].status_code == 200
    [row] = gateway.ledger.all()
    force_row(gateway.ledger, row.id, state="pending")
    env = {
        "X402GW_DEPLOYMENT_FILE": str(gateway.settings.deployment_file),
        "X402GW_CATALOG": ",".join(str(p) for p in gateway.settings.catalog),
        "X402GW_DATABASE_URL": gateway.settings.database_url,
        "X402GW_WEBHOOKS": json.dumps(webhooks_config("https://erp.example/hooks")),
    }
    # From this payment's block: the session's chain holds other tests' payments to the same payee.
    result = CliRunner().invoke(main, ["reconcile", "--json", "--from-block", str(row.block_number)], env=env)
    assert result.exit_code == 0, result.output
    assert gateway.ledger.get(row.id).state == "settled"  # type: ignore[union-attr]
    with gateway.ledger.outbox_transaction() as connection:
        [event] = outbox.list_rows(connection)
    assert (event["event_type"], event["status"], event["endpoint"]) == ("payment.settled", "pending", "erp")
    assert json.loads(event["payload"])["data"]["paymentId"] == row.id
