"""Bad input to the ``x402gw`` commands, the catalog loader and the settings, from the
operator's and the API owner's side.

Each test runs the real CLI (``python -m gateway.cli.main`` in a subprocess, in a scratch
directory, with no X402GW_* variable inherited) and fails on the current code because of a real
problem: a traceback, a wrong exit status, a hang, a secret echoed, or something recorded lost.
The standard: bad input gets exit 2 (or the documented status), one line naming the problem with
a stable code, no traceback, and nothing already recorded is lost or half-written.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from catalog import load_catalogs
from catalog.errors import CatalogError
from settlement.audit import AuditEvent, AuditTrail

REPO = Path(__file__).resolve().parents[3]
MINIMAL = REPO / "catalog" / "examples" / "minimal.yaml"
SQLITE_MAGIC = b"SQLite format 3\x00"
# A remote facilitator for the local chain: the gateway builds without a dev chain deployment.
REMOTE_FACILITATOR = '{"eip155:31337": "http://127.0.0.1:1"}'


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("X402GW_", "X402_", "CDP_")) and k not in ("PYTHONWARNINGS",)}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra or {})
    return env


class Run:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout = returncode, stdout
        # `python -m gateway.cli.main` makes runpy warn that the module was imported by its package: not ours to judge.
        self.stderr = "\n".join(
            line for line in stderr.splitlines()
            if "<frozen runpy>" not in line and "found in sys.modules after import" not in line
        )

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def x402gw(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Run:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli.main", *args], cwd=cwd, env=_env(env), capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def x402gw_bounded(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 20) -> Run | None:
    """The command, or None when it is still running after ``timeout`` seconds (then killed)."""
    try:
        return x402gw(cwd, *args, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def assert_refused_cleanly(run: Run, *, status: int = 2) -> None:
    assert "Traceback" not in run.output, run.output[-3000:]
    assert run.returncode == status, (run.returncode, run.output[-3000:])


def make_ledger(path: Path, records: int = 3) -> str:
    """A real ledger file (every migration run) holding ``records`` audit records."""
    url = f"sqlite:///{path}"
    setup = x402gw(path.parent, "db", "upgrade", "--database-url", url)
    assert setup.returncode == 0, setup.output
    trail = AuditTrail(url)
    trail.append([AuditEvent(f"req{n}", "challenge_issued", {"amount": "2000"}, tool="get_quote") for n in range(records)])
    trail.close()
    return url


def audit_records(path: Path) -> int:
    with path.open("rb") as handle:
        assert handle.read(16) == SQLITE_MAGIC, f"{path} is no longer a SQLite database"
    connection = sqlite3.connect(path)
    try:
        return int(connection.execute("SELECT count(*) FROM audit_records").fetchone()[0])
    finally:
        connection.close()


def catalog_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _free_path_tool(path: str) -> str:
    """minimal.yaml with its tool moved to ``path`` (no path parameter)."""
    text = MINIMAL.read_text()
    text = text.replace("path: /minimal/quotes/{symbol}", f"path: {path}")
    text = text.replace("upstream_path: /api/v1/quote/{symbol}", "upstream_path: /api/v1/quote/AAPL")
    head, _, _ = text.partition("    input_schema:")
    return head


# --------------------------------------------------------------------------------------------
# The catalog loader and `x402gw catalog validate`
# --------------------------------------------------------------------------------------------


def test_catalog_validate_prints_each_problems_stable_code(tmp_path: Path) -> None:
    """The README (The catalog): "every problem is reported as `file:line: field.path: message`
    with a stable code", and names codes an operator would grep for (`price_precision`,
    `invalid_number`, `file_unreadable`, `invalid_url`...). What the operator sees for a price with
    more digits than the token: `bad.yaml:20: tools[0].price: price 0.0000001 has more digits than
    the token's 6 decimals`: no code anywhere (``CatalogIssue.__str__`` drops ``code``; `serve`
    prints the same text). What they should see: the same line carrying `price_precision`, as every
    other refusal of the CLI carries its `[code]`."""
    bad = catalog_file(tmp_path, "bad.yaml", MINIMAL.read_text().replace('price: "0.001"', "price: 0.0000001"))
    with pytest.raises(CatalogError) as info:  # the loader knows the code...
        load_catalogs([bad])
    assert [issue.code for issue in info.value.issues] == ["price_precision"]
    run = x402gw(tmp_path, "catalog", "validate", str(bad))
    assert_refused_cleanly(run, status=1)
    assert "bad.yaml:" in run.output and "tools[0].price" in run.output
    assert "price_precision" in run.output, run.output  # ...the operator never sees it


@pytest.mark.parametrize("path", ["/healthz", "/.well-known/x402", "/mcp", "/admin", "/tools"])
def test_catalog_refuses_a_tool_on_the_gateways_own_routes(tmp_path: Path, path: str) -> None:
    """A tool whose path is one of the gateway's own routes (/healthz, /readyz, /metrics, /admin,
    /mcp, /tools, /openapi.json, /llms.txt, /.well-known/x402...). What the API owner sees: `catalog
    validate` says `ok` (exit 0) and `serve` starts; the tool is listed on /tools, in
    /.well-known/x402 and MCP, but every call reaches the gateway's own route instead (GET /healthz
    answers `{"status":"ok"}`, GET /admin a 404 `no tool is exposed at this path`): a tool on sale
    that nobody can ever buy. What they should see: the catalog refused at the path's `file:line`
    with a stable code (e.g. `reserved_path`), exit 1, and `serve` refusing to start (exit 2)."""
    cat = catalog_file(tmp_path, "own.yaml", _free_path_tool(path))
    run = x402gw(tmp_path, "catalog", "validate", str(cat))
    assert "Traceback" not in run.output
    assert run.returncode == 1, f"a tool at {path} was accepted:\n{run.output}"
    assert "tools[0].path" in run.output


def test_catalog_refuses_a_budget_amount_out_of_range(tmp_path: Path) -> None:
    """README: "a number beyond 400 digits or exponent is refused (`invalid_number`), a price must lie
    within 10^±40 (`invalid_price`)". A budget amount written as a string, `amount: "1e999999999"`,
    escapes both guards. What the API owner sees: `catalog validate` says `ok` (exit 0); `serve` then
    turns it into whole token units and prints it with `:f` in its refusal: a billion-digit line
    (300+ MB on standard error, a minute of CPU before it ends). What they should see: the amount
    refused at its `file:line` (`budgets.per_payer.amount`), exit 1, like an out-of-range price."""
    text = MINIMAL.read_text().replace(
        "owner: minimal", 'owner: minimal\nbudgets: {per_payer: {amount: "1e999999999", window: 1d}}')
    cat = catalog_file(tmp_path, "budget.yaml", text)
    run = x402gw(tmp_path, "catalog", "validate", str(cat))
    assert "Traceback" not in run.output
    assert run.returncode == 1, f"accepted:\n{run.output[:2000]}"
    assert "budgets.per_payer.amount" in run.output


# --------------------------------------------------------------------------------------------
# Output files: `ledger export -o`, `audit export -o`
# --------------------------------------------------------------------------------------------


def test_ledger_export_over_the_ledger_it_reads_keeps_the_ledger(tmp_path: Path) -> None:
    """`x402gw ledger export -o var/x402gw.sqlite3` (a slip of the shell's history, or -o and
    --database-url swapped). What the operator sees: `0 payments written to .../ledger.sqlite3`,
    exit 0, and the ledger database (payments, refunds owed, the audit trail) replaced by a CSV
    header: everything recorded is gone. What they should see: exit 2, one line saying the output
    is the ledger being read, and the ledger untouched."""
    ledger = tmp_path / "ledger.sqlite3"
    url = make_ledger(ledger)
    run = x402gw(tmp_path, "ledger", "export", "--database-url", url, "-o", str(ledger))
    try:
        kept = audit_records(ledger)
    except AssertionError as exc:
        pytest.fail(f"the ledger was overwritten by its own export ({exc}); the command said: {run.output.strip()}")
    assert kept == 3
    assert_refused_cleanly(run)


def test_audit_export_over_the_ledger_it_reads_keeps_the_ledger(tmp_path: Path) -> None:
    """`x402gw audit export -o ledger.sqlite3` with the ledger as --database-url. What the operator
    sees: exit 0, nothing on screen, and the ledger database truncated and replaced by the JSON
    lines of its own audit trail (the payments, and the trail as a database, lost). What they should
    see: exit 2 and a line saying the output is the database being read, the ledger untouched."""
    ledger = tmp_path / "ledger.sqlite3"
    url = make_ledger(ledger)
    run = x402gw(tmp_path, "audit", "export", "--database-url", url, "-o", str(ledger))
    try:
        kept = audit_records(ledger)
    except AssertionError as exc:
        pytest.fail(f"the ledger was overwritten by its own audit export ({exc}); exit {run.returncode}")
    assert kept == 3
    assert_refused_cleanly(run)


@pytest.mark.parametrize("where", ["missing_directory", "a_directory"])
def test_ledger_export_to_a_path_it_cannot_write_is_one_line(tmp_path: Path, where: str) -> None:
    """`x402gw ledger export -o DIR/missing/out.csv` (a directory that does not exist) or `-o DIR`
    (an existing directory). What the operator sees: a Python traceback
    (`FileNotFoundError: ... '.out.csv.partial'` from `_sink`, or `IsADirectoryError` from
    `os.replace`) and exit 1. What they should see: exit 2 (the command could not run) and one line
    naming the output path and why (e.g. `[output_unwritable]`), no traceback."""
    url = make_ledger(tmp_path / "ledger.sqlite3")
    target = tmp_path / "nowhere" / "out.csv" if where == "missing_directory" else tmp_path / "outdir"
    if where == "a_directory":
        target.mkdir()
    run = x402gw(tmp_path, "ledger", "export", "--database-url", url, "-o", str(target))
    assert_refused_cleanly(run)
    assert str(target.name) in run.stderr


def test_ledger_export_onto_a_fifo_does_not_replace_it(tmp_path: Path) -> None:
    """`x402gw ledger export -o FIFO` (a named pipe a loader reads from), or any non-regular file:
    the export writes `.NAME.partial` beside it and renames it over the target. What the operator
    sees: `0 payments written to .../pipe`, exit 0, and the pipe replaced by a regular file (its
    reader never gets a byte). As root, `-o /dev/full` (or `-o /dev/stdout`) replaces the device
    node (the symlink) in /dev with a regular file: this review restored /dev/full by hand after one
    run. What they should see: the special file kept as it is: written through, or refused with exit
    2 and one line, never replaced."""
    url = make_ledger(tmp_path / "ledger.sqlite3")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    run = x402gw_bounded(tmp_path, "ledger", "export", "--database-url", url, "-o", str(fifo))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), (
        f"the FIFO was replaced by a regular file; the command said: {run.output.strip() if run else '(still running)'}")


# --------------------------------------------------------------------------------------------
# Database URLs: unparsable, mistyped, another version
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["db", "upgrade"], ["audit", "verify"], ["audit", "export"]])
def test_an_unparsable_database_url_is_one_line(tmp_path: Path, command: list[str]) -> None:
    """`--database-url sqlite3:/var/ledger` (any string SQLAlchemy cannot parse). What the operator
    sees from `db upgrade`, `audit verify` and `audit export`: a traceback ending in
    `sqlalchemy.exc.ArgumentError: Could not parse SQLAlchemy URL`, exit 1 (`ledger export` and
    `webhooks list` say it in one line: `cannot open the ledger database (ArgumentError)
    [ledger_unavailable]`, exit 2). What they should see: that same one line, exit 2."""
    run = x402gw(tmp_path, *command, "--database-url", "not a database url")
    assert_refused_cleanly(run)


@pytest.mark.parametrize("command", [["db", "upgrade"], ["ledger", "export"], ["webhooks", "list"]])
def test_a_ledger_of_a_newer_version_is_one_line(tmp_path: Path, command: list[str]) -> None:
    """A ledger written by a newer x402gw (its `alembic_version` is a revision this one does not
    ship), e.g. after a rollback of the package. What the operator sees: a traceback ending in
    `alembic.util.exc.CommandError: Can't locate revision identified by '0099'`, exit 1. What they
    should see: exit 2 and one line saying the database is at a revision this version does not
    know (upgrade x402gw), with a code; the ledger untouched."""
    ledger = tmp_path / "ledger.sqlite3"
    url = make_ledger(ledger)
    connection = sqlite3.connect(ledger)
    connection.execute("UPDATE alembic_version SET version_num = '0099'")
    connection.commit()
    connection.close()
    run = x402gw(tmp_path, *command, "--database-url", url)
    assert_refused_cleanly(run)
    assert audit_records(ledger) == 3


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "export"], ["webhooks", "list"]])
def test_a_mistyped_ledger_path_is_not_a_fresh_ledger(tmp_path: Path, command: list[str]) -> None:
    """`--database-url sqlite:////var/x402gw/legder.sqlite3` (a typo). `ledger export`, `summary`,
    `refunds` and `reconcile` refuse it (`no ledger at ...: nothing was created
    [ledger_not_found]`, exit 2). What the operator sees from `audit verify`: `audit trail intact: 0
    records`, exit 0 (a verification that passes on nothing), and a new empty ledger file created
    at the mistyped path; `audit export` and `webhooks list` print nothing, exit 0, and create it
    too. What they should see: the same `ledger_not_found` refusal, exit 2, nothing created."""
    typo = tmp_path / "legder.sqlite3"
    run = x402gw(tmp_path, *command, "--database-url", f"sqlite:///{typo}")
    assert not typo.exists(), f"a fresh ledger was created at the mistyped path; the command said: {run.output.strip()}"
    assert_refused_cleanly(run)
    assert "ledger_not_found" in run.stderr


# --------------------------------------------------------------------------------------------
# Files given to commands: not what they should be
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["not json at all\n", '{"a": 1}\n', b"\xff\xfe\x00binary", "a directory"])
def test_audit_verify_file_that_is_not_an_export_is_one_line(tmp_path: Path, content: str | bytes) -> None:
    """`x402gw audit verify --file FILE` given the wrong file: not JSON, JSON of another shape, not
    UTF-8, or a directory. What the operator sees: a traceback (`JSONDecodeError`, `KeyError: 'seq'`,
    `UnicodeDecodeError`, `IsADirectoryError`), exit 1, which is also the status of "TAMPERED": a
    script reads "the trail was tampered with". What they should see: exit 2 (the documented
    "unreadable") and one line naming the file and its line, no traceback."""
    target = tmp_path / "export.jsonl"
    if content == "a directory":
        target.mkdir()
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    run = x402gw(tmp_path, "audit", "verify", "--file", str(target))
    assert_refused_cleanly(run)


def test_receipt_verify_of_a_fifo_does_not_hang(tmp_path: Path) -> None:
    """`x402gw receipt verify PIPE --signer 0x...` where PIPE is a FIFO (or /dev/zero, or another
    special file): `click.Path(exists=True, dir_okay=False)` lets it through and `read_text()` waits
    for a writer for ever (on /dev/zero it fills the memory). What the operator sees: a command that
    never returns. What they should see, as the catalog loader does it for catalog files: exit 2 and
    `... is not a receipt ... [receipt_unreadable]` at once."""
    fifo = tmp_path / "receipt.json"
    os.mkfifo(fifo)
    run = x402gw_bounded(tmp_path, "receipt", "verify", str(fifo), "--signer",
                         "0x0000000000000000000000000000000000000001", timeout=10)
    assert run is not None, "receipt verify of a FIFO was still waiting after 10 s"
    assert_refused_cleanly(run)
    assert "receipt_unreadable" in run.stderr


@pytest.mark.parametrize("command", [
    ["webhooks", "replay", "99999999999999999999999"],
    ["receipt", "export", "--payment-id", "99999999999999999999999"],
    ["audit", "export", "--from-seq", "99999999999999999999999"],
])
def test_an_id_beyond_the_database_integer_is_one_line(tmp_path: Path, command: list[str]) -> None:
    """An id or sequence number with more digits than a 64-bit integer (a pasted transaction hash,
    a typo). What the operator sees: a traceback ending in `OverflowError: Python int too large to
    convert to SQLite INTEGER`, exit 1. What they should see: exit 2 with the option or argument
    named and its range, no traceback."""
    url = make_ledger(tmp_path / "ledger.sqlite3")
    run = x402gw(tmp_path, *command, "--database-url", url)
    assert "Traceback" not in run.output, run.output[-2000:]
    assert run.returncode == 2 and "9223372036854775807" in run.output, run.output


@pytest.mark.parametrize("command", [
    ["deploy-batch-settlers", "--rpc-url", "http://127.0.0.1:1", "--deployer-key-file", "{keys}",
     "--settler", "0x0000000000000000000000000000000000000001"],
    ["serve", "--workers", "2", "--settlement-keys-file", "{keys}", "--port", "0"],
])
def test_a_keys_file_that_is_not_text_is_one_line(tmp_path: Path, command: list[str]) -> None:
    """`--deployer-key-file` / `--settlement-keys-file` pointing at a binary file (a keystore, a
    `.der`, the wrong file of a secrets mount). `read_keys` catches OSError only. What the operator
    sees: a traceback ending in `UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff`, exit 1.
    What they should see: exit 2 and `error: ...: cannot read FILE: not UTF-8 text
    [secret_file_unreadable]` (the documented code), no traceback and no byte of the file."""
    keys = tmp_path / "keys.bin"
    keys.write_bytes(b"\xff\xfe0x" + b"\x8a" * 64)
    args = [part.replace("{keys}", str(keys)) for part in command]
    env = {"X402GW_FACILITATORS": REMOTE_FACILITATOR, "X402GW_CATALOG": str(MINIMAL),
           "X402GW_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"}
    run = x402gw_bounded(tmp_path, *args, env=env, timeout=30)
    assert run is not None, "still running after 30 s"
    assert_refused_cleanly(run)
    assert "secret_file_unreadable" in run.stderr


# --------------------------------------------------------------------------------------------
# Settings (X402GW_*)
# --------------------------------------------------------------------------------------------

API_KEY = "sk_live_9f8e7d6c5b4a"


@pytest.mark.parametrize("command", [["audit", "verify"], ["audit", "export"], ["webhooks", "list"],
                                     ["webhooks", "replay", "1"]])
def test_bad_settings_in_audit_and_webhooks_commands_are_one_line_without_the_value(
    tmp_path: Path, command: list[str]
) -> None:
    """`audit verify|export` and `webhooks list|replay` build `Settings()` themselves instead of
    `gateway.cli.settings_errors.load_settings`. With a malformed variable, e.g.
    `X402GW_RPC_URLS='["https://base-mainnet.example/v2/<api key>"]'` (a list where a map is
    expected), what the operator sees: a pydantic traceback that prints
    `input_value=['https://base-mainnet.example/v2/sk_live_...']`, the RPC provider's API key in
    the terminal and the CI log, exit 1. What they should see, as from `serve` and `ledger`:
    `error: invalid settings: X402GW_RPC_URLS: Input should be a valid dictionary
    [invalid_setting]`, exit 2, no value."""
    env = {"X402GW_RPC_URLS": f'["https://base-mainnet.example/v2/{API_KEY}"]'}
    run = x402gw(tmp_path, *command, env=env)
    assert API_KEY not in run.output, "the API key was echoed:\n" + run.output[-1500:]
    assert_refused_cleanly(run)
    assert "X402GW_RPC_URLS" in run.stderr and "[invalid_setting]" in run.stderr


def test_serve_with_an_unknown_log_level_is_an_invalid_setting(tmp_path: Path) -> None:
    """`X402GW_LOG_LEVEL=verbose` (or `trace`, or `5`): `log_level` is a free string in the
    settings and `logging.basicConfig` rejects it. What the operator sees from `x402gw serve`: a
    traceback ending in `ValueError: Unknown level: 'VERBOSE'`, exit 1 (a `--workers` supervisor or
    systemd reads a crash). What they should see: `error: invalid settings: X402GW_LOG_LEVEL: ...
    [invalid_setting]`, exit 2."""
    run = x402gw(tmp_path, "serve", "--port", "0", env={"X402GW_LOG_LEVEL": "verbose"})
    assert_refused_cleanly(run)
    assert "X402GW_LOG_LEVEL" in run.stderr and "[invalid_setting]" in run.stderr


def test_a_secret_file_that_is_not_utf8_names_its_variable(tmp_path: Path) -> None:
    """`X402GW_SETTLEMENT_KEY_FILE` pointing at a binary file (a keystore, the wrong mount).
    `_read_secret_file` catches OSError only; the UnicodeDecodeError becomes a model-level
    ValidationError. What the operator sees: `error: invalid settings: settings: Value error,
    'utf-8' codec can't decode byte 0xff in position 0: invalid start byte [invalid_setting]`: no
    variable named (five variables read secret files). What they should see, as for a missing or
    unreadable file: `error: X402GW_SETTLEMENT_KEY_FILE: cannot read FILE: not UTF-8 text
    [secret_file_unreadable]`."""
    secret = tmp_path / "settlement.key"
    secret.write_bytes(b"\xff\xfe" + os.urandom(30))
    run = x402gw(tmp_path, "ledger", "summary", env={"X402GW_SETTLEMENT_KEY_FILE": str(secret)})
    assert_refused_cleanly(run)
    assert "X402GW_SETTLEMENT_KEY_FILE" in run.stderr, run.stderr
    assert "[secret_file_unreadable]" in run.stderr


def test_a_secret_file_that_is_a_fifo_does_not_hang_every_command(tmp_path: Path) -> None:
    """`X402GW_SETTLEMENT_KEY_FILE` (or `_REFUND_KEY_FILE`, `_RECEIPT_KEY_FILE`,
    `_FACILITATOR_AUTH_FILE`, `_CDP_API_KEY_SECRET_FILE`) naming a FIFO, or /dev/zero:
    `Path.read_text()` waits for a writer for ever (fills the memory on /dev/zero), in every command
    that reads settings, `serve` and `ledger summary` included. What the operator sees: a command
    that never returns, nothing printed. What they should see, as the catalog loader does it: exit 2
    at once, `X402GW_SETTLEMENT_KEY_FILE: cannot read FILE: not a regular file
    [secret_file_unreadable]`."""
    fifo = tmp_path / "settlement.key"
    os.mkfifo(fifo)
    run = x402gw_bounded(tmp_path, "ledger", "summary", env={"X402GW_SETTLEMENT_KEY_FILE": str(fifo)}, timeout=10)
    assert run is not None, "`ledger summary` was still waiting on the secret file's FIFO after 10 s"
    assert_refused_cleanly(run)
    assert "[secret_file_unreadable]" in run.stderr


def test_a_budget_setting_out_of_range_is_an_invalid_setting(tmp_path: Path) -> None:
    """`X402GW_BUDGET_PER_PAYER=1e100000/1d` passes the settings (the catalog refuses such numbers:
    `invalid_number`, prices within 10^±40). What the operator sees from `serve`: a single 100,000-
    digit line `error: budget per_payer 1000...000 (gateway) has more digits than the 6 decimals of
    the token of tool minimal_quote [invalid_safety_limits]` (wrong as well: it has no decimals);
    with `1e999999999/1d` the start-up computes a billion-digit integer and writes 300+ MB to
    standard error for over a minute. What they should see: `error: invalid settings:
    X402GW_BUDGET_PER_PAYER: ... [invalid_setting]` at once, one short line, exit 2."""
    env = {"X402GW_BUDGET_PER_PAYER": "1e100000/1d", "X402GW_FACILITATORS": REMOTE_FACILITATOR,
           "X402GW_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.sqlite3'}"}
    run = x402gw_bounded(tmp_path, "serve", "--port", "0", "--catalog", str(MINIMAL), env=env, timeout=30)
    assert run is not None, "serve was still starting after 30 s"
    assert_refused_cleanly(run)
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert error_lines and max(len(line) for line in error_lines) < 500, \
        f"the refusal is {max(map(len, error_lines), default=0)} characters long"
    assert "X402GW_BUDGET_PER_PAYER" in run.stderr
