"""A tool's answers: block (catalog.answers): what loads, and the refusals at file:line."""

from __future__ import annotations

import pytest

from catalog import CatalogError, parse_catalog
from tests.support.catalog_text import one_tool_catalog

catalog = one_tool_catalog


def test_no_block_means_answers_pass_through() -> None:
    [tool] = parse_catalog(catalog("")).tools
    assert tool.answers is None


def test_a_full_block_loads() -> None:
    text = catalog("    output_schema: {type: object}\n    answers: {trim: true, max_items: 20, token_budget: 2000, drift: fail}\n")
    [tool] = parse_catalog(text).tools
    assert tool.answers is not None
    assert (tool.answers.trim, tool.answers.max_items, tool.answers.token_budget, tool.answers.drift) == (True, 20, 2000, "fail")


@pytest.mark.parametrize(("extra", "code", "path", "line"), [
    ("    answers: {max_items: 5}\n", "trim_required", "tools[0].answers", 15),
    ("    answers: {trim: true, max_items: -1}\n", "invalid_value", "tools[0].answers.max_items", 15),
    ("    answers: {trim: true, token_budget: 0}\n", "invalid_value", "tools[0].answers.token_budget", 15),
    ("    answers: {drift: ignore}\n", "invalid_drift", "tools[0].answers.drift", 15),
    ("    answers: {drift: fail}\n", "output_schema_required", "tools[0].answers.drift", 15),
    ("    answers: {trim: true, max_item: 5}\n", "unknown_key", "tools[0].answers.max_item", 15),
    ("    input_schema: {type: object, properties: {x402gw_fields: {type: string}}}\n",
     "reserved_argument", "tools[0].input_schema", 15),
])
def test_mistakes_are_reported_at_their_line(extra: str, code: str, path: str, line: int) -> None:
    with pytest.raises(CatalogError) as error:
        parse_catalog(catalog(extra), "tools.yaml")
    issue = next(i for i in error.value.issues if i.code == code)
    assert (issue.path, issue.line, issue.file) == (path, line, "tools.yaml")
    assert str(issue).startswith(f"tools.yaml:{line}: ")
