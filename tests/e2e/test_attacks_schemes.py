"""Review attacks on ``upto`` (Permit2, usage-metered), smart-wallet payers and SIWX re-access, on the
session anvil through a real gateway. Each asserts the invariant on the ledger, the chain balances
and the upstream's call log, not only the status: no content and no upstream call without this
request's own payment; never a charge without the answer it paid for.

Covered here (not elsewhere): upto authorizations validly re-signed over other terms, one field at a
time; the payer spending its Permit2 nonce while the upstream works; a zero-charge permit presented
for a second request; an upto price above the signed maximum; a contract wallet that stops
accepting between verify and settle; re-access standing on a payment that moved no money; a
sign-in made for one tool presented at another; expired / not-yet-valid sign-ins; re-access on
voided, failed and pending payments."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_defunct
from sqlalchemy import update
from web3 import Web3
from x402 import x402Client
from x402.extensions.sign_in_with_x import SIWxPayload, create_siwx_message, encode_siwx_header
from x402.mechanisms.evm.constants import ERC6492_MAGIC_VALUE
from x402.mechanisms.evm.exact import ExactEvmScheme
from x402.schemas import PaymentRequired as SdkPaymentRequired

from catalog import CatalogError, load_catalog
from gateway.devkit.devchain import load_artifact
from gateway.devkit.payer import Payer
from gateway.ops.serving import ThreadServer
from settlement.chain.client import selector
from settlement.ledger import Payment, PaymentState
from settlement.schemes.exact_permit2_payload import EXACT_PROXY_ADDRESS
from settlement.schemes.upto_permit import PERMIT2_ADDRESS, parse_upto
from settlement.x402.codec import encode_header
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, offer_of
from tests.e2e.test_siwx_reaccess import OwnedWallet, sign_in_challenge, signed
from tests.e2e.test_upto_paid_call import _header as sdk_upto_header
from tests.support.chain_actions import transfer
from tests.support.recording_upstream import MARKER_PREFIX, RecordingUpstream
from tests.support.usage_upstream import UsageUpstream

MAXIMUM, PRICE = 10_000, 2_000
PUBLIC_URL = "http://gw.review.example"
CATALOG = """
catalog: 1
owner: review
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  rec: {{base_url: "{rec}", timeout_seconds: 5}}
  lying: {{base_url: "{lying}", timeout_seconds: 5}}
tools:
  - name: upto_read
    description: A read paid in upto, the price charged of a signed maximum.
    method: GET
    path: /r/{{symbol}}
    upstream: rec
    upstream_path: /u/upto_read/{{symbol}}
    price: 0.002
    max_price: 0.01
    payment: {{scheme: upto}}
    input_schema: &sym {{type: object, properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}, required: [symbol]}}
  - name: upto_priced
    description: A read paid in upto at a price per item, at most 0.005.
    method: GET
    path: /p
    upstream: rec
    upstream_path: /u/upto_priced
    price: {{per: n, each: "0.001"}}
    max_price: 0.005
    payment: {{scheme: upto}}
    input_schema: {{type: object, properties: {{n: {{type: integer, minimum: 0}}}}, required: [n]}}
  - name: metered
    description: Charged per unit its answer reports; the same call re-accessed for an hour.
    method: GET
    path: /m/{{mode}}
    upstream: lying
    upstream_path: /usage/{{mode}}
    price: 0.001
    max_price: 0.01
    payment: {{scheme: upto}}
    usage: {{from: json, pointer: /usage/units}}
    reaccess: {{match: request, window: 1h}}
    input_schema: {{type: object, properties: {{mode: {{type: string}}}}, required: [mode]}}
  - name: page_a
    description: A page, re-accessed for the same request.
    method: GET
    path: /a/{{symbol}}
    upstream: rec
    upstream_path: /u/page_a/{{symbol}}
    price: 0.001
    reaccess: {{window: 1h}}
    input_schema: *sym
  - name: page_b
    description: Another page, re-accessed for the same request.
    method: GET
    path: /b/{{symbol}}
    upstream: rec
    upstream_path: /u/page_b/{{symbol}}
    price: 0.001
    reaccess: {{window: 1h}}
    input_schema: *sym
  - name: wallet_read
    description: A read paid in exact, settled after the upstream answers.
    method: GET
    path: /w/{{symbol}}
    upstream: rec
    upstream_path: /u/wallet_read/{{symbol}}
    price: 0.002
    input_schema: *sym
"""


@pytest.fixture(scope="module")
def rec() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def lying() -> Iterator[tuple[str, UsageUpstream]]:
    upstream = UsageUpstream()
    with ThreadServer(upstream.app()) as server:
        yield server.url, upstream


@pytest.fixture
def gw(start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, rec: RecordingUpstream,
       lying: tuple[str, UsageUpstream]) -> RunningGateway:
    path = tmp_path / "review.yaml"
    path.write_text(CATALOG.format(token=devchain.token, pay_to=PAY_TO, rec=rec.url, lying=lying[0]))
    return start_gateway(path, public_url=PUBLIC_URL)


def _required(gw: RunningGateway, path: str, **params: Any) -> dict[str, Any]:
    with gw.client() as http:
        response = http.get(path, params=params)
    assert response.status_code == 402, response.text
    required: dict[str, Any] = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    return required


def _upto(devchain: Devchain, payer: int, required: dict[str, Any]) -> dict[str, Any]:
    """The official SDK upto client's payment for ``required``, as JSON."""
    return dict(json.loads(base64.b64decode(sdk_upto_header(devchain, payer, required))))


def _resigned(devchain: Devchain, payer: int, payment: dict[str, Any], change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """``payment`` with one Permit2 field changed and signed again by the payer: valid, other terms."""
    forged = copy.deepcopy(payment)
    change(forged["payload"]["permit2Authorization"])
    permit = parse_upto(forged["payload"])
    assert permit is not None
    signature = Account.from_key(devchain.key(payer)).unsafe_sign_hash(permit.digest(31337)).signature
    forged["payload"]["signature"] = "0x" + bytes(signature).hex()
    return forged


def _h(payment: dict[str, Any]) -> dict[str, str]:
    return {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(payment).encode()).decode()}


def _balances(devchain: Devchain, *owners: str) -> tuple[int, ...]:
    return tuple(devchain.balance(owner) for owner in (*owners, PAY_TO))


def _pay_exact(gw: RunningGateway, devchain: Devchain, payer: int, path: str) -> httpx.Response:
    with gw.client() as http:
        offer = offer_of(http.get(path))
        payment = Payer(devchain.key(payer)).sign(offer.accepts[0], resource=offer.resource)
        paid = http.get(path, headers={"PAYMENT-SIGNATURE": encode_header(payment)})
    assert paid.status_code == 200, paid.text
    return paid


def _sign_in(gw: RunningGateway, path: str, account: Any, **changes: Any) -> str:
    with gw.client() as http:
        return signed(sign_in_challenge(http.get(path)), account, **changes)



def test_upto_authorizations_re_signed_over_other_terms_are_refused_before_the_upstream(
    gw: RunningGateway, devchain: Devchain, rec: RecordingUpstream,
) -> None:
    payer = 2
    good = _upto(devchain, payer, _required(gw, "/r/MUTA"))
    now = int(time.time())
    plain = devchain.deployment.plain_token.address if devchain.deployment.plain_token else devchain.address(8)
    changes: dict[str, tuple[Callable[[dict[str, Any]], object], set[str]]] = {
        "spender: the exact proxy": (lambda a: a.update(spender=EXACT_PROXY_ADDRESS), {"invalid_permit2_spender"}),
        "token: another": (lambda a: a["permitted"].update(token=plain), {"permit2_token_mismatch"}),
        "witness.to: the payer": (lambda a: a["witness"].update(to=devchain.address(payer)), {"invalid_permit2_recipient_mismatch"}),
        "witness.facilitator: another": (lambda a: a["witness"].update(facilitator=devchain.address(6)), {"upto_facilitator_mismatch"}),
        "maximum: one below": (lambda a: a["permitted"].update(amount=str(MAXIMUM - 1)), {"permit2_amount_mismatch"}),
        "maximum: ten times": (lambda a: a["permitted"].update(amount=str(MAXIMUM * 10)), {"permit2_amount_mismatch"}),
        "maximum: 2**256-1": (lambda a: a["permitted"].update(amount=str(2**256 - 1)), {"permit2_amount_mismatch"}),
        "deadline: in 3 s": (lambda a: a.update(deadline=str(now + 3)), {"permit2_deadline_expired"}),
        "deadline: in 8 s": (lambda a: a.update(deadline=str(now + 8)), {"payment_window_too_short", "permit2_deadline_expired"}),
        "validAfter: in 10 min": (lambda a: a["witness"].update(validAfter=str(now + 600)), {"permit2_not_yet_valid"}),
    }
    before, calls = _balances(devchain, devchain.address(payer)), rec.count("upto_read")
    with gw.client() as http:
        for label, (change, codes) in changes.items():
            response = http.get("/r/MUTA", headers=_h(_resigned(devchain, payer, good, change)))
            assert response.status_code == 402 and response.json()["error"] in codes, (label, response.text)
            assert MARKER_PREFIX not in response.text, label
    assert rec.count("upto_read") == calls and _balances(devchain, devchain.address(payer)) == before
    assert all(row.state != PaymentState.SETTLED for row in gw.ledger.all())


def test_a_payer_who_spends_its_permit2_nonce_mid_call_gets_no_answer_and_pays_nothing(
    gw: RunningGateway, devchain: Devchain, rec: RecordingUpstream,
) -> None:
    payer = 3
    payment = _upto(devchain, payer, _required(gw, "/r/NONCE"))
    nonce = int(payment["payload"]["permit2Authorization"]["nonce"])
    call = selector("invalidateUnorderedNonces(uint256,uint256)") + abi_encode(["uint256", "uint256"], [nonce >> 8, 1 << (nonce & 255)])

    def spend_nonce(_: Any) -> None:  # while the upstream works, after verify said yes
        sent = devchain.w3.eth.send_transaction({"from": devchain.address(payer), "to": PERMIT2_ADDRESS, "data": call, "gas": 100_000})
        assert devchain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1

    before, calls = _balances(devchain, devchain.address(payer)), rec.count("upto_read")
    rec.on("upto_read", spend_nonce)
    try:
        with gw.client() as http:
            response = http.get("/r/NONCE", headers=_h(payment))
    finally:
        rec.on("upto_read", None)
    assert response.status_code == 402 and MARKER_PREFIX not in response.text, response.text
    assert rec.count("upto_read") == calls + 1 and _balances(devchain, devchain.address(payer)) == before
    [row] = gw.ledger.all()
    assert row.state == PaymentState.FAILED


def test_a_zero_charge_permit_buys_exactly_one_answer(
    gw: RunningGateway, devchain: Devchain, lying: tuple[str, UsageUpstream],
) -> None:
    """0 units settle nothing, so the permit's nonce stays unused on chain: only the ledger stops the
    payer re-signing that nonce over another request's offer for a second call."""
    payer = 4
    payment = _upto(devchain, payer, _required(gw, "/m/json-0"))
    nonce = payment["payload"]["permit2Authorization"]["nonce"]
    before = _balances(devchain, devchain.address(payer))
    with gw.client() as http:
        free = http.get("/m/json-0", headers=_h(payment))
        assert free.status_code == 200, free.text
        calls = lying[1].calls["json-7"]
        second = _resigned(devchain, payer, _upto(devchain, payer, _required(gw, "/m/json-7")), lambda a: a.update(nonce=nonce))
        again = http.get("/m/json-7", headers=_h(second))
    assert again.status_code == 409 and "USAGE-CONTENT-" not in again.text, again.text
    assert lying[1].calls["json-7"] == calls and _balances(devchain, devchain.address(payer)) == before
    [row] = gw.ledger.all()
    assert (row.state, row.amount, row.tx_hash) == (PaymentState.SETTLED, 0, None)


def test_an_upto_price_above_the_signed_maximum_never_calls_the_upstream_unpaid(
    gw: RunningGateway, devchain: Devchain, rec: RecordingUpstream,
) -> None:
    """A price rule's price above the upto maximum (max_price, what the payer signs) could never
    settle: no offer is made for it (422 price_out_of_range, never a 402 nobody can pay), and a
    payment signed over the maximum and presented for those arguments calls no upstream."""
    payer = 5
    before, calls = _balances(devchain, devchain.address(payer)), rec.count("upto_priced")
    with gw.client() as http:
        dear = http.get("/p", params={"n": 9})  # 9 x 0.001 = 0.009, above max_price 0.005
        assert dear.status_code == 422 and dear.json()["error"] == "price_out_of_range", dear.text
        assert "payment-required" not in dear.headers and "0.005" in dear.json()["message"]
        required = _required(gw, "/p", n=5)  # 0.005: the maximum itself is sold
        [accept] = required["accepts"]
        assert accept["amount"] == "5000" and accept["extra"]["charge"]["amount"] == "5000"
        payment = _upto(devchain, payer, required)
        refused = http.get("/p", params={"n": 9}, headers=_h(payment))
        assert refused.status_code == 422 and refused.json()["error"] == "price_out_of_range", refused.text
        assert MARKER_PREFIX not in refused.text
        assert rec.count("upto_priced") == calls and _balances(devchain, devchain.address(payer)) == before
        assert gw.ledger.all() == []
        paid = http.get("/p", params={"n": 5}, headers=_h(payment))  # the same payment where it is due
    assert paid.status_code == 200 and MARKER_PREFIX in paid.text, paid.text
    moved = tuple(a - b for a, b in zip(before, _balances(devchain, devchain.address(payer)), strict=True))
    [row] = gw.ledger.all()
    assert (row.state, row.amount, moved) == (PaymentState.SETTLED, 5000, (5000, -5000)) and row.tx_hash
    assert rec.count("upto_priced") == calls + 1


def test_a_wallet_that_stops_accepting_between_verify_and_settle_pays_nothing_and_gets_nothing(
    gw: RunningGateway, devchain: Devchain, rec: RecordingUpstream,
) -> None:
    w3, owner, factory = devchain.w3, Account.create(), devchain.deployment.wallet_factory
    assert factory is not None
    args = abi_encode(["address", "uint256"], [owner.address, secrets.randbits(64)])
    wallet = Web3.to_checksum_address("0x" + bytes(w3.eth.call({"to": factory, "data": selector("getAddress(address,uint256)") + args}))[-20:].hex())
    for tx in ({"to": factory, "data": selector("createAccount(address,uint256)") + args},
               {"data": "0x" + load_artifact("RevertingWallet")["bytecode"][2:]}):
        receipt = w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction({"from": devchain.address(7), "gas": 3_000_000, **tx}))
        assert receipt["status"] == 1
    refusing_code = bytes(w3.eth.get_code(receipt["contractAddress"]))  # isValidSignature reverts
    transfer(w3, devchain.token, devchain.key(7), wallet, 5 * PRICE)
    client = x402Client()
    client.register("eip155:31337", ExactEvmScheme(signer=OwnedWallet(owner, wallet)))
    client.set_spend_controls(False)
    payload = asyncio.run(client.create_payment_payload(SdkPaymentRequired.model_validate(_required(gw, "/w/WAL"))))
    header = encode_header(payload.model_dump(mode="json", by_alias=True, exclude_none=True))

    def change_mind(_: Any) -> None:  # verify asked the wallet (and cached yes); now it says no
        w3.provider.make_request("anvil_setCode", [wallet, "0x" + refusing_code.hex()])  # type: ignore[arg-type]

    before, calls = _balances(devchain, wallet), rec.count("wallet_read")
    rec.on("wallet_read", change_mind)
    try:
        with gw.client() as http:
            response = http.get("/w/WAL", headers={"PAYMENT-SIGNATURE": header})
            again = http.get("/w/WAL", headers={"PAYMENT-SIGNATURE": header})  # resent: not served either
    finally:
        rec.on("wallet_read", None)
    assert response.status_code == 402 and again.status_code in (402, 409), (response.text, again.text)
    assert MARKER_PREFIX not in response.text + again.text  # the answer is withheld, the resend gets none
    assert _balances(devchain, wallet) == before and rec.count("wallet_read") == calls + 1
    assert [row.state for row in gw.ledger.all()] == [PaymentState.FAILED]


# -- SIWX re-access --------------------------------------------------------------------------------


def test_re_access_never_stands_on_a_payment_that_moved_no_money(
    gw: RunningGateway, devchain: Devchain, lying: tuple[str, UsageUpstream], tmp_path: Path,
) -> None:
    """A zero-usage upto call settles 0 (no transaction). Re-access must not treat that as a
    payment: not of the same request (its stored answer), and match: tool, which would buy any
    number of fresh, metered upstream calls for nothing, is refused on a usage-charged tool."""
    payer = 6
    with gw.client() as http:
        paid = http.get("/m/json-0", headers=_h(_upto(devchain, payer, _required(gw, "/m/json-0"))))
    assert paid.status_code == 200 and "USAGE-CONTENT-" in paid.text, paid.text
    [row] = gw.ledger.all()
    assert (row.state, row.amount, row.tx_hash) == (PaymentState.SETTLED, 0, None)  # nothing moved on chain
    before, calls = _balances(devchain, devchain.address(payer)), lying[1].calls["json-0"]
    with gw.client() as http:
        for _ in range(2):
            header = _sign_in(gw, "/m/json-0", Account.from_key(devchain.key(payer)))
            response = http.get("/m/json-0", headers={"SIGN-IN-WITH-X": header})
            assert response.status_code == 402 and response.json()["error"] == "reaccess_not_paid", response.text
            assert "USAGE-CONTENT-" not in response.text and "x402gw-reaccess" not in response.headers
    assert lying[1].calls["json-0"] == calls and _balances(devchain, devchain.address(payer)) == before
    assert [(r.id, r.state, r.amount) for r in gw.ledger.all()] == [(row.id, PaymentState.SETTLED, 0)]
    text = CATALOG.format(token=devchain.token, pay_to=PAY_TO, rec="http://127.0.0.1:9", lying="http://127.0.0.1:9")
    path = tmp_path / "tool-wide.yaml"
    path.write_text(text.replace("{match: request, window: 1h}", "{match: tool, window: 1h}"))
    with pytest.raises(CatalogError) as refused:
        load_catalog(path)
    [issue] = refused.value.issues
    assert (issue.code, issue.path) == ("reaccess_repeats_priced_calls", "tools[2].reaccess.match")
    assert issue.line == text.splitlines().index("    reaccess: {match: request, window: 1h}") + 1


def test_a_sign_in_made_for_one_tool_does_not_open_another(gw: RunningGateway, devchain: Devchain, rec: RecordingUpstream) -> None:
    """The 402 of /a/SIGN binds its challenge to that resource (uri, resources); the payer's
    sign-in for it, presented at /b/SIGN (also paid), must not be taken there."""
    payer, account = 8, Account.from_key(devchain.key(8))
    _pay_exact(gw, devchain, payer, "/a/SIGN")
    _pay_exact(gw, devchain, payer, "/b/SIGN")
    header = _sign_in(gw, "/a/SIGN", account)
    calls, payee = rec.count("page_b"), devchain.balance(PAY_TO)
    with gw.client() as http:
        elsewhere = http.get("/b/SIGN", headers={"SIGN-IN-WITH-X": header})
        assert elsewhere.status_code == 402, elsewhere.text
        assert elsewhere.json()["error"] == "invalid_siwx_uri_mismatch" and MARKER_PREFIX not in elsewhere.text
        # /b's challenge signed with its resources naming /a, or its uri naming /a: both bind
        for changes in ({"resources": [f"{PUBLIC_URL}/a/SIGN"]}, {"uri": f"{PUBLIC_URL}/a/SIGN"}):
            mixed = signed({**sign_in_challenge(http.get("/b/SIGN")), **changes}, account)
            refused = http.get("/b/SIGN", headers={"SIGN-IN-WITH-X": mixed})
            assert refused.status_code == 402 and refused.json()["error"] == "invalid_siwx_uri_mismatch", (changes, refused.text)
            assert MARKER_PREFIX not in refused.text
        where_made = http.get("/a/SIGN", headers={"SIGN-IN-WITH-X": header})
    assert where_made.status_code == 200 and where_made.headers.get("x402gw-reaccess"), where_made.text
    assert rec.count("page_b") == calls and devchain.balance(PAY_TO) == payee


def test_expired_or_premature_sign_ins_and_payments_that_did_not_settle_open_nothing(
    gw: RunningGateway, devchain: Devchain, rec: RecordingUpstream,
) -> None:
    payer = Account.from_key(devchain.key(8))
    paid = _pay_exact(gw, devchain, 8, "/a/TIME")
    calls, payee = rec.count("page_a"), devchain.balance(PAY_TO)
    now = datetime.now(UTC)
    stamp = lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")  # noqa: E731
    cases = {
        "expired": {"issuedAt": stamp(now - timedelta(minutes=2)), "expirationTime": stamp(now - timedelta(minutes=1))},
        "not yet valid": {"notBefore": stamp(now + timedelta(minutes=3))},
        "issued in the future": {"issuedAt": stamp(now + timedelta(minutes=10)), "expirationTime": stamp(now + timedelta(minutes=12))},
    }
    with gw.client() as http:
        for label, changes in cases.items():
            response = http.get("/a/TIME", headers={"SIGN-IN-WITH-X": _sign_in(gw, "/a/TIME", payer, **changes)})
            assert response.status_code == 402 and response.json()["error"].startswith("invalid_siwx"), (label, response.text)
        # ERC-6492: the allow-listed factory deploys the attacker's own wallet (which accepts the
        # attacker's key), wrapped around a sign-in that names the victim EOA that paid.
        attacker, factory = Account.create(), devchain.deployment.wallet_factory
        assert factory is not None
        info = sign_in_challenge(http.get("/a/TIME"))
        inner = attacker.sign_message(encode_defunct(text=create_siwx_message(info, payer.address))).signature
        deploy = selector("createAccount(address,uint256)") + abi_encode(["address", "uint256"], [attacker.address, 1])
        wrapped = abi_encode(["address", "bytes", "bytes"], [factory, deploy, bytes(inner)]) + ERC6492_MAGIC_VALUE
        forged = encode_siwx_header(SIWxPayload.model_validate({**info, "address": payer.address, "signature": "0x" + wrapped.hex()}))
        response = http.get("/a/TIME", headers={"SIGN-IN-WITH-X": forged})
        assert response.status_code == 402 and response.json()["error"] == "invalid_siwx_signature", response.text
        [row] = [r for r in gw.ledger.all() if r.tool == "page_a"]
        for state in (PaymentState.VOIDED, PaymentState.FAILED, PaymentState.PENDING, PaymentState.SETTLING):
            with gw.ledger.engine.begin() as connection:
                connection.execute(update(Payment).where(Payment.id == row.id).values(state=state.value))
            response = http.get("/a/TIME", headers={"SIGN-IN-WITH-X": _sign_in(gw, "/a/TIME", payer)})
            assert response.status_code == 402 and response.json()["error"] == "reaccess_not_paid", (state, response.text)
        with gw.ledger.engine.begin() as connection:
            connection.execute(update(Payment).where(Payment.id == row.id).values(state=PaymentState.SETTLED.value))
        good = http.get("/a/TIME", headers={"SIGN-IN-WITH-X": _sign_in(gw, "/a/TIME", payer)})
    assert good.status_code == 200 and good.content == paid.content, good.text
    assert rec.count("page_a") == calls and devchain.balance(PAY_TO) == payee
