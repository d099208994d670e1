"""Revenue net of gas on a real anvil: each settled row records its transaction's gasUsed and
effectiveGasPrice (a batch's cost split exactly among its rows), and net of gas is gross minus
refunds minus the gas the chain's receipts report, in the summary, the CLI, /admin and exports;
rows missing gas get it back from the receipts (ledger backfill-gas)."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, localcontext
from pathlib import Path

import httpx
from click.testing import CliRunner

from gateway.cli.main import main
from gateway.devkit.payer import Payer
from settlement.finance.export import Filters, export
from settlement.finance.summary import summarize
from settlement.ledger import PaymentState
from settlement.x402.codec import encode_header
from tests.conftest import Devchain, GatewayFactory, demo_catalog, offer_of
from tests.e2e.test_exactly_once import UPFRONT_TOOL
from tests.e2e.test_paid_call import pay, receipt_of
from tests.support.ledger_rows import force_row

RATE = "2712.3456789"  # dollars per ETH on the dev chain, as X402GW_NATIVE_USD_RATE gives it
NETWORK = "eip155:31337"
ADMIN_TOKEN = "admin-token-for-gas"


def chain_cost(devchain: Devchain, tx_hashes: set[str]) -> int:
    """Σ gasUsed × effectiveGasPrice of the transactions, as eth_getTransactionReceipt reports them."""
    total = 0
    for tx_hash in tx_hashes:
        receipt = devchain.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        total += int(receipt["gasUsed"]) * int(receipt["effectiveGasPrice"])
    return total


def expected_net_usd(gross: int, refunds: int, gas_wei: int) -> str:
    with localcontext() as exact:
        exact.prec = 200
        value = Decimal(gross - refunds) / Decimal(10) ** 6 - Decimal(gas_wei) * Decimal(RATE) / Decimal(10) ** 18
    text = format(value, "f").rstrip("0").rstrip(".")
    return text


def test_net_revenue_is_gross_minus_refunds_minus_the_gas_the_chain_reports(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    catalog = demo_catalog(tmp_path, upstream)
    catalog.write_text(catalog.read_text() + UPFRONT_TOOL)
    gateway = start_gateway(catalog=catalog, native_usd_rate={NETWORK: RATE}, admin_token=ADMIN_TOKEN)
    with gateway.client() as client:
        paid = [pay(client, devchain, "GET", path, payer=4)[1] for path in ("/quotes/GASA", "/quotes/GASB")]
        refunded = pay(client, devchain, "GET", "/paid-first/reports/500", payer=4)[1]  # settles, upstream fails
    assert [r.status_code for r in paid] == [200, 200] and refunded.status_code == 500
    for response in (*paid, refunded):  # the gas is the ledger's: not in the payer's receipt
        assert not {"gasUsed", "effectiveGasPrice", "gasCost"} & set(receipt_of(response).extra or {})

    rows = gateway.ledger.all()
    assert {r.state for r in rows} == {PaymentState.SETTLED} and len(rows) == 3
    for row in rows:
        receipt = devchain.w3.eth.get_transaction_receipt(row.tx_hash)  # type: ignore[arg-type]
        assert (row.gas_used, row.gas_price) == (receipt["gasUsed"], receipt["effectiveGasPrice"])
        assert row.gas_cost == receipt["gasUsed"] * receipt["effectiveGasPrice"] > 0
    gas_wei = chain_cost(devchain, {r.tx_hash for r in rows if r.tx_hash})
    gross, refunds = sum(r.amount for r in rows), sum(r.refund_owed or 0 for r in rows)
    assert refunds == 4000

    # The summary (the one revenue definition): one group per asset and network here.
    [total] = summarize(gateway.ledger, ())
    data = total.to_json((), {NETWORK: Decimal(RATE)})
    assert (data["gross_atomic"], data["refunds_atomic"], data["gas_wei"]) == (str(gross), str(refunds), str(gas_wei))
    assert data["network"] == NETWORK and data["gas_missing"] == 0
    assert data["net_usd"] == expected_net_usd(gross, refunds, gas_wei)
    per_tool = summarize(gateway.ledger, ("owner", "tool"))
    assert sum(g.gas for g in per_tool) == gas_wei and {g.key[1] for g in per_tool} == {
        "get_quote", "generate_report_upfront"
    }

    # The CLI, with the rate from the environment.
    result = CliRunner(env={"X402GW_NATIVE_USD_RATE": json.dumps({NETWORK: RATE})}).invoke(main, [
        "ledger", "summary", "--by", "owner", "--format", "json", "--database-url", gateway.settings.database_url,
    ])
    assert result.exit_code == 0, result.output
    [group] = json.loads(result.output)["groups"]
    assert (group["gas_wei"], group["net_usd"]) == (str(gas_wei), expected_net_usd(gross, refunds, gas_wei))

    # /admin's data, per owner, tool, asset and network.
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        net_of_gas = admin.get("/admin/data.json").json()["netOfGas"]
        page = admin.get("/admin").text
    assert sum(int(g["gas_wei"]) for g in net_of_gas) == gas_wei
    assert {(g["owner"], g["tool"], g["network"]) for g in net_of_gas} == {
        ("acme-legacy", "get_quote", NETWORK), ("acme-legacy", "generate_report_upfront", NETWORK),
    }
    assert all(g["gas_usd"] is not None and g["net_usd"] is not None for g in net_of_gas)
    assert 'id="net-of-gas"' in page

    # Exports: each row's share of its transaction, in wei.
    out = io.StringIO()
    export(gateway.ledger, Filters(), "jsonl", out)
    exported = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sum(int(r["gas_cost_wei"]) for r in exported) == gas_wei


def test_a_batch_shares_its_transaction_gas_exactly(start_gateway: GatewayFactory, devchain: Devchain) -> None:
    payers = (1, 3, 5)
    gateway = start_gateway(batch_settlement={NETWORK: {"max_wait_ms": 500, "max_payments": len(payers)}})
    with gateway.client() as client:
        offer = offer_of(client.get("/quotes/GASBT"))
    headers = [encode_header(Payer(devchain.key(i)).sign(offer.accepts[0], resource=offer.resource)) for i in payers]

    def call(header: str) -> httpx.Response:
        with gateway.client() as client:
            return client.get("/quotes/GASBT", headers={"PAYMENT-SIGNATURE": header})

    with ThreadPoolExecutor(len(headers)) as pool:
        assert [r.status_code for r in pool.map(call, headers)] == [200] * len(payers)
    rows = gateway.ledger.all()
    by_tx: dict[str, list[int]] = {}
    for row in rows:
        assert row.tx_hash is not None and row.gas_cost is not None
        by_tx.setdefault(row.tx_hash, []).append(row.gas_cost)
    for tx_hash, shares in by_tx.items():
        # Split exactly: the shares add up to the transaction's cost and differ by at most one wei.
        assert sum(shares) == chain_cost(devchain, {tx_hash})
        assert max(shares) - min(shares) <= 1
    assert summarize(gateway.ledger, ())[0].gas == chain_cost(devchain, set(by_tx))


def test_backfill_gas_reads_the_receipts_of_rows_missing_it(
    start_gateway: GatewayFactory, devchain: Devchain, upstream: str, tmp_path: Path,
) -> None:
    """Rows settled before the gas columns (or by a remote facilitator) have none: x402gw ledger
    backfill-gas reads each transaction's receipt and records exactly what the gateway would have."""
    catalog = demo_catalog(tmp_path, upstream)
    gateway = start_gateway(catalog=catalog)
    with gateway.client() as client:
        for path in ("/quotes/FILLA", "/quotes/FILLB"):
            assert pay(client, devchain, "GET", path, payer=6)[1].status_code == 200
    before = {r.id: (r.gas_used, r.gas_price, r.gas_cost) for r in gateway.ledger.all()}
    assert all(None not in gas for gas in before.values())
    for pid in before:
        force_row(gateway.ledger, pid, gas_used=None, gas_price=None, gas_cost=None)
    assert summarize(gateway.ledger, ())[0].gas_missing == len(before)

    def backfill() -> dict[str, object]:
        result = CliRunner(env={"X402GW_DEPLOYMENT_FILE": str(devchain.deployment_file)}).invoke(main, [
            "ledger", "backfill-gas", "--json", "--catalog", str(catalog),
            "--database-url", gateway.settings.database_url,
        ])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        assert isinstance(report, dict)
        return report

    assert backfill()["filled"] == len(before)
    assert {r.id: (r.gas_used, r.gas_price, r.gas_cost) for r in gateway.ledger.all()} == before
    assert backfill()["filled"] == 0  # nothing left to fill
    assert summarize(gateway.ledger, ())[0].gas_missing == 0

    # A transaction another account sent (a remote facilitator's) is not the settlement key's gas.
    other = devchain.w3.eth.send_transaction({"from": devchain.address(8), "to": devchain.address(7), "value": 1})
    devchain.w3.eth.wait_for_transaction_receipt(other)
    first = min(before)
    force_row(gateway.ledger, first, tx_hash="0x" + other.hex().removeprefix("0x"), gas_used=None, gas_price=None,
              gas_cost=None)
    report = backfill()
    assert report["filled"] == 0 and report["otherSender"] == ["0x" + other.hex().removeprefix("0x")]
    other_receipt = devchain.w3.eth.get_transaction_receipt(other)
    row = gateway.ledger.get(first)
    assert row is not None and (row.gas_used, row.gas_price, row.gas_cost) == (
        other_receipt["gasUsed"], other_receipt["effectiveGasPrice"], 0)  # not the settlement key's gas
    assert summarize(gateway.ledger, ())[0].gas_missing == 0
