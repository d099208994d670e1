"""An anvil node as a child process: found (explicit path, PATH, the repository's npm copy, or one
fetched with npm into the user's cache), started on a port, waited for until it answers with the
local chain id, and stopped with its process group.

On Linux anvil is also told to die with the thread that started it (``PR_SET_PDEATHSIG``): a demo
or devchain killed by a signal it cannot handle (SIGKILL) leaves no node behind holding its port.

Used by ``gateway.devkit.devchain`` and by the integration tests.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from settlement.chain.deployment import LOCAL_CHAIN_ID, DevchainError

__all__ = ["ANVIL_NPM_VERSION", "REPO_ROOT", "Anvil", "anvil_cache_dir", "anvil_npm_package", "find_anvil"]

REPO_ROOT = Path(__file__).resolve().parent.parent.parent

# The anvil build package.json pins; fetched with npm when no anvil is found (an installed wheel).
ANVIL_NPM_VERSION = "1.7.1"
_NPM_PLATFORMS = {
    ("linux", "x86_64"): "linux-amd64", ("linux", "aarch64"): "linux-arm64",
    ("darwin", "x86_64"): "darwin-amd64", ("darwin", "arm64"): "darwin-arm64",
}

_LISTENING = re.compile(r"Listening on ([0-9.]+|\[[0-9a-fA-F:]+\]):(\d+)")
_PR_SET_PDEATHSIG = 1


def anvil_npm_package() -> str:
    """The npm package that ships anvil's native binary for this platform (Foundry's own build)."""
    platform = _NPM_PLATFORMS.get((sys.platform, os.uname().machine), "linux-amd64")
    return f"@foundry-rs/anvil-{platform}@{ANVIL_NPM_VERSION}"


def anvil_cache_dir() -> Path:
    """Where anvil fetched with npm lives: ``$XDG_CACHE_HOME/x402gw/anvil`` (``~/.cache`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "x402gw" / "anvil"


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_anvil(explicit: str | None = None, *, fetch: bool = True) -> str:
    """Path of the anvil binary: the explicit setting, else PATH, else the repository's npm copy,
    else the copy in the user's cache, else (``fetch``, npm on PATH) one installed there with npm.

    Not found: a one-line ``DevchainError`` naming the two ways to get it, never a traceback."""
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise DevchainError(
            f"anvil not found or not executable at {explicit!r} (the configured path)",
            code="anvil_not_found",
        )
    on_path = shutil.which("anvil")
    if on_path:
        return on_path
    cached = anvil_cache_dir() / "node_modules" / ".bin" / "anvil"
    for candidate in (REPO_ROOT / "node_modules" / ".bin" / "anvil", cached):
        if _executable(candidate):
            return str(candidate)
    npm = shutil.which("npm")
    if fetch and npm:
        return _fetch_with_npm(npm, cached)
    raise DevchainError(
        "anvil not found: install Foundry and put anvil on PATH (or set X402GW_ANVIL_PATH), "
        f"or install Node.js with npm so x402gw can fetch it (npm install {anvil_npm_package()})",
        code="anvil_not_found",
    )


def _fetch_with_npm(npm: str, binary: Path) -> str:
    """``npm install`` Foundry's anvil package into the user's cache; its native binary ships in
    the package, so nothing else is downloaded."""
    prefix = binary.parent.parent.parent
    prefix.mkdir(parents=True, exist_ok=True)
    package = anvil_npm_package()
    print(f"anvil not found on PATH: installing {package} with npm into {prefix} (once)", file=sys.stderr, flush=True)
    cmd = [npm, "install", "--prefix", str(prefix), "--no-save", "--no-audit", "--no-fund", "--loglevel=error", package]
    try:
        # A bound on a hung registry, not a measurement.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DevchainError(f"could not fetch anvil with npm ({package}): {exc}", code="anvil_not_found") from exc
    if done.returncode != 0 or not _executable(binary):
        last = (done.stderr.strip().splitlines() or ["no anvil binary after the install"])[-1]
        raise DevchainError(
            f"could not fetch anvil with npm ({package}): {last}; install Foundry and put anvil on PATH instead",
            code="anvil_not_found",
        )
    return str(binary)


def _die_with_parent(parent_pid: int) -> None:
    """Child side (between fork and exec): SIGKILL this process when the thread that started it
    dies, however it dies. Linux only; anywhere else the normal stop() is all there is."""
    if _LIBC is None:
        return
    _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect: die now
        os.kill(os.getpid(), signal.SIGKILL)


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()  # loaded before any fork: the child only calls into it


class Anvil:
    """An anvil child process on 127.0.0.1, chain id 31337.

    ``port=0`` lets the OS pick a free port, read back from anvil's ``Listening on`` line.
    Use as a context manager, or call ``start()`` and ``stop()``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        port: int = 0,
        *,
        anvil_path: str | None = None,
        block_time: float | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 15.0,
        chain_id: int = LOCAL_CHAIN_ID,
    ) -> None:
        self._requested_port = port
        self.chain_id = chain_id  # another network's id for a rehearsal (gateway.devkit.rehearsal)
        self._anvil_path = anvil_path
        self._block_time = block_time
        self._extra_args = tuple(extra_args)
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._output: collections.deque[str] = collections.deque(maxlen=200)
        self._listening = threading.Event()
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise DevchainError("anvil is not running", code="anvil_start_failed")
        return self._port

    @property
    def rpc_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        cmd = [
            find_anvil(self._anvil_path),
            "--host",
            self.host,
            "--port",
            str(self._requested_port),
            "--chain-id",
            str(self.chain_id),
        ]
        if self._block_time is not None:
            cmd += ["--block-time", _format_seconds(self._block_time)]
        # Never --quiet: the `Listening on` line is how a port-0 start learns its port.
        return cmd + list(self._extra_args)

    def start(self) -> Anvil:
        if self._process is not None:
            raise DevchainError("anvil already started", code="anvil_start_failed")
        cmd = self.command()
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits: only the main thread (which
        # lives as long as the process) asks for it, so a node started by a worker thread is not
        # killed when that thread ends.
        in_main = threading.current_thread() is threading.main_thread()
        try:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                bufsize=1,
                # Own process group: a terminal's Ctrl-C reaches us, not anvil; we stop it.
                start_new_session=True,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()) if in_main and _LIBC is not None else None,
            )
        except OSError as exc:
            raise DevchainError(f"could not start anvil ({cmd[0]}): {exc}", code="anvil_start_failed") from exc
        self._reader = threading.Thread(target=self._drain, name="anvil-stdout", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(time.monotonic() + self._startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 5.0) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout)
        if process.stdout is not None:
            process.stdout.close()
        self._port = None

    def output_tail(self, lines: int = 20) -> str:
        return "\n".join(list(self._output)[-lines:])

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # Reads anvil's output for as long as it runs, so the pipe never fills and blocks anvil.
    def _drain(self) -> None:
        process = self._process
        if process is None or process.stdout is None:
            return
        for line in process.stdout:
            line = line.rstrip("\n")
            self._output.append(line)
            if not self._listening.is_set():
                match = _LISTENING.search(line)
                if match:
                    self._port = int(match.group(2))
                    self._listening.set()

    def _wait_ready(self, deadline: float) -> None:
        process = self._process
        assert process is not None
        while not self._listening.wait(0.02):
            if process.poll() is not None:
                self._reader_join()
                raise self._start_failed(f"anvil exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise self._start_failed("anvil did not report its port in time")
        request = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
        while True:
            chain_id = _query_chain_id(self.rpc_url, request)
            if chain_id is not None:
                if chain_id != self.chain_id:
                    raise self._start_failed(f"anvil answered chain id {chain_id}, expected {self.chain_id}")
                return
            if process.poll() is not None:
                self._reader_join()
                raise self._start_failed(f"anvil exited with status {process.returncode}")
            if time.monotonic() > deadline:
                raise self._start_failed("anvil did not answer eth_chainId in time")
            time.sleep(0.01)  # poll interval, bounded by the deadline above

    def _reader_join(self) -> None:
        if self._reader is not None:
            self._reader.join(1.0)

    def _start_failed(self, reason: str) -> DevchainError:
        tail = self.output_tail()
        detail = f"\n--- anvil output ---\n{tail}" if tail else ""
        return DevchainError(f"{reason}{detail}", code="anvil_start_failed")

    @staticmethod
    def _signal_group(process: subprocess.Popen[str], sig: signal.Signals) -> None:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass


def _query_chain_id(rpc_url: str, request: bytes) -> int | None:
    http_request = urllib.request.Request(rpc_url, data=request, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(http_request, timeout=1.0) as response:
            return int(json.load(response)["result"], 16)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _format_seconds(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))

