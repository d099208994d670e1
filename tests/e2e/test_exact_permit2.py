"""x402 ``exact`` for an ERC-20 without EIP-3009, through Permit2, on anvil: the dev chain's plain token
(``contracts/PlainToken.sol``), Permit2 and the x402 exact proxy at their canonical addresses. The
official x402 SDK's exact client pays it (the offer's ``extra.assetTransferMethod`` is ``permit2``);
ledger, chain and upstream calls agree (``tests/support/invariant.py``). Attacks beside it: one field
of a valid payment changed at a time, payments validly signed over other terms, the nonce replayed
after settlement (through the gateway and on chain by someone else), a junk signature. And the start
refusals: a token without EIP-3009 where no Permit2 path is served (``no_payment_path``)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from x402 import x402Client
from x402.http import x402HTTPClient
from x402.http.clients.httpx import x402AsyncTransport
from x402.mechanisms.evm.exact import ExactEvmClientScheme
from x402.schemas import PaymentRequired as SdkPaymentRequired

from catalog import load_catalogs
from gateway.app import create_app
from gateway.errors import GatewayConfigError
from gateway.ops.doctor import NetworkPlan, Offer
from gateway.ops.doctor.chain_checks import check_token
from gateway.ops.doctor.rpc import RpcReader
from gateway.settings import Settings
from settlement.ledger import PaymentState
from settlement.schemes.exact_permit2_payload import EXACT_PROXY_ADDRESS, parse_exact_permit2
from settlement.schemes.upto_permit import UPTO_PROXY_ADDRESS
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway
from tests.e2e.test_reconcile import run_reconcile
from tests.support.invariant import InvariantChecker
from tests.support.recording_upstream import RecordingUpstream

PRICE = 2_500  # 0.0025 PUSD
CATALOG = """
catalog: 1
owner: acme-plain
payment:
  network: "eip155:31337"
  asset: "{token}"
  asset_name: "Plain Dollar"
  asset_transfer_method: {method}{version}
  decimals: 6
  pay_to: "{pay_to}"
  max_timeout_seconds: 120
upstreams:
  rec: {{base_url: "{upstream}", timeout_seconds: 5}}
tools:
  - name: plain_quote
    description: A quote paid in a token without EIP-3009.
    method: GET
    path: /q/{{symbol}}
    upstream: rec
    upstream_path: /u/plain_quote/{{symbol}}
    price: "0.0025"
    input_schema:
      type: object
      properties: {{symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}}}
      required: [symbol]
"""




def _catalog(devchain: Devchain, upstream: str, tmp_path: Path, method: str = "permit2") -> Path:
    assert devchain.deployment.plain_token is not None
    path = tmp_path / f"plain-{method}.yaml"
    path.write_text(CATALOG.format(token=devchain.deployment.plain_token.address, pay_to=PAY_TO, upstream=upstream, method=method,
                                 version="" if method == "permit2" else '\n  asset_version: "1"'))
    return path


def _setup(
    start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> tuple[RunningGateway, InvariantChecker, Callable[[str], int]]:
    gateway = start_gateway(_catalog(devchain, recording.url, tmp_path))
    token = gateway.catalogs.tools[0].payment.asset
    checker = InvariantChecker(chain=devchain, ledger=gateway.ledger, upstream=recording, catalogs=gateway.catalogs,
                               pay_to=PAY_TO, asset=token)
    return gateway, checker, checker._balance


def _client(devchain: Devchain, payer: int) -> x402Client:
    assert devchain.deployment.plain_token is not None
    client = x402Client()
    client.register("eip155:31337", ExactEvmClientScheme(Account.from_key(devchain.key(payer))))
    client.set_spend_controls({"allowed_assets": [{"network": "eip155:31337", "asset": devchain.deployment.plain_token.address}]})
    return client


def _offer(gateway: RunningGateway, path: str = "/q/ACME") -> dict[str, Any]:
    with gateway.client() as http:
        response = http.get(path)
    assert response.status_code == 402, response.text
    required: dict[str, Any] = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    return required


def _signed(devchain: Devchain, payer: int, required: dict[str, Any]) -> dict[str, Any]:
    """The SDK exact client's payment for ``required`` (its first offer), as JSON."""
    payload = asyncio.run(_client(devchain, payer).create_payment_payload(SdkPaymentRequired.model_validate(required)))
    signed: dict[str, Any] = payload.model_dump(mode="json", by_alias=True, exclude_none=True)
    return signed


def _header(payment: dict[str, Any]) -> dict[str, str]:
    return {"PAYMENT-SIGNATURE": base64.b64encode(json.dumps(payment).encode()).decode()}


def _resigned(devchain: Devchain, payer: int, payment: dict[str, Any], change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    """``payment`` with its Permit2 authorization changed by ``change`` and signed again by the payer:
    a valid signature over terms the offer did not ask for."""
    forged = copy.deepcopy(payment)
    change(forged["payload"]["permit2Authorization"])
    permit = parse_exact_permit2(forged["payload"])
    assert permit is not None
    signature = Account.from_key(devchain.key(payer)).unsafe_sign_hash(permit.digest(31337)).signature
    forged["payload"]["signature"] = "0x" + bytes(signature).hex()
    return forged


def test_sdk_exact_client_pays_a_plain_token_through_permit2(
    start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    gateway, checker, balance = _setup(start_gateway, devchain, recording, tmp_path)
    [accept] = _offer(gateway)["accepts"]
    extra = {k: v for k, v in accept["extra"].items() if k != "requestBinding"}
    assert (accept["scheme"], accept["amount"], extra) == (
        "exact", str(PRICE), {"name": "Plain Dollar", "assetTransferMethod": "permit2"})  # no EIP-712 version
    with gateway.client() as http:  # discovery says so too
        [entry] = http.get("/tools").json()["tools"]
        assert "permit2" in http.get("/llms.txt").text
    assert (entry["scheme"], entry["assetTransferMethod"], entry["priceAtomic"]) == ("exact", "permit2", str(PRICE))
    payer = devchain.address(2)
    before = (balance(payer), balance(PAY_TO))
    start = devchain.w3.eth.block_number + 1

    sent: list[httpx.Request] = []

    class Keeping(httpx.AsyncHTTPTransport):  # under the SDK's transport: sees its paid retry
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            sent.append(request)
            return await super().handle_async_request(request)

    async def call() -> tuple[httpx.Response, Any]:
        async with httpx.AsyncClient(transport=x402AsyncTransport(_client(devchain, 2), Keeping()), timeout=30) as http:
            response = await http.get(f"{gateway.url}/q/ACME")
            return response, x402HTTPClient(_client(devchain, 2)).get_payment_settle_response(response.headers.get)

    response, settle = asyncio.run(call())
    assert response.status_code == 200 and settle.success and settle.transaction.startswith("0x"), response.text
    assert [r.headers.get("payment-signature") is not None for r in sent] == [False, True]  # the 402, then paid
    response.request = sent[-1]
    checker.record(response, "sdk")
    [row] = gateway.ledger.all()
    assert (row.state, row.amount, row.payer, row.tx_hash) == (PaymentState.SETTLED, PRICE, payer, settle.transaction)
    receipt = devchain.w3.eth.get_transaction_receipt(settle.transaction)  # type: ignore[arg-type]
    assert row.gas_used == receipt["gasUsed"] and row.gas_cost == receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert (before[0] - balance(payer), balance(PAY_TO) - before[1]) == (PRICE, PRICE)
    checker.check()  # one settled row, its Permit2 nonce spent, its Transfer in its transaction, one upstream call
    code, report = run_reconcile(gateway, start)  # the row's own transaction moved its amount: the books agree
    assert code == 0, report
    assert (report["matched"], report["missing_on_chain"], report["amount_mismatch"]) == (1, [], [])


def test_a_changed_field_or_junk_signature_is_refused_with_nothing_moved(
    start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    gateway, checker, _ = _setup(start_gateway, devchain, recording, tmp_path)
    good = _signed(devchain, 4, _offer(gateway))
    usdc = devchain.token
    changes: dict[str, Callable[[dict[str, Any]], object]] = {
        "amount": lambda a: a["permitted"].update(amount=str(PRICE - 1)),
        "to": lambda a: a["witness"].update(to=devchain.address(4)),
        "token": lambda a: a["permitted"].update(token=usdc),
        "spender": lambda a: a.update(spender=UPTO_PROXY_ADDRESS),
        "deadline": lambda a: a.update(deadline="1"),
    }
    expected: list[str] = []
    with gateway.client() as http:
        for name, change in changes.items():  # as sent: the signature no longer covers it, refused offline
            bad = copy.deepcopy(good)
            change(bad["payload"]["permit2Authorization"])
            checker.send(http, "GET", "/q/ACME", label=f"changed {name}", headers=_header(bad))
            expected.append("invalid_permit2_signature")
        for name, change in changes.items():  # signed again by the payer: refused by verify, on its terms
            checker.send(http, "GET", "/q/ACME", label=f"signed {name}", headers=_header(_resigned(devchain, 4, good, change)))
        expected += ["permit2_amount_mismatch", "invalid_permit2_recipient_mismatch", "permit2_token_mismatch",
                     "invalid_permit2_spender", "permit2_deadline_expired"]
        junk = copy.deepcopy(good)
        junk["payload"]["signature"] = "0x" + "11" * 64 + "1b"
        checker.send(http, "GET", "/q/ACME", label="junk signature", headers=_header(junk))
        expected.append("invalid_permit2_signature")
    assert [(e.status, json.loads(e.content)["error"]) for e in checker.exchanges] == [(402, code) for code in expected]
    assert gateway.ledger.all() == [] and recording.count("plain_quote", checker.upstream_since) == 0
    checker.check()  # no 2xx, no upstream call, the payee's balance unchanged


def test_a_settled_nonce_is_never_paid_twice(
    start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    gateway, checker, balance = _setup(start_gateway, devchain, recording, tmp_path)
    payment = _signed(devchain, 5, _offer(gateway))
    with gateway.client() as http:
        first = checker.send(http, "GET", "/q/ACME", label="paid", headers=_header(payment))
        again = checker.send(http, "GET", "/q/ACME", label="resent", headers=_header(payment))
        elsewhere = checker.send(http, "GET", "/q/OTHER", label="another request", headers=_header(payment))
    assert first.status_code == 200 and again.status_code == 200 and again.headers["x402gw-replay"] == "true"
    assert elsewhere.status_code in (402, 409) and not elsewhere.is_success, elsewhere.text
    # A payment whose nonce someone else spent on chain (the proxy takes anyone's transaction) first:
    fresh = _signed(devchain, 5, _offer(gateway))
    permit = parse_exact_permit2(fresh["payload"])
    assert permit is not None
    outsider = Account.from_key(devchain.key(6))
    tx = {"to": EXACT_PROXY_ADDRESS, "data": "0x" + permit.settle_calldata().hex(), "gas": 300_000, "chainId": 31337,
          "nonce": devchain.w3.eth.get_transaction_count(outsider.address), "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 1}
    sent = devchain.w3.eth.send_raw_transaction(outsider.sign_transaction(tx).raw_transaction)
    assert devchain.w3.eth.wait_for_transaction_receipt(sent)["status"] == 1
    checker.note_external_payee_credit(PRICE)
    with gateway.client() as http:
        spent = checker.send(http, "GET", "/q/ACME", label="spent on chain", headers=_header(fresh))
    assert (spent.status_code, spent.json()["error"]) == (402, "permit2_nonce_used"), spent.text
    assert [r.state for r in gateway.ledger.all()] == [PaymentState.SETTLED]
    assert recording.count("plain_quote", checker.upstream_since) == 1
    checker.check()
    assert balance(PAY_TO) - checker.pay_to_before == 2 * PRICE  # the one paid call, and the outsider's


def test_a_token_without_eip3009_and_no_permit2_path_is_refused_at_start(
    devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    without = tmp_path / "no-permit2.json"
    without.write_text(devchain.deployment.model_copy(update={"exact_proxy": None}).model_dump_json())

    def settings(method: str, deployment: Path) -> Settings:
        return Settings(catalog=[_catalog(devchain, recording.url, tmp_path, method)], deployment_file=deployment,
                        database_url=f"sqlite:///{tmp_path / 'ledger.sqlite3'}")

    async def start(app: Any) -> None:
        async with app.router.lifespan_context(app):
            pass

    declared = settings("permit2", without)  # declared Permit2, none here: refused as the app is built
    with pytest.raises(GatewayConfigError) as built:
        create_app(declared, catalogs=load_catalogs(declared.catalog))
    assert built.value.code == "no_payment_path" and "Permit2" in built.value.message
    for deployment, code in ((without, "no_payment_path"), (devchain.deployment_file, "asset_not_eip3009")):
        plain = settings("eip3009", deployment)  # no method declared: the start-up probe finds no EIP-3009
        with pytest.raises(GatewayConfigError) as probed:
            asyncio.run(start(create_app(plain, catalogs=load_catalogs(plain.catalog))))
        assert probed.value.code == code, probed.value.message
    assert "asset_transfer_method: permit2" in probed.value.message  # where the path exists, it says how


def test_a_permit2_offer_beside_a_usdc_one_is_paid_as_chosen(
    start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    assert devchain.deployment.plain_token is not None
    plain = devchain.deployment.plain_token.address
    text = CATALOG.format(token=devchain.token, pay_to=PAY_TO, upstream=recording.url, method="eip3009",
                          version='\n  asset_version: "2"').replace('"Plain Dollar"', '"USD Coin"')
    text = text.replace('    price: "0.0025"\n', f'    price: "0.0025"\n    offers:\n      - {{asset: "{plain}", '
                        'asset_name: "Plain Dollar", decimals: 6, asset_transfer_method: permit2, price: "0.003"}\n')
    path = tmp_path / "two-offers.yaml"
    path.write_text(text)
    gateway = start_gateway(path)
    usdc, pusd = _offer(gateway)["accepts"]
    assert (usdc["asset"], "assetTransferMethod" in usdc["extra"]) == (devchain.token, False)
    assert (pusd["asset"], pusd["amount"], pusd["extra"]["assetTransferMethod"]) == (plain, "3000", "permit2")
    checker = InvariantChecker(chain=devchain, ledger=gateway.ledger, upstream=recording, catalogs=gateway.catalogs,
                               pay_to=PAY_TO, asset=plain)
    before = (checker._balance(devchain.address(7)), devchain.balance(devchain.address(7)))
    with gateway.client() as http:  # the SDK client allowed only the plain token picks its offer
        paid = checker.send(http, "GET", "/q/ACME", label="pusd", headers=_header(_signed(devchain, 7, _offer(gateway))))
    assert paid.status_code == 200, paid.text
    [row] = gateway.ledger.all()
    assert (row.asset, row.amount, row.state) == (plain, 3000, PaymentState.SETTLED)
    assert (before[0] - checker._balance(devchain.address(7)), devchain.balance(devchain.address(7))) == (3000, before[1])
    checker.check()


def test_the_doctor_checks_a_permit2_token_by_its_decimals(devchain: Devchain) -> None:
    assert devchain.deployment.plain_token is not None
    plan = NetworkPlan("eip155:31337", 31337, (devchain.anvil.rpc_url,), ("local",))

    async def findings(decimals: int) -> list[tuple[str, str]]:
        offer = Offer("eip155:31337", devchain.deployment.plain_token.address, "Plain Dollar", None, decimals, ("plain_quote",))
        async with httpx.AsyncClient() as client:
            return [(f.status, f.code) for f in await check_token(plan, offer, RpcReader(client, devchain.anvil.rpc_url))]

    # No EIP-712 domain to compare (it has none): its decimals, right or wrong.
    assert asyncio.run(findings(6)) == [("ok", "ok")]
    assert asyncio.run(findings(18)) == [("fail", "asset_decimals_mismatch")]


def test_one_payment_raced_twice_settles_once(
    start_gateway: GatewayFactory, devchain: Devchain, recording: RecordingUpstream, tmp_path: Path,
) -> None:
    gateway, checker, balance = _setup(start_gateway, devchain, recording, tmp_path)
    header = _header(_signed(devchain, 8, _offer(gateway)))
    before = balance(devchain.address(8))

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            return list(await asyncio.gather(*(http.get("/q/ACME", headers=header) for _ in range(3))))

    responses = [checker.record(r, "raced") for r in asyncio.run(race())]
    assert 200 in [r.status_code for r in responses], [r.text for r in responses]
    assert all(r.status_code in (200, 409) for r in responses), [r.text for r in responses]
    assert [r.state for r in gateway.ledger.all()] == [PaymentState.SETTLED]
    assert before - balance(devchain.address(8)) == PRICE
    checker.check()  # one fresh 2xx (the others replays or 409), one upstream call, payee +PRICE
