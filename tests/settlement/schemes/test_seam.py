"""The scheme seam: a scheme the gateway has never heard of, added as one class and one catalog value.

``Tally`` is a fake scheme (it speaks exact's payload, since decoding and binding are exact's today,
but its own name, its own requirements and its own bookkeeping). Registered through
``create_app(schemes=...)`` and named by the catalog (``payment.scheme: tally``), it is offered in
the 402, verified, settled (writing ahead through ``before_send``) and, for a payment whose outcome
was unknown, resolved: all by the unchanged pipeline. A catalog naming a scheme nobody registered
does not start.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from catalog import Catalogs, PaymentTerms, parse_catalog
from gateway.app import create_app
from gateway.devkit.payer import Payer
from gateway.settings import Settings
from gateway.store import MemoryStore
from gateway.upstream.bridge import UpstreamResponse
from settlement.chain.client import BeforeSend
from settlement.ledger import Payment, PaymentState
from settlement.ledger.resolve import Resolution
from settlement.schemes import ExactEvm, Schemes, Supported
from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentPayload, PaymentRequirements, SettleResponse, VerifyResponse

NETWORK = "eip155:31337"
PAYER_KEY = "0x59c6995e998f97a5a0044966f0945389dc9c86dae88c7a8412f4603b6b78690d"
TX = "0x" + "ab" * 32

CATALOG = f"""\
catalog: 1
owner: acme
payment:
  scheme: tally
  network: "{NETWORK}"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
upstreams:
  api:
    base_url: "http://127.0.0.1:9"
tools:
  - name: quote
    description: A quote
    method: GET
    path: /quote
    price: "0.002"
"""


@dataclass
class Tally:
    """A scheme that keeps its own tally: everything the gateway asks of a scheme, nothing more."""

    name: str = "tally"
    pending: bool = False  # settle answers "outcome unknown" (the chain is slow)
    verified: list[str] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)

    def serves(self, network: str) -> bool:
        return network == NETWORK

    def requirements(self, terms: PaymentTerms, amount: int) -> PaymentRequirements:
        return PaymentRequirements(
            scheme=self.name, network=terms.network, amount=str(amount), asset=terms.asset, pay_to=terms.pay_to,
            max_timeout_seconds=terms.max_timeout_seconds,
            extra={"name": terms.asset_name, "version": terms.asset_version, "tally": True},
        )

    async def verify(self, payload: PaymentPayload, requirements: PaymentRequirements) -> VerifyResponse:
        assert requirements.scheme == self.name and (requirements.extra or {}).get("tally") is True
        payer = str(payload.payload["authorization"]["from"])
        self.verified.append(payer)
        return VerifyResponse(is_valid=True, payer=payer)

    async def settle(
        self, payload: PaymentPayload, requirements: PaymentRequirements, *, before_send: BeforeSend | None = None
    ) -> SettleResponse:
        payer = str(payload.payload["authorization"]["from"])
        if before_send is not None:
            await before_send(TX)  # the gateway's write-ahead record, before "broadcasting"
        self.settled.append(payer)
        if self.pending:
            return SettleResponse(success=False, error_reason="settlement_pending", transaction=TX,
                                  payer=payer, network=requirements.network)
        return SettleResponse(success=True, transaction=TX, payer=payer, network=requirements.network,
                              amount=requirements.amount, extra={"blockNumber": 7})

    def writes_ahead(self, network: str) -> bool:
        return True

    async def resolve(self, row: Payment) -> Resolution | None:
        self.resolved.append(row.id)
        return Resolution(payment_id=row.id, request_id=row.request_id, before=row.state,
                          after=PaymentState.SETTLED.value, tx_hash=TX, block_number=8, reason="tally_says_settled")

    def describe(self) -> Supported:
        return {"kinds": [{"x402Version": 2, "scheme": self.name, "network": NETWORK}], "extensions": [], "signers": {}}


class Upstream:
    def __init__(self) -> None:
        self.calls = 0

    async def send(self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float,
                   max_bytes: int) -> UpstreamResponse:
        self.calls += 1
        return UpstreamResponse(200, [("content-type", "application/json")], b'{"price": 42}')

    async def open(self, method: str, url: str, headers: dict[str, str], body: bytes, timeout: float,
                   max_bytes: int) -> UpstreamResponse:
        return await self.send(method, url, headers, body, timeout, max_bytes)

    async def close(self) -> None:
        pass


def _catalogs(text: str = CATALOG) -> Catalogs:
    return Catalogs(catalogs=(parse_catalog(text),))


def _app(tmp_path: Path, scheme: Tally, upstream: Upstream) -> Any:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    return create_app(settings, catalogs=_catalogs(), schemes=Schemes([scheme]), upstream=upstream, store=MemoryStore())


def _offer(client: TestClient) -> PaymentRequirements:
    unpaid = client.get("/quote")
    assert unpaid.status_code == 402, unpaid.text
    required = json.loads(base64.b64decode(unpaid.headers["PAYMENT-REQUIRED"]))
    return PaymentRequirements.model_validate(required["accepts"][0])


def _pay(client: TestClient, payload: PaymentPayload) -> Any:
    return client.get("/quote", headers={"PAYMENT-SIGNATURE": encode_header(payload)})


def test_a_scheme_added_through_the_seam_is_offered_verified_and_settled(tmp_path: Path) -> None:
    scheme, upstream = Tally(), Upstream()
    with TestClient(_app(tmp_path, scheme, upstream)) as client:
        offer = _offer(client)
        assert offer.scheme == "tally" and (offer.extra or {})["tally"] is True
        payer = Payer(PAYER_KEY)
        paid = _pay(client, payer.sign(offer))
        assert paid.status_code == 200, paid.text
        assert paid.json() == {"price": 42}
        assert "PAYMENT-RESPONSE" in paid.headers
        assert scheme.verified == [payer.address] and scheme.settled == [payer.address]
        ledger = client.app.state.ledger  # type: ignore[attr-defined]
        row = ledger.get(1)
        assert (row.state, row.tx_hash, row.block_number) == (PaymentState.SETTLED, TX, 7)
    assert upstream.calls == 1


def test_an_unknown_outcome_is_resolved_by_the_scheme_that_took_the_payment(tmp_path: Path) -> None:
    scheme, upstream = Tally(pending=True), Upstream()
    with TestClient(_app(tmp_path, scheme, upstream)) as client:
        payload = Payer(PAYER_KEY).sign(_offer(client))
        held = _pay(client, payload)
        assert held.status_code == 503 and held.json()["error"] == "settlement_pending", held.text
        ledger = client.app.state.ledger  # type: ignore[attr-defined]
        assert ledger.get(1).state == PaymentState.PENDING
        # The same payment again: the pipeline asks the scheme what happened, and serves the answer
        # it held back, without a second verify, settle or upstream call.
        replay = _pay(client, payload)
        assert replay.status_code == 200, replay.text
        assert replay.headers["X402GW-Replay"] == "true"
        assert scheme.resolved == [1] and len(scheme.settled) == 1
        row = ledger.get(1)
        assert (row.state, row.tx_hash, row.block_number) == (PaymentState.SETTLED, TX, 8)
    assert upstream.calls == 1


def test_a_catalog_naming_an_unregistered_scheme_does_not_start(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    with pytest.raises(Exception) as refused:
        create_app(settings, catalogs=_catalogs(), schemes=Schemes([ExactEvm(None)]), store=MemoryStore())
    assert getattr(refused.value, "code", None) == "scheme_not_served"
    assert "'tally' on eip155:31337" in str(refused.value)


def test_the_registry_routes_by_scheme_and_network_and_merges_descriptions() -> None:
    tally, exact = Tally(), ExactEvm(None, ["eip155:8453"])
    schemes = Schemes([tally, exact])
    assert schemes.get("tally", NETWORK) is tally
    assert schemes.get("tally", "eip155:8453") is None
    assert schemes.get("exact", "eip155:8453") is exact
    assert schemes.names == {"tally", "exact"}
    assert schemes.supported()["kinds"] == [{"x402Version": 2, "scheme": "tally", "network": NETWORK}]
