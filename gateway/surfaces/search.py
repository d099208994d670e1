"""Tool search: the catalog's tools ranked by relevance to a few words, for ``GET /tools?q=`` and
MCP's ``search_tools``.

The index is SQLite FTS5 in memory, built once per catalog (on the first search; a catalog changes
with a restart) and ranked with FTS5's BM25. Each tool is one row of three columns, weighted
name > description > parameters (``WEIGHTS``): a word in the name counts most, one that only a
parameter mentions least. Words are split the way tool names are written (``get_stock_quote``,
``getStockQuote``, ``HTTPStatus`` → get stock quote / http status; the joined word is kept too), then
lower-cased and stemmed (FTS5's ``porter`` tokenizer: "forecasts" finds "forecast"). A query is
split the same way, its common English words dropped, and every remaining word OR-ed, each quoted
(no FTS5 syntax reaches SQLite from a client). Nothing is downloaded: no model, no vocabulary.

Token sizes are an estimate, documented here and in the README: ``ceil(len(json) / 3)`` over the
definition a model is given, serialized as compact JSON. Tokenizers average about 4 characters per
token on English prose and nearer 3 on JSON (braces, quotes, schema keywords), so dividing by 3
leans high: a list fitted to a budget by this estimate fits the real one. (An exact count needs the
model's own tokenizer and its vocabulary file, which is not something a gateway should fetch.)

A budget keeps the best tools whose definitions fit: tools are taken in rank order, a tool that
does not fit what is left is skipped, and the walk stops at ``limit`` tools or ``CANDIDATES`` ranked
candidates.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from catalog import Tool
from gateway import codes
from gateway.errors import GatewayError

__all__ = [
    "BUDGET_MAX",
    "CANDIDATES",
    "CHARS_PER_TOKEN",
    "LIMIT_DEFAULT",
    "LIMIT_MAX",
    "QUERY_MAX_CHARS",
    "TOKEN_ESTIMATE",
    "WEIGHTS",
    "Hit",
    "SearchRequest",
    "ToolSearch",
    "estimate_tokens",
    "fit",
    "search_request",
    "words",
]

LIMIT_DEFAULT = 10
LIMIT_MAX = 100
BUDGET_MAX = 1_000_000  # tokens: far above any model's context, so only a mistake is refused
QUERY_MAX_CHARS = 300
CANDIDATES = 500  # ranked tools a budget walk may look at
CHARS_PER_TOKEN = 3
TOKEN_ESTIMATE = "ceil(characters of the compact JSON definition / 3), an estimate that leans high"
WEIGHTS = (10.0, 3.0, 1.0)  # BM25 column weights: name, description, parameters

# Common words a query is written with that say nothing about which tool is meant. Dropped from a
# query (unless nothing else is left), not from the index: BM25 would rank them low anyway, but an
# OR over "the" matches every tool and makes the query slow on a big catalog.
STOPWORDS = frozenset("""
a about all also am an and any are as at be by can could do does for from get give how i if in into
is it its just like me much many my need now of on or please really right should show so some tell
that the their them then there these this those to tool tools use very want was we what when where
which who will with would you your
""".split())

_WORD = re.compile(r"[^\W_]+")
_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")
_DIGITS = re.compile(r"^[0-9]{1,9}$")


def words(text: str) -> list[str]:
    """Lower-case words of ``text``, identifiers split at underscores and case changes (the joined
    word kept as well, so "PayPal" is found by "paypal" and by "pay pal")."""
    found: list[str] = []
    for word in _WORD.findall(text):
        parts = _PARTS.findall(word) if word.isascii() else [word]
        if len(parts) > 1:
            found.extend(p.lower() for p in parts)
        found.append(word.lower())
    return found


def estimate_tokens(definition: Any) -> int:
    """The documented estimate of a definition's size in tokens (see the module docstring)."""
    text = json.dumps(definition, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _parameter_text(schema: Any, depth: int = 0) -> list[str]:
    """Parameter names, descriptions, titles and enum values of a JSON schema, nested ones too."""
    if not isinstance(schema, dict) or depth > 4:
        return []
    text: list[str] = []
    for key in ("title", "description"):
        if isinstance(schema.get(key), str):
            text.append(schema[key])
    for value in schema.get("enum") or []:
        if isinstance(value, str):
            text.append(value)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        for name, sub in properties.items():
            text.append(str(name))
            text.extend(_parameter_text(sub, depth + 1))
    text.extend(_parameter_text(schema.get("items"), depth + 1))
    return text


@dataclass(frozen=True, slots=True)
class Hit:
    tool: Tool
    score: float  # BM25 relevance, higher is better (FTS5's bm25() negated)


@dataclass(frozen=True, slots=True)
class SearchRequest:
    query: str
    limit: int
    budget: int | None


class ToolSearch:
    """The FTS5 index of one catalog's tools; built on the first search, then only read."""

    def __init__(self, tools: Callable[[], Sequence[Tool]]) -> None:
        self._source = tools
        self._tools: Sequence[Tool] = ()
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._index()[1])

    def _index(self) -> tuple[sqlite3.Connection, Sequence[Tool]]:
        with self._lock:
            if self._db is None:
                self._tools = list(self._source())
                self._db = self._build(self._tools)
            return self._db, self._tools

    @staticmethod
    def _build(tools: Sequence[Tool]) -> sqlite3.Connection:
        db = sqlite3.connect(":memory:", check_same_thread=False)
        db.execute(
            "CREATE VIRTUAL TABLE tools USING fts5(name, description, parameters, tokenize='porter unicode61')"
        )
        db.executemany(
            "INSERT INTO tools(rowid, name, description, parameters) VALUES (?, ?, ?, ?)",
            (
                (
                    row,
                    " ".join(words(tool.name)),
                    " ".join(words(tool.description)),
                    " ".join(words(" ".join(_parameter_text(tool.input_schema)))),
                )
                for row, tool in enumerate(tools)
            ),
        )
        db.commit()
        return db

    def build(self) -> None:
        """Build the index now (else the first search does)."""
        self._index()

    def search(self, query: str, candidates: int) -> list[Hit]:
        """Tools matching any word of ``query``, best first (ties in catalog order)."""
        terms = list(dict.fromkeys(words(query)))
        kept = [t for t in terms if t not in STOPWORDS] or terms
        if not kept:
            return []
        match = " OR ".join('"' + term.replace('"', '""') + '"' for term in kept)
        db, tools = self._index()
        with self._lock:  # one connection: sqlite3 objects are not for concurrent use
            rows = db.execute(
                "SELECT rowid, bm25(tools, ?, ?, ?) AS rank FROM tools WHERE tools MATCH ? "
                "ORDER BY rank, rowid LIMIT ?",
                (*WEIGHTS, match, candidates),
            ).fetchall()
        return [Hit(tools[row], -rank) for row, rank in rows]


T = TypeVar("T")


def fit(ranked: Sequence[T], size: Callable[[T], int], limit: int, budget: int | None) -> list[T]:
    """The first ``limit`` of ``ranked``; with a budget, those whose sizes fit it, in rank order (a
    tool too big for what is left is skipped, and a smaller one after it may still fit)."""
    if budget is None:
        return list(ranked[:limit])
    chosen: list[T] = []
    left = budget
    for item in ranked:
        cost = size(item)
        if cost <= left:
            chosen.append(item)
            left -= cost
            if len(chosen) == limit:
                break
    return chosen


def _refuse(code: str, field: str, problem: str, message: str) -> GatewayError:
    return GatewayError(code, message, fields=[{"field": field, "problem": problem}])


def _count(value: Any, field: str, code: str, high: int, default: int | None, text: bool) -> int | None:
    if value is None or (text and value == ""):
        return default
    if isinstance(value, bool) or not (
        (isinstance(value, int)) or (text and isinstance(value, str) and _DIGITS.match(value))
    ) or not 1 <= int(value) <= high:
        shown = value[:40] if isinstance(value, str) else value
        raise _refuse(
            code, field, f"expected an integer from 1 to {high}, got {shown!r}",
            f"{field} must be an integer from 1 to {high}",
        )
    return int(value)


def search_request(query: Any, limit: Any = None, budget: Any = None, *, text: bool = True) -> SearchRequest:
    """A search's parameters checked: a refusal with a stable code for a query that is empty, not
    text or too long, a limit or budget that is not a positive integer within its cap. ``text``:
    they come from a query string (ASCII digits; empty = absent), else JSON (integers only)."""
    if not isinstance(query, str) or not query.strip():
        raise _refuse(codes.SEARCH_QUERY_INVALID, "q", "expected a few words", "q must be a few words to search for")
    if len(query) > QUERY_MAX_CHARS:
        raise _refuse(
            codes.SEARCH_QUERY_INVALID, "q", f"at most {QUERY_MAX_CHARS} characters, got {len(query)}",
            f"q must be at most {QUERY_MAX_CHARS} characters",
        )
    chosen = _count(limit, "limit", codes.SEARCH_LIMIT_INVALID, LIMIT_MAX, LIMIT_DEFAULT, text)
    assert chosen is not None
    return SearchRequest(query, chosen, _count(budget, "budget", codes.SEARCH_BUDGET_INVALID, BUDGET_MAX, None, text))
