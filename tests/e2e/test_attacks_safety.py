"""A griefer against the safety rules, on one real gateway and a real anvil: draining a tool's rate
limit with fresh unfunded keys, tripping an upstream's breaker with free failing calls, spending
a budget on voided calls, escaping the per-client limit with a forged X-Forwarded-For, paying
while denied. Each asserts the ledger, the balances and the upstream's call log."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from eth_account import Account

from gateway.devkit.payer import Payer
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, body_json, demo_catalog, offer_of, upstream_hits

VICTIM = 3
GRIEFER = 7


def signed(client: httpx.Client, path: str, key: str) -> str:
    offer = offer_of(client.get(path))
    return encode_header(Payer(key).sign(offer.accepts[0], resource=offer.resource))


def paid(client: httpx.Client, devchain: Devchain, path: str, payer: int) -> httpx.Response:
    return client.get(path, headers={"PAYMENT-SIGNATURE": signed(client, path, devchain.key(payer))})


def test_fresh_unfunded_keys_cannot_drain_a_tools_rate_limit(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    text = catalog.read_text().replace(
        "    path: /quotes/{symbol}\n", "    path: /quotes/{symbol}\n    rate_limits: {per_tool: {requests: 2, window: 1h}}\n", 1)
    catalog.write_text(text)
    gateway = start_gateway(catalog)
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        # valid signatures (the signer recovers offline) from keys that hold nothing: verify refuses
        junk = [client.get("/quotes/TOOL", headers={"PAYMENT-SIGNATURE": signed(
            client, "/quotes/TOOL", "0x" + bytes(Account.create().key).hex())}) for _ in range(5)]
        answers = [paid(client, devchain, "/quotes/TOOL", VICTIM) for _ in range(3)]
    assert {r.status_code for r in junk} == {402}
    assert all("insufficient" in body_json(r)["error"] for r in junk), [r.text for r in junk]
    # the tool's two tokens went to funded, verified payments only; the third is limited
    assert [r.status_code for r in answers] == [200, 200, 429], [r.text for r in answers]
    assert body_json(answers[2])["limit"] == "per_tool"
    assert upstream_hits(upstream, "GET /api/v1/quote/TOOL") == 2
    rows = gateway.ledger.all()
    assert [r.state for r in rows] == [PaymentState.SETTLED] * 2
    assert {r.payer for r in rows} == {devchain.address(VICTIM)}
    assert devchain.balance(PAY_TO) - before == 2 * 2000


def breaker_catalog(tmp_path: Path, upstream: str, failures: int) -> Path:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text().replace(
        "    timeout_seconds: 10\n",
        f"    timeout_seconds: 10\n    breaker: {{failures: {failures}, window_seconds: 86400, cooldown_seconds: 600}}\n", 1))
    return catalog


def test_a_griefers_free_failing_calls_do_not_open_the_breaker_between_good_calls(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    gateway = start_gateway(breaker_catalog(tmp_path, upstream, 3))
    griefer_before, payee_before = devchain.balance(devchain.address(GRIEFER)), devchain.balance(PAY_TO)
    with gateway.client() as client:
        results = []
        for round_ in range(3):
            # report 500 makes the upstream answer 500: voided, so each failure costs the griefer nothing
            results += [paid(client, devchain, "/reports/500", GRIEFER).status_code for _ in range(2)]
            results.append(paid(client, devchain, f"/quotes/OK{'ABC'[round_]}", VICTIM).status_code)
        still_sold = client.get("/reports/42")
    assert results == [500, 500, 200] * 3
    assert still_sold.status_code == 402, still_sold.text  # six failures, never three in a row: closed
    assert upstream_hits(upstream, "GET /reports/500") == 6
    rows = gateway.ledger.all()
    assert sorted(r.state for r in rows if r.payer == devchain.address(GRIEFER)) == [PaymentState.VOIDED] * 6
    assert devchain.balance(devchain.address(GRIEFER)) == griefer_before
    assert devchain.balance(PAY_TO) - payee_before == 3 * 2000


def test_an_unbroken_run_of_failures_still_opens_the_breaker_and_nobody_pays(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    gateway = start_gateway(breaker_catalog(tmp_path, upstream, 2))
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        first = paid(client, devchain, "/reports/500", GRIEFER)
        good = paid(client, devchain, "/quotes/BRK", VICTIM)  # resets the count
        failed = [paid(client, devchain, "/reports/500", GRIEFER) for _ in range(2)]
        refused = client.get("/quotes/BRK")
    assert first.status_code == 500 and good.status_code == 200
    assert [r.status_code for r in failed] == [500, 500]
    assert refused.status_code == 503 and body_json(refused)["error"] == "upstream_circuit_open"
    assert "payment-required" not in refused.headers
    assert upstream_hits(upstream, "GET /reports/500") == 3
    assert devchain.balance(PAY_TO) - before == 2000


def test_a_voided_call_gives_its_budget_back(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text().replace(
        "\nupstreams:", '\nbudgets:\n  per_payer: {amount: "0.005", window: 1d}\n\nupstreams:', 1))
    gateway = start_gateway(catalog)
    before = devchain.balance(PAY_TO)
    with gateway.client() as client:
        failed = paid(client, devchain, "/reports/500", VICTIM)  # the whole budget, reserved then voided
        good = paid(client, devchain, "/reports/41", VICTIM)  # fits only if the first was given back
        over = paid(client, devchain, "/reports/43", VICTIM)
    assert failed.status_code == 500 and good.status_code == 200, good.text
    assert over.status_code == 403 and body_json(over)["error"] == "budget_exceeded"
    assert body_json(over)["usedAtomic"] == "5000"
    assert upstream_hits(upstream, "GET /reports/43") == 0
    states = sorted(r.state for r in gateway.ledger.all())
    assert states == sorted([PaymentState.VOIDED, PaymentState.SETTLED])
    assert devchain.balance(PAY_TO) - before == 5000


def from_address(gateway_url: str, source: str) -> httpx.Client:
    """A client on another loopback address: uvicorn trusts proxy headers from 127.0.0.1 only."""
    return httpx.Client(base_url=gateway_url, transport=httpx.HTTPTransport(local_address=source), timeout=30)


def test_a_forged_forwarded_for_neither_escapes_nor_spends_another_clients_limit(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway(rate_limit_per_client="2/1h")
    with from_address(gateway.url, "127.0.0.3") as client:
        spoofed = [client.get("/quotes/XFF", headers={"X-Forwarded-For": f"10.0.0.{i}", "X-Real-IP": f"10.0.0.{i}",
                                                    "Forwarded": f"for=10.0.0.{i}"}) for i in range(3)]
        victim_named = client.get("/quotes/XFF", headers={"X-Forwarded-For": "127.0.0.2"})
    with from_address(gateway.url, "127.0.0.2") as other:
        victim = [other.get("/quotes/XFF") for _ in range(2)]
    assert [r.status_code for r in spoofed] == [402, 402, 429]
    assert victim_named.status_code == 429
    assert [r.status_code for r in victim] == [402, 402]  # its own bucket, untouched by the forged names
    assert upstream_hits(upstream, "GET /api/v1/quote/XFF") == 0
    assert gateway.ledger.all() == []


def test_a_payer_denied_through_the_admin_api_is_refused_on_every_route_and_never_charged(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str
) -> None:
    gateway = start_gateway(admin_token="s3cret-admin-token-for-tests")
    denied = devchain.address(GRIEFER)
    with gateway.client() as client:
        set_ = client.post("/admin/payers", content=json.dumps({"payer": denied.lower(), "denied": True}),
                           headers={"Authorization": "Bearer s3cret-admin-token-for-tests"})
        before = devchain.balance(PAY_TO)
        refused = [paid(client, devchain, path, GRIEFER) for path in ("/quotes/DNY", "/reports/44", "/weather?city=Oslo")]
        allowed = paid(client, devchain, "/quotes/DNY", VICTIM)
    assert set_.status_code == 200, set_.text
    assert [r.status_code for r in refused] == [403] * 3, [r.text for r in refused]
    assert {body_json(r)["error"] for r in refused} == {"payer_denied"}
    assert allowed.status_code == 200
    assert upstream_hits(upstream, "GET /reports/44") == 0 and upstream_hits(upstream, "GET /api/v1/quote/DNY") == 1
    assert [r.payer for r in gateway.ledger.all()] == [devchain.address(VICTIM)]
    assert devchain.balance(PAY_TO) - before == 2000


def test_sign_ins_of_fresh_keys_spend_none_of_a_tools_rate_limit(
    tmp_path: Path, devchain: Devchain, upstream: str
) -> None:
    """A sign-in proves only a key: one that paid nothing is refused (reaccess_not_paid) before it
    takes any of the tool's tokens, so fresh keys cannot lock paying customers out."""
    from tests.e2e.test_siwx_reaccess import free_port, reaccess_settings, serving, sign_in_challenge
    from tests.e2e.test_siwx_reaccess import signed as signed_in

    port = free_port()
    settings = reaccess_settings(tmp_path, devchain, upstream, public_url=f"http://127.0.0.1:{port}")
    catalog = settings.catalog[0]
    text = catalog.read_text()
    limited = text.replace("    reaccess: {window: 1h, match: tool}\n",
                           "    reaccess: {window: 1h, match: tool}\n    rate_limits: {per_tool: {requests: 2, window: 1h}}\n", 1)
    assert limited != text
    catalog.write_text(limited)
    with serving(settings, port) as (gateway, _), gateway.client() as client:
        refused = []
        for _ in range(4):
            challenge = client.get("/quotes/SIWX")
            refused.append(client.get("/quotes/SIWX", headers={
                "SIGN-IN-WITH-X": signed_in(sign_in_challenge(challenge), Account.create())}))
        answers = [paid(client, devchain, f"/quotes/SIW{c}", VICTIM) for c in "ABC"]
    assert [body_json(r)["error"] for r in refused] == ["reaccess_not_paid"] * 4
    assert [r.status_code for r in answers] == [200, 200, 429], [r.text for r in answers]
    assert upstream_hits(upstream, "GET /api/v1/quote/SIWA") + upstream_hits(upstream, "GET /api/v1/quote/SIWB") == 2
    assert [r.state for r in gateway.ledger.all()] == [PaymentState.SETTLED] * 2
