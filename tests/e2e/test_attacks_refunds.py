"""Attacks on the refunds owed to payers, against a real anvil and gateway: the running gateway and
``x402gw ledger refunds --pay`` share the refund account, interleave with each other and with a
refund still in flight. Each test asserts the payer's balance on chain and the ledger row."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from eth_account import Account

from gateway.cli.main import main
from settlement.chain.client import SEL_TRANSFER
from settlement.ledger import Payment
from tests.conftest import PAY_TO, Devchain, GatewayFactory, RunningGateway, demo_catalog, upstream_hits
from tests.e2e.test_exactly_once import UPFRONT_TOOL, signed
from tests.e2e.test_ledger_refunds import PAYER, REFUND, age_claim, env_of, run_refunds, send_refund_transfer
from tests.e2e.test_paid_call import receipt_of

pytestmark = pytest.mark.e2e

FAILING = "/paid-first/reports/500"  # an upfront tool whose upstream fails: a refund is owed


def owe_one(gateway: RunningGateway, devchain: Devchain) -> tuple[str, Payment]:
    """One paid call whose upstream fails; its refund header and its ledger row."""
    with gateway.client() as client:
        header = signed(client, devchain, FAILING, payer=PAYER)
        failed = client.get(FAILING, headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 500 and receipt_of(failed).success
    settled = receipt_of(failed).transaction
    row = next(r for r in gateway.ledger.all() if r.tx_hash == settled)
    return failed.headers["x402gw-refund"], row


def upfront_gateway(start_gateway: GatewayFactory, tmp_path: Path, upstream: str, tool: str = UPFRONT_TOOL,
                    **overrides: Any) -> RunningGateway:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + tool)
    return start_gateway(catalog=catalog, **overrides)


NOT_THERE = "/paid-first/reports/404"  # a report that does not exist: the upstream answers 404


def ask_for_what_is_not_there(gateway: RunningGateway, devchain: Devchain, times: int, resend: bool = False) -> list[httpx.Response]:
    """``times`` paid calls for a report that does not exist; with ``resend``, each payment sent twice."""
    answers = []
    with gateway.client() as client:
        for _ in range(times):
            header = signed(client, devchain, NOT_THERE, payer=PAYER)
            for _ in range(2 if resend else 1):
                answers.append(client.get(NOT_THERE, headers={"PAYMENT-SIGNATURE": header}))
    return answers


def test_a_payer_asking_for_what_is_not_there_cannot_make_the_gateway_spend_gas_on_refunds(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """Every 404 of an upfront tool used to be refunded: the payer got its price back and the gateway
    paid the refund's gas, so a griefer could drain the refund account for free, call after call. The
    caller's own failed request now stays charged (``refund_on: upstream_fault``, the default): no
    refund transaction, the refund account's ETH and nonce untouched, each row settled with its 404."""
    gateway = upfront_gateway(start_gateway, tmp_path, upstream, refund_key=devchain.key(9))
    eth = devchain.w3.eth
    payer, refunder = devchain.address(PAYER), devchain.address(9)
    payer_before, nonce_before, gas_before = devchain.balance(payer), eth.get_transaction_count(refunder), eth.get_balance(refunder)
    answers = ask_for_what_is_not_there(gateway, devchain, 3, resend=True)
    for first, again in zip(answers[::2], answers[1::2], strict=True):
        assert first.status_code == 404 and receipt_of(first).success, first.text
        assert first.headers["x402gw-refund"] == "none" and "x402gw-replay" not in first.headers
        assert first.json()["error"] == "upstream_client_error" and "nothing was charged" not in first.text
        # The same payment again: its stored answer, not "answer lost, refund owed" (the drain, one request later)
        assert again.status_code == 404 and again.headers["x402gw-replay"] == "true", again.text
        assert again.headers["x402gw-refund"] == "none" and again.json() == first.json()
    assert eth.get_transaction_count(refunder) == nonce_before and eth.get_balance(refunder) == gas_before
    assert devchain.balance(payer) == payer_before - 3 * REFUND  # charged: the upstream served the request it got
    rows = [r for r in gateway.ledger.all() if r.path == NOT_THERE]
    assert len(rows) == 3 and {(r.state, r.upstream_status, r.refund_owed) for r in rows} == {("settled", 404, None)}
    assert upstream_hits(upstream, "GET /reports/404") == 3


def test_refund_on_any_failure_refunds_the_callers_failed_requests_too(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """An owner who wants every failed call refunded says so (and pays that gas)."""
    tool = UPFRONT_TOOL + "    refund_on: any_failure\n"
    gateway = upfront_gateway(start_gateway, tmp_path, upstream, tool, refund_key=devchain.key(9))
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    [answer] = ask_for_what_is_not_there(gateway, devchain, 1)
    assert answer.status_code == 404 and answer.headers["x402gw-refund"].startswith("refunded 0x"), answer.headers
    assert devchain.balance(payer) == before
    [row] = [r for r in gateway.ledger.all() if r.path == NOT_THERE]
    assert row.refund_owed == REFUND and row.refunded_at is not None and row.refund_reason == "upstream_error"


def test_the_gateway_pays_a_refund_after_the_command_used_the_same_refund_account(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """The command (or anyone) sent from the refund account since the gateway last did: the
    gateway's next refund is refused for its stale nonce and signed again on a fresh one. The second
    signature's claim replaces the first (which can never land): the refund is paid, not left holding
    a hash that was never sent (``unknown``, for a person to sort out)."""
    gateway = upfront_gateway(start_gateway, tmp_path, upstream, refund_key=devchain.key(9))
    payer = devchain.address(PAYER)
    first, _ = owe_one(gateway, devchain)
    assert first.startswith("refunded 0x")  # the gateway's refund lane now counts the account's nonces
    send_refund_transfer(devchain, devchain.address(3), 1)  # another sender on the refund account
    before = devchain.balance(payer)

    refund, row = owe_one(gateway, devchain)

    assert refund.startswith("refunded 0x"), refund
    assert devchain.balance(payer) == before - REFUND + REFUND  # charged, then paid back: once
    row = gateway.ledger.get(row.id) or row
    assert row.refunded_at is not None and row.refund_tx == refund.split()[1]
    assert devchain.w3.eth.get_transaction_receipt(row.refund_tx)["status"] == 1


def test_include_unknown_never_pays_over_a_refund_still_being_sent(
    owed_with_spare_key: tuple[RunningGateway, Payment, str], devchain: Devchain
) -> None:
    """The gateway claimed the refund (its hash recorded) and is about to broadcast it: the node does
    not know it yet. ``--include-unknown`` must not pay it again then: the gateway's transaction lands
    a moment later. Here the refund is sent from another account than the command's (a refund key
    rotated while the gateway runs, say), so no shared nonce saves the payer from a second refund."""
    gateway, row, command_key = owed_with_spare_key
    payer = devchain.address(PAYER)
    in_flight = Account.sign_transaction({
        "to": devchain.token, "data": "0x" + (SEL_TRANSFER + bytes.fromhex(payer[2:].rjust(64, "0"))
                                              + REFUND.to_bytes(32, "big")).hex(),
        "gas": 100_000, "maxFeePerGas": 10**10, "maxPriorityFeePerGas": 10**6, "chainId": devchain.w3.eth.chain_id,
        "nonce": devchain.w3.eth.get_transaction_count(PAY_TO, "pending"), "type": 2,
    }, devchain.key(9))
    claimed = "0x" + in_flight.hash.hex().removeprefix("0x")
    assert gateway.ledger.record_refund_tx(row.id, claimed)  # the gateway's claim, before its broadcast
    before = devchain.balance(payer)

    code, report = run_refunds(gateway, "--pay", "--include-unknown", refund_key=command_key)
    devchain.w3.eth.send_raw_transaction(in_flight.raw_transaction)  # the gateway's broadcast goes out

    assert devchain.balance(payer) == before + REFUND  # the gateway's refund, and nothing more
    assert code == 1 and report["refunds"][0]["status"] == "unknown"
    assert report["refunds"][0]["outcome"] == "too_recent"
    assert gateway.ledger.get(row.id).refund_tx == claimed  # type: ignore[union-attr]


def test_include_unknown_pays_a_refund_whose_claim_went_quiet(
    owed_with_spare_key: tuple[RunningGateway, Payment, str], devchain: Devchain
) -> None:
    """A claim whose transaction never left (the process died before its broadcast), old enough that
    nothing of the gateway's can still send it, is paid with ``--include-unknown``; once."""
    gateway, row, command_key = owed_with_spare_key
    payer = devchain.address(PAYER)
    assert gateway.ledger.record_refund_tx(row.id, "0x" + "5e" * 32)
    age_claim(gateway, row.id, timedelta(hours=1))
    before = devchain.balance(payer)

    code, report = run_refunds(gateway, "--pay", "--include-unknown", refund_key=command_key)

    assert code == 0 and report["refunds"][0]["outcome"] == "paid"
    assert devchain.balance(payer) == before + REFUND
    assert gateway.ledger.get(row.id).refunded_at is not None  # type: ignore[union-attr]


@pytest.fixture
def owed_with_spare_key(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> tuple[RunningGateway, Payment, str]:
    """A refund left owed by a gateway without a refund key, and a funded account (not the payee's)
    for the command to pay refunds from."""
    gateway = upfront_gateway(start_gateway, tmp_path, upstream)
    refund, row = owe_one(gateway, devchain)
    assert refund == "owed" and row.refund_owed == REFUND
    spare = Account.create()
    devchain.w3.eth.send_transaction({"from": PAY_TO, "to": spare.address, "value": 10**18})
    send_refund_transfer(devchain, spare.address, 10 * REFUND)
    return gateway, row, "0x" + spare.key.hex().removeprefix("0x")



def test_a_ledger_that_fails_mid_run_is_a_clear_error_and_pays_nothing(
    owed_with_spare_key: tuple[RunningGateway, Payment, str], devchain: Devchain
) -> None:
    """The ledger refuses the claim (another writer holds its lock past the busy wait): one line
    with its code and exit 2 ("could not run"), not a traceback and exit 1 ("refunds stay owed");
    nothing is broadcast without its claim."""
    gateway, row, command_key = owed_with_spare_key
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    database = gateway.settings.database_url.removeprefix("sqlite:///")
    holder = sqlite3.connect(database, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held through the command's busy wait
        result = CliRunner().invoke(main, ["ledger", "refunds", "--pay"], env=env_of(gateway, command_key))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert "[ledger_unavailable]" in result.output and command_key.removeprefix("0x") not in result.output
    assert devchain.balance(payer) == before
    again = gateway.ledger.get(row.id)
    assert again is not None and again.refund_tx is None and again.refunded_at is None


CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.mark.parametrize("key", [CURVE_ORDER, CURVE_ORDER + 1, 2**256 - 1], ids=["n", "n+1", "max"])
def test_a_refund_key_past_the_curve_order_is_refused_without_quoting_it(
    owed_with_spare_key: tuple[RunningGateway, Payment, str], key: int
) -> None:
    """64 hex digits that are no secp256k1 key: one line and exit 2, not a traceback (whose
    validation error prints the key, as a decimal)."""
    gateway, _, _ = owed_with_spare_key
    text = f"0x{key:064x}"
    result = CliRunner().invoke(main, ["ledger", "refunds", "--pay"], env=env_of(gateway, text))
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "[invalid_key]" in result.output
    assert text[2:] not in result.output.lower() and str(key) not in result.output


@pytest.mark.parametrize(("status", "refunded"), [(404, False), (502, True)])
def test_a_failure_rule_says_whose_failure_it_is_by_its_status(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str, status: int, refunded: bool
) -> None:
    """A catalog's failure rule turns an answer into a failure with the status it gives: a 4xx is the
    caller's (charged, no refund gas), a 5xx the upstream's (refunded)."""
    rule = f'    failure_when:\n      - {{pointer: /report_id, equals: "7", code: report_withdrawn, status: {status}}}\n'
    gateway = upfront_gateway(start_gateway, tmp_path, upstream, UPFRONT_TOOL + rule, refund_key=devchain.key(9))
    payer, refunder = devchain.address(PAYER), devchain.address(9)
    before, nonce_before = devchain.balance(payer), devchain.w3.eth.get_transaction_count(refunder)
    with gateway.client() as client:
        path = "/paid-first/reports/7"
        header = signed(client, devchain, path, payer=PAYER)
        answer = client.get(path, headers={"PAYMENT-SIGNATURE": header})
        again = client.get(path, headers={"PAYMENT-SIGNATURE": header})  # refunded: 409, already refunded; charged: replayed
    assert answer.status_code == status and answer.json()["error"] == "report_withdrawn", answer.text
    assert receipt_of(answer).success
    assert answer.json()["refund"] == ("refunded" if refunded else "none")
    assert again.json()["refund"] == ("refunded" if refunded else "none"), again.text
    assert again.status_code == (409 if refunded else status)
    assert devchain.balance(payer) == (before if refunded else before - REFUND)
    assert devchain.w3.eth.get_transaction_count(refunder) == nonce_before + (1 if refunded else 0)


FX_WITHOUT_KEY = """
  - name: fx_rate_upfront
    description: An FX rate, paid first; the owner left out the upstream's API key.
    method: GET
    path: /paid-first/fx/{pair}
    upstream_path: /limited/fx/{pair}
    price: "0.004"
    settle: upfront
"""


def test_an_upstream_refusing_the_owners_credentials_is_refunded_not_charged_to_the_caller(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """A 401 (or 403) from an upstream the gateway sends the owner's credentials to is about those
    credentials (here: none configured), not about what the caller asked: refunded, whatever the
    default ``refund_on``. Only a user-scoped tool's 401/403 (the caller's own token) is the caller's."""
    gateway = upfront_gateway(start_gateway, tmp_path, upstream, FX_WITHOUT_KEY, refund_key=devchain.key(9))
    payer = devchain.address(PAYER)
    before = devchain.balance(payer)
    with gateway.client() as client:
        path = "/paid-first/fx/EURUSD"
        answer = client.get(path, headers={"PAYMENT-SIGNATURE": signed(client, devchain, path, payer=PAYER)})
    assert answer.status_code == 401 and receipt_of(answer).success, answer.text
    assert answer.headers["x402gw-refund"].startswith("refunded 0x")
    assert devchain.balance(payer) == before


OVER_QUOTA = "/paid-first/reports/429"  # the owner's quota at the upstream is spent: 429, Retry-After: 120


def test_an_upstream_over_the_owners_quota_cannot_be_turned_into_a_refund_per_call(
    start_gateway: GatewayFactory, devchain: Devchain, tmp_path: Path, upstream: str
) -> None:
    """A 429 to the owner's credentials is the upstream's (refunded), and it says nobody is served
    now: each later paid call would settle, get the same 429 and be refunded, the gateway paying
    two transactions' gas per call for nothing, as fast as a griefer sends them (or as long as the
    owner's quota stays spent). The 429 opens the breaker for its Retry-After: the next calls to
    that upstream's tools are refused before any payment (503, Retry-After), nothing settled,
    nothing refunded, the upstream not called again."""
    gateway = upfront_gateway(start_gateway, tmp_path, upstream, refund_key=devchain.key(9))
    eth = devchain.w3.eth
    payer, refunder, settler = devchain.address(PAYER), devchain.address(9), devchain.deployment.deployer
    with gateway.client() as client:
        headers = [signed(client, devchain, OVER_QUOTA, payer=PAYER) for _ in range(3)]
        other = signed(client, devchain, "/paid-first/reports/7", payer=PAYER)  # another tool path, same upstream
        payer_before, refunds_before, settled_before = devchain.balance(payer), eth.get_transaction_count(refunder), eth.get_transaction_count(settler)
        first = client.get(OVER_QUOTA, headers={"PAYMENT-SIGNATURE": headers[0]})
        later = [client.get(OVER_QUOTA, headers={"PAYMENT-SIGNATURE": h}) for h in headers[1:]]
        later.append(client.get("/paid-first/reports/7", headers={"PAYMENT-SIGNATURE": other}))
        unpaid = client.get("/paid-first/reports/8")
    assert first.status_code == 429 and receipt_of(first).success, first.text
    assert first.headers["x402gw-refund"].startswith("refunded 0x")  # the owner's quota: not the caller's failure
    for answer in [*later, unpaid]:
        assert answer.status_code == 503 and answer.json()["error"] == "upstream_circuit_open", answer.text
        assert 100 <= int(answer.headers["retry-after"]) <= 120
    assert devchain.balance(payer) == payer_before  # settled once, refunded once
    assert eth.get_transaction_count(settler) - settled_before == 1
    assert eth.get_transaction_count(refunder) - refunds_before == 1
    assert upstream_hits(upstream, "GET /reports/429") == 1 and upstream_hits(upstream, "GET /reports/7") == 0
    rows = [r for r in gateway.ledger.all() if r.payer.lower() == payer.lower()]
    assert len(rows) == 1 and rows[0].upstream_status == 429 and rows[0].refund_tx
