"""Discovery formats on a running gateway: /tools, /openapi.json, bazaar listings, llms.txt, and the
`next` step in every refusal. All must agree with the catalog the gateway serves."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate as validate_openapi
from x402.extensions.bazaar import BodyDiscoveryExtension, QueryDiscoveryExtension

from gateway.errors import GatewayError
from gateway.surfaces.discovery import tool_request
from tests.conftest import PAY_TO, Devchain, RunningGateway, body_json, offer_of


def test_tools_are_openai_functions_with_price_and_url(gateway: RunningGateway, devchain: Devchain) -> None:
    with gateway.client() as client:
        response = client.get("/tools")
    assert response.status_code == 200
    tools = {entry["function"]["name"]: entry for entry in response.json()["tools"]}
    assert set(tools) == {tool.name for tool in gateway.catalogs.tools}
    quote = tools["get_quote"]
    assert quote["type"] == "function"
    assert quote["function"]["parameters"] == gateway.catalogs.tool("get_quote").input_schema
    assert quote["function"]["description"].startswith("Latest price in USD")
    assert (quote["method"], quote["url"]) == ("GET", f"{gateway.url}/quotes/{{symbol}}")
    assert (quote["price"], quote["priceAtomic"]) == ("0.002", "2000")
    assert (quote["asset"], quote["network"], quote["payTo"]) == (devchain.token, "eip155:31337", PAY_TO)
    assert quote["settle"] == "after"
    assert tools["create_order"]["price"] == "0.01" and tools["create_order"]["priceAtomic"] == "10000"


def test_public_url_is_used_in_every_format(start_gateway: Any) -> None:
    gateway = start_gateway(public_url="https://pay.example/")
    with gateway.client() as client:
        assert client.get("/tools").json()["tools"][0]["url"].startswith("https://pay.example/")
        assert client.get("/openapi.json").json()["servers"] == [{"url": "https://pay.example"}]
        assert client.get("/discovery/resources").json()["items"][0]["resource"].startswith("https://pay.example/")
        assert "https://pay.example/quotes/{symbol}" in client.get("/llms.txt").text


def test_documents_are_kept_per_base_url(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        first = client.get("/openapi.json").content
        other = client.get("/openapi.json", headers={"host": "other.example"}).json()
        again = client.get("/openapi.json").content
        tools = client.get("/tools", headers={"host": "other.example"}).json()["tools"]
        llms = client.get("/llms.txt", headers={"host": "other.example"}).text
    assert other["servers"] == [{"url": "http://other.example"}]  # each base gets its own document
    assert again == first and b"other.example" not in first
    assert all(t["url"].startswith("http://other.example/") for t in tools)
    assert "http://other.example/quotes/{symbol}" in llms


def test_openapi_document_is_valid_and_priced(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        document = client.get("/openapi.json").json()
    validate_openapi(document)  # raises on an invalid OpenAPI 3.1 document
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    assert set(paths) == {tool.path for tool in gateway.catalogs.tools}
    quote = paths["/quotes/{symbol}"]["get"]
    assert quote["operationId"] == "get_quote"
    assert quote["parameters"] == [
        {"name": "symbol", "in": "path", "required": True,
         "schema": gateway.catalogs.tool("get_quote").input_schema["properties"]["symbol"]}
    ]
    assert quote["x-x402-price"]["amount"] == "0.002" and quote["x-x402-price"]["atomic"] == "2000"
    assert quote["x-x402-price"]["payTo"] == PAY_TO
    assert "PAYMENT-REQUIRED" in quote["responses"]["402"]["headers"]
    assert {"400", "402", "409", "422", "503"} <= set(quote["responses"])
    weather = paths["/weather"]["get"]
    assert {(p["name"], p["in"], p["required"]) for p in weather["parameters"]} == {
        ("city", "query", True), ("units", "query", False)
    }
    order = paths["/orders"]["post"]
    assert "parameters" not in order
    assert order["requestBody"]["content"]["application/json"]["schema"]["required"] == ["symbol", "quantity"]


def test_discovery_resources_pages_through_the_bazaar_listing(gateway: RunningGateway) -> None:
    names = [tool.name for tool in gateway.catalogs.tools]
    with gateway.client() as client:
        first = client.get("/discovery/resources", params={"type": "http", "limit": 2, "offset": 0}).json()
        last = client.get("/discovery/resources", params={"type": "http", "limit": 2, "offset": 4}).json()
        default = client.get("/discovery/resources").json()
        beyond = client.get("/discovery/resources", params={"offset": 50}).json()
        other_type = client.get("/discovery/resources", params={"type": "mcp"}).json()
        by_network = client.get("/discovery/resources", params={"network": "eip155:1"}).json()
    assert first["pagination"] == {"limit": 2, "offset": 0, "total": 5}
    assert [i["metadata"]["name"] for i in first["items"]] == names[:2]
    assert [i["metadata"]["name"] for i in last["items"]] == names[4:]
    assert default["pagination"] == {"limit": 20, "offset": 0, "total": 5} and len(default["items"]) == 5
    assert beyond["items"] == [] and beyond["pagination"]["total"] == 5
    assert other_type["items"] == [] and by_network["items"] == []
    item = first["items"][0]
    assert set(item) == {"resource", "type", "x402Version", "accepts", "lastUpdated", "metadata"}
    assert item["type"] == "http" and item["x402Version"] == 2 and isinstance(item["lastUpdated"], int)
    assert item["resource"] == f"{gateway.url}/quotes/{{symbol}}"
    assert item["accepts"][0]["amount"] == "2000" and "requestBinding" not in item["accepts"][0]["extra"]


@pytest.mark.parametrize("query", [{"limit": "0"}, {"limit": "101"}, {"limit": "ten"}, {"offset": "-1"}])
def test_bad_paging_parameters_are_a_400_with_a_code(gateway: RunningGateway, query: dict[str, str]) -> None:
    with gateway.client() as client:
        response = client.get("/discovery/resources", params=query)
    assert response.status_code == 400
    body = body_json(response)
    assert body["error"] == "invalid_parameter"
    assert body["next"] == {"action": "fix_arguments", "fields": list(query)}


def test_well_known_and_llms_txt_list_every_tool(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        well_known = client.get("/.well-known/x402").json()
        llms = client.get("/llms.txt")
    assert well_known["resources"] == [f"{gateway.url}{tool.path}" for tool in gateway.catalogs.tools]
    assert well_known["discovery"]["mcp"] == f"{gateway.url}/mcp"
    assert llms.headers["content-type"].startswith("text/plain")
    for tool in gateway.catalogs.tools:
        assert f"### {tool.name}" in llms.text
        assert f"price: {tool.price:f}".rstrip("0").rstrip(".") in llms.text
    assert "PAYMENT-SIGNATURE" in llms.text and "x402/payment" in llms.text


def test_every_challenge_carries_the_bazaar_extension(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        get_offer = offer_of(client.get("/weather", params={"city": "Oslo"}))
        post_offer = offer_of(client.post("/orders", json={"symbol": "MSFT", "quantity": 1}))
        path_offer = offer_of(client.get("/quotes/AAPL"))
    for offer, model in ((get_offer, QueryDiscoveryExtension), (post_offer, BodyDiscoveryExtension),
                         (path_offer, QueryDiscoveryExtension)):
        extensions = offer.extensions or {}
        assert "payment-identifier" in extensions
        bazaar = extensions["bazaar"]
        model.model_validate(bazaar)  # the official SDK's shape
        Draft202012Validator.check_schema(bazaar["schema"])
        if model is QueryDiscoveryExtension:  # a body tool's info.body is an empty example, as in the SDK
            assert list(Draft202012Validator(bazaar["schema"]).iter_errors(bazaar["info"])) == []
    assert get_offer.extensions["bazaar"]["schema"]["properties"]["input"]["properties"]["queryParams"]["required"] == ["city"]
    assert post_offer.extensions["bazaar"]["info"]["input"]["bodyType"] == "json"
    assert path_offer.extensions["bazaar"]["info"]["input"]["pathParams"] == {"symbol": "{symbol}"}


def test_refusals_say_what_to_do_next(gateway: RunningGateway) -> None:
    with gateway.client() as client:
        unpaid = client.get("/quotes/AAPL")
        bad_args = client.post("/orders", json={"symbol": "MSFT", "quantity": 0})
        bad_json = client.post("/orders", content=b"{not json", headers={"content-type": "application/json"})
        unknown = client.get("/admin/users")
        wrong_method = client.delete("/quotes/AAPL")
        bad_header = client.get("/quotes/AAPL", headers={"PAYMENT-SIGNATURE": "%%%"})
    assert body_json(unpaid)["next"]["action"] == "pay"
    assert body_json(bad_args)["next"] == {"action": "fix_arguments", "fields": ["quantity"]}
    assert body_json(bad_json)["next"]["action"] == "fix_arguments"
    assert body_json(unknown)["next"] == {"action": "discover", "tools": "/tools"}
    assert body_json(wrong_method)["next"] == {"action": "use_method", "allowed": ["GET", "HEAD"]}
    assert body_json(bad_header)["next"]["action"] == "fix_payment"


def test_tool_request_is_deterministic_and_splits_arguments() -> None:
    get = tool_request("GET", "/a/{x}", {"x": "b c/d", "z": 2, "y": [True, "q"], "n": None})
    assert (get.method, get.path, get.query, get.body) == ("GET", "/a/b%20c%2Fd", "y=true&y=q&z=2", b"")
    post = tool_request("post", "/orders/{id}", {"qty": 1, "id": 7, "sym": "X"})
    assert (post.method, post.target, post.body) == ("POST", "/orders/7", b'{"qty":1,"sym":"X"}')
    with pytest.raises(GatewayError) as info:
        tool_request("GET", "/a/{x}/{y}", {"x": 1})
    assert info.value.code == "invalid_arguments" and info.value.fields["fields"][0]["field"] == "y"
