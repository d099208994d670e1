"""Every refusal code the gateway raises is in gateway.codes, with a status and a next step."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gateway import codes
from gateway.codes import FIX_PAYMENT_PREFIXES, NEXT_KINDS, REFUSALS, SETTLEMENT_REASONS
from gateway.errors import STATUS_BY_CODE, GatewayError

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"
# Classes whose first argument (PaymentChallenge: second, after the quote) is a refusal code.
_RAISERS = {"GatewayError": 0, "UpstreamFailure": 0, "UpstreamUnreachable": 0, "BadRequest": 0, "PaymentChallenge": 1}


def _raised_codes() -> dict[str, list[str]]:
    """Each code written at a raise site in gateway/, as a literal or a ``codes.NAME``, with where."""
    found: dict[str, list[str]] = {}
    for path in sorted(GATEWAY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
            index = _RAISERS.get(name or "")
            if index is None or len(node.args) <= index:
                continue
            argument = node.args[index]
            written: list[str] = []
            if isinstance(argument, ast.Attribute) and isinstance(argument.value, ast.Name) and argument.value.id == "codes":
                written.append(getattr(codes, argument.attr))  # an unknown constant fails here, loudly
            else:  # a literal, or literals inside a conditional expression ("a" if ... else "b")
                written.extend(
                    n.value for n in ast.walk(argument) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                )
            for code in written:
                found.setdefault(code, []).append(f"{path.relative_to(GATEWAY.parent)}:{node.lineno}")
    return found


def test_the_scan_sees_the_raise_sites() -> None:
    found = _raised_codes()
    assert {"not_found", "payment_requirements_mismatch", "store_unavailable", "upstream_timeout"} <= set(found)


def test_every_code_raised_in_the_gateway_is_in_the_table() -> None:
    missing = {code: where for code, where in _raised_codes().items() if code not in REFUSALS}
    assert not missing, f"add these codes to gateway/codes.py: {missing}"


@pytest.mark.parametrize("code", sorted(REFUSALS))
def test_each_code_has_a_status_and_a_next_step(code: str) -> None:
    entry = REFUSALS[code]
    assert entry.code == code
    assert 400 <= entry.status <= 599
    assert entry.next in NEXT_KINDS
    assert (entry.status == 402) == (entry.next == "pay")
    assert STATUS_BY_CODE[code] == entry.status
    # the prefix rule for codes the table does not know agrees with the table for those it does
    if code.startswith(FIX_PAYMENT_PREFIXES) and entry.status != 402:
        assert entry.next == "fix_payment"
    action = GatewayError(code, "message", status=entry.status).body()["next"]["action"]
    expected = {"another_tool": "discover", "retry": "none", "wait_until": "none"}.get(entry.next, entry.next)
    assert action == expected  # without timing fields, the body names the table's kind of step


def test_every_constant_is_in_the_table() -> None:
    constants = {value for name, value in vars(codes).items() if name.isupper() and isinstance(value, str)}
    assert constants == set(REFUSALS)


def test_settlement_reasons_are_answered_with_a_fresh_offer() -> None:
    for reason in SETTLEMENT_REASONS:
        assert GatewayError(reason, "refused", status=402).body()["next"]["action"] == "pay"


def test_literal_statuses_at_raise_sites_agree_with_the_table() -> None:
    disagree = []
    for path in sorted(GATEWAY.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.func.id != "GatewayError":
                continue
            code, status = node.args[0] if node.args else None, next((k.value for k in node.keywords if k.arg == "status"), None)
            if isinstance(code, ast.Attribute) and isinstance(code.value, ast.Name) and code.value.id == "codes":
                name = getattr(codes, code.attr)
            elif isinstance(code, ast.Constant) and isinstance(code.value, str):
                name = code.value
            else:
                continue
            if isinstance(status, ast.Constant) and name in REFUSALS and REFUSALS[name].status != status.value:
                disagree.append(f"{path.name}:{node.lineno} {name} {status.value}")
    assert not disagree
