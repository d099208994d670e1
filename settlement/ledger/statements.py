"""Hot statements: Core statements compiled once per dialect, run on the driver's own cursor.

A paid call writes about ten statements (its row, its state changes, its stored answer, its audit
records). SQLAlchemy runs a cached Core statement in about 30 µs of Python on this kind of machine;
the driver runs the same SQL in about 3 µs (``python -m bench.stage_cpu``; issue 20). So the ledger's
and the audit trail's hot statements are still written as SQLAlchemy Core (one source for SQLite
and PostgreSQL: quoting, placeholders, casts, ``RETURNING``), compiled once for the engine's
dialect and for the set of keys given, and then run on the DB-API cursor of the very connection
(and transaction) SQLAlchemy holds: what SQLAlchemy would do, minus its per-call bookkeeping.

Values go through the column types' own bind processors (a datetime becomes SQLite's text form, an
``AtomicAmount`` its decimal string), and driver errors come out as SQLAlchemy's exceptions
(``IntegrityError``, ``OperationalError``, ...), so callers handle them as before. Reads that build
rows (result processing, ORM objects) stay with SQLAlchemy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError, StatementError
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

__all__ = ["HotStatement", "HotStatements"]

_REQUIRED = object()


class HotStatement:
    """One statement compiled for one dialect and one set of keys (an INSERT's or UPDATE's columns)."""

    def __init__(self, statement: ClauseElement, dialect: Dialect, keys: Iterable[str] = (),
                 defaults: Mapping[str, Any] | None = None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))
        if not isinstance(compiled, SQLCompiler):
            raise TypeError(f"not a SQL statement: {type(statement).__name__}")
        self.sql = compiled.string
        names = list(compiled.positiontup) if compiled.positional and compiled.positiontup is not None else list(compiled.binds)
        self.positional = bool(compiled.positional)
        # Per bind: its name, the value the statement carries (a literal in its WHERE clause), and
        # its type's processor for this dialect.
        self._binds: list[tuple[str, Any, Callable[[Any], Any] | None]] = []
        for name in names:
            bind = compiled.binds[name]
            preset = bind.value if bind.value is not None and not bind.required else _REQUIRED
            if preset is _REQUIRED and defaults is not None and name in defaults:
                preset = defaults[name]
            if bind.callable is not None:
                raise ValueError(f"a hot statement cannot carry a callable bind ({name})")
            impl = bind.type.dialect_impl(dialect)
            processor = _sqlite_datetime(impl, dialect) or impl.bind_processor(dialect)
            self._binds.append((name, preset, processor))
        self._names = [name for name, _, _ in self._binds]
        self._dbapi_error = dialect.loaded_dbapi.Error

    def parameters(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        get = values.get
        out: list[Any] = []
        for name, preset, processor in self._binds:
            value = get(name, preset)
            if value is _REQUIRED:
                raise KeyError(f"a value is required for {name!r}")
            out.append(processor(value) if processor is not None and value is not None else value)
        return out if self.positional else dict(zip(self._names, out, strict=True))

    def execute(self, connection: Connection, values: Mapping[str, Any]) -> Any:
        """Runs on ``connection``'s DB-API connection, in its transaction; returns the cursor."""
        parameters = self.parameters(values)
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(self.sql, parameters)
        except self._dbapi_error as exc:
            raise self._error(connection, parameters, exc, cursor) from exc
        return cursor

    def execute_many(self, connection: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        parameters = [self.parameters(row) for row in rows]
        cursor = connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(self.sql, parameters)
        except self._dbapi_error as exc:
            raise self._error(connection, parameters, exc, cursor) from exc
        finally:
            cursor.close()

    def _error(self, connection: Connection, parameters: Any, exc: Exception, cursor: Any) -> StatementError:
        """SQLAlchemy's exception for a driver error; a lost connection is invalidated first (as
        SQLAlchemy's own execution does), so it is not handed out again."""
        lost = connection.dialect.is_disconnect(cast(Any, exc), connection.connection.driver_connection, cursor)
        if lost:
            connection.invalidate(exc)
        return DBAPIError.instance(self.sql, parameters, exc, self._dbapi_error, connection_invalidated=lost)


# SQLite's DATETIME as SQLAlchemy stores it by default: its fields, without the zone (what its bind
# processor formats with ``%``, field by field); ``isoformat`` writes the same 26 characters first.
_SQLITE_DATETIME = "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"


def _sqlite_datetime(impl: Any, dialect: Dialect) -> Callable[[Any], Any] | None:
    """A faster equal of SQLite's default DATETIME bind processor (a few on every hot statement), or None."""
    if not isinstance(impl, sqlite.DATETIME) or getattr(impl, "_storage_format", None) != _SQLITE_DATETIME:
        return None
    fallback = impl.bind_processor(dialect)
    isoformat = datetime.isoformat

    def process(value: Any) -> Any:
        if type(value) is datetime and (value.tzinfo is None or value.tzinfo is UTC):  # utcoffset() cannot raise
            return isoformat(value, " ", "microseconds")[:26]
        return fallback(value) if fallback is not None else value

    return process


class HotStatements:
    """The compiled forms of a set of statements for one dialect, by statement and key set."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self._compiled: dict[tuple[int, frozenset[str]], tuple[Executable, HotStatement]] = {}

    def get(self, statement: Executable, keys: Iterable[str] = (), defaults: Mapping[str, Any] | None = None) -> HotStatement:
        key = (id(statement), frozenset(keys))
        found = self._compiled.get(key)
        if found is None:
            # The statement is kept with its compiled form, so its id stays its own.
            found = (statement, HotStatement(statement, self.dialect, key[1], defaults))  # type: ignore[arg-type]
            self._compiled[key] = found
        return found[1]
