"""``refund_on``: which failed calls of an upfront tool are refunded. By default only the upstream's
failures (a refund costs gas: refunding the caller's own bad requests would let any payer make the
gateway spend it for free); ``any_failure`` refunds every failed call, as before."""

from __future__ import annotations

import pytest

from catalog import parse_catalog
from gateway.pipeline.refunds import callers_failure, keeps_charge
from tests.catalog.test_loader import BASE, issues, one


def test_an_upfront_tool_refunds_the_upstreams_failures_by_default() -> None:
    tool = parse_catalog(BASE + "    settle: upfront\n").tool("get_report")
    assert tool.settle == "upfront" and tool.refund_on == "upstream_fault"


def test_any_failure_is_written_per_tool() -> None:
    tool = parse_catalog(BASE + "    settle: upfront\n    refund_on: any_failure\n").tool("get_report")
    assert tool.refund_on == "any_failure"
    assert parse_catalog(BASE).tool("get_quote").refund_on == "upstream_fault"


@pytest.mark.parametrize(("added", "expected"), [
    ("    settle: upfront\n    refund_on: sometimes\n", ("tools[1].refund_on", 30, "invalid_value")),
    ("    refund_on: any_failure\n", ("tools[1].refund_on", 29, "refund_on_needs_upfront")),  # a settle-after GET
    ("    settle: after\n    refund_on: upstream_fault\n", ("tools[1].refund_on", 30, "refund_on_needs_upfront")),
])
def test_bad_refund_on_is_a_clear_issue(added: str, expected: tuple[str, int, str]) -> None:
    assert one(BASE + added) == expected


@pytest.mark.parametrize(("status", "fault", "callers"), [
    (400, None, True), (404, None, True), (409, None, True), (422, None, True),
    (408, None, False), (429, None, False),  # the upstream timed out, or would not serve now
    (401, None, False), (403, None, False), (407, None, False),  # the owner's credentials, as the gateway sends them
    (405, None, False), (415, None, False),  # the request the gateway built
    (500, None, False), (502, None, False), (503, None, False),
    (502, "soap:Client", False), (502, "Sender", False),  # SOAP 1.1 files the owner's bad token under Client too
    (502, "env:Receiver", False), (502, "Server", False),
    (502, 17, False),  # not a fault code
])
def test_whose_failure_it_is(status: int, fault: object, callers: bool) -> None:
    assert callers_failure(status, fault) is callers


@pytest.mark.parametrize(("status", "callers"), [
    (401, True), (403, True), (429, True), (407, False), (404, True), (500, False),
])
def test_a_user_scoped_tools_refused_credential_is_the_callers(status: int, callers: bool) -> None:
    """A tool that sends the caller's own token (or its payer's linked account) upstream: a 401 or
    403 is about that credential, the caller's, and so is a 429 (that credential's own quota at the
    upstream: refunded, a caller could drain the refund account by running over it); so is a SOAP
    Client fault."""
    assert callers_failure(status, user_scoped=True) is callers
    assert callers_failure(502, "soap:Client", user_scoped=True)


def test_a_tool_keeps_the_charge_by_its_policy_and_by_whose_credential_it_sends() -> None:
    tool = parse_catalog(BASE + "    settle: upfront\n").tool("get_report")
    assert keeps_charge(tool, 404) and not keeps_charge(tool, 401) and not keeps_charge(tool, 500)
    assert not keeps_charge(tool.model_copy(update={"refund_on": "any_failure"}), 404)
    scoped = tool.model_copy(update={"wallet_accounts": object()})  # the payer's linked account goes upstream
    assert keeps_charge(scoped, 401) and keeps_charge(scoped, 502, "soap:Client")


def test_an_upfront_tool_needs_a_payment_window_of_the_settle_margin() -> None:
    """An upfront tool's payment must outlive its settlement (verify, the write-ahead, the block
    after the broadcast): the gateway refuses a shorter one (``payment_window``), so a catalog whose
    offers allow no such window is refused at load, not left unpayable."""
    short = BASE.replace('  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"\n',
                         '  pay_to: "0xa0Ee7A142d267C1f36714E4a8F75612F20a79720"\n  max_timeout_seconds: 14\n')
    assert short != BASE
    found = {(i.path, i.code): i.message for i in issues(short + "    settle: upfront\n")}  # get_quote's (after) too
    assert "settle: upfront needs max_timeout_seconds >= 15" in found[("tools[1].settle", "payment_window_too_short")]
    enough = short.replace("max_timeout_seconds: 14", "max_timeout_seconds: 15")
    assert ("tools[1].settle", "payment_window_too_short") not in {(i.path, i.code) for i in issues(enough + "    settle: upfront\n")}
