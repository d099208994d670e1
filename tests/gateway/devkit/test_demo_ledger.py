"""``x402gw ledger export`` right after ``x402gw demo`` finds the demo's ledger (issue 15), and says
which ledger it read; a default ledger that exists, or a URL given, is never second-guessed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import main
from gateway.devkit.demo_ledger import DEMO_LEDGER, choose_ledger, export_command, sqlite_url, write_pointer
from settlement.schema import open_ledger

DEFAULT = "sqlite:///var/x402gw.sqlite3"


def _demo_ledger(base: Path) -> str:
    (base / DEMO_LEDGER).parent.mkdir(parents=True, exist_ok=True)
    open_ledger(f"sqlite:///{base / DEMO_LEDGER}").close()
    return write_pointer(DEMO_LEDGER, base)


def test_without_a_demo_the_default_is_read_silently(tmp_path: Path) -> None:
    choice = choose_ledger(DEFAULT, tmp_path)
    assert (choice.url, choice.note) == (DEFAULT, None)


def test_after_a_demo_its_ledger_is_read_and_named(tmp_path: Path) -> None:
    url = _demo_ledger(tmp_path)
    assert url == sqlite_url(tmp_path / DEMO_LEDGER) and url.startswith("sqlite:////")
    choice = choose_ledger(DEFAULT, tmp_path)
    assert choice.url == url
    assert choice.note is not None and url in choice.note and "demo" in choice.note


def test_an_existing_default_ledger_wins_and_the_demo_one_is_named(tmp_path: Path) -> None:
    url = _demo_ledger(tmp_path)
    (tmp_path / "var" / "x402gw.sqlite3").touch()
    choice = choose_ledger(DEFAULT, tmp_path)
    assert choice.url == DEFAULT
    assert choice.note is not None and f"--database-url {url}" in choice.note


def test_a_pointer_to_a_deleted_ledger_is_ignored(tmp_path: Path) -> None:
    _demo_ledger(tmp_path)
    (tmp_path / DEMO_LEDGER).unlink()
    assert choose_ledger(DEFAULT, tmp_path).url == DEFAULT


def test_export_command_works_from_anywhere(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / DEMO_LEDGER)
    assert export_command(url) == f"x402gw ledger export --database-url {url}"


@pytest.mark.parametrize("command", [["ledger", "export", "--format", "jsonl"], ["ledger", "summary", "--format", "json"]])
def test_ledger_commands_in_the_demo_directory_read_the_demo_ledger(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("X402GW_DATABASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    url = _demo_ledger(tmp_path)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert f"reading the demo's ledger {url}" in result.stderr
    assert not (tmp_path / "var" / "x402gw.sqlite3").exists(), "the empty default ledger was created"
    if command[1] == "summary":
        assert json.loads(result.stdout)["groups"] == []


def test_an_explicit_database_url_is_read_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _demo_ledger(tmp_path)
    other = tmp_path / "other.sqlite3"
    monkeypatch.setenv("X402GW_DATABASE_URL", f"sqlite:///{other}")
    # A file that does not exist is a mistyped URL: refused, not created, and not the demo's instead.
    missing = CliRunner().invoke(main, ["ledger", "export", "--format", "jsonl"])
    assert missing.exit_code == 2 and "[ledger_not_found]" in missing.stderr and "demo" not in missing.stderr
    assert not other.exists()
    open_ledger(f"sqlite:///{other}").close()
    result = CliRunner().invoke(main, ["ledger", "export", "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    assert "demo" not in result.stderr and result.stdout == ""
