"""A tool's reaccess: block (catalog.reaccess): what loads, and the refusals at file:line."""

from __future__ import annotations

import pytest

from catalog import CatalogError, parse_catalog
from tests.support.catalog_text import one_tool_catalog


def test_no_block_means_every_call_is_paid() -> None:
    [tool] = parse_catalog(one_tool_catalog("")).tools
    assert tool.reaccess is None


@pytest.mark.parametrize(("block", "window", "match"), [
    ("{window: 1h}", 3600, "request"),
    ("{window: 90, match: tool}", 90, "tool"),
    ("{window: 30d, match: request}", 30 * 86_400, "request"),
])
def test_a_block_loads(block: str, window: int, match: str) -> None:
    [tool] = parse_catalog(one_tool_catalog(f"    reaccess: {block}\n")).tools
    assert tool.reaccess is not None and (tool.reaccess.window, tool.reaccess.match) == (window, match)


@pytest.mark.parametrize(("extra", "code", "path"), [
    ("    reaccess: {window: soon}\n", "invalid_window", "tools[0].reaccess.window"),
    ("    reaccess: {window: 31d}\n", "invalid_window", "tools[0].reaccess.window"),
    ("    reaccess: {window: 1h, match: caller}\n", "invalid_match", "tools[0].reaccess.match"),
    ("    reaccess: {match: tool}\n", "missing_key", "tools[0].reaccess.window"),
    ("    reaccess: {window: 1h, scope: all}\n", "unknown_key", "tools[0].reaccess.scope"),
    ("    side_effects: true\n    reaccess: {window: 1h, match: tool}\n", "reaccess_repeats_side_effects", "tools[0].reaccess.match"),
])
def test_mistakes_are_reported_with_their_code(extra: str, code: str, path: str) -> None:
    with pytest.raises(CatalogError) as error:
        parse_catalog(one_tool_catalog(extra), "tools.yaml")
    issue = next(i for i in error.value.issues if i.code == code)
    assert issue.path == path and issue.line is not None and issue.line >= 15  # at the block, not the file


def test_a_state_changing_tool_may_have_the_stored_answer_again_but_not_a_fresh_call() -> None:
    post = one_tool_catalog("    reaccess: {window: 1h}\n").replace("method: GET", "method: POST")
    [tool] = parse_catalog(post).tools
    assert tool.reaccess is not None and tool.reaccess.match == "request"
    with pytest.raises(CatalogError) as error:
        parse_catalog(post.replace("{window: 1h}", "{window: 1h, match: tool}"))
    assert [i.code for i in error.value.issues] == ["reaccess_repeats_side_effects"]
