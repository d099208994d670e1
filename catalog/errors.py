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
        # The file name and the field path come from the user (a YAML key, a path on disk): a line
        # break or a terminal escape in them is shown escaped, so one issue is always one line.
        file, path = _printable(self.file), _printable(self.path)
        where = file if self.line is None else f"{file}:{self.line}"
        text = f"{where}: {path}: {self.message}" if path else f"{where}: {self.message}"
        return f"{text} [{self.code}]"  # the stable code, as every other refusal prints it


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class CatalogError(Exception):
    def __init__(self, issues: Iterable[CatalogIssue]) -> None:
        self.issues: list[CatalogIssue] = list(issues)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)
