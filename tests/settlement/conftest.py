"""Shared fixtures of the settlement tests.

``postgres_url`` gives the session a throwaway database on the local PostgreSQL (trust auth, user
``postgres``) and drops it at the end, so runs never see each other's rows.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

PG_SERVER = "postgres@127.0.0.1:5432"


def _admin_connection() -> psycopg.Connection:
    # The maintenance database is usually "postgres"; some images only create "test".
    try:
        return psycopg.connect(f"postgresql://{PG_SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError:
        return psycopg.connect(f"postgresql://{PG_SERVER}/test", autocommit=True, connect_timeout=5)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh database, created for this test session and dropped after it."""
    name = f"x402gw_t_{secrets.token_hex(6)}"
    with _admin_connection() as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://{PG_SERVER}/{name}"
    finally:
        with _admin_connection() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
