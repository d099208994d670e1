from decimal import Decimal

import pytest

from catalog import PaymentTerms, Router, Tool, Upstream, parse_template, route_shape

PAYMENT = PaymentTerms(
    network="eip155:31337",
    asset="0x5FbDB2315678afecb367f032d93F642f64180aa3",
    asset_name="USD Coin",
    asset_version="2",
    decimals=6,
    pay_to="0xa0Ee7A142d267C1f36714E4a8F75612F20a79720",
)
UPSTREAM = Upstream(name="legacy", base_url="http://127.0.0.1:9101")


def tool(name: str, path: str, method: str = "GET") -> Tool:
    return Tool(
        owner="acme", name=name, description=name, method=method, path=path, upstream=UPSTREAM,
        upstream_path=path, price=Decimal("0.001"), payment=PAYMENT,
    )


@pytest.fixture
def router() -> Router:
    return Router([
        tool("quote", "/quotes/{symbol}"),
        tool("quote_latest", "/quotes/latest"),
        tool("order", "/orders", "POST"),
        tool("orders_list", "/orders"),
        tool("order_delete", "/orders/{id}", "DELETE"),
        tool("item", "/a/{x}/d"),
        tool("item_c", "/a/b/c"),
        tool("deep", "/u/{user}/posts/{post}"),
    ])


def test_literal_and_param_match(router):
    found = router.match("GET", "/quotes/ACME")
    assert found is not None and found.tool.name == "quote" and found.params == {"symbol": "ACME"}
    found = router.match("POST", "/orders")
    assert found is not None and found.tool.name == "order" and found.params == {}
    found = router.match("GET", "/u/7/posts/9")
    assert found is not None and found.params == {"user": "7", "post": "9"}


def test_literal_wins_over_param(router):
    assert router.match("GET", "/quotes/latest").tool.name == "quote_latest"


def test_backtracks_to_param_when_literal_branch_fails(router):
    found = router.match("GET", "/a/b/d")
    assert found is not None and found.tool.name == "item" and found.params == {"x": "b"}
    assert router.match("GET", "/a/b/c").tool.name == "item_c"


def test_method_selects_route(router):
    assert router.match("DELETE", "/orders/5").tool.name == "order_delete"
    assert router.match("GET", "/orders/5") is None
    assert router.match("put", "/orders") is None
    assert router.match("post", "/orders").tool.name == "order"  # method case-insensitive


def test_head_matches_get(router):
    assert router.match("HEAD", "/quotes/ACME").tool.name == "quote"
    assert router.match("HEAD", "/orders").tool.name == "orders_list"
    assert router.match("HEAD", "/orders/5") is None


def test_allowed_methods(router):
    assert router.allowed_methods("/orders") == {"GET", "HEAD", "POST"}
    assert router.allowed_methods("/orders/5") == {"DELETE"}
    assert router.allowed_methods("/nope") == set()


@pytest.mark.parametrize(
    "path",
    ["/quotes/", "/quotes//ACME", "//quotes/ACME", "/quotes/.", "/quotes/..", "/quotes/../orders", "/./orders",
     "quotes/ACME", "", "/", "/quotes/ACME/", "/unknown", "/quotes/ACME/extra"],
)
def test_refused_or_unknown_paths(router, path):
    assert router.match("GET", path) is None


def test_param_never_contains_slash(router):
    assert router.match("GET", "/quotes/A/B") is None


def test_duplicate_routes_rejected():
    with pytest.raises(ValueError):
        Router([tool("a", "/a/{x}"), tool("b", "/a/{y}")])
    with pytest.raises(ValueError):
        Router([tool("a", "/a"), tool("b", "/a")])
    Router([tool("a", "/a/{x}"), tool("b", "/a/{y}", "POST")])


def test_route_shape_and_templates():
    assert route_shape("get", "/a/{x}") == route_shape("GET", "/a/{y}")
    assert [s.value for s in parse_template("/a/{x}/b")] == ["a", "x", "b"]
    for bad in ["a", "/a//b", "/a/./b", "/a/{x}{y}", "/a/%2F", "/a?b", "/a#b", "/{x}/{x}", "/a/{1x}", "/"]:
        with pytest.raises(ValueError):
            parse_template(bad)


def test_ten_thousand_tools():
    tools = []
    for i in range(5000):
        tools.append(tool(f"lit_{i}", f"/svc{i}/items"))
        tools.append(tool(f"par_{i}", f"/svc{i}/items/{{item_id}}/detail"))
    router = Router(tools)
    assert len(router) == 10_000
    for i in (0, 1234, 4999):
        assert router.match("GET", f"/svc{i}/items").tool.name == f"lit_{i}"
        found = router.match("GET", f"/svc{i}/items/xyz/detail")
        assert found.tool.name == f"par_{i}" and found.params == {"item_id": "xyz"}
    assert router.match("GET", "/svc5000/items") is None
