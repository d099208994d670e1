"""Where an export is written, and which ledger a command reads: checked before anything is touched.

An export written over the ledger it reads replaced the ledger with a CSV header; one aimed at a
FIFO or a device (``/dev/full``) replaced it with a regular file; one into a directory that does not
exist was a traceback. A mistyped SQLite path made a fresh, empty ledger that reported "0 records".
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import click

__all__ = ["EXIT_ERROR", "fail", "missing_ledger", "sink"]

EXIT_ERROR = 2


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def missing_ledger(url: str) -> str | None:
    """Why ``url`` names no ledger to read (a SQLite file that does not exist), with its code."""
    from gateway.devkit.demo_ledger import sqlite_file

    path = sqlite_file(url)
    if path is not None and not path.exists():
        return f"no ledger at {path}: check --database-url or X402GW_DATABASE_URL (nothing was created) [ledger_not_found]"
    return None


def _target_problem(target: Path, ledger_url: str | None) -> str | None:
    from gateway.devkit.demo_ledger import sqlite_file

    if not target.parent.is_dir():
        return f"{target}: its directory does not exist [output_unwritable]"
    if not target.exists():
        return None
    if not target.is_file():
        return f"{target} is not a regular file (a directory, FIFO or device): give a file path [output_not_a_file]"
    ledger = sqlite_file(ledger_url) if ledger_url else None
    if ledger is not None and ledger.exists() and os.path.samefile(target, ledger):
        return f"{target} is the ledger this command reads: give another file (nothing was written) [output_is_the_ledger]"
    return None


@contextmanager
def sink(output: str, *, binary: bool = False, ledger_url: str | None = None) -> Iterator[IO[Any]]:
    """Standard output, or a regular file written beside its target and renamed into place when
    complete (an interrupted export never leaves a truncated file under the final name); never the
    ledger being read, a FIFO or a device. A target that cannot be written is one line, exit 2."""
    if output == "-":
        yield sys.stdout.buffer if binary else sys.stdout
        sys.stdout.flush()
        return
    target = Path(output)
    problem = _target_problem(target, ledger_url)
    if problem is not None:
        fail(problem)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with open(partial, "wb") if binary else open(partial, "w", encoding="utf-8", newline="") as handle:
            yield handle
        os.replace(partial, target)
    except OSError as exc:
        fail(f"{target}: cannot write it ({exc.strerror or type(exc).__name__}) [output_unwritable]")
    finally:
        partial.unlink(missing_ok=True)
