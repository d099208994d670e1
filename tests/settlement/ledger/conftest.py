"""The ledger tests' fixture: a ledger on each backend it supports, SQLite (a file under
tmp_path) and PostgreSQL (the session's throwaway database, emptied after each test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from settlement.ledger import Base, Ledger
from settlement.schema import open_ledger


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    ledger = open_ledger(url)
    try:
        yield ledger
    finally:
        Base.metadata.drop_all(ledger.engine)  # the PostgreSQL database lives for the whole session
        ledger.close()
