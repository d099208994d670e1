"""Review of the malicious (or merely non-ASCII) upstream, paid end to end on a real anvil.

An upstream's response header whose value is not Latin-1 (raw UTF-8 bytes such as a
``Content-Disposition`` filename ``報告.json``, or a lone byte 0xFF) is decoded by aiohttp as a ``str``
holding characters above U+00FF. The bridge keeps the header (it is not hop-by-hop, not a payment
header), the payment settles, and only then does ``respond`` hand the header to Starlette, which
encodes header values as Latin-1 and raises: the payer is charged and gets a 500. The stored answer
is replayed through the same ``respond``, so a resend of the same payment fails the same way: the
answer that was paid for is never delivered. An ``exact`` stream (settled before the call) fails in
``PaidStream``'s constructor the same way: charged, a 500, and no refund on record.

Each test holds the invariant: charged ⇒ the agent got the answer it paid for (or, for an
``upfront`` call, a refund owed on the ledger); not charged ⇒ nothing of the content went out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.ops.serving import ThreadServer
from gateway.pipeline.stages.respond import respond
from gateway.upstream.transport import UpstreamResponse
from settlement.ledger import PaymentState
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_paid_call import pay, receipt_of

PAYER = 3
PRICE = 1000  # "0.001" at 6 decimals
CONTENT = b'{"report":"the paid content"}'
EVENTS = b'data: {"i":1}\n\ndata: {"i":2}\n\n'
# Raw header bytes as an upstream sends them: UTF-8 in a filename (common in the wild), and a lone 0xFF.
NON_LATIN1 = [
    (b"content-disposition", 'attachment; filename="報告.json"'.encode()),
    (b"x-upstream-note", b"caf\xe2\x82\xac \xff"),
]


class NonLatin1Upstream:
    """A raw ASGI upstream (so header bytes go out exactly as written) that counts its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path = scope["path"]
        self.calls.append(path)
        if path == "/h/stream":
            headers = [(b"content-type", b"text/event-stream"), *NON_LATIN1]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": EVENTS})
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(CONTENT)).encode()), *NON_LATIN1]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": CONTENT})


@pytest.fixture(scope="module")
def hostile() -> Iterator[tuple[ThreadServer, NonLatin1Upstream]]:
    upstream = NonLatin1Upstream()
    with ThreadServer(upstream) as server:
        yield server, upstream


@pytest.fixture
def gateway(start_gateway: GatewayFactory, tmp_path: Path, devchain: Devchain,
            hostile: tuple[ThreadServer, NonLatin1Upstream]) -> RunningGateway:
    hostile[1].calls.clear()
    catalog = tmp_path / "review.yaml"
    catalog.write_text(f"""
catalog: 1
owner: review-upstream
payment: {{network: "eip155:31337", asset: "{devchain.token}", asset_name: "USD Coin", asset_version: "2",
           decimals: 6, pay_to: "{PAY_TO}", max_timeout_seconds: 300}}
upstreams:
  default: {{base_url: "{hostile[0].url}", timeout_seconds: 5}}
tools:
  - name: report
    description: d
    method: GET
    path: /t/report
    upstream_path: /h/report
    price: "0.001"
    settle: after
    input_schema: {{type: object, additionalProperties: false}}
  - name: report_stream
    description: d
    method: GET
    path: /t/stream
    upstream_path: /h/stream
    price: "0.001"
    stream: true
    input_schema: {{type: object, additionalProperties: false}}
""")
    return start_gateway(catalog)


def balances(devchain: Devchain) -> tuple[int, int]:
    return devchain.balance(devchain.address(PAYER)), devchain.balance(PAY_TO)


def test_a_settled_answer_with_a_utf8_header_is_delivered_not_a_500_and_a_resend_gets_it(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, NonLatin1Upstream]
) -> None:
    before = balances(devchain)
    with gateway.client() as client:
        _, paid, header = pay(client, devchain, "GET", "/t/report", payer=PAYER)
        again = client.get("/t/report", headers={"PAYMENT-SIGNATURE": header})  # the payer's resend
    assert hostile[1].calls == ["/h/report"]  # asked once; the resend is never a second call
    [row] = gateway.ledger.all()
    if balances(devchain) == before:  # not charged: nothing of the content went out
        assert row.state == PaymentState.VOIDED and row.tx_hash is None
        assert CONTENT not in paid.content and CONTENT not in again.content
        return
    # Charged (once): then the agent must get what it paid for, first time and on a resend.
    assert balances(devchain) == (before[0] - PRICE, before[1] + PRICE)
    assert row.state == PaymentState.SETTLED and row.tx_hash
    for answer in (paid, again):
        assert answer.status_code == 200, (answer.status_code, answer.text)
        assert answer.content == CONTENT
        assert receipt_of(answer).transaction == row.tx_hash
        sent = [(name.lower(), value) for name, value in answer.headers.raw]
        assert all(header in sent for header in NON_LATIN1)  # the upstream's octets, as it sent them


def test_an_answer_stored_with_a_decoded_header_is_written_as_its_utf8_octets() -> None:
    """Answers stored before headers were kept as octets hold aiohttp's decoded text: still written."""
    stored = UpstreamResponse(200, [("Content-Disposition", 'attachment; filename="報告.json"')], CONTENT)
    written = respond(stored, None, "req-1")
    assert (b"content-disposition", NON_LATIN1[0][1]) in written.raw_headers


def test_a_settled_upfront_stream_with_a_utf8_header_is_delivered_or_owes_a_refund(
    gateway: RunningGateway, devchain: Devchain, hostile: tuple[ThreadServer, NonLatin1Upstream]
) -> None:
    before = balances(devchain)
    with gateway.client() as client:
        _, paid, _ = pay(client, devchain, "GET", "/t/stream", payer=PAYER)
    [row] = gateway.ledger.all()
    if balances(devchain) == before:
        assert row.tx_hash is None and EVENTS not in paid.content
        return
    assert balances(devchain) == (before[0] - PRICE, before[1] + PRICE)
    assert row.state == PaymentState.SETTLED and row.tx_hash
    # Settled before the call: either the stream reached the payer, or the ledger owes it back.
    delivered = paid.status_code == 200 and paid.content.startswith(EVENTS)
    assert delivered or row.refund_owed == PRICE, (paid.status_code, paid.text, row.refund_owed)
