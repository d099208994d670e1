"""Attack g (issue 13): Hypothesis mutates one field of a valid payment at a time, in both header
versions, against a settled nonce (a replay probe) and a fresh, unsettled one; the shared invariant
checker must hold for every answer: never a 2xx unless the payload is semantically the settled one
for the same request, never a charge without an answer, never an unpaid upstream call."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from settlement.x402.codec import encode_header
from settlement.x402.wire import PaymentRequired
from tests.support.attack_stack import Stack, attack_stack, offer_for, sign, v1_wire
from tests.support.invariant import InvariantChecker

PAYER = 7
OTHER = 4  # a second funded account, for addresses that are real but wrong

V2_FIELDS: list[tuple[str, ...]] = [
    ("x402Version",), ("resource", "url"), ("resource",), ("accepted", "scheme"), ("accepted", "network"),
    ("accepted", "amount"), ("accepted", "asset"), ("accepted", "payTo"), ("accepted", "maxTimeoutSeconds"),
    ("accepted", "extra", "name"), ("accepted", "extra", "version"), ("accepted", "extra", "requestBinding"),
    ("accepted", "extra"), ("accepted",), ("payload", "signature"), ("payload", "authorization", "from"),
    ("payload", "authorization", "to"), ("payload", "authorization", "value"),
    ("payload", "authorization", "validAfter"), ("payload", "authorization", "validBefore"),
    ("payload", "authorization", "nonce"), ("extensions",),
]
V1_FIELDS: list[tuple[str, ...]] = [
    ("x402Version",), ("scheme",), ("network",), ("payload", "signature"), ("payload", "authorization", "from"),
    ("payload", "authorization", "to"), ("payload", "authorization", "value"),
    ("payload", "authorization", "validAfter"), ("payload", "authorization", "validBefore"),
    ("payload", "authorization", "nonce"),
]


class _Delete:
    def __repr__(self) -> str:
        return "<deleted>"


DELETE = _Delete()
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass
class Targets:
    stack: Stack
    checker: InvariantChecker
    key: str
    other: str
    settled: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # version -> (path, wire)
    offers: dict[str, tuple[str, PaymentRequired]] = field(default_factory=dict)  # version -> (path, offer)
    statuses: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Targets]:
    with attack_stack(tmp_path_factory.mktemp("mutations")) as stack:
        gateway = stack.gateway("memory")
        key = stack.chain.key(PAYER)
        found = Targets(stack, stack.checker(gateway), key, stack.chain.address(OTHER))
        with gateway.client() as client:
            for version, path in (("v2", "/q/HYPS"), ("v1", "/q/HYPV")):
                payment = sign(key, offer_for(client, "GET", path))
                wire = payment.to_wire() if version == "v2" else v1_wire(payment)
                header = {"PAYMENT-SIGNATURE" if version == "v2" else "X-PAYMENT": encode_header(wire)}
                paid = found.checker.send(client, "GET", path, headers=header, label=f"settle {version}")
                assert paid.status_code == 200, paid.text
                found.settled[version] = (path, wire)
            for version, path in (("v2", "/q/HYPU"), ("v1", "/q/HYPW")):
                found.offers[version] = (path, offer_for(client, "GET", path))
        yield found


def mutations(value: Any, other_address: str) -> list[Any]:
    """Alternatives for one field: same-meaning spellings (case, 0/1 v) and different meanings."""
    out: list[Any] = [DELETE, None, "", "junk", 0, [], {}]
    if isinstance(value, str):
        out += [value + "0", value[:-1], value.upper(), value.lower(), " " + value]
        if value.startswith("0x"):
            body = value[2:]
            flipped = body[:-1] + ("0" if body[-1:] != "0" else "1")
            out += ["0x" + flipped, "0x" + body.upper(), "0x" + os.urandom(max(1, len(body) // 2)).hex(), body]
            if len(body) == 40:
                out += [other_address, "0x" + "0" * 40]
            if len(body) == 130:  # a 65-byte signature: v as 0/1, the other v, the malleable twin
                r, s, v = int(body[:64], 16), int(body[64:128], 16), int(body[128:], 16)
                out += ["0x" + body[:128] + f"{v - 27:02x}", "0x" + body[:128] + f"{55 - v:02x}",
                        "0x" + f"{r:064x}{SECP256K1_N - s:064x}{55 - v:02x}", "0x" + "11" * 64 + "1b"]
        if value.lstrip("-").isdigit():
            number = int(value)
            out += [str(number + 1), str(number - 1), number, "0", "1", str(2**256), "-1", f"{number}.0", f"0x{number:x}"]
    if isinstance(value, int) and not isinstance(value, bool):
        out += [value + 1, value - 1, str(value), 1, 2, 99999, True]
    if isinstance(value, dict):
        out += [{**value, "extraField": "x"}, {k: v for k, v in list(value.items())[:-1]}]
    return out


def apply(wire: dict[str, Any], path: tuple[str, ...], replacement: Any) -> dict[str, Any]:
    mutated = copy.deepcopy(wire)
    node: Any = mutated
    for part in path[:-1]:
        node = node.setdefault(part, {}) if isinstance(node, dict) else {}
    if not isinstance(node, dict):
        return mutated
    if replacement is DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = replacement
    return mutated


def current(wire: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = wire
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


EXTENSION_VALUES = [{"payment-identifier": {"info": {"required": False, "id": "pay_" + "a1" * 10}}}, {"x": 1}]


@settings(max_examples=90, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_one_field_mutations_never_break_the_invariant(targets: Targets, data: st.DataObject) -> None:
    version = data.draw(st.sampled_from(["v2", "v1"]), label="version")
    settled = data.draw(st.booleans(), label="against a settled nonce")
    if settled:
        path, wire = targets.settled[version]
    else:
        path, offer = targets.offers[version]
        payment = sign(targets.key, offer)
        wire = payment.to_wire() if version == "v2" else v1_wire(payment)
    where = data.draw(st.sampled_from(V2_FIELDS if version == "v2" else V1_FIELDS), label="field")
    original = current(wire, where)
    choices = EXTENSION_VALUES + [DELETE] if where == ("extensions",) else mutations(original, targets.other)
    replacement = data.draw(st.sampled_from(choices), label="replacement")
    mutated = apply(wire, where, replacement)
    try:
        header = encode_header(mutated)
    except (TypeError, ValueError):
        return
    name = "PAYMENT-SIGNATURE" if version == "v2" else "X-PAYMENT"
    with targets.stack.gateway("memory").client() as client:
        response = targets.checker.send(client, "GET", path, headers={name: header},
                                        label=f"{version} {'settled' if settled else 'fresh'} {'.'.join(where)}={replacement!r:.80}")
    targets.statuses.append(response.status_code)
    assert response.status_code != 500, response.text
    targets.checker.check_response(targets.checker.exchanges[-1])


def test_global_invariant_after_the_mutations(targets: Targets) -> None:
    """Runs after the Hypothesis test (file order): the payee's balance against the ledger, the
    upstream call log against the payments, for every mutation sent."""
    assert len(targets.checker.exchanges) > 2
    outcomes = sorted({(e.status, e.replay) for e in targets.checker.exchanges})
    print("mutation outcomes (status, replay):", outcomes,
          {e.label: e.status for e in targets.checker.exchanges if 200 <= e.status < 300})
    targets.checker.check()
