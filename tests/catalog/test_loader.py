from decimal import Decimal
from pathlib import Path

import pytest

import catalog
from catalog import (
    CatalogError,
    CatalogIssue,
    load_catalog,
    load_catalogs,
    parse_catalog,
)

EXAMPLES = Path(catalog.__file__).parent / "examples"

# Line numbers below are asserted by the tests: keep this text's layout stable.
BASE = """\
catalog: 1
owner: acme-legacy
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  asset_name: "USD Coin"
  asset_version: "2"
  decimals: 6
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
upstreams:
  legacy:
    base_url: "http://127.0.0.1:9101/"
tools:
  - name: get_quote
    description: "Latest price"
    method: GET
    path: /quotes/{symbol}
    upstream_path: /api/v1/quote/{symbol}
    price: 0.002
    input_schema:
      type: object
      properties:
        symbol: {type: string}
  - name: get_report
    description: "A report"
    method: GET
    path: /reports/{report_id}
    price: "0.005"
"""


def issues(text: str, name: str = "t.yaml") -> list[CatalogIssue]:
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, name)
    return info.value.issues


def one(text: str) -> tuple[str, int | None, str]:
    found = issues(text)
    assert len(found) == 1, found
    return found[0].path, found[0].line, found[0].code


def test_base_loads_resolved():
    cat = parse_catalog(BASE, "t.yaml")
    quote = cat.tool("get_quote")
    assert cat.source == "t.yaml" and cat.owner == "acme-legacy"
    assert quote.price == Decimal("0.002") and quote.price_atomic == 2000
    assert quote.path_params == ("symbol",)
    assert quote.upstream.name == "legacy"
    assert quote.upstream.base_url == "http://127.0.0.1:9101"  # trailing slash stripped
    assert quote.upstream.timeout_seconds == 10
    assert quote.payment.decimals == 6 and quote.settle == "after"
    report = cat.tool("get_report")
    assert report.upstream_path == "/reports/{report_id}"  # defaults to path
    assert report.input_schema == {"type": "object"}
    assert report.price_atomic == 5000


@pytest.mark.parametrize("name", ["demo.yaml", "minimal.yaml"])
def test_example_catalogs_load(name):
    cat = load_catalog(EXAMPLES / name)
    assert cat.tools


def test_demo_catalog_contents():
    cat = load_catalog(EXAMPLES / "demo.yaml")
    prices = {t.name: (t.method, t.path, t.price_atomic) for t in cat.tools}
    assert prices == {
        "get_quote": ("GET", "/quotes/{symbol}", 2000),
        "get_weather": ("GET", "/weather", 1000),
        "create_order": ("POST", "/orders", 10000),
        "get_report": ("GET", "/reports/{report_id}", 5000),
        "request_report": ("POST", "/reports", 3000),
    }
    assert cat.payment.pay_to == "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
    assert cat.tool("get_quote").upstream_path == "/api/v1/quote/{symbol}"


def test_load_catalogs_merges_owners():
    both = load_catalogs([EXAMPLES / "demo.yaml", EXAMPLES / "minimal.yaml"])
    assert len(both.tools) == 6
    assert both.tool("minimal_quote").owner == "minimal"
    assert "get_quote" in both


def test_addresses_normalised_to_checksum():
    cat = parse_catalog(BASE.replace("0xa0Ee7A142d267C1f36714E4a8F75612F20a79720", "0xa0ee7a142d267c1f36714e4a8f75612f20a79720"))
    assert cat.payment.pay_to == "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"


def test_tool_payment_override_and_settle():
    text = BASE + "    settle: upfront\n    payment:\n      decimals: 18\n"
    tool = parse_catalog(text).tool("get_report")
    assert tool.settle == "upfront"
    assert tool.payment.decimals == 18 and tool.price_atomic == 5 * 10**15
    assert tool.payment.asset_name == "USD Coin"  # the rest inherited


def test_error_rendering():
    err = CatalogError([CatalogIssue("demo.yaml", "tools[2].price", 14, "price must be greater than 0, got 0", "invalid_price")])
    assert str(err) == "demo.yaml:14: tools[2].price: price must be greater than 0, got 0 [invalid_price]"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("    price: 0.002\n", "    price: 0.0000001\n", ("tools[0].price", 19, "price_precision")),
        ("    price: 0.002\n", "    price: 0\n", ("tools[0].price", 19, "invalid_price")),
        ("    price: 0.002\n", "    price: -0.002\n", ("tools[0].price", 19, "invalid_price")),
        ("    price: 0.002\n", "    price: true\n", ("tools[0].price", 19, "invalid_price")),
        ("    price: 0.002\n", "    price: .nan\n", ("tools[0].price", 19, "invalid_price")),
        ("    price: 0.002\n", "    price: .inf\n", ("tools[0].price", 19, "invalid_price")),
        ("    price: 0.002\n", "    price: abc\n", ("tools[0].price", 19, "invalid_price")),
        ('  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"', '  pay_to: "0x1234"', ("payment.pay_to", 9, "invalid_address")),
        ('  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"', '  pay_to: "0xA0ee7A142d267C1f36714E4a8F75612F20a79720"', ("payment.pay_to", 9, "invalid_address")),
        ('  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"', '  pay_to: "0x0000000000000000000000000000000000000000"', ("payment.pay_to", 9, "zero_address")),
        ('  network: "eip155:31337"', '  network: "solana:mainnet"', ("payment.network", 4, "invalid_network")),
        ("  - name: get_report\n", "  - name: get_quote\n", ("tools[1].name", 24, "duplicate_tool")),
        ("    path: /reports/{report_id}\n", "    path: /quotes/{ticker}\n", ("tools[1].path", 27, "duplicate_route")),
        ("    path: /quotes/{symbol}\n", "    path: /quotes/{symbol}\n    upstream: nope\n", ("tools[0].upstream", 18, "unknown_upstream")),
        ("        symbol: {type: string}", "        ticker: {type: string}", ("tools[0].input_schema", 20, "path_param_not_in_schema")),
        ("      type: object\n", "      type: objekt\n", ("tools[0].input_schema", 20, "invalid_json_schema")),
        ("    upstream_path: /api/v1/quote/{symbol}", "    upstream_path: /api/v1/quote/{sym}", ("tools[0].upstream_path", 18, "path_param_mismatch")),
        ("    path: /quotes/{symbol}\n", "    path: /quotes/../{symbol}\n", ("tools[0].path", 17, "invalid_path")),
        ("    method: GET\n    path: /q", "    method: HEAD\n    path: /q", ("tools[0].method", 16, "invalid_method")),
        ('    base_url: "http://127.0.0.1:9101/"', '    base_url: "ftp://x"', ("upstreams.legacy.base_url", 12, "invalid_url")),
        ('    base_url: "http://127.0.0.1:9101/"', '    base_url: "http://u:p@x/"', ("upstreams.legacy.base_url", 12, "invalid_url")),
        ("catalog: 1\n", "catalog: 2\n", ("catalog", 1, "unsupported_version")),
        ("owner: acme-legacy", "owner: Acme Legacy", ("owner", 2, "invalid_name")),
        ("  decimals: 6", "  decimals: 6.5", ("payment.decimals", 8, "invalid_value")),
    ],
)
def test_bad_catalogs(old, new, expected):
    assert old in BASE
    assert one(BASE.replace(old, new)) == expected


def test_unknown_key_typo_suggests():
    found = issues(BASE.replace('    price: "0.005"\n', '    prise: "0.005"\n'))
    by_code = {i.code: i for i in found}
    assert by_code["unknown_key"].path == "tools[1].prise"
    assert by_code["unknown_key"].line == 28
    assert "did you mean 'price'" in by_code["unknown_key"].message
    assert by_code["missing_key"].path == "tools[1].price"
    assert by_code["missing_key"].line == 24  # reported at the tool that lacks it


def test_missing_price():
    path, line, code = one(BASE.replace('    price: "0.005"\n', ""))
    assert (path, line, code) == ("tools[1].price", 24, "missing_key")


def test_precision_message():
    found = issues(BASE.replace("    price: 0.002\n", "    price: 0.0000001\n"), "demo.yaml")
    assert str(CatalogError(found)) == "demo.yaml:19: tools[0].price: price 0.0000001 has more digits than the token's 6 decimals [price_precision]"


def test_upstream_required_when_several():
    text = BASE.replace("upstreams:\n", "upstreams:\n  other:\n    base_url: http://example.com\n")
    found = issues(text)
    assert {(i.path, i.code) for i in found} == {("tools[0].upstream", "upstream_required"), ("tools[1].upstream", "upstream_required")}


def test_yaml_syntax_error_has_line():
    text = BASE.replace("    method: GET\n    path: /reports", "    method: [GET\n    path: /reports")
    (issue,) = issues(text)
    assert issue.code == "yaml_syntax" and issue.line is not None and issue.line >= 26


def test_duplicate_yaml_key():
    path, line, code = one(BASE.replace("    price: 0.002\n", "    price: 0.002\n    price: 0.003\n"))
    assert (path, line, code) == ("tools[0].price", 20, "duplicate_key")


def test_empty_and_non_mapping():
    assert issues("")[0].code == "empty_catalog"
    assert issues("- a\n- b\n")[0].code == "invalid_value"


def test_missing_file(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(tmp_path / "nope.yaml")
    (issue,) = info.value.issues
    assert issue.code == "file_not_found" and issue.file.endswith("nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(CatalogError) as info:
        load_catalog(tmp_path)  # a directory
    assert info.value.issues[0].code == "file_unreadable"
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CatalogError) as info:
        load_catalog(bad)
    assert info.value.issues[0].code == "file_unreadable"


def test_cross_file_duplicates_name_both_files(tmp_path):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(BASE)
    b.write_text(BASE.replace("owner: acme-legacy", "owner: other").replace("/reports/{report_id}", "/other/{x}"))
    with pytest.raises(CatalogError) as info:
        load_catalogs([a, b])
    found = info.value.issues
    assert {(i.path, i.code) for i in found} == {
        ("tools[0].name", "duplicate_tool"),
        ("tools[0].path", "duplicate_route"),
        ("tools[1].name", "duplicate_tool"),
    }
    assert all(i.file == str(b) and str(a) in i.message for i in found)


def test_all_issues_reported_at_once():
    text = BASE.replace("    price: 0.002\n", "    price: 0\n").replace('  network: "eip155:31337"', '  network: "x:1"')
    assert {i.code for i in issues(text)} == {"invalid_price", "invalid_network"}


def test_yaml_floats_are_decimals_everywhere():
    text = BASE.replace("    price: 0.002\n", "    price: 1_000.000001\n")
    assert parse_catalog(text).tool("get_quote").price_atomic == 1_000_000_001


def test_schema_numbers_stay_json_serialisable():
    import json

    text = BASE.replace("        symbol: {type: string}", "        symbol: {type: string}\n        n: {type: number, minimum: 0.5, maximum: 3.0}")
    schema = parse_catalog(text).tool("get_quote").input_schema
    assert json.loads(json.dumps(schema))["properties"]["n"] == {"type": "number", "minimum": 0.5, "maximum": 3}


def test_catalog_package_is_a_leaf():
    import ast

    for path in Path(catalog.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in {"gateway", "settlement", "starlette", "httpx", "uvicorn", "sqlalchemy", "redis", "web3"}, (path, name)


# -- large catalogs: a clean file is built without the line map, which is made only to report -------

LARGE_TOOL = """\
  - name: tool_{i}
    description: "Generated endpoint number {i}"
    method: GET
    path: /svc{i}/quotes/{{symbol}}
    upstream_path: /api/v1/quote/{{symbol}}
    price: 0.002
    input_schema:
      type: object
      properties:
        symbol: {{type: string, pattern: "^[A-Z]{{1,5}}$"}}
{options}      required: [symbol]
"""
OPTIONS = "".join(f"        option_{n}: {{type: string}}\n" for n in range(10))


def large_catalog(tools: int, bad: dict[int, tuple[str, str]] | None = None) -> str:
    """BASE's header and ``tools`` generated tools (more YAML nodes than the old line-map walk
    covered); ``bad`` replaces a line of some tools: {index: (old, new)}."""
    header = BASE[: BASE.index("tools:\n") + len("tools:\n")]
    parts = [header]
    for i in range(tools):
        text = LARGE_TOOL.format(i=i, options=OPTIONS)
        if bad and i in bad:
            old, new = bad[i]
            assert old in text
            text = text.replace(old, new)
        parts.append(text)
    return "".join(parts)


def line_of(text: str, needle: str, after: str) -> int:
    """1-based line of the first ``needle`` after the line holding ``after``."""
    lines = text.splitlines()
    start = lines.index(after)
    return next(n for n, line in enumerate(lines[start:], start + 1) if needle in line)


def test_large_catalog_loads_with_shared_schema_and_terms():
    cat = parse_catalog(large_catalog(300))
    assert len(cat.tools) == 300 and cat.tools[-1].path == "/svc299/quotes/{symbol}"
    assert cat.tools[0].input_schema == cat.tools[-1].input_schema
    assert cat.tools[0].input_schema is cat.tools[-1].input_schema  # one object per distinct schema
    assert cat.tools[0].payment is cat.payment  # no payment block of its own: the catalog's terms
    assert all(t.price_atomic == 2000 for t in cat.tools)


def test_errors_deep_in_a_large_catalog_name_their_line():
    deep = 5990  # past the 200,000 YAML nodes the line map used to stop at
    text = large_catalog(6000, {
        deep: ("    price: 0.002\n", "    price: 0\n"),
        deep + 5: ("    method: GET\n", "    method: GET\n    prise: 1\n"),
    })
    found = issues(text, "big.yaml")
    by_path = {i.path: i for i in found}
    assert set(by_path) == {f"tools[{deep}].price", f"tools[{deep + 5}].prise"}
    price = by_path[f"tools[{deep}].price"]
    assert (price.code, price.line) == ("invalid_price", line_of(text, "price: 0", f"  - name: tool_{deep}"))
    assert str(price) == f"big.yaml:{price.line}: tools[{deep}].price: price must be greater than 0, got 0 [invalid_price]"
    unknown = by_path[f"tools[{deep + 5}].prise"]
    assert (unknown.code, unknown.line) == ("unknown_key", line_of(text, "prise: 1", f"  - name: tool_{deep + 5}"))


def test_cross_field_errors_deep_in_a_large_catalog_name_their_line():
    deep = 5995
    text = large_catalog(6000, {
        deep - 1: ("    price: 0.002\n", "    price: 0.0000001\n"),
        deep: ("/api/v1/quote/{symbol}", "/api/v1/quote/{sym}"),
    })
    found = issues(text, "big.yaml")
    price_line = line_of(text, "price: 0.0000001", f"  - name: tool_{deep - 1}")
    assert [(i.path, i.code, i.line) for i in found] == [
        (f"tools[{deep - 1}].price", "price_precision", price_line),
        (f"tools[{deep}].upstream_path", "path_param_mismatch", line_of(text, "{sym}", f"  - name: tool_{deep}")),
    ]


def test_duplicate_key_deep_in_a_large_catalog_names_its_line():
    deep = 1990  # a clean parse falls back to the full one, which reports it
    text = large_catalog(2000, {deep: ("    price: 0.002\n", "    price: 0.002\n    price: 0.003\n")})
    (issue,) = issues(text)
    assert (issue.path, issue.code) == (f"tools[{deep}].price", "duplicate_key")
    assert issue.line == line_of(text, "price: 0.003", f"  - name: tool_{deep}")


# The fast path builds data from the parser's events; PyYAML's composer and constructor are the
# reference, and anything the fast path does not build itself goes to them.
YAML_DOCUMENTS = [
    "", "# a comment only\n", "---\n", "a: 1", "- a\n- b\n", "a scalar", "'quoted'", "~",
    "a: &x {b: 1, c: [1, 2]}\nd: *x\n", "a: &s hello\nb: *s\n", "base: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n",
    "i: [0x1F, 0o17, 017, 1_000, 1:30, -5, +7, 0, 0b101]",
    "f: [1.5, 1_000.000_1, .inf, -.inf, .nan, 1:30.5, 6.8523015e+5, 1e3, 0.1e-2, 0., .5]",
    "b: [yes, No, ON, off, true, FALSE, y, n]", "n: [~, null, Null, '', ]", "t: 2001-12-14",
    "s: !!str 1", "s: !!int '3'", "s: !custom x", "? [a]\n: b", "a: 1\na: 2", "1: a\n'1': b", "1: a\n0x1: b",
    "yes: a\ntrue: b", "a: ! 12", "a:\n", "a: |\n  one\n  two\n", "a: >\n  folded\n  text\n", 'a: "\\t\\u00e9"',
    "- {a: 1}\n- [1, [2, [3]]]\n- !!map {x: y}\n- !!seq [1]\n", "a: [1, 2\n", "a: b: c", "--- 1\n--- 2\n",
    "a: *nope", "a: &x [1, *x]", "a: &x 1\nb: &x 2\nc: *x", "x: !!binary aGVsbG8=", "s: !!set {a, b}",
    "=: 1", '{"price": 0.002, "tools": [{"name": "x"}]}',
]


@pytest.mark.parametrize("text", YAML_DOCUMENTS)
def test_fast_yaml_path_builds_what_pyyaml_builds(text):
    import yaml

    from catalog.source import _construct_plain, _Loader, _NeedsFullConstructor

    def typed(value):
        if isinstance(value, dict):
            return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
        if isinstance(value, list):
            return ("list", [typed(v) for v in value])
        return (type(value).__name__, repr(value))

    try:
        fast = _construct_plain(text)
    except _NeedsFullConstructor:
        return  # left to PyYAML, as before
    assert typed(fast) == typed(yaml.load(text, Loader=_Loader))


def test_a_json_catalog_loads_as_its_yaml_twin():
    import json

    import yaml

    yaml_text = (EXAMPLES / "demo.yaml").read_text()
    json_text = json.dumps(yaml.safe_load(yaml_text), indent=2)  # JSON is YAML's flow style
    from_yaml = parse_catalog(yaml_text, "demo")
    from_json = parse_catalog(json_text, "demo")
    assert from_json == from_yaml
    assert [t.price for t in from_json.tools] == [t.price for t in from_yaml.tools]  # Decimals, exact
    bad = json_text.replace('"price": 0.002', '"price": 0.0000001', 1)
    (issue,) = issues(bad, "demo.json")
    assert issue.code == "price_precision"
    assert issue.line == next(n for n, line in enumerate(bad.splitlines(), 1) if '"price": 0.0000001' in line)
