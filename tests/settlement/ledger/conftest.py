"""The ledger tests' fixtures: a ledger on each backend it supports, SQLite (a file under
tmp_path) and PostgreSQL (the session's throwaway database, emptied after each test), and one on
PostgreSQL alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from settlement.ledger import Base, Ledger
from settlement.schema import open_ledger


@contextmanager
def opened(url: str) -> Iterator[Ledger]:
    ledger = open_ledger(url)
    try:
        yield ledger
    finally:
        Base.metadata.drop_all(ledger.engine)  # the PostgreSQL database lives for the whole session
        ledger.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    with opened(url) as ledger:
        yield ledger


@pytest.fixture
def pg_ledger(postgres_url: str) -> Iterator[Ledger]:
    """The ledger on PostgreSQL only (what only a server database does: pools, autocommit)."""
    with opened(postgres_url) as ledger:
        yield ledger
