"""Environment variables in catalog values (catalog.interpolation): ${NAME}, ${NAME:-default}, $$;
dollar prices untouched; the resolved value validated with the usual file:line diagnostics; an
unset or malformed variable a catalog error at its line naming the variable, never a value; the
environment only what the caller hands in."""

from __future__ import annotations

import ast
from decimal import Decimal
from pathlib import Path

import pytest

import catalog
from catalog import CatalogError, CatalogIssue, load_catalogs, parse_catalog
from catalog.registry import stablecoin

PAY_TO = "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
OTHER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
SECRET = "s3cr3t-value-4f1c9a"

# Line numbers below are asserted by the tests: keep this text's layout stable.
TEXT = """\
catalog: 1
owner: acme
payment:
  network: "${NET:-base}"
  asset: USDC
  pay_to: "${PAY_TO}"
upstreams:
  api: {base_url: "${API:-http://127.0.0.1:9101}"}
tools:
  - name: quote
    description: "A quote"
    method: GET
    path: /quotes
    price: "$0.01"
"""


def issues(text: str, env: dict[str, str]) -> list[CatalogIssue]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, "live.yaml", env=env)
    return info.value.issues


def test_variables_and_defaults_resolve_from_the_given_environment() -> None:
    tool = parse_catalog(TEXT, env={"PAY_TO": PAY_TO}).tools[0]
    usdc = stablecoin("eip155:8453", "USDC")
    assert usdc is not None
    assert (tool.payment.network, tool.payment.asset, tool.payment.pay_to) == ("eip155:8453", usdc.address, PAY_TO)
    assert tool.upstream.base_url.rstrip("/") == "http://127.0.0.1:9101"
    assert tool.price == Decimal("0.01") and tool.price_atomic == 10_000  # "$0.01" is a dollar price, not a variable
    # ... a dollar price indeed: refused on a token that is not a dollar one, at the price's line
    [issue] = issues(TEXT.replace("asset: USDC", "asset: EURC"), {"PAY_TO": PAY_TO})
    assert (issue.line, issue.path, issue.code) == (14, "tools[0].price", "dollar_price_not_usd")

    env = {"PAY_TO": OTHER, "NET": "base-sepolia", "API": "http://127.0.0.1:7000"}
    tool = parse_catalog(TEXT, env=env).tools[0]
    sepolia = stablecoin("eip155:84532", "USDC")
    assert sepolia is not None
    assert (tool.payment.network, tool.payment.asset, tool.payment.pay_to) == ("eip155:84532", sepolia.address, OTHER)
    assert tool.upstream.base_url.rstrip("/") == "http://127.0.0.1:7000"


def test_an_empty_variable_takes_the_default_and_a_set_one_without_default_is_used_as_is() -> None:
    assert parse_catalog(TEXT, env={"PAY_TO": PAY_TO, "NET": ""}).tools[0].payment.network == "eip155:8453"
    text = TEXT.replace("  - name: quote", "  - name: \"${TOOL}\"")
    assert parse_catalog(text, env={"PAY_TO": PAY_TO, "TOOL": "quote_v2"}).tools[0].name == "quote_v2"


@pytest.mark.parametrize(("written", "resolved"), [
    ('"$$0.01 a call"', "$0.01 a call"),
    ('"costs $$$$"', "costs $$"),
    ('"literal $${NOT_A_VAR}"', "literal ${NOT_A_VAR}"),
    ('"price ${P:-$0.02} or $5"', "price $0.02 or $5"),
    ('"a lone $ and $1 stay"', "a lone $ and $1 stay"),
])
def test_double_dollar_is_a_literal_dollar_and_only_dollar_brace_starts_a_variable(written: str, resolved: str) -> None:
    text = TEXT.replace('description: "A quote"', f"description: {written}")
    assert parse_catalog(text, env={"PAY_TO": PAY_TO}).tools[0].description == resolved


def test_a_price_may_come_from_the_environment_and_stays_exact() -> None:
    text = TEXT.replace('price: "$0.01"', 'price: "${PRICE:-$0.01}"')
    assert parse_catalog(text, env={"PAY_TO": PAY_TO}).tools[0].price_atomic == 10_000
    tool = parse_catalog(text, env={"PAY_TO": PAY_TO, "PRICE": "0.0025"}).tools[0]
    assert tool.price == Decimal("0.0025") and tool.price_atomic == 2_500


def test_an_unset_variable_is_an_error_at_its_line_naming_the_variable() -> None:
    [issue] = issues(TEXT, {})
    assert (issue.file, issue.line, issue.path, issue.code) == ("live.yaml", 6, "payment.pay_to", "undefined_variable")
    assert "${PAY_TO}" in issue.message and str(issue).startswith("live.yaml:6: payment.pay_to: ")


def test_errors_name_variables_never_values() -> None:
    text = TEXT.replace('pay_to: "${PAY_TO}"', 'pay_to: "${TOKEN}${PAY_TO}"')
    [issue] = issues(text, {"TOKEN": SECRET})
    assert issue.code == "undefined_variable" and "PAY_TO" in issue.message
    assert SECRET not in str(issue)


@pytest.mark.parametrize("bad", ["${}", "${1NET}", "${NET", "${NET:?required}", "${NET-base}", "${NET:-${OTHER}}", "${ NET }"])
def test_a_malformed_variable_is_an_error_at_its_line(bad: str) -> None:
    [issue] = issues(TEXT.replace('"${NET:-base}"', f'"{bad}"'), {"PAY_TO": PAY_TO, "NET": "base", "OTHER": "base"})
    assert (issue.line, issue.path, issue.code) == (4, "payment.network", "invalid_interpolation")


def test_the_resolved_value_is_validated_with_the_usual_diagnostics_naming_its_variable() -> None:
    [issue] = issues(TEXT, {"PAY_TO": PAY_TO, "NET": "nowhere"})
    assert (issue.line, issue.path, issue.code) == (4, "payment.network", "unknown_network")
    assert issue.message.endswith("(from ${NET})")
    [issue] = issues(TEXT, {"PAY_TO": "0x1234"})
    assert (issue.line, issue.path, issue.code) == (6, "payment.pay_to", "invalid_address")
    assert issue.message.endswith("(from ${PAY_TO})")
    # a value written as it is, made wrong by its neighbour's variable: the neighbour is named
    [issue] = issues(TEXT.replace("asset: USDC", "asset: EURC"), {"PAY_TO": PAY_TO, "NET": "arbitrum"})
    assert (issue.line, issue.path, issue.code) == (5, "payment.asset", "unknown_asset")
    assert "(from ${NET}" in issue.message


def test_keys_and_non_strings_are_never_read_and_plain_files_are_untouched() -> None:
    schema = '    input_schema: {type: object, properties: {"${FIELD}": {type: string, maxLength: 5}}}\n'
    text = TEXT + schema
    tool = parse_catalog(text, env={"PAY_TO": PAY_TO, "FIELD": "other"}).tools[0]
    assert tool.input_schema["properties"] == {"${FIELD}": {"type": "string", "maxLength": 5}}
    plain = TEXT.replace('"${NET:-base}"', "base").replace('"${PAY_TO}"', f'"{PAY_TO}"').replace(
        '"${API:-http://127.0.0.1:9101}"', '"http://127.0.0.1:9101"')
    assert parse_catalog(plain).tools[0].price_atomic == 10_000  # no environment needed at all


def test_only_the_environment_handed_in_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PAY_TO", PAY_TO)
    assert issues(TEXT, {})[0].code == "undefined_variable"  # os.environ is not the catalog's to read
    path = tmp_path / "live.yaml"
    path.write_text(TEXT)
    loaded = load_catalogs([path], env={"PAY_TO": OTHER, "NET": "base-sepolia"})
    assert (loaded.tools[0].payment.network, loaded.tools[0].payment.pay_to) == ("eip155:84532", OTHER)
    with pytest.raises(CatalogError) as info:
        load_catalogs([path])
    assert [(i.file, i.line, i.code) for i in info.value.issues] == [(str(path), 6, "undefined_variable")]


def test_the_catalog_package_reads_no_environment_of_its_own() -> None:
    for path in Path(catalog.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
            n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not {"environ", "getenv"} & names, path
