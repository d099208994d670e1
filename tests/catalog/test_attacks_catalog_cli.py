"""Attacks on the catalog loader and the CLI front: hostile files, hostile numbers, secrets in
arguments and settings. Each ends in a stable code and one line, never a hang or a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import SecretStr

import catalog.source
from catalog import CatalogError, load_catalogs
from gateway.cli.main import main
from gateway.devkit.devchain import ANVIL_KEYS
from gateway.settings import DEFAULT_CATALOG, Settings
from gateway.wiring import build_chains

MINIMAL = DEFAULT_CATALOG.with_name("minimal.yaml").read_text()
SECRET = "SECRETAPIKEY123"


def codes(path: Path | str) -> list[str]:
    with pytest.raises(CatalogError) as caught:
        load_catalogs([path])
    return [issue.code for issue in caught.value.issues]


def validate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["catalog", "validate", *args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def with_price(price: str) -> str:
    return MINIMAL.replace('price: "0.001"', f"price: {price}")


@pytest.mark.parametrize("text, code", [
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)), "unknown_key"),
    (with_price("[" * 50_000 + "]" * 50_000), "yaml_syntax"),
    (with_price('!!python/object/apply:os.system ["echo pwned"]'), "yaml_syntax"),
    (MINIMAL.replace("owner: minimal", "owner: minimal\nowner: other"), "duplicate_key"),
    (MINIMAL + "---\n" + MINIMAL, "yaml_syntax"),
    ("- 1\n- 2\n", "invalid_value"),
])
def test_hostile_yaml_is_an_issue_not_a_crash(tmp_path: Path, text: str, code: str) -> None:
    path = write(tmp_path, text)
    assert code in codes(path)
    status, _ = validate(str(path))
    assert status == 1


@pytest.mark.parametrize("price, code", [
    ('"1e-999999999"', "invalid_price"),   # was: a hang building a billion-digit string
    ('"1E+999999999"', "invalid_price"),   # was: MemoryError traceback
    ('"1e80"', "invalid_price"),
    ("1.0e+999999999", "invalid_number"),  # a YAML float: refused at its line
    ("9" * 5000, "invalid_number"),        # was: ValueError traceback (int max str digits)
    (".nan", "invalid_price"),
    ('"NaN"', "invalid_price"),
    (".inf", "invalid_price"),
    ("-1", "invalid_price"),
    ("0", "invalid_price"),
    ('"0.000000000000000000000000000001"', "price_precision"),
])
def test_hostile_prices_are_refused_with_a_code(tmp_path: Path, price: str, code: str) -> None:
    path = write(tmp_path, with_price(price))
    assert codes(path) == [code]
    status, output = validate(str(path))
    assert status == 1 and len(output) < 500


def test_a_huge_number_in_a_schema_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace('pattern: "^[A-Z]{1,5}$"}', 'pattern: "^[A-Z]{1,5}$", maxLength: 1.0e+999999999}')
    assert codes(write(tmp_path, text)) == ["invalid_number"]


def test_a_long_exact_price_still_loads(tmp_path: Path) -> None:
    path = write(tmp_path, with_price('"0.00100000000000000000000000000000000000000000000"'))
    [tool] = load_catalogs([path]).tools
    assert tool.price_atomic == 1000


def test_a_fifo_is_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "catalog.yaml"
    os.mkfifo(fifo)  # was: the load blocked for ever waiting for a writer
    assert codes(fifo) == ["file_unreadable"]
    status, output = validate(str(fifo))
    assert status == 1 and "not a regular file" in output


@pytest.mark.parametrize("path, reason", [("/dev/zero", "not a regular file"), ("/", "Is a directory")])
def test_devices_and_directories_are_unreadable(path: str, reason: str) -> None:
    assert codes(path) == ["file_unreadable"]
    status, output = validate(path)
    assert status == 1 and reason in output


def test_a_huge_file_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(catalog.source, "MAX_FILE_BYTES", 1024)
    path = write(tmp_path, MINIMAL + "#" * 2048 + "\n")
    assert codes(path) == ["file_unreadable"]
    assert "larger than" in validate(str(path))[1]


def test_bad_utf8_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(MINIMAL.encode().replace(b"minimal_quote", b"min\xff\xfe"))
    assert codes(bad) == ["file_unreadable"]
    assert codes(tmp_path / "none.yaml") == ["file_not_found"]


def test_crlf_catalogs_still_load(tmp_path: Path) -> None:
    path = tmp_path / "crlf.yaml"
    path.write_bytes(MINIMAL.replace("\n", "\r\n").encode())
    assert [tool.name for tool in load_catalogs([path]).tools] == ["minimal_quote"]


@pytest.mark.parametrize("upstream_path", [
    "/api/../../admin/{symbol}", "//evil.com/{symbol}", '"@evil.com/{symbol}"', '"/api/\\r\\nX-Evil: 1/{symbol}"',
    '"http://evil.com/{symbol}"', '"/api?x=1#{symbol}"',
])
def test_upstream_paths_cannot_leave_the_upstream(tmp_path: Path, upstream_path: str) -> None:
    text = MINIMAL.replace("upstream_path: /api/v1/quote/{symbol}", f"upstream_path: {upstream_path}")
    assert codes(write(tmp_path, text)) == ["invalid_path"]


@pytest.mark.parametrize("field, value", [
    ("base_url", '"http://user:pass@127.0.0.1:9101"'),
    ("base_url", '"http://127.0.0.1:9101/\\r\\nX: y"'),  # was: accepted
    ("base_url", '"file:///etc/passwd"'),
])
def test_base_urls_are_checked(tmp_path: Path, field: str, value: str) -> None:
    text = MINIMAL.replace('base_url: "http://127.0.0.1:9101"', f"{field}: {value}")
    found = codes(write(tmp_path, text))
    assert found and set(found) <= {"invalid_url"}
    assert "pass" not in validate(str(tmp_path / "c.yaml"))[1].replace("passwd", "")


def test_check_chain_never_prints_the_rpc_key() -> None:
    url = f"http://user:{SECRET}@127.0.0.1:1/v2/{SECRET}?apikey={SECRET}"
    status, output = validate(str(DEFAULT_CATALOG.with_name("minimal.yaml")), "--check-chain", url)
    assert status == 1 and "rpc_unreachable" in output
    assert SECRET not in output  # was: the URL and str(exc) echoed as given


def test_check_chain_with_an_unparsable_url_is_one_line() -> None:
    status, output = validate(str(DEFAULT_CATALOG.with_name("minimal.yaml")), "--check-chain", "http://[::1")
    assert status == 1 and "rpc_unreachable: InvalidURL" in output  # was: an httpx.InvalidURL traceback


@pytest.mark.parametrize("device", ["/dev/zero", "/"])
def test_a_deployment_file_that_is_a_device_does_not_hang(device: str) -> None:
    status, output = validate("--deployment", device, str(DEFAULT_CATALOG.with_name("minimal.yaml")))
    assert status == 0 and "minimal_quote" in output


@pytest.mark.parametrize("key", [
    ANVIL_KEYS[0], ANVIL_KEYS[0][2:], "0x" + ANVIL_KEYS[0][2:].upper(), f" {ANVIL_KEYS[0]}\n",
    f"\t{ANVIL_KEYS[0][2:].upper()} ",
])
def test_dev_keys_are_refused_however_written(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, MINIMAL.replace('"eip155:31337"', '"eip155:8453"'))
    settings = Settings(catalog=[path], rpc_urls={"eip155:8453": "http://127.0.0.1:1"}, settlement_key=SecretStr(key),
                        deployment_file=tmp_path / "none.json")
    with pytest.raises(Exception) as caught:
        build_chains(settings, load_catalogs([path]))
    assert getattr(caught.value, "code", None) == "dev_key_on_public_chain"  # was: binascii.Error with spaces


def test_a_dev_key_in_a_key_file_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('"eip155:31337"', '"eip155:8453"'))
    key_file = tmp_path / "key"
    key_file.write_text(f"\n  {ANVIL_KEYS[1].upper().replace('0X', '0x')}  \n")
    settings = Settings(catalog=[path], rpc_urls={"eip155:8453": "http://127.0.0.1:1"},
                        settlement_key_file=key_file, deployment_file=tmp_path / "none.json")
    with pytest.raises(Exception) as caught:
        build_chains(settings, load_catalogs([path]))
    assert getattr(caught.value, "code", None) == "dev_key_on_public_chain"


@pytest.mark.parametrize("env, code", [
    ({"X402GW_RPC_URLS": '{"eip155:8453": "https://x/v2/' + SECRET + '"'}, "invalid_setting_json"),
    ({"X402GW_SETTLEMENT_KEY": SECRET, "X402GW_RPC_URLS": '{"eip155:31337": "http://127.0.0.1:1/' + SECRET + '"}'},
     "invalid_key"),
    ({"X402GW_RPC_URLS": '{"eip155:8453": ["' + SECRET + '"]}'}, None),
    ({"X402GW_PORT": SECRET}, "invalid_setting"),
])
def test_serve_settings_errors_never_echo_the_secret(tmp_path: Path, env: dict[str, str], code: str | None) -> None:
    env = {"X402GW_DEPLOYMENT_FILE": str(tmp_path / "none.json"), **env}
    args = ["serve", "--catalog", str(DEFAULT_CATALOG.with_name("minimal.yaml"))]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2, result.output
    assert SECRET not in result.output and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    if code is not None:
        assert lines[0].endswith(f"[{code}]")


@pytest.mark.parametrize("args", [
    ["serve", "--port", "notaport"], ["catalog", "validate"], ["catalog", "bogus"], ["demo", "--port", "abc"],
    ["devchain", "--port", "x"], ["no-such-command"], ["doctor", "--no-such-option"],
    ["ledger", "export", "--no-such-option"], ["reconcile", "--bogus"], ["audit", "--bogus"],
])
def test_garbage_arguments_exit_2_without_a_traceback(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (args, result.output)
    assert "Traceback" not in result.output and "Error:" in result.output


def test_a_file_name_or_key_with_a_line_break_cannot_fake_output_lines(tmp_path: Path) -> None:
    """A catalog named ``c.yaml\\nall.yaml: ok`` or a YAML key with a line break or a terminal escape
    in it: each issue is still one line, the injected text shown escaped."""
    path = write(tmp_path, with_price('"-1"').replace("owner: minimal", 'owner: minimal\n"x\\ny\\u001b[2J": 1'),
                 name="c.yaml\nall.yaml: ok")
    status, output = validate(str(path))
    assert status == 1
    issues = [line for line in output.splitlines() if line.strip()]
    assert not any(line.startswith("all.yaml") for line in issues)
    assert all("\x1b" not in line for line in issues)
    assert any("c.yaml\\nall.yaml: ok" in line for line in issues)
    assert any("x\\ny\\x1b[2J" in line for line in issues)


@pytest.mark.parametrize("key", ["f" * 64, "0x" + "F" * 64, "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141"])
def test_a_key_past_the_curve_order_is_refused_without_quoting_it(tmp_path: Path, key: str) -> None:
    """64 hex digits, yet no secp256k1 key: one line naming the setting, never the key (the signing
    library's own error prints it as a decimal number)."""
    env = {"X402GW_DEPLOYMENT_FILE": str(tmp_path / "none.json"), "X402GW_SETTLEMENT_KEY": key,
           "X402GW_RPC_URLS": '{"eip155:31337": "http://127.0.0.1:1"}'}
    result = CliRunner().invoke(main, ["serve", "--catalog", str(DEFAULT_CATALOG.with_name("minimal.yaml"))], env=env)
    assert result.exit_code == 2, result.output
    assert result.output.strip().endswith("[invalid_key]") and "X402GW_SETTLEMENT_KEY" in result.output
    assert key.lower().removeprefix("0x") not in result.output.lower() and str(int(key, 16)) not in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", [["ledger", "export"], ["ledger", "summary"], ["receipt", "export"]])
def test_a_mistyped_ledger_url_is_refused_not_created_empty(tmp_path: Path, command: list[str]) -> None:
    """A finance command pointed at a SQLite file that does not exist would have created an empty
    ledger and reported nothing owed, nothing earned: refused, and nothing is created."""
    missing = tmp_path / "typo" / "ledgr.sqlite3"
    result = CliRunner().invoke(main, command, env={"X402GW_DATABASE_URL": f"sqlite:///{missing}"})
    assert result.exit_code == 2, result.output
    assert "[ledger_not_found]" in result.output and "Traceback" not in result.output
    assert not missing.exists() and not missing.parent.exists()
