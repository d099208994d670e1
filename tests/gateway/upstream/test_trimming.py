"""The trimmer (gateway.upstream.trimming): what a caller may ask, refused with the position of the
error; projections, item limits and token budgets applied as asked and described; a projection's
cost bounded."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from catalog import parse_catalog
from gateway.errors import GatewayError
from gateway.surfaces.discovery import advertised_schema, tool_request
from gateway.upstream.documents import dumps
from gateway.upstream.trimming import (
    MAX_EXPRESSION_CHARS,
    AnswerRequest,
    answer_request,
    compile_projection,
    estimate_tokens,
    trim,
)

DOCUMENT = {"items": [{"name": f"n{i}", "price": Decimal("1.10") + i, "tags": ["a", "b", "c"]} for i in range(6)], "total": 6}
CATALOG = """catalog: 1
owner: acme
payment: {{network: "eip155:31337", asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3", pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"}}
upstreams:
  u: {{base_url: "http://127.0.0.1:9"}}
tools:
  - name: a
    description: d
    method: {method}
    path: /a
    price: "0.002"
    input_schema: {{type: object, properties: {{q: {{type: string}}}}}}
{answers}"""


def tool(answers: str = "    answers: {trim: true}\n", method: str = "GET") -> Any:
    return parse_catalog(CATALOG.format(answers=answers, method=method)).tools[0]


def body_of(document: Any) -> tuple[bytes, Any]:
    text = dumps(document)  # exact decimals, as an upstream would send them
    return text, json.loads(text, parse_float=Decimal)


def run(request: AnswerRequest, document: Any = DOCUMENT) -> tuple[Any, str]:
    body, parsed = body_of(document)
    trimmed = trim(request, body, parsed)
    return json.loads(trimmed.body, parse_float=Decimal), trimmed.describe()


def test_parameters_are_taken_out_of_the_arguments_and_out_of_the_upstream_query() -> None:
    pairs = [("q", "x"), ("x402gw_fields", "items[*].name"), ("x402gw_max_items", "3")]
    request, rest = answer_request(tool(), pairs, "q=x&x402gw_fields=items%5B*%5D.name&x402gw_max_items=3")
    assert rest == [("q", "x")]
    assert request is not None and request.fields == "items[*].name" and request.max_items == 3
    assert request.upstream_query == "q=x" and request.token_budget is None


def test_the_catalog_defaults_apply_when_the_caller_asks_nothing() -> None:
    request, rest = answer_request(tool("    answers: {trim: true, max_items: 4, token_budget: 100}\n"), [("q", "x")], "q=x")
    assert rest == [("q", "x")] and request is not None
    assert (request.fields, request.max_items, request.token_budget, request.upstream_query) == (None, 4, 100, "q=x")
    caller, _ = answer_request(tool("    answers: {trim: true, max_items: 4}\n"), [("x402gw_max_items", "9")], "")
    assert caller is not None and caller.max_items == 9


def test_a_tool_without_answers_is_untouched_and_refuses_the_parameters() -> None:
    plain = tool("")
    assert answer_request(plain, [("q", "x")], "q=x") == (None, [("q", "x")])
    with pytest.raises(GatewayError) as error:
        answer_request(plain, [("x402gw_fields", "a")], "x402gw_fields=a")
    assert (error.value.code, error.value.status) == ("answer_trimming_not_offered", 400)


@pytest.mark.parametrize(("pairs", "code"), [
    ([("x402gw_fields", "a"), ("x402gw_fields", "b")], "answer_parameter_invalid"),
    ([("x402gw_budget", "5")], "answer_parameter_invalid"),
    ([("x402gw_max_items", "1e3")], "answer_limit_invalid"),
    ([("x402gw_max_items", "100001")], "answer_limit_invalid"),
    ([("x402gw_token_budget", "0")], "answer_limit_invalid"),
    ([("x402gw_token_budget", "١٢")], "answer_limit_invalid"),  # digits, but not ASCII ones
])
def test_bad_parameters_are_refused(pairs: list[tuple[str, str]], code: str) -> None:
    with pytest.raises(GatewayError) as error:
        answer_request(tool(), pairs, "")
    assert (error.value.code, error.value.status) == (code, 400)


@pytest.mark.parametrize(("expression", "position", "problem"), [
    ("items[", 6, "ends too soon"),
    ("items[*].name)", 13, "Unexpected token"),
    ('items."name', 6, "Unclosed"),
    ("sort_by(items, &price)", 0, "functions are not taken"),
    ("items[*].length(tags)", 9, "functions are not taken"),
    ("items[::0]", 8, "slice step cannot be 0"),
    ("", 0, "empty"),
    ("a" * (MAX_EXPRESSION_CHARS + 1), MAX_EXPRESSION_CHARS, "longer than"),
    (".".join(["a"] * 200), 0, "terms"),
])
def test_a_malformed_projection_names_its_position(expression: str, position: int, problem: str) -> None:
    with pytest.raises(GatewayError) as error:
        compile_projection(expression)
    assert error.value.code == "answer_fields_invalid" and error.value.status == 400
    assert error.value.fields["position"] == position and error.value.fields["parameter"] == "x402gw_fields"
    assert problem in error.value.fields["problem"]


def test_a_projection_keeps_what_it_names_with_exact_numbers() -> None:
    expression = "items[?price > `3`].{n: name, p: price}"
    answer, note = run(AnswerRequest(fields=expression, projection=compile_projection(expression)))
    assert answer == [{"n": f"n{i}", "p": Decimal("1.10") + i} for i in range(2, 6)]
    assert note == "fields"


def test_an_item_limit_cuts_every_array_top_down() -> None:
    answer, note = run(AnswerRequest(max_items=2))
    assert answer["items"] == [{**item, "tags": ["a", "b"]} for item in DOCUMENT["items"][:2]]
    assert note == "max-items=2;arrays=3;dropped=6"  # items 6 → 2, then each kept item's tags 3 → 2
    untouched, note = run(AnswerRequest(max_items=10))
    assert untouched == DOCUMENT and note == "max-items=10;arrays=0;dropped=0"


def test_a_token_budget_keeps_the_most_items_that_fit() -> None:
    body, _ = body_of(DOCUMENT)
    whole = estimate_tokens(len(body))
    answer, note = run(AnswerRequest(token_budget=whole))
    assert answer == DOCUMENT and note.startswith(f"token-budget={whole};arrays=0;dropped=0")
    answer, note = run(AnswerRequest(token_budget=40))
    kept = len(answer["items"])
    assert 1 <= kept < 6 and estimate_tokens(len(dumps(answer))) <= 40 and "over" not in note
    assert note.startswith(f"token-budget=40;items={kept};") and note.endswith(f";tokens={estimate_tokens(len(dumps(answer)))}")
    # One more item in every array would not have fitted.
    _, more = body_of(DOCUMENT)
    more["items"] = more["items"][:kept + 1]
    for item in more["items"]:
        del item["tags"][kept + 1:]
    assert estimate_tokens(len(dumps(more))) > 40


def test_a_budget_no_cut_can_meet_is_said() -> None:
    answer, note = run(AnswerRequest(token_budget=1), {"long": "x" * 100, "list": [1, 2, 3]})
    assert answer == {"long": "x" * 100, "list": []}
    assert note.endswith(";over") and "items=0" in note


def test_the_three_apply_in_order_and_are_all_said() -> None:
    expression = "items[*].tags"
    answer, note = run(AnswerRequest(fields=expression, projection=compile_projection(expression), max_items=3, token_budget=5))
    # the projection's 6 lists of tags cut to 3 (each kept one has 3 already), then the budget
    assert note.startswith("fields, max-items=3;arrays=1;dropped=3, token-budget=5;")
    assert len(answer) <= 3


@pytest.mark.parametrize("expression", [
    "|".join(["[@,@][]"] * 12),  # a list that doubles twelve times
    "|".join(["[@,@]"] * 30),  # a small object that serialises to 2^30 copies
    "items[]" + ".[@,@][]" * 12,
])
def test_a_projection_that_would_build_without_bound_is_not_applied(expression: str) -> None:
    answer, note = run(AnswerRequest(fields=expression, projection=compile_projection(expression), max_items=1))
    assert note.startswith('fields=?0;error="projection_too_costly"')
    assert answer["total"] == 6 and len(answer["items"]) == 1  # the limits still apply


def test_a_repeated_node_in_a_projection_is_cut_once_per_place() -> None:
    expression = "[items, items]"
    answer, note = run(AnswerRequest(fields=expression, projection=compile_projection(expression), max_items=2))
    # each place of the repeated list cut on its own (6 → 2), and each kept item's tags (3 → 2)
    assert [len(part) for part in answer] == [2, 2] and note == "fields, max-items=2;arrays=6;dropped=12"
    assert answer[0] == answer[1] and answer[0] is not answer[1]


def test_discovery_adds_the_parameters_and_requests_carry_them_in_the_query() -> None:
    schema = advertised_schema(tool())
    assert set(schema["properties"]) == {"q", "x402gw_fields", "x402gw_max_items", "x402gw_token_budget"}
    assert advertised_schema(tool("")) == tool("").input_schema
    post = tool(method="POST")
    call = tool_request(post.method, post.path, {"q": "x", "x402gw_max_items": 2})
    assert (call.query, json.loads(call.body)) == ("x402gw_max_items=2", {"q": "x"})
