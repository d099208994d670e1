"""x402gw as a newcomer installs it (issue 15): a built wheel in a fresh virtualenv runs
``x402gw demo`` from any directory; ``x402gw --version``; the changelog; anvil found or fetched,
or a one-line error naming the two ways to get it.

The wheel test builds from a copy of the sources (nothing written into the working tree), installs
into a venv made without system site packages, with every dependency from the package index as a
user's pip would (about 20 s here; printed, never asserted), and runs the installed ``x402gw`` with
a PATH that holds no checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli.main import main
from gateway.devkit import anvil as anvil_module
from gateway.devkit.anvil import anvil_npm_package, find_anvil
from settlement.chain.deployment import DevchainError
from tests.support.demo_process import SERVING, DemoProcess, demo_env, free_ports, wait_gone

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
PACKAGES = ("catalog", "settlement", "gateway")


def test_version_is_the_project_version() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"x402gw, version {VERSION}"


def test_changelog_has_a_section_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert changelog.startswith("# Changelog")
    headings = re.findall(r"^## (\S+)", changelog, flags=re.M)
    assert headings and headings[0] == VERSION, f"newest CHANGELOG.md section is {headings[:1]}, the version is {VERSION}"


def _no_anvil_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(anvil_module, "REPO_ROOT", tmp_path / "no-checkout")


def test_no_anvil_and_no_npm_is_one_line_naming_both_ways(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").mkdir()
    _no_anvil_anywhere(tmp_path, monkeypatch, str(tmp_path / "empty"))
    with pytest.raises(DevchainError) as info:
        find_anvil()
    message = str(info.value)
    assert info.value.code == "anvil_not_found"
    assert "\n" not in message
    assert "anvil on PATH" in message and f"npm install {anvil_npm_package()}" in message


@pytest.mark.e2e
def test_without_anvil_on_path_it_is_fetched_once_with_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed: the Quick start needs Node 20+ with npm")
    tools = tmp_path / "bin"  # npm and node, and nothing else
    tools.mkdir()
    for name in ("npm", "node"):
        found = shutil.which(name)
        assert found is not None
        (tools / name).symlink_to(found)
    _no_anvil_anywhere(tmp_path, monkeypatch, f"{tools}{os.pathsep}/usr/bin{os.pathsep}/bin")
    if shutil.which("anvil"):
        pytest.fail(f"anvil is on the system PATH ({shutil.which('anvil')}): this test needs it absent")
    fetched = find_anvil()
    assert fetched == str(tmp_path / "cache" / "x402gw" / "anvil" / "node_modules" / ".bin" / "anvil")
    version = subprocess.run([fetched, "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert version.stdout.startswith("anvil")
    assert find_anvil() == fetched  # the second time from the cache


def _copy_sources(target: Path) -> Path:
    target.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, target / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    # The timeout stops a hung install from hanging the suite; it is not a measurement.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, **kwargs)  # type: ignore[call-overload]
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result: subprocess.CompletedProcess[str] = done
    return result


@pytest.mark.e2e
def test_a_wheel_in_a_fresh_venv_runs_the_demo_from_any_directory(tmp_path: Path) -> None:
    sources = _copy_sources(tmp_path / "src")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(sources)])
    [wheel] = dist.glob("x402gw-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for packaged in ("gateway/devkit/contracts/TestUSDC.json", "gateway/devkit/contracts/BatchSettler.json",
                     "catalog/examples/demo.yaml", "catalog/examples/warehouse.yaml",
                     "gateway/devkit/samples/warehouse.wsdl", "settlement/schema/migrations/script.py.mako"):
        assert packaged in names, f"{packaged} is not in the wheel"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])  # no --system-site-packages: nothing of ours leaks in
    started = time.monotonic()
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)])
    print(f"\nwheel install with all dependencies into a fresh venv: {time.monotonic() - started:.1f} s")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    x402gw = str(venv / "bin" / "x402gw")
    anvil_dir = str(ROOT / "node_modules" / ".bin")  # anvil on PATH, as a Foundry install puts it
    system = [d for d in os.environ["PATH"].split(os.pathsep) if d and not d.startswith(str(ROOT))]
    env = demo_env([str(venv / "bin"), anvil_dir, *system], tmp_path / "cache")

    version = _run([x402gw, "--version"], cwd=elsewhere, env=env)
    assert version.stdout.strip() == f"x402gw, version {VERSION}"
    where = _run([str(venv / "bin" / "python"), "-c", "import gateway; print(gateway.__file__)"], cwd=elsewhere, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout

    ports = free_ports(3)
    demo = DemoProcess.start([x402gw, "demo", "--calls", "2", "--port", str(ports[0]), "--upstream-port", str(ports[1]),
                              "--warehouse-port", str(ports[2])], elsewhere, env)
    anvil_fd = -1
    try:
        demo.read_until(SERVING)
        anvil_fd = os.pidfd_open(demo.anvil_pid())
        assert len(re.findall(r"HTTP 20[01]  tx 0x[0-9a-f]{64}", demo.output)) == 2, demo.output
        ledger = elsewhere / "var" / "demo" / "ledger.sqlite3"
        assert f"ledger   {ledger}" in demo.output
        assert f"export   x402gw ledger export --database-url sqlite:///{ledger}" in demo.output
        demo.process.send_signal(signal.SIGINT)
        assert demo.finish() == 0, demo.output
        assert "Traceback" not in demo.output
        assert wait_gone(anvil_fd), "anvil outlived the demo"
    finally:
        demo.kill()
        if anvil_fd >= 0:
            os.close(anvil_fd)

    exported = _run([x402gw, "ledger", "export", "--format", "jsonl"], cwd=elsewhere, env=env)
    assert len(exported.stdout.splitlines()) == 2
    assert f"reading the demo's ledger sqlite:///{ledger}" in exported.stderr

    bare = {**env, "PATH": str(venv / "bin")}  # neither anvil nor npm
    missing = subprocess.run([x402gw, "demo", "--exit-after-calls", "--port", "0", "--upstream-port", "0",
                              "--warehouse-port", "0"], cwd=elsewhere, env=bare, capture_output=True, text=True,
                             timeout=120, check=False)
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    [line] = missing.stdout.strip().splitlines()
    assert line.startswith("error: anvil not found:") and "npm" in line, line
