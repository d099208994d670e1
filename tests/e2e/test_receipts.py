"""Signed receipts end to end (issue 21 item 1): a real gateway on loopback, anvil, the sample upstream.

A settled call's answer carries ``X402GW-Receipt`` signed by the receipt key published in
``/.well-known/x402``; the payer fetches the same receipt later with a personal_sign of its wallet;
another wallet, a replayed or an expired signature gets nothing; an unsettled payment has none;
``x402gw receipt verify`` checks one offline.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from eth_account import Account
from eth_account.messages import encode_defunct
from pydantic import SecretStr

from gateway.cli.main import main
from gateway.errors import GatewayConfigError
from gateway.protocol.receipts import decode_signed_receipt
from gateway.surfaces.receipts import DEV_RECEIPT_KEY, challenge_message, receipt_signer
from settlement.chain.deployment import ANVIL_KEYS
from settlement.finance.receipts import recover_receipt_signer
from settlement.ledger import PaymentState
from settlement.schema import open_ledger
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, body_json
from tests.e2e.test_doctor import LOCAL, catalog, doctor, environment, failures, fresh_key
from tests.e2e.test_mcp import pay_over_mcp, with_session
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.facilitator_double import closed_port_url

PAYER = 5
OTHER = 6
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def signer_of(client: httpx.Client) -> str:
    receipts = client.get("/.well-known/x402").json()["receipts"]
    assert receipts["format"] == "eip712" and receipts["retrieve"].endswith("/receipts/{paymentId}")
    return str(receipts["signer"])


def fetch(client: httpx.Client, key: str, signer: str, payment_id: int | str, *, at: int | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    timestamp = int(time.time()) if at is None else at
    message = encode_defunct(text=challenge_message(signer, payment_id, timestamp))
    signature = "0x" + bytes(Account.sign_message(message, key).signature).hex()
    auth = headers or {"X402GW-Receipt-Time": str(timestamp), "X402GW-Receipt-Signature": signature}
    return client.get(f"/receipts/{payment_id}", headers=auth)


def test_a_settled_call_carries_a_receipt_the_payer_fetches_again(
    gateway: RunningGateway, devchain: Devchain, tmp_path: Path
) -> None:
    payer = devchain.address(PAYER)
    with gateway.client() as client:
        signer = signer_of(client)
        _, paid, header = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
        assert paid.status_code == 200, paid.text
        receipt = decode_signed_receipt(paid.headers["x402gw-receipt"])
        # A resend of the same payment replays the stored answer with the same receipt.
        replay = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": header})
        assert replay.headers["x402gw-replay"] == "true"
        assert replay.headers["x402gw-receipt"] == paid.headers["x402gw-receipt"]
        [row] = gateway.ledger.all()
        assert signer == Account.from_key(DEV_RECEIPT_KEY).address
        assert recover_receipt_signer(receipt) == signer
        tx = receipt_of(paid).transaction
        assert receipt["payload"] | {"issuedAt": 0, "requestId": ""} == {
            "network": "eip155:31337", "resourceUrl": "/quotes/AAPL", "payer": payer, "payTo": PAY_TO,
            "asset": devchain.token, "amount": "2000", "maxAmount": "2000", "transaction": tx,
            "blockNumber": row.block_number, "tool": "get_quote", "method": "GET",
            "argumentsDigest": row.fingerprint, "paymentId": row.id, "issuedAt": 0, "requestId": "",
        }
        assert receipt["payload"]["requestId"] == paid.headers["x-request-id"] == row.request_id
        assert row.block_number and devchain.w3.eth.get_transaction_receipt(tx)["blockNumber"] == row.block_number
        # Later (another call in between), the payer fetches the very same receipt.
        pay(client, devchain, "GET", "/quotes/MSFT", payer=PAYER)
        again = fetch(client, devchain.key(PAYER), signer, row.id)
    assert again.status_code == 200, again.text
    assert again.headers["cache-control"] == "private, no-store"
    assert again.json() == receipt
    # By the settlement transaction, too: the payer's receipts in it; another wallet's: nothing.
    with gateway.client() as client:
        by_tx = fetch(client, devchain.key(PAYER), signer, tx)
        not_theirs = fetch(client, devchain.key(OTHER), signer, tx)
    assert by_tx.status_code == 200 and by_tx.json() == {"receipts": [receipt]}
    assert (not_theirs.status_code, body_json(not_theirs)["error"]) == (404, "receipt_not_found")
    # Exported from the ledger: the same bytes, one line per settled payment (both of this payer's).
    exported = CliRunner().invoke(main, ["receipt", "export", "--database-url", gateway.settings.database_url,
                                         "--payer", payer.lower()])
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["paymentId"] for line in lines] == [row.id, row.id + 1]
    assert lines[0]["receipt"] == receipt and recover_receipt_signer(lines[1]["receipt"]) == signer
    # Offline: valid against the published signer (exit 0, fields printed), invalid otherwise.
    path = tmp_path / "receipt.json"
    path.write_text(json.dumps(receipt))
    runner = CliRunner()
    ok = runner.invoke(main, ["receipt", "verify", str(path), "--signer", signer])
    assert ok.exit_code == 0, ok.output
    assert f"valid: signed by {signer}" in ok.output and tx in ok.output and "get_quote" in ok.output
    header_file = tmp_path / "receipt.b64"
    header_file.write_text(paid.headers["x402gw-receipt"])
    assert runner.invoke(main, ["receipt", "verify", str(header_file), "--signer", signer]).exit_code == 0
    wrong_signer = runner.invoke(main, ["receipt", "verify", str(path), "--signer", devchain.address(OTHER)])
    assert wrong_signer.exit_code == 1 and "receipt_signer_mismatch" in wrong_signer.output
    path.write_text(json.dumps({**receipt, "payload": {**receipt["payload"], "amount": "1"}}))
    tampered = runner.invoke(main, ["receipt", "verify", str(path), "--signer", signer])
    assert tampered.exit_code == 1 and "invalid" in tampered.output
    path.write_text("not a receipt")
    assert runner.invoke(main, ["receipt", "verify", str(path), "--signer", signer]).exit_code == 2


def test_only_the_payer_gets_a_receipt_once_per_signature_within_the_skew(
    gateway: RunningGateway, devchain: Devchain
) -> None:
    with gateway.client() as client:
        signer = signer_of(client)
        _, paid, _ = pay(client, devchain, "GET", "/quotes/IBM", payer=PAYER)
        assert paid.status_code == 200
        [row] = gateway.ledger.all()
        # Another wallet, signing for this payment: nothing, and no hint that it exists.
        other = fetch(client, devchain.key(OTHER), signer, row.id)
        missing = fetch(client, devchain.key(OTHER), signer, 999_999)
        assert (other.status_code, body_json(other)["error"]) == (404, "receipt_not_found")
        assert body_json(other)["message"] == body_json(missing)["message"]
        # The payer's signature for another payment id (or another gateway) does not open this one.
        timestamp = int(time.time())
        for_other_id = encode_defunct(text=challenge_message(signer, row.id + 1, timestamp))
        signature = "0x" + bytes(Account.sign_message(for_other_id, devchain.key(PAYER)).signature).hex()
        moved = fetch(client, devchain.key(PAYER), signer, row.id,
                      headers={"X402GW-Receipt-Time": str(timestamp), "X402GW-Receipt-Signature": signature})
        assert (moved.status_code, body_json(moved)["error"]) == (404, "receipt_not_found")
        # The payer's own: once. The same headers again are refused.
        message = encode_defunct(text=challenge_message(signer, row.id, timestamp))
        own = {"X402GW-Receipt-Time": str(timestamp),
               "X402GW-Receipt-Signature": "0x" + bytes(Account.sign_message(message, devchain.key(PAYER)).signature).hex()}
        assert fetch(client, devchain.key(PAYER), signer, row.id, headers=own).status_code == 200
        replayed = fetch(client, devchain.key(PAYER), signer, row.id, headers=own)
        assert (replayed.status_code, body_json(replayed)["error"]) == (401, "receipt_auth_replayed")
        # The same signature re-encoded (s -> n - s, v flipped) is still the same signed message.
        raw = bytes.fromhex(own["X402GW-Receipt-Signature"][2:])
        r, high_s, v = raw[:32], SECP256K1_N - int.from_bytes(raw[32:64], "big"), raw[64]
        malleated = "0x" + (r + high_s.to_bytes(32, "big") + bytes([55 - v])).hex()
        assert Account.recover_message(message, signature=malleated) == devchain.address(PAYER)
        twin = fetch(client, devchain.key(PAYER), signer, row.id,
                     headers={**own, "X402GW-Receipt-Signature": malleated})
        assert (twin.status_code, body_json(twin)["error"]) == (401, "receipt_auth_replayed")
        # Signed too long ago, or in the future: expired, whoever signed.
        old = fetch(client, devchain.key(PAYER), signer, row.id, at=int(time.time()) - 301 - 60)
        ahead = fetch(client, devchain.key(PAYER), signer, row.id, at=int(time.time()) + 301 + 60)
        assert (old.status_code, body_json(old)["error"]) == (401, "receipt_auth_expired")
        assert body_json(ahead)["error"] == "receipt_auth_expired"
        # No or malformed headers: told what to sign.
        bare = client.get(f"/receipts/{row.id}")
        assert (bare.status_code, body_json(bare)["error"]) == (401, "receipt_auth_invalid")
        assert body_json(bare)["messageTemplate"] == challenge_message(signer, row.id, "{unixSeconds}")
        junk = fetch(client, devchain.key(PAYER), signer, row.id,
                     headers={"X402GW-Receipt-Time": str(timestamp), "X402GW-Receipt-Signature": "0x" + "00" * 65})
        assert (junk.status_code, body_json(junk)["error"]) == (401, "receipt_auth_invalid")


def test_no_receipt_for_an_unsettled_payment(gateway: RunningGateway, devchain: Devchain) -> None:
    with gateway.client() as client:
        signer = signer_of(client)
        _, paid, _ = pay(client, devchain, "GET", "/reports/500", payer=PAYER)
        assert paid.status_code == 500
        assert "x402gw-receipt" not in paid.headers
        [row] = gateway.ledger.all()
        assert row.state == PaymentState.VOIDED
        refused = fetch(client, devchain.key(PAYER), signer, row.id)
    assert (refused.status_code, body_json(refused)["error"]) == (409, "receipt_not_settled")


def test_the_receipt_key_from_settings_and_dev_keys_only_on_the_local_chain(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path
) -> None:
    own_key = "0x" + "5a" * 32
    key_file = tmp_path / "receipt.key"
    key_file.write_text(own_key + "\n")
    gateway = start_gateway(receipt_key_file=key_file)
    with gateway.client() as client:
        assert signer_of(client) == Account.from_key(own_key).address
        _, paid, _ = pay(client, devchain, "GET", "/quotes/AAPL", payer=PAYER)
    assert recover_receipt_signer(decode_signed_receipt(paid.headers["x402gw-receipt"])) == Account.from_key(own_key).address
    assert own_key not in repr(gateway.settings) and "5a5a5a" not in str(gateway.settings.model_dump())
    # Off the local chain: a dev key refuses to start, no key means no receipts (nothing published).
    settings = gateway.settings.model_copy(update={"receipt_key": None})
    assert receipt_signer(settings, {"eip155:84532"}) is None
    with pytest.raises(GatewayConfigError) as refused:
        receipt_signer(gateway.settings.model_copy(update={"receipt_key": SecretStr(ANVIL_KEYS[3])}),
                       {"eip155:31337", "eip155:8453"})
    assert refused.value.code == "dev_key_on_public_chain"


def test_a_paid_mcp_call_carries_the_signed_receipt_in_meta(gateway: RunningGateway, devchain: Devchain) -> None:
    _, paid, _ = with_session(gateway, lambda s: pay_over_mcp(s, devchain, "get_quote", {"symbol": "AAPL"}, payer=PAYER))
    assert not paid.is_error and paid.meta is not None
    receipt = paid.meta["x402gw/receipt"]
    [row] = gateway.ledger.all()
    assert receipt["payload"]["paymentId"] == row.id and receipt["payload"]["transaction"] == row.tx_hash
    with gateway.client() as client:
        assert recover_receipt_signer(receipt) == signer_of(client)


def test_the_doctor_refuses_a_dev_receipt_key_off_the_local_chain(tmp_path: Path, devchain: Devchain) -> None:
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    open_ledger(ledger_url).close()
    public = environment(tmp_path, devchain, ledger_url, X402GW_CATALOG=str(catalog(tmp_path, **{LOCAL: "eip155:84532"})),
                         X402GW_RPC_URLS=json.dumps({"eip155:84532": closed_port_url()}),
                         X402GW_SETTLEMENT_KEY=fresh_key(), X402GW_RECEIPT_KEY=ANVIL_KEYS[3])
    status, report = doctor(public)
    dev = [f for f in report["findings"] if f["code"] == "dev_key_on_public_chain"]
    assert status == 1 and [("receipt key" in f["message"], "X402GW_RECEIPT_KEY" in f["fix"]) for f in dev] == [(True, True)]
    assert ANVIL_KEYS[3].removeprefix("0x") not in json.dumps(report)
    # On the local chain alone, the same key is fine.
    _, local = doctor(environment(tmp_path, devchain, ledger_url, X402GW_RECEIPT_KEY=ANVIL_KEYS[3]))
    assert "dev_key_on_public_chain" not in failures(local)
