"""Gateways as real processes (for kill -9 and replica tests), and a private anvil per module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    def __init__(self, env: dict[str, str], cwd: Path, log: Path, args: tuple[str, ...] = ()) -> None:
        self.args = args  # after ``serve``: e.g. --workers 2
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {**os.environ, **env, "X402GW_PORT": str(self.port), "X402GW_LOG_LEVEL": "WARNING"}
        self._cwd = cwd
        self._log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> GatewayProcess:
        log = open(self._log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli.main", "serve", *self.args], env=self._env, cwd=self._cwd,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            return self._wait_ready(self.process, timeout)
        except BaseException:
            self.stop()  # never leave a process behind that the caller has no handle on
            raise

    def _wait_ready(self, process: subprocess.Popen[bytes], timeout: float) -> GatewayProcess:
        with httpx.Client(timeout=1.0) as client:
            deadline = _Deadline(timeout)
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"gateway exited with {process.returncode}: {self.log_tail()}")
                try:
                    if client.get(f"{self.url}/healthz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                if deadline.passed():
                    raise RuntimeError(f"gateway did not become ready: {self.log_tail()}")
                try:
                    process.wait(0.05)  # returns early if the process dies
                except subprocess.TimeoutExpired:
                    pass

    def kill9(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)

    def log_tail(self) -> str:
        try:
            return self._log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


class _Deadline:
    def __init__(self, seconds: float) -> None:
        import time

        self._time = time.monotonic
        self._end = self._time() + seconds

    def passed(self) -> bool:
        return self._time() >= self._end


@contextmanager
def gateway_processes(envs: list[dict[str, str]], cwd: Path) -> Iterator[list[GatewayProcess]]:
    processes = [GatewayProcess(env, cwd, cwd / f"gateway{i}.log") for i, env in enumerate(envs)]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        for process in processes:
            process.stop()
