"""Attacks on what payers, agents and upstreams can put in front of the API owner's people and tools:
the audit trail's export, the webhook signature check receivers are told to run, and the admin
API's description of webhook endpoints.

Each test drives a real gateway (anvil, the sample upstream, a gateway on loopback) or the very
code and documentation a receiver runs, and asserts on what the owner's people and tools get: the
exported lines, the receiver's answer, the admin API's body."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from catalog import load_catalogs
from gateway.app import create_app
from gateway.cli.main import main
from gateway.ops.serving import ThreadServer
from gateway.ops.webhooks import verify
from gateway.settings import Settings
from settlement.audit import AuditTrail, AuditWriter
from settlement.schema import open_ledger
from tests.conftest import Devchain, GatewayFactory, demo_catalog

README = Path(__file__).resolve().parents[2] / "README.md"
ADMIN = "review-admin-token-0123456789abcdef"
SECRET_ENV = "X402GW_TEST_REVIEW_WEBHOOK_SECRET"
WEBHOOK_SECRET = b"whsec-review-finance-admin"
# Characters that end a line for Unicode-aware line splitters (Python's str.splitlines, many log
# viewers and editors) though JSON allows them raw inside a string.
LINE_BREAKS = ("\u2028", "\u2029", "\x85")


# -- the audit trail's export ---------------------------------------------------------------------


@pytest.fixture
def loose_path_gateway(tmp_path: Path, devchain: Devchain, upstream: str) -> Iterator[tuple[str, AuditWriter, str]]:
    """The demo catalog with ``get_quote``'s path parameter a free string of at most 40 characters
    (as a city, a user name or a document title would be), audited into its own database."""
    catalog = demo_catalog(tmp_path, upstream)
    text = catalog.read_text()
    strict = 'pattern: "^[A-Z]{1,5}$"\n          description: Ticker symbol, upper case, e.g. ACME'
    assert strict in text
    catalog.write_text(text.replace(strict, "maxLength: 40\n          description: Ticker symbol"))
    database_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    settings = Settings(catalog=[catalog], deployment_file=devchain.deployment_file, database_url=database_url,
                        receipt_timeout_seconds=10)
    ledger = open_ledger(database_url)
    writer = AuditWriter(AuditTrail(database_url))
    app = create_app(settings, catalogs=load_catalogs(settings.catalog), ledger=ledger, audit=writer)
    with ThreadServer(app) as server:
        yield server.url, writer, database_url
    ledger.close()


def test_a_strangers_path_cannot_split_the_audit_export_into_extra_lines(
    loose_path_gateway: tuple[str, AuditWriter, str],
) -> None:
    """Attack: any client, unpaid, asks for ``/quotes/A%E2%80%A8B`` (and U+2029, U+0085): the 402
    is audited with the decoded path, and ``x402gw audit export`` writes its JSON with
    ``ensure_ascii=False``, so the export carries a raw LINE SEPARATOR / PARAGRAPH SEPARATOR / NEL
    inside a record. Python's ``str.splitlines()`` (the idiom this repository's own tests use on
    the export), log shippers and editors that honour Unicode line breaks then see a record cut in
    two invalid JSON halves: a griefer makes the owner's audit pipeline choke at will, for free.

    Correct: one record is one line for every line splitter: the export escapes these characters
    (``\\u2028``...) as the ledger export's JSON lines already do (``ensure_ascii`` on, or those
    three escaped); the data and its hash are unchanged (``audit verify --file`` re-canonicalises)."""
    url, writer, database_url = loose_path_gateway
    with httpx.Client(base_url=url, timeout=30) as client:
        asked = [client.get(f"/quotes/A{quoted}B") for quoted in ("%E2%80%A8", "%E2%80%A9", "%C2%85")]
    assert [r.status_code for r in asked] == [402, 402, 402], [r.text for r in asked]
    assert writer.drain(30), "the audit writer did not catch up"
    paths = [json.loads(r.data)["path"] for answer in asked
             for r in writer.trail.for_request(answer.headers["x-request-id"]) if r.event == "response"]
    assert paths == [f"/quotes/A{c}B" for c in LINE_BREAKS]  # the stranger's characters are in the trail

    exported = CliRunner().invoke(main, ["audit", "export", "--database-url", database_url])
    assert exported.exit_code == 0, exported.output
    records = exported.stdout.count("\n")
    assert records == 6  # challenge_issued and response for each of the three requests
    lines = exported.stdout.splitlines()
    broken = [line for line in lines if not _is_json(line)]
    assert len(lines) == records and not broken, (
        f"{len(lines)} lines for {records} records; not JSON: {broken}")
    assert not [c for c in LINE_BREAKS if c in exported.stdout], "raw Unicode line breaks in the audit export"


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


# -- webhook signatures, as a receiver checks them --------------------------------------------------


def _readme_verify() -> Callable[..., bool]:
    """The receiver's check exactly as the README's "Verifying a delivery" prints it."""
    text = README.read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def verify(secret: bytes, header: str" in b]
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md#verifying-a-delivery", "exec"), namespace)  # the documented code, as printed
    documented = namespace["verify"]
    assert callable(documented)
    return documented


@pytest.fixture
def documented_receiver() -> Iterator[str]:
    """A webhook receiver on loopback that does what the README says: ``gateway.ops.webhooks.verify``
    over the raw body and the X402GW-Signature header, 401 for a delivery that does not verify."""
    async def hook(request: Request) -> Response:
        body = await request.body()
        if not verify(WEBHOOK_SECRET, request.headers.get("x402gw-signature", ""), body, int(time.time())):
            return Response("bad signature", status_code=401)
        return Response("ok")

    with ThreadServer(Starlette(routes=[Route("/hooks", hook, methods=["POST"])])) as server:
        yield f"{server.url}/hooks"


def test_a_forged_signature_header_is_refused_not_a_crash_of_the_receiver(documented_receiver: str) -> None:
    """Attack: anyone who can reach a receiver's webhook URL POSTs a forged delivery with
    ``X402GW-Signature: t=\\xb2,v1=...`` (the header byte 0xB2 is "²" once decoded as Latin-1, as
    Starlette and most servers do) or ``t=`` followed by 5,000 ASCII digits. ``verify`` checks
    ``t.isdigit()`` and then calls ``int(t)``: "²".isdigit() is True but int("²") raises, and
    int() refuses more than 4,300 digits. So the documented check (``gateway.ops.webhooks.verify``
    and the README's copy of it) raises ValueError instead of answering False: the receiver
    answers 500 to a forgery (alerts, retries, a log full of tracebacks) rather than refusing it.

    Correct: any malformed header is simply not a valid signature: only ASCII digits
    (``t.isascii() and t.isdigit()``, or a regex ``[0-9]{1,12}``) of a sane length are parsed, and
    ``verify`` returns False for everything else, in the code and in the README."""
    now = int(time.time())
    forged = [b"t=\xb2,v1=" + b"0" * 64, f"t={'1' * 5000},v1={'0' * 64}".encode()]
    answers = [_answer(documented_receiver, header) for header in forged]
    assert answers == [401, 401], f"the receiver's answers to two forgeries: {answers}"
    # The same headers as the receiver's framework hands them over, to the code and to the README's copy.
    documented = _readme_verify()
    checks: list[Callable[[str], bool]] = [lambda h: verify(WEBHOOK_SECRET, h, b"{}", now),
                                           lambda h: documented(WEBHOOK_SECRET, h, b"{}")]
    for check in checks:
        for header in forged:
            try:
                verdict = check(header.decode("latin-1"))
            except ValueError as exc:
                pytest.fail(f"verify raised on a forged header {header[:12]!r}...: {exc!r}")
            assert verdict is False


def _answer(url: str, header: bytes) -> int | str:
    """The receiver's status (a connection of its own), or what became of it when the receiver crashed."""
    try:
        return httpx.post(url, content=b'{"type":"payment.settled"}', headers={b"X402GW-Signature": header}, timeout=30).status_code
    except httpx.TransportError as exc:
        return f"no answer ({type(exc).__name__}: the receiver raised)"


# -- the admin API's webhook listing ---------------------------------------------------------------


def test_a_webhook_url_whose_path_is_its_credential_is_not_shown_by_the_admin_api(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack (on the owner's secrets): the receivers an owner most often points webhooks at (Slack,
    Discord, Teams, Zapier, Make...) put their credential in the URL's path
    (``https://hooks.slack.com/services/T…/B…/<secret>``): whoever has the URL can post into the
    owner's channel or trigger the owner's automation. ``GET /admin/webhooks`` describes each endpoint
    with ``redact_url``, which drops user info, query and fragment but keeps the path, so the
    listing hands the receiver's credential to anyone reading admin answers (the dashboard's
    operators, a log of admin API calls, a screenshot in a ticket). The gateway itself says paths hold
    keys: RPC and facilitator URLs are shown as scheme://host[:port] only (``settlement.chain.rpc``,
    ``doctor``'s ``keep_path=False``), and the README promises no secret in any answer.

    Correct: the admin API names an endpoint by its name, owner, events and scheme://host[:port]
    (or the path with its segments masked), never the path's secret."""
    monkeypatch.setenv(SECRET_ENV, WEBHOOK_SECRET.decode())
    path_secret = "XyZ9sEcReTpAtHtOkEn0123456789"
    hook = f"https://hooks.slack.example/services/T0001/B0001/{path_secret}"
    gateway = start_gateway(admin_token=ADMIN, webhook_poll_seconds=60,
                            webhooks={"acme-legacy": [{"name": "slack", "url": hook, "secret_env": SECRET_ENV}]})
    with gateway.client() as client:
        listing = client.get("/admin/webhooks", headers={"Authorization": f"Bearer {ADMIN}"})
        page = client.get("/admin", headers={"Authorization": f"Bearer {ADMIN}"})
    assert listing.status_code == 200 and page.status_code == 200
    [endpoint] = listing.json()["endpoints"]
    assert endpoint["name"] == "slack" and endpoint["owner"] == "acme-legacy"
    assert WEBHOOK_SECRET.decode() not in listing.text  # the signing secret is hidden already
    assert path_secret not in page.text
    assert path_secret not in listing.text, f"the receiver's credential is in the admin API: {endpoint['url']}"
