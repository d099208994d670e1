"""Routes of different owners may not share a path: whichever the router picks would sell the other's
calls to its own payTo (``route_overlaps_owner``, catalog/across.py). A literal beside a template is
found by probing; two templates that share paths only where each has a literal the other has as a
parameter (``/{x}/AAPL`` and ``/q/{s}`` both take ``/q/AAPL``) are found by the path made of both."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog import CatalogError, load_catalogs

CATALOG = """
catalog: 1
owner: {owner}
payment: {{network: "eip155:31337", asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3", asset_name: "USD Coin",
           asset_version: "2", decimals: 6, pay_to: "{pay_to}", max_timeout_seconds: 120}}
upstreams:
  api: {{base_url: "http://127.0.0.1:9", timeout_seconds: 5}}
tools:
  - name: {name}
    description: a tool of {owner}
    method: GET
    path: {path}
    upstream: api
    upstream_path: {path}
    price: "0.002"
"""
A_PAY_TO, B_PAY_TO = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"


def two_owners(tmp_path: Path, a_path: str, b_path: str) -> list[Path]:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(CATALOG.format(owner="alpha", pay_to=A_PAY_TO, name="alpha_tool", path=a_path))
    b.write_text(CATALOG.format(owner="beta", pay_to=B_PAY_TO, name="beta_tool", path=b_path))
    return [a, b]


@pytest.mark.parametrize(("a_path", "b_path", "winner"), [
    ("/q/{symbol}", "/q/AAPL", "beta_tool"),  # a literal beside a template (the probe finds it)
    ("/q/{symbol}", "/{market}/AAPL", "alpha_tool"),  # /q/AAPL: both templates; alpha's literal 'q' wins
    ("/{market}/{symbol}/daily", "/eu/{symbol}/{period}", "beta_tool"),  # /eu/x/daily
])
def test_routes_of_two_owners_that_share_a_path_are_refused(tmp_path: Path, a_path: str, b_path: str, winner: str) -> None:
    with pytest.raises(CatalogError) as refused:
        load_catalogs(two_owners(tmp_path, a_path, b_path))
    [issue] = [issue for issue in refused.value.issues if issue.code == "route_overlaps_owner"]
    taker, loser = (a_path, "beta_tool") if winner == "alpha_tool" else (b_path, "alpha_tool")
    # named on the route the router picks (the one taking the other's calls), naming the other
    assert issue.message.startswith(f"route GET {taker} takes requests") and f"tool {loser!r}" in issue.message


@pytest.mark.parametrize(("a_path", "b_path"), [
    ("/q/{symbol}", "/r/{symbol}"),
    ("/q/{symbol}", "/q/{symbol}/history"),
    ("/{market}/AAPL", "/{market}/MSFT"),
])
def test_routes_of_two_owners_that_share_no_path_load(tmp_path: Path, a_path: str, b_path: str) -> None:
    loaded = load_catalogs(two_owners(tmp_path, a_path, b_path))
    assert sorted(tool.name for tool in loaded.tools) == ["alpha_tool", "beta_tool"]
