"""Production facilitators and RPC (issue 15, item 5), against anvil, real facilitators on loopback
(our facilitator API over the test chain, behind a gate that demands credentials, and the
facilitator double) and the gateway wired from settings:

* several facilitators per network: the first dead, the second settles; all dead, a 503 with
  nothing served and nothing charged; an unknown outcome at the first is never sent to the second;
* credentials: a bearer token or a CDP JWT per request gets the payment settled; wrong or missing
  ones are a clear refusal, and the credential is in no log line and no answer;
* several RPC URLs: the first dead, reads and the settlement go through the second, and the
  per-URL health names the dead one; the settlement key read from a file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from catalog import load_catalogs
from gateway.app import create_app
from gateway.errors import GatewayConfigError
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from gateway.start_checks import check_remote_facilitators
from gateway.wiring import build_schemes
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, Devchain, body_json, demo_catalog, upstream_hits
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.auth_facilitator import RequireAuth, bearer, cdp_jwt
from tests.support.facilitator_double import FacilitatorDouble, closed_port_url
from tests.support.local_facilitator import local_facilitator_app

NETWORK = "eip155:31337"
PAYER = 7
PRICE = 2000  # /quotes/AAPL: 0.002 USDC
QUOTE = "GET /api/v1/quote/AAPL"
TOKEN = "prod-facilitator-token-5c2e91"
KEY_ID = "organizations/test-org/apiKeys/gateway-key"


@dataclass
class Gateway:
    url: str
    app: Any
    ledger: Ledger

    def pay(self, devchain: Devchain) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
        return paid


@pytest.fixture
def start(tmp_path: Path, devchain: Devchain, upstream: str) -> Iterator[Callable[..., Gateway]]:
    """A gateway wired from settings (no facilitator handed in): the production path."""
    servers: list[ThreadServer] = []
    ledgers: list[Ledger] = []

    def start(**overrides: Any) -> Gateway:
        values: dict[str, Any] = {
            "catalog": [demo_catalog(tmp_path, upstream)],
            "deployment_file": devchain.deployment_file,
            "database_url": f"sqlite:///{tmp_path / f'ledger{len(servers)}.sqlite3'}",
            "receipt_timeout_seconds": 10,
            **overrides,
        }
        settings = Settings(**values)
        ledger = open_ledger(settings.database_url)
        ledgers.append(ledger)
        app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger)
        server = ThreadServer(app).start()
        servers.append(server)
        return Gateway(server.url, app, ledger)

    yield start
    for server in servers:
        server.stop()
    for ledger in ledgers:
        ledger.close()


@dataclass
class Facilitator:
    """Our facilitator API over the test chain, behind ``RequireAuth`` (which records every request)."""

    server: ThreadServer
    gate: RequireAuth

    @property
    def url(self) -> str:
        return self.server.url + "/facilitator"

    def paths(self) -> list[str]:
        return [path for path, _ in self.gate.seen]


@pytest.fixture
def real_facilitator(devchain: Devchain) -> Iterator[Callable[..., Facilitator]]:
    started: list[ThreadServer] = []

    def make(check: Callable[[str, str, str, str | None], str | None] = lambda *_: None) -> Facilitator:
        gate = RequireAuth(local_facilitator_app(devchain.deployment), check)
        server = ThreadServer(gate).start()
        started.append(server)
        return Facilitator(server, gate)

    yield make
    for server in started:
        if server.thread.is_alive():
            server.stop()


def public_supported(check: Callable[[str, str, str, str | None], str | None]) -> Callable[..., str | None]:
    """``check`` for /verify and /settle; /supported answers anyone (some facilitators' does)."""
    return lambda method, host, path, auth: None if path.endswith("/supported") else check(method, host, path, auth)


def balances(devchain: Devchain) -> tuple[int, int]:
    return devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)


def assert_paid_once(devchain: Devchain, gateway: Gateway, paid: httpx.Response, before: tuple[int, int]) -> None:
    assert paid.status_code == 200, paid.text
    assert "symbol" in body_json(paid)
    receipt = receipt_of(paid)
    assert receipt.success and receipt.transaction
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.SETTLED and row.tx_hash == receipt.transaction
    assert balances(devchain) == (before[0] - PRICE, before[1] + PRICE)
    assert devchain.w3.eth.get_transaction_receipt(receipt.transaction)["status"] == 1


def assert_nothing_charged(devchain: Devchain, gateway: Gateway, before: tuple[int, int]) -> None:
    assert balances(devchain) == before
    assert all(row.state != PaymentState.SETTLED for row in gateway.ledger.all())


def leaks(secret: str, *texts: str) -> list[str]:
    return [text[:80] for text in texts if secret in text]


# ------------------------------------------------------------------------------ failover


def test_first_facilitator_dead_the_second_settles(
    start: Callable[..., Gateway], real_facilitator: Callable[..., Facilitator], devchain: Devchain, upstream: str
) -> None:
    second = real_facilitator()
    gateway = start(facilitators={NETWORK: [closed_port_url(), second.url]})
    before = balances(devchain)
    paid = gateway.pay(devchain)
    assert_paid_once(devchain, gateway, paid, before)
    assert second.paths().count("/facilitator/settle") == 1
    assert upstream_hits(upstream, QUOTE) == 1
    [facilitators] = gateway.app.state.dependency_health()["facilitators"].values()
    assert [f["state"] for f in facilitators] == ["down", "up"]


def test_every_facilitator_dead_is_a_503_nothing_served_nothing_charged(
    start: Callable[..., Gateway], real_facilitator: Callable[..., Facilitator], devchain: Devchain, upstream: str
) -> None:
    first, second = FacilitatorDouble().start(), real_facilitator()
    gateway = start(facilitators={NETWORK: [first.url, second.url]})  # both answer /supported at start-up
    first.stop()
    second.server.stop()
    before = balances(devchain)
    paid = gateway.pay(devchain)
    assert paid.status_code == 503, paid.text
    assert body_json(paid)["error"] == "facilitator_unavailable"
    assert "symbol" not in paid.text
    assert upstream_hits(upstream, QUOTE) == 0
    assert_nothing_charged(devchain, gateway, before)
    assert gateway.ledger.all() == []


def test_an_unknown_outcome_at_the_first_is_never_settled_at_the_second(
    start: Callable[..., Gateway], real_facilitator: Callable[..., Facilitator], devchain: Devchain
) -> None:
    """The first facilitator takes the settle and never answers: it may have broadcast it. The
    second, which would settle at once, is not asked; the payment is held (503) for the chain to
    resolve, and nothing moved."""
    first = FacilitatorDouble().start()
    first.settle_mode = "timeout"
    second = real_facilitator()
    try:
        gateway = start(facilitators={NETWORK: [first.url, second.url]}, facilitator_settle_timeout_seconds=0.5)
        before = balances(devchain)
        paid = gateway.pay(devchain)
    finally:
        first.stop()
    assert paid.status_code == 503, paid.text
    assert body_json(paid)["error"] == "settlement_unknown"
    assert "payment-required" not in paid.headers  # no fresh offer
    assert "/facilitator/settle" not in second.paths() and "/facilitator/verify" not in second.paths()
    [row] = gateway.ledger.all()
    assert row.state == PaymentState.PENDING
    assert not devchain.authorization_state(row.payer, row.nonce)
    assert_nothing_charged(devchain, gateway, before)


# ------------------------------------------------------------------------------ credentials


def test_a_bearer_token_from_the_settings_gets_the_payment_settled(
    start: Callable[..., Gateway], real_facilitator: Callable[..., Facilitator], devchain: Devchain,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    facilitator = real_facilitator(bearer(TOKEN))
    gateway = start(facilitators={NETWORK: facilitator.url},
                    facilitator_auth=json.dumps({facilitator.url: {"Authorization": f"Bearer {TOKEN}"}}))
    before = balances(devchain)
    paid = gateway.pay(devchain)
    assert_paid_once(devchain, gateway, paid, before)
    assert all(ok for _, ok in facilitator.gate.seen)
    assert leaks(TOKEN, caplog.text, paid.text, str(dict(paid.headers))) == []


@pytest.mark.parametrize("sent", [None, "Bearer wrong-token-88a1"])
def test_wrong_or_missing_credentials_are_a_clear_503_that_shows_no_credential(
    start: Callable[..., Gateway], real_facilitator: Callable[..., Facilitator], devchain: Devchain, upstream: str,
    caplog: pytest.LogCaptureFixture, sent: str | None,
) -> None:
    caplog.set_level(logging.DEBUG)
    facilitator = real_facilitator(public_supported(bearer(TOKEN)))
    auth = {} if sent is None else {facilitator.url: {"Authorization": sent}}
    gateway = start(facilitators={NETWORK: facilitator.url}, facilitator_auth=json.dumps(auth))
    before = balances(devchain)
    paid = gateway.pay(devchain)
    assert paid.status_code == 503, paid.text
    assert body_json(paid)["error"] == "facilitator_unavailable"
    assert "answered 401: it refused this gateway's credentials" in caplog.text
    assert upstream_hits(upstream, QUOTE) == 0 and gateway.ledger.all() == []
    assert_nothing_charged(devchain, gateway, before)
    for secret in (TOKEN, "wrong-token-88a1"):
        assert leaks(secret, caplog.text, paid.text, str(dict(paid.headers))) == []


def test_credentials_refused_at_start_up_stop_the_start_named_without_the_credential(
    real_facilitator: Callable[..., Facilitator], devchain: Devchain, tmp_path: Path, upstream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    facilitator = real_facilitator(bearer(TOKEN))
    settings = Settings(catalog=[demo_catalog(tmp_path, upstream)], deployment_file=devchain.deployment_file,
                        facilitators={NETWORK: facilitator.url},
                        facilitator_auth=json.dumps({facilitator.url: {"Authorization": "Bearer nope-31f0"}}))
    wiring = build_schemes(settings, load_catalogs(settings.catalog))

    async def check() -> None:
        try:
            await check_remote_facilitators(wiring.remotes)
        finally:
            for remote in wiring.remotes.values():
                await remote.close()
            for chain in wiring.chains.values():
                await chain.close()

    with pytest.raises(GatewayConfigError) as refused:
        asyncio.run(check())
    assert refused.value.code == "facilitator_unreachable"
    assert "refused this gateway's credentials" in refused.value.message
    assert leaks("nope-31f0", caplog.text, refused.value.message) == []


def es256_key() -> tuple[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption()).decode()
    return pem, key.public_key()


def test_a_cdp_jwt_per_request_gets_the_payment_settled(
    start: Callable[..., Gateway], real_facilitator: Callable[..., Facilitator], devchain: Devchain,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret, public = es256_key()
    facilitator = real_facilitator(cdp_jwt(KEY_ID, public))
    gateway = start(facilitators={NETWORK: facilitator.url}, facilitator_auth=json.dumps({facilitator.url: "cdp"}),
                    cdp_api_key_id=KEY_ID, cdp_api_key_secret=secret)
    before = balances(devchain)
    paid = gateway.pay(devchain)
    assert_paid_once(devchain, gateway, paid, before)
    # every request (start-up /supported, verify, settle) carried its own valid token
    assert facilitator.paths() == ["/facilitator/supported", "/facilitator/verify", "/facilitator/settle"]
    assert all(ok for _, ok in facilitator.gate.seen)
    body = secret.splitlines()[1]
    assert leaks(body, caplog.text, paid.text) == []


def test_a_cdp_jwt_signed_with_another_key_is_refused(
    start: Callable[..., Gateway], real_facilitator: Callable[..., Facilitator], devchain: Devchain, upstream: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    _, public = es256_key()
    other, _ = es256_key()
    facilitator = real_facilitator(public_supported(cdp_jwt(KEY_ID, public)))
    gateway = start(facilitators={NETWORK: facilitator.url}, facilitator_auth=json.dumps({facilitator.url: "cdp"}),
                    cdp_api_key_id=KEY_ID, cdp_api_key_secret=other)
    before = balances(devchain)
    paid = gateway.pay(devchain)
    assert paid.status_code == 503 and body_json(paid)["error"] == "facilitator_unavailable", paid.text
    assert upstream_hits(upstream, QUOTE) == 0
    assert_nothing_charged(devchain, gateway, before)
    assert leaks(other.splitlines()[1], caplog.text, paid.text) == []


# ------------------------------------------------------------------------------ RPC


def test_first_rpc_url_dead_reads_and_settlement_go_through_the_second(
    start: Callable[..., Gateway], devchain: Devchain, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Locally settled, with the settlement key read from a file: the start-up checks (chain id,
    token metadata), verify's reads and the broadcast all go through the second URL."""
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "settlement.key"
    key_file.write_text(devchain.deployment.settlement_key + "\n")
    dead = closed_port_url() + "/v2/rpc-api-key-0d7e"
    gateway = start(rpc_urls={NETWORK: [dead, devchain.anvil.rpc_url]}, settlement_key_file=key_file)
    before = balances(devchain)
    paid = gateway.pay(devchain)
    assert_paid_once(devchain, gateway, paid, before)
    [rpc] = gateway.app.state.dependency_health()["rpc"].values()
    assert [u["state"] for u in rpc] == ["down", "up"]
    assert rpc[0]["lastError"] == "ClientConnectorError"
    # /readyz and /metrics show the same per-URL state, redacted
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        ready, metrics = client.get("/readyz"), client.get("/metrics").text
    assert [u["state"] for u in ready.json()["dependencies"]["rpc"][NETWORK]] == ["down", "up"]
    up = {line.split("position=")[1][1]: line.rsplit(" ", 1)[1] for line in metrics.splitlines()
          if line.startswith('x402gw_dependency_up{kind="rpc"') and f'network="{NETWORK}"' in line}
    assert up == {"0": "0.0", "1": "1.0"}
    assert leaks("rpc-api-key-0d7e", caplog.text, str(rpc), ready.text, metrics) == []
    assert leaks(devchain.deployment.settlement_key[2:], caplog.text) == []
