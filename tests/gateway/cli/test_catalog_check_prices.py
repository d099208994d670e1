"""``x402gw catalog-check`` lists a tool priced by a rule with its rule, not one amount."""

from __future__ import annotations

from catalog import Catalogs, parse_catalog
from gateway.cli.catalog_check import describe_offers

TEXT = """catalog: 1
owner: acme
payment:
  network: "eip155:31337"
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3"
  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"
upstreams:
  u: {base_url: "http://127.0.0.1:9"}
tools:
  - {name: fixed, description: d, method: GET, path: /f, price: "$0.002"}
  - name: by_page
    description: d
    method: GET
    path: /p
    price: {base: "$0.01", per: pages, each: "$0.002"}
    input_schema: {type: object, properties: {pages: {type: integer, minimum: 1}}, required: [pages]}
"""


def test_a_rule_is_listed_as_its_rule() -> None:
    lines = describe_offers(Catalogs(catalogs=(parse_catalog(TEXT),)))
    fixed = next(line for line in lines if " fixed " in line)
    by_page = next(line for line in lines if " by_page " in line)
    assert fixed.endswith("$0.002 = 0.002 USDC (2000 atomic)")
    assert by_page.endswith("$0.01 plus $0.002 per pages (a count of 1: $0.012 = 0.012 USDC, 12000 atomic)")
