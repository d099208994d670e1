"""The ledger's state machine is enforced: a row moves only through the named transitions of
``settlement.ledger.payments``, each refuses a row in a state it may not leave (``invalid_transition``,
nothing written), and no other module of the gateway or the settlement package writes a state."""

from __future__ import annotations

import ast
import asyncio
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from settlement.errors import LedgerError
from settlement.ledger import TRANSITIONS, Ledger, Payment, PaymentState
from settlement.schema import open_ledger
from tests.support.ledger_rows import force_row
from tests.support.settlement_helpers import ledger_fields

ROOT = Path(__file__).resolve().parents[3]
TX = "0x" + "ab" * 32

V, SG, SD, F, P, VD = (
    PaymentState.VERIFIED, PaymentState.SETTLING, PaymentState.SETTLED, PaymentState.FAILED,
    PaymentState.PENDING, PaymentState.VOIDED,
)

# transition → (the call, the states it may leave, the state it leaves the row in; None: unchanged)
CASES: dict[str, tuple[Callable[[Ledger, int], None], set[PaymentState], PaymentState | None]] = {
    "begin_settlement": (lambda lg, pid: lg.begin_settlement(pid, (200, [], b"ok"), tx_hash=TX), {V, SG}, SG),
    "record_tx_hash": (lambda lg, pid: lg.record_tx_hash(pid, TX), {SG}, None),
    "mark_settled": (lambda lg, pid: lg.mark_settled(pid, tx_hash=TX, block_number=7), {SG, P, SD}, SD),
    "mark_pending": (lambda lg, pid: lg.mark_pending(pid, tx_hash=TX, error_reason="settlement_pending"), {V, SG, P}, P),
    "fail": (lambda lg, pid: lg.fail(pid, "transaction_failed", tx_hash=TX, block_number=7), {V, SG, P, F}, F),
    "void": (lambda lg, pid: lg.void(pid, "upstream_error", upstream_status=502), {V}, VD),
    "record_upstream_status": (lambda lg, pid: lg.record_upstream_status(pid, 500), {SD}, None),
    "record_refund_owed": (lambda lg, pid: lg.record_refund_owed(pid, 1000, "upstream_error"), {SD}, None),
    "record_answer_lost": (lambda lg, pid: lg.record_answer_lost(pid, 1000), {SD}, None),
    "record_refund_tx": (lambda lg, pid: lg.record_refund_tx(pid, TX), {SD}, None),
    "record_refund_paid": (lambda lg, pid: lg.record_refund_paid(pid, TX), {SD}, None),
    "record_gas": (lambda lg, pid: lg.record_gas(pid, {"gas_used": 21_000, "gas_price": 7, "gas_cost": 147_000}),
                   {SD, F}, None),
}


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    book = open_ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    yield book
    book.close()


_numbers = itertools.count(1)


def _row(ledger: Ledger, state: PaymentState) -> int:
    row = ledger.record_verified(**ledger_fields(next(_numbers)))
    force_row(ledger, row.id, state=state)
    return row.id


def _columns(ledger: Ledger, payment_id: int) -> dict[str, Any]:
    row = ledger.get(payment_id)
    assert row is not None
    return {column: getattr(row, column) for column in (c.key for c in Payment.__table__.c)}


def test_every_transition_is_tested_and_published() -> None:
    assert set(CASES) == set(TRANSITIONS)
    for name, (_, allowed, _) in CASES.items():
        assert set(TRANSITIONS[name]) == {s.value for s in allowed}, name


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("state", list(PaymentState), ids=[s.value for s in PaymentState])
def test_a_transition_moves_only_from_its_states(ledger: Ledger, name: str, state: PaymentState) -> None:
    call, allowed, after = CASES[name]
    payment_id = _row(ledger, state)
    before = _columns(ledger, payment_id)
    stored_before = ledger.stored_response(payment_id)

    if state in allowed:
        call(ledger, payment_id)
        assert ledger.get(payment_id).state == (after or state)  # type: ignore[union-attr]
        return

    with pytest.raises(LedgerError) as refused:
        call(ledger, payment_id)

    assert refused.value.code == "invalid_transition"
    assert name in refused.value.message and state.value in refused.value.message
    assert _columns(ledger, payment_id) == before  # nothing written, not even updated_at
    assert ledger.stored_response(payment_id) == stored_before


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_transition_of_a_missing_row(ledger: Ledger, name: str) -> None:
    with pytest.raises(LedgerError) as missing:
        CASES[name][0](ledger, 424_242)
    assert missing.value.code == "ledger_row_missing"


def test_a_refused_transition_in_a_group_undoes_nothing_of_its_neighbours(ledger: Ledger) -> None:
    settled = _row(ledger, SD)
    verified = _row(ledger, V)

    async def run() -> list[Any]:
        return await asyncio.gather(
            ledger.run(ledger.void, settled, "upstream_error"),  # refused: money moved
            ledger.run(ledger.begin_settlement, verified, (200, [], b"ok")),
            return_exceptions=True,
        )

    refused, ok = asyncio.run(run())
    assert isinstance(refused, LedgerError) and refused.code == "invalid_transition"
    assert ok is None
    assert ledger.get(settled).state == SD  # type: ignore[union-attr]
    assert ledger.get(verified).state == SG  # type: ignore[union-attr]
    assert ledger.stored_response(verified) == (200, [], b"ok")


def test_keep_and_clear(ledger: Ledger) -> None:
    """A column not named is kept; ``None`` clears it (the settle stage's writes, as before)."""
    payment_id = _row(ledger, SG)
    ledger.record_tx_hash(payment_id, TX)
    ledger.mark_pending(payment_id, error_reason="settlement_unknown")
    assert ledger.get(payment_id).tx_hash == TX  # type: ignore[union-attr]
    ledger.mark_pending(payment_id, tx_hash=None)
    assert ledger.get(payment_id).tx_hash is None  # type: ignore[union-attr]


# -- no other code writes a payment's state --------------------------------------------------------

LEDGER_MODULE = Path("settlement/ledger/payments.py")
_SQL_UPDATE = re.compile(r"\bupdate\s+payments\b", re.IGNORECASE)
_PRIVATE_WRITERS = {"_transition", "_TRANSITION", "_PAYMENTS", "_update_row"}


def _dotted(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:
        return ""


def state_writes(source: str) -> list[str]:
    """What in ``source`` writes a payment's state, or could (one line per finding)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call):
            func = _dotted(node.func)
            keywords = {k.arg for k in node.keywords}
            on_ledger = "ledger" in func.lower() or any("ledger" in _dotted(a).lower() for a in node.args[:1])
            if "state" in keywords and (on_ledger or func.split(".")[-1] in {"update", "values", "run", "execute"}):
                found.append(f"{where}: state= in a call of {func}")
            if func.split(".")[-1] == "update" and any(
                "Payment" in _dotted(a) or "payments" in _dotted(a).lower() for a in node.args
            ):
                found.append(f"{where}: an UPDATE of the payments table ({_dotted(node)[:80]})")
            if func == "setattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value == "state":
                found.append(f"{where}: setattr(..., 'state', ...)")
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = list(node.targets) if isinstance(node, ast.Assign) else [node.target]
            while targets:
                target = targets.pop()
                if isinstance(target, (ast.Tuple, ast.List)):
                    targets.extend(target.elts)
                elif isinstance(target, ast.Starred):
                    targets.append(target.value)
                elif isinstance(target, ast.Attribute) and target.attr == "state":  # not app.state.x = ...
                    found.append(f"{where}: assignment to {_dotted(target)}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("settlement.ledger", "settlement.ledger.payments"):
            for alias in node.names:
                if alias.name in _PRIVATE_WRITERS:
                    found.append(f"{where}: imports the ledger's private writer {alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _SQL_UPDATE.search(node.value):
            found.append(f"{where}: SQL UPDATE of payments")
    return found


def _modules() -> list[Path]:
    paths = sorted(p.relative_to(ROOT) for package in ("gateway", "settlement") for p in (ROOT / package).rglob("*.py"))
    assert LEDGER_MODULE in paths and Path("gateway/pipeline/pipeline.py") in paths
    return [p for p in paths if p != LEDGER_MODULE]


def test_no_module_outside_the_ledger_writes_a_payment_state() -> None:
    offenders = {str(path): hits for path in _modules() if (hits := state_writes((ROOT / path).read_text()))}
    assert offenders == {}


def test_the_ledger_has_no_generic_update() -> None:
    assert not hasattr(Ledger, "update")


@pytest.mark.parametrize(
    "source",
    [
        "await ledger.run(ledger.update, pid, state=PaymentState.SETTLED)",
        "self.ledger.update(pid, state='settled')",
        "row.state = 'settled'",
        "payment.state, other = 'settled', 1",
        "row.state += 'x'",
        "session.execute(update(Payment).where(Payment.id == 1).values(state='failed'))",
        "conn.execute(update(Payment.__table__).values(error_reason='x'))",
        "setattr(row, 'state', 'voided')",
        "conn.exec_driver_sql('UPDATE payments SET state = 1')",
        "from settlement.ledger import _transition",
        "from settlement.ledger.payments import _transition",
    ],
)
def test_the_scan_sees_a_state_write(source: str) -> None:
    assert state_writes(source), source


def test_the_scan_passes_reads_and_named_transitions() -> None:
    source = (
        "if row.state == PaymentState.SETTLED: pass\n"
        "await ledger.run(ledger.mark_settled, pid, tx_hash=tx)\n"
        "self.refunds.labels(tool=tool, state='owed').inc()\n"
        "fields.update(changes)\n"
        "app.state.pipeline = pipeline\n"
    )
    assert state_writes(source) == []


def test_an_answer_claimed_and_its_refund_as_lost_never_both_win(ledger: Ledger) -> None:
    """The request that got its upstream's answer claims it (``record_upstream_status``); the sweep or a
    resend that found none owes its refund (``record_answer_lost``). Whichever writes first wins and
    the other is refused, in the database, whatever the payment lock (Redis) said."""
    answered, lost = _row(ledger, SD), _row(ledger, SD)
    assert ledger.record_upstream_status(answered, 200) is True
    assert ledger.record_answer_lost(answered, 1000) is False
    assert ledger.record_answer_lost(lost, 1000) is True
    assert ledger.record_upstream_status(lost, 200) is False
    assert ledger.record_answer_lost(lost, 1000) is False  # once
    rows = {row.id: row for row in ledger.all()}
    assert (rows[answered].upstream_status, rows[answered].refund_owed) == (200, None)
    assert (rows[lost].upstream_status, rows[lost].refund_owed, rows[lost].refund_reason) == (None, 1000, "answer_lost")
