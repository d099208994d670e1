"""Where ``x402gw demo`` keeps its ledger, and the pointer that lets ``x402gw ledger`` find it.

The demo writes its ledger to ``var/demo/ledger.sqlite3`` under the directory it runs in, and a
pointer file beside it (``var/demo/ledger-url``) naming that ledger's absolute URL. ``x402gw ledger
export`` / ``summary`` given no ``--database-url`` (nor ``X402GW_DATABASE_URL``) read the gateway's
default ``var/x402gw.sqlite3``; when that file does not exist and the pointer does, they read the
demo's ledger instead and say so on standard error. Light on purpose: the CLI imports it without
the demo's dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_DIR", "DEMO_LEDGER", "DEMO_LEDGER_POINTER", "LedgerChoice", "choose_ledger", "export_command",
           "sqlite_file", "sqlite_url", "write_pointer"]

DEMO_DIR = Path("var/demo")
DEMO_LEDGER = DEMO_DIR / "ledger.sqlite3"
DEMO_LEDGER_POINTER = DEMO_DIR / "ledger-url"


def sqlite_url(path: Path) -> str:
    """``sqlite:///`` + the absolute path (four slashes in all): the same file from any directory."""
    return f"sqlite:///{path.resolve()}"


def export_command(url: str) -> str:
    """The exact command that exports this ledger from any directory."""
    return f"x402gw ledger export --database-url {url}"


def write_pointer(ledger: Path, base: Path = Path()) -> str:
    """Record ``ledger`` as the demo's ledger for ``x402gw ledger`` run in ``base``; returns its URL."""
    url = sqlite_url(base / ledger)
    pointer = base / DEMO_LEDGER_POINTER
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(url + "\n", encoding="utf-8")
    return url


@dataclass(frozen=True)
class LedgerChoice:
    url: str
    note: str | None  # a line for standard error: which ledger was read, and why


def choose_ledger(default_url: str, base: Path = Path()) -> LedgerChoice:
    """The ledger ``x402gw ledger`` reads when given none: the gateway's default, unless that
    default is a SQLite file that does not exist and a demo left its pointer here."""
    demo_url = _demo_url(base)
    if demo_url is None:
        return LedgerChoice(default_url, None)
    default_file = sqlite_file(default_url, base)
    if default_file is not None and not default_file.exists():
        return LedgerChoice(demo_url, f"reading the demo's ledger {demo_url} (no --database-url given and "
                                      f"{default_url} does not exist; written by x402gw demo)")
    return LedgerChoice(default_url, f"reading {default_url}; the demo's ledger is another one: "
                                     f"--database-url {demo_url}")


def _demo_url(base: Path) -> str | None:
    try:
        url = (base / DEMO_LEDGER_POINTER).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    target = sqlite_file(url, base)
    return url if target is not None and target.exists() else None


def sqlite_file(url: str, base: Path = Path()) -> Path | None:
    """The file a ``sqlite:///`` URL names (relative to ``base``), or None for another database."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url == prefix + ":memory:":
        return None
    path = Path(url[len(prefix):].split("?", 1)[0])
    return path if path.is_absolute() else base / path
