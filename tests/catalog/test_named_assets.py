"""Catalogs that name their network and stablecoin and price in dollars (catalog.terms): the same
offers as the explicit form, and every bad input refused with its code at its file:line."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from catalog import CatalogError, CatalogIssue, load_catalog, parse_catalog
from catalog.registry import with_local_token

PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"

# Line numbers below are asserted by the tests: keep this text's layout stable.
NAMED = f"""\
catalog: 1
owner: acme
payment:
  network: base
  asset: USDC
  pay_to: "{PAY_TO}"
upstreams:
  api: {{base_url: "http://127.0.0.1:9101"}}
tools:
  - name: quote
    description: "A quote"
    method: GET
    path: /quotes
    price: "$0.01"
  - name: report
    description: "A report"
    method: GET
    path: /reports
    price: "0.002"
"""

EXPLICIT = f"""\
catalog: 1
owner: acme
payment:
  network: "eip155:8453"
  asset: "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "{PAY_TO}"
upstreams:
  api: {{base_url: "http://127.0.0.1:9101"}}
tools:
  - name: quote
    description: "A quote"
    method: GET
    path: /quotes
    price: 0.01
  - name: report
    description: "A report"
    method: GET
    path: /reports
    price: "0.002"
"""


def issues(text: str, **kwargs: object) -> list[CatalogIssue]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, "t.yaml", **kwargs)  # type: ignore[arg-type]
    return info.value.issues


def one(text: str) -> tuple[str, int | None, str, str]:
    found = issues(text)
    assert len(found) == 1, found
    return found[0].path, found[0].line, found[0].code, str(found[0])


def test_named_network_asset_and_dollar_price_give_the_explicit_offer() -> None:
    named, explicit = parse_catalog(NAMED, "t.yaml"), parse_catalog(EXPLICIT, "t.yaml")
    assert named.payment == explicit.payment
    for a, b in zip(named.tools, explicit.tools, strict=True):
        assert a.model_dump() == b.model_dump()
        assert type(a.price) is Decimal  # the dollar mark does not leak past the loader
    quote = named.tool("quote")
    assert quote.payment.network == "eip155:8453" and quote.payment.asset == "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
    assert (quote.payment.asset_name, quote.payment.asset_version, quote.payment.decimals) == ("USD Coin", "2", 6)
    assert quote.price == Decimal("0.01") and quote.price_atomic == 10_000


@pytest.mark.parametrize(("network", "asset"), [
    ('"eip155:8453"', "USDC"), ("base", '"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"'),
    ("Base", "usdc"), ("base", '"0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"'),
])
def test_mixed_forms(network: str, asset: str) -> None:
    text = NAMED.replace("  network: base\n", f"  network: {network}\n").replace("  asset: USDC\n", f"  asset: {asset}\n")
    assert parse_catalog(text, "t.yaml").payment == parse_catalog(EXPLICIT, "t.yaml").payment


def test_a_tool_may_name_another_network_or_coin() -> None:
    text = NAMED + "    payment: {network: base-sepolia}\n"
    report = parse_catalog(text, "t.yaml").tool("report")
    assert report.payment.network == "eip155:84532"
    assert (report.payment.asset, report.payment.asset_name) == ("0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC")
    eurc = parse_catalog(NAMED + "    payment: {asset: EURC}\n", "t.yaml").tool("report")
    assert (eurc.payment.asset, eurc.payment.asset_name, eurc.price_atomic) == (
        "0x60a3E35Cc302bFA44Cb288Bc5a4F316Fdb1adb42", "EURC", 2000)


def test_dollar_prices_convert_exactly() -> None:
    for written, atomic in [('"$0.01"', 10_000), ('"$1"', 1_000_000), ("$0.000001", 1), ('" $ 12.5 "', 12_500_000)]:
        text = NAMED.replace('    price: "$0.01"\n', f"    price: {written}\n")
        assert parse_catalog(text, "t.yaml").tool("quote").price_atomic == atomic, written


@pytest.mark.parametrize(("old", "new", "expected"), [
    # a symbol the registry does not know on that network
    ("  asset: USDC\n", "  asset: USDT\n", ("payment.asset", 5, "unknown_asset")),
    # an unknown network name; a malformed one keeps its old code
    ("  network: base\n", "  network: basee\n", ("payment.network", 4, "unknown_network")),
    ("  network: base\n", '  network: "solana:mainnet"\n', ("payment.network", 4, "invalid_network")),
    # too many digits for USDC's 6 decimals
    ('    price: "$0.01"\n', '    price: "$0.0000001"\n', ("tools[0].price", 14, "price_precision")),
    ('    price: "$0.01"\n', '    price: "$-1"\n', ("tools[0].price", 14, "invalid_price")),
    ('    price: "$0.01"\n', '    price: "$1e3"\n', ("tools[0].price", 14, "invalid_price")),
    ('    price: "$0.01"\n', '    price: "$"\n', ("tools[0].price", 14, "invalid_price")),
    # facts written beside a known coin that are not its facts (Base Sepolia's name on Base)
    ("  asset: USDC\n", '  asset: USDC\n  asset_name: "USDC"\n', ("payment.asset_name", 6, "asset_mismatch")),
])
def test_bad_input_named_at_its_line(old: str, new: str, expected: tuple[str, int, str]) -> None:
    assert old in NAMED
    path, line, code, text = one(NAMED.replace(old, new, 1))
    assert (path, line, code) == expected
    assert text.startswith(f"t.yaml:{line}: {path}: ")


def test_dollar_price_on_a_euro_coin() -> None:
    path, line, code, text = one(NAMED.replace("  asset: USDC\n", "  asset: EURC\n"))
    assert (path, line, code) == ("tools[0].price", 14, "dollar_price_not_usd")
    assert "EURC" in text and "EUR" in text


def test_dollar_price_on_a_token_the_registry_does_not_know() -> None:
    text = NAMED.replace("  network: base\n", '  network: "eip155:999"\n').replace(
        "  asset: USDC\n", '  asset: "0x1111111111111111111111111111111111111111"\n  asset_name: X\n'
        "  asset_version: \"1\"\n  decimals: 6\n")
    found = issues(text)
    assert [(i.path, i.line, i.code) for i in found] == [("tools[0].price", 17, "dollar_price_not_usd")]


def test_unknown_address_needs_its_facts() -> None:
    text = NAMED.replace("  asset: USDC\n", '  asset: "0x1111111111111111111111111111111111111111"\n')
    found = issues(text)
    assert {(i.path, i.line, i.code) for i in found} == {
        ("payment.asset_name", 3, "missing_key"), ("payment.asset_version", 3, "missing_key"), ("payment.decimals", 3, "missing_key"),
    }


def test_a_tool_block_is_blamed_for_what_it_caused() -> None:
    found = issues(NAMED + "    payment: {network: polygon-amoy}\n")
    assert [(i.path, i.line, i.code) for i in found] == [("tools[1].payment", 20, "unknown_asset")]
    assert "polygon-amoy" not in found[0].message or "eip155:80002" in found[0].message
    found = issues(NAMED + "    payment: {asset: DAI}\n")
    assert [(i.path, i.line, i.code) for i in found] == [("tools[1].payment.asset", 20, "unknown_asset")]


def test_the_local_chain_resolves_through_the_deployment() -> None:
    local_text = NAMED.replace("  network: base\n", "  network: local\n")
    default = parse_catalog(local_text, "t.yaml")
    assert default.payment.asset == "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    moved = parse_catalog(local_text, "t.yaml", local=with_local_token("eip155:31337", "0x" + "12" * 20, "USD Coin", "2", 6))
    assert moved.payment.asset == "0x" + "12" * 20
    # an explicit address on the local chain is not checked against the devchain's defaults
    explicit = local_text.replace("  asset: USDC\n", '  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"\n  asset_name: Other\n')
    assert parse_catalog(explicit, "t.yaml").payment.asset_name == "Other"


def test_files_report_their_own_name(tmp_path: Path) -> None:
    path = tmp_path / "shop.yaml"
    path.write_text(NAMED.replace("  asset: USDC\n", "  asset: USDT\n"), encoding="utf-8")
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    assert str(info.value).startswith(f"{path}:5: payment.asset: USDT is not a stablecoin")
