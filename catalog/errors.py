"""Errors raised while loading a catalog.

    CatalogError            root, and the one exception of a load, carrying every issue found
     └─ .issues: list[CatalogIssue]   file, dotted field path, line, message, stable code

    The loader's private ``_NeedsFullConstructor`` (catalog/source.py) is a signal between its
    fast and full YAML paths and never leaves that module, so it stays a plain exception.

Every problem in a hand-written catalog becomes an issue with a line number where one is
known, so ``x402gw catalog validate`` can print compiler-style diagnostics, never a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["CatalogError", "CatalogIssue"]


@dataclass(frozen=True, slots=True)
class CatalogIssue:
    file: str
    path: str  # dotted field path, e.g. "tools[2].price"; "" for the whole document
    line: int | None  # 1-based
    message: str
    code: str  # stable snake_case code, e.g. "invalid_price"

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class CatalogError(Exception):
    def __init__(self, issues: Iterable[CatalogIssue]) -> None:
        self.issues: list[CatalogIssue] = list(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)
