"""Attacks on the separation between the API owners one gateway serves (several catalogs, each with
its ``owner``, ``pay_to``, upstreams, budgets and breakers): what one owner's catalog, payments or
traffic can do to another owner's credentials, breakers, routes and paid answers.

Every test runs a real gateway on anvil against the recording upstream (``recorder``) and asserts
the THREATS.md invariant on what moved: each owner's payTo balance on chain, the ledger rows and
their owner, and what reached each upstream."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from catalog import CatalogError, load_catalogs
from gateway.app import create_app
from gateway.devkit.payer import Payer
from gateway.errors import GatewayConfigError
from gateway.ops.serving import ThreadServer
from gateway.settings import Settings
from settlement.ledger import Ledger, PaymentState
from settlement.schema import open_ledger
from settlement.x402.codec import encode_header
from tests.conftest import Devchain, RunningGateway, offer_of
from tests.e2e.test_siwx_reaccess import free_port, sign_in_challenge, signed
from tests.support.forwarding_upstream import Received

PAY_TO_A, PAY_TO_B = 1, 2  # anvil accounts: owner A's and owner B's payees
PAYER, GRIEFER = 5, 6

CATALOG = """
catalog: 1
owner: {owner}
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  api: {{base_url: "{base_url}", timeout_seconds: 5{upstream_extra}}}
tools:
{tools}
"""


def tool(name: str, path: str, upstream_path: str, price: str = "0.002", extra: str = "") -> str:
    text = (f"  - name: {name}\n    description: {name} of its owner\n    method: GET\n    path: {path}\n"
            f"    upstream: api\n    upstream_path: {upstream_path}\n    price: \"{price}\"\n")
    return text + "".join(f"    {line}\n" for line in extra.splitlines() if line)


def write_catalog(directory: Path, file: str, devchain: Devchain, *, owner: str, pay_to: str, base_url: str,
                  tools: str, upstream_extra: str = "") -> Path:
    path = directory / file
    path.write_text(CATALOG.format(owner=owner, token=devchain.token, pay_to=pay_to, base_url=base_url,
                                   upstream_extra=upstream_extra, tools=tools))
    return path


Start = Callable[..., RunningGateway]


@pytest.fixture
def start_owners(tmp_path: Path, devchain: Devchain) -> Iterator[Start]:
    """Gateways serving several owners' catalog files (``X402GW_CATALOG=a.yaml,b.yaml``)."""
    servers: list[ThreadServer] = []
    ledgers: list[Ledger] = []

    def start(catalogs: list[Path], *, port: int = 0, database: str = "ledger.sqlite3", **values: Any) -> RunningGateway:
        settings = Settings(catalog=catalogs, deployment_file=devchain.deployment_file,
                            database_url=f"sqlite:///{tmp_path / database}", receipt_timeout_seconds=10, **values)
        loaded = load_catalogs(settings.catalog)
        ledger = open_ledger(settings.database_url)
        ledgers.append(ledger)
        server = ThreadServer(create_app(settings, catalogs=loaded, ledger=ledger), port=port).start()
        servers.append(server)
        return RunningGateway(server.url, settings, ledger, loaded)

    yield start
    for server in servers:
        server.stop()
    for ledger in ledgers:
        ledger.close()


def paid_get(http: httpx.Client, devchain: Devchain, path: str, payer: int = PAYER) -> httpx.Response:
    offer = offer_of(http.get(path))
    payment = Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource)
    return http.get(path, headers={"PAYMENT-SIGNATURE": encode_header(payment)})


def arrived(received: list[Received], path: str) -> list[Received]:
    return [r for r in received if r.path == path]


# -- one owner's upstream credentials --------------------------------------------------------------


def test_an_owner_string_reused_by_another_catalog_sends_the_first_owners_api_key_to_the_others_upstream(
    tmp_path: Path, devchain: Devchain, recorder: tuple[ThreadServer, list[Received]], received: list[Received],
    start_owners: Start, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Attack: owner A's catalog sells ``a_report`` from its upstream ``api`` (A's host) with A's API
    key (``auth: {type: header, value_env: ...}``). A second catalog, B's, served by the same gateway,
    writes ``owner: acme`` too (nothing stops two files from naming the same owner: a copied
    template, or an owner who submits its own file) and an upstream also called ``api``, at B's host,
    with no credentials. The gateway prepares upstream credentials per ``(owner, upstream name)``
    (``gateway.upstream.bridge.Bridge``), the first file's winning: every paid call to B's tool is
    sent to B's host carrying A's API key. B (or whoever runs B's upstream) reads A's secret off
    its access log for the price of one call.

    Correct: an upstream's credentials are its own catalog's, never another file's (or two files
    naming the same owner are refused at load); B's upstream never sees A's key."""
    server, _ = recorder
    secret = "owner-a-secret-api-key-0123456789"
    monkeypatch.setenv("OWNER_A_API_KEY", secret)
    a = write_catalog(tmp_path, "a.yaml", devchain, owner="acme", pay_to=devchain.address(PAY_TO_A),
                      base_url=server.url, upstream_extra=", auth: {type: header, name: X-Api-Key, value_env: OWNER_A_API_KEY}",
                      tools=tool("a_report", "/a/report", "/rec/a/report"))
    b_host = server.url.replace("127.0.0.1", "localhost")  # another upstream (B's host), same name `api`
    b = write_catalog(tmp_path, "b.yaml", devchain, owner="acme", pay_to=devchain.address(PAY_TO_B),
                      base_url=b_host, tools=tool("b_report", "/b/report", "/rec/b/report"))
    try:
        gateway = start_owners([a, b])
    except (CatalogError, GatewayConfigError) as refused:  # refusing a second file of one owner is correct
        if "owner" in str(refused):
            return
        raise
    payee_b = devchain.balance(devchain.address(PAY_TO_B))
    with gateway.client() as http:
        answer = paid_get(http, devchain, "/b/report")
    assert answer.status_code == 200, answer.text
    [row] = gateway.ledger.all()
    assert (row.tool, row.state, row.pay_to) == ("b_report", PaymentState.SETTLED, devchain.address(PAY_TO_B))
    assert devchain.balance(devchain.address(PAY_TO_B)) == payee_b + 2000
    [call] = arrived(received, "/rec/b/report")
    assert call.header("x-api-key") is None, (
        f"B's upstream ({b_host}) received owner A's API key {call.header('x-api-key')!r}"
    )


# -- one owner's breaker ----------------------------------------------------------------------------


def test_failures_of_one_catalogs_upstream_open_the_breaker_of_another_catalogs_upstream_of_the_same_name(
    tmp_path: Path, devchain: Devchain, recorder: tuple[ThreadServer, list[Received]], received: list[Received],
    start_owners: Start,
) -> None:
    """Attack (griefer): two catalog files naming the same owner (see above) each have an upstream
    called ``api``, at different hosts: A's is healthy, B's tool answers 500. Breakers are keyed
    ``breaker:<owner>/<upstream name>`` (``gateway.safety.breaker.upstream_key``), so the two are
    one breaker: a griefer's failing calls to B's tool (settle-after: voided, they cost him
    nothing) open the breaker of A's healthy upstream, and A's payers get 503
    ``upstream_circuit_open`` instead of an offer: A sells nothing while B's host is down.

    Correct: a breaker per upstream of each catalog (its base URL), so B's failures open only B's;
    A's tool still answers its 402 and serves a paid call (or the shared owner is refused at load)."""
    server, _ = recorder
    breaker = ", breaker: {failures: 2, window_seconds: 60, cooldown_seconds: 60}"
    a = write_catalog(tmp_path, "a.yaml", devchain, owner="acme", pay_to=devchain.address(PAY_TO_A),
                      base_url=server.url, upstream_extra=breaker, tools=tool("a_read", "/a/read", "/rec/a/read"))
    b = write_catalog(tmp_path, "b.yaml", devchain, owner="acme", pay_to=devchain.address(PAY_TO_B),
                      base_url=server.url.replace("127.0.0.1", "localhost"), upstream_extra=breaker,
                      tools=tool("b_broken", "/b/broken", "/spoof-error"))
    try:
        gateway = start_owners([a, b])
    except (CatalogError, GatewayConfigError) as refused:  # refusing two files of one owner is correct
        if "owner" in str(refused):
            return
        raise
    griefer_balance = devchain.balance(devchain.address(GRIEFER))
    with gateway.client() as http:
        for _ in range(2):
            failed = paid_get(http, devchain, "/b/broken", payer=GRIEFER)
            assert failed.status_code >= 500, failed.text
        assert devchain.balance(devchain.address(GRIEFER)) == griefer_balance  # the failures cost nothing
        assert len(arrived(received, "/rec/a/read")) == 0
        a_offer = http.get("/a/read")
        assert a_offer.status_code == 402, (
            f"owner A's healthy upstream is closed by B's failures: {a_offer.status_code} {a_offer.text}"
        )
        payee_a = devchain.balance(devchain.address(PAY_TO_A))
        served = paid_get(http, devchain, "/a/read")
    assert served.status_code == 200, served.text
    assert devchain.balance(devchain.address(PAY_TO_A)) == payee_a + 2000
    assert len(arrived(received, "/rec/a/read")) == 1


# -- one owner's routes ------------------------------------------------------------------------------


def test_another_owners_catalog_cannot_take_over_a_path_of_an_owners_published_route(
    tmp_path: Path, devchain: Devchain, recorder: tuple[ThreadServer, list[Received]], received: list[Received],
    start_owners: Start,
) -> None:
    """Attack: owner A sells ``quote`` at ``GET /q/{symbol}`` (listed so in ``/tools``, paid to A).
    Owner B's catalog, on the same gateway, adds ``GET /q/AAPL``: a literal route, so its shape is
    not A's and ``load_catalogs``' cross-file ``duplicate_route`` check lets it through, and the
    router prefers literal segments. Every agent that calls A's published tool for AAPL (the most
    asked symbol) now gets B's offer, at the same price and token, and pays B: B's upstream is
    called and A loses that traffic and its revenue, with nothing in ``/tools`` or the 402 telling
    the agent it is no longer dealing with A.

    Correct: a route of one owner's catalog that takes requests of another owner's route is refused
    at load (as ``duplicate_route`` is); a request for A's route stays A's: A's offer, A's payTo."""
    server, _ = recorder
    a = write_catalog(tmp_path, "a.yaml", devchain, owner="alpha", pay_to=devchain.address(PAY_TO_A),
                      base_url=server.url,
                      tools=tool("quote", "/q/{symbol}", "/rec/a/{symbol}",
                                 extra="input_schema: {type: object, properties: {symbol: {type: string}}, required: [symbol]}"))
    b = write_catalog(tmp_path, "b.yaml", devchain, owner="beta", pay_to=devchain.address(PAY_TO_B),
                      base_url=server.url, tools=tool("beta_quote", "/q/AAPL", "/rec/b/aapl"))
    try:
        load_catalogs([a, b])
    except CatalogError:
        return  # refused at load: correct
    gateway = start_owners([a, b])
    payee_a, payee_b = (devchain.balance(devchain.address(i)) for i in (PAY_TO_A, PAY_TO_B))
    with gateway.client() as http:
        listed = {t["function"]["name"]: t for t in http.get("/tools").json()["tools"]}
        assert "quote" in listed  # A's tool, as agents discover it
        answer = paid_get(http, devchain, "/q/AAPL")
    assert answer.status_code == 200, answer.text
    [row] = gateway.ledger.all()
    assert (row.owner, row.tool, row.pay_to) == ("alpha", "quote", devchain.address(PAY_TO_A)), (
        f"a call to owner alpha's route GET /q/{{symbol}} was sold by {row.owner}/{row.tool} to payTo {row.pay_to}; "
        f"upstream calls: {[r.path for r in received]}"
    )
    assert devchain.balance(devchain.address(PAY_TO_A)) == payee_a + 2000
    assert devchain.balance(devchain.address(PAY_TO_B)) == payee_b


# -- one owner's payments opening another's content -------------------------------------------------


def test_a_sign_in_on_a_payment_to_one_owner_does_not_open_another_owners_tool_of_the_same_name(
    tmp_path: Path, devchain: Devchain, recorder: tuple[ThreadServer, list[Received]], received: list[Received],
    start_owners: Start,
) -> None:
    """Attack: owner A sold ``forecast`` (re-access ``match: tool``, 1h) and the payer paid A for
    it. Then A's catalog goes and owner B's arrives with its own ``forecast`` (a common name; or,
    during a rolling catalog change, two replicas on one ledger serve the two catalogs): tool names
    are unique in one gateway at one time, not in the ledger. ``Reaccess`` looks for the payer's
    latest settled payment by tool *name* only (``Ledger.latest_paid``), so the payer signs in at
    B's tool and B's upstream is called, its content served, for money that went to A's payTo. B
    was never paid; A was paid for B's content.

    Correct: a sign-in stands only on a payment to this tool's owner and payee (owner, payTo,
    network and asset of one of its offers); here: 402 ``reaccess_not_paid``, B's upstream not called."""
    server, _ = recorder
    a = write_catalog(tmp_path, "a.yaml", devchain, owner="alpha", pay_to=devchain.address(PAY_TO_A),
                      base_url=server.url,
                      tools=tool("forecast", "/forecast", "/rec/a/forecast", extra="reaccess: {window: 1h, match: tool}"))
    b = write_catalog(tmp_path, "b.yaml", devchain, owner="beta", pay_to=devchain.address(PAY_TO_B),
                      base_url=server.url,
                      tools=tool("forecast", "/forecast", "/rec/b/forecast", extra="reaccess: {window: 1h, match: tool}"))
    port_a, port_b = free_port(), free_port()
    gateway_a = start_owners([a], port=port_a, public_url=f"http://127.0.0.1:{port_a}")
    gateway_b = start_owners([b], port=port_b, public_url=f"http://127.0.0.1:{port_b}")  # same ledger database
    payer = Account.from_key(devchain.key(PAYER))
    with gateway_a.client() as http:
        assert paid_get(http, devchain, "/forecast").status_code == 200
    [row] = gateway_a.ledger.all()
    assert (row.owner, row.pay_to, row.state) == ("alpha", devchain.address(PAY_TO_A), PaymentState.SETTLED)
    payee_a, payee_b = (devchain.balance(devchain.address(i)) for i in (PAY_TO_A, PAY_TO_B))
    with gateway_b.client() as http:
        challenge = sign_in_challenge(http.get("/forecast"))
        again = http.get("/forecast", headers={"SIGN-IN-WITH-X": signed(challenge, payer)})
    b_calls = arrived(received, "/rec/b/forecast")
    assert again.status_code == 402 and again.json().get("error") == "reaccess_not_paid", (
        f"owner beta served {again.status_code} (X402GW-Reaccess: {again.headers.get('x402gw-reaccess')}) on a "
        f"payment to owner alpha's payTo; beta's upstream called {len(b_calls)} time(s) unpaid"
    )
    assert b_calls == []
    assert devchain.balance(devchain.address(PAY_TO_A)) == payee_a
    assert devchain.balance(devchain.address(PAY_TO_B)) == payee_b
