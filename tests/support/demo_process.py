"""``x402gw demo`` as a subprocess: started on free ports, read until it serves, its anvil found.

No sleeps: output is read by a thread into a queue and waited for line by line (the timeouts only
bound a hung demo, they measure nothing); a process's end is waited for on its pidfd.
"""

from __future__ import annotations

import os
import queue
import re
import select
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SERVING = "x402gw is serving at"
_CHAIN = re.compile(r"^chain\s+http://127\.0\.0\.1:(\d+)")
_GATEWAY = re.compile(r"^gateway\s+(http://\S+)")


def free_ports(count: int) -> list[int]:
    """Ports the OS hands out as free right now (port 0), all different."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (a bind with SO_REUSEADDR fails only then)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the live children of ``pid``, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(entry.name), name))
    return found


def wait_gone(pidfd: int, timeout: float = 30.0) -> bool:
    """True once the process behind ``pidfd`` has exited (the pidfd turns readable)."""
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


@dataclass
class DemoProcess:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, command: Sequence[str], cwd: Path, env: dict[str, str]) -> DemoProcess:
        process = subprocess.Popen(
            list(command), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        demo = cls(process)
        threading.Thread(target=demo._read, daemon=True).start()
        return demo

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def read_until(self, marker: str, timeout: float = 120.0) -> str:
        """Lines up to the first one containing ``marker``; fails with the output so far."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {marker!r} within {timeout}s:\n{self.output}") from None
            if line is None:
                raise AssertionError(f"demo ended (status {self.process.wait()}) before {marker!r}:\n{self.output}")
            self.lines.append(line)
            if marker in line:
                return line

    def finish(self, timeout: float = 60.0) -> int:
        """Wait for the end and collect the rest of the output."""
        code = self.process.wait(timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return code

    @property
    def anvil_port(self) -> int:
        for line in self.lines:
            if match := _CHAIN.match(line):
                return int(match.group(1))
        raise AssertionError(f"no chain line:\n{self.output}")

    @property
    def gateway_url(self) -> str:
        for line in self.lines:
            if match := _GATEWAY.match(line):
                return match.group(1)
        raise AssertionError(f"no gateway line:\n{self.output}")

    def anvil_pid(self) -> int:
        anvils = [pid for pid, name in children(self.process.pid) if name == "anvil"]
        assert len(anvils) == 1, (anvils, children(self.process.pid))
        return anvils[0]

    def kill(self) -> None:
        """Last-resort clean-up for a failed test (anvil dies with the demo)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)


def demo_env(path_dirs: Sequence[str], cache: Path) -> dict[str, str]:
    """The environment for a demo subprocess: PATH as given, no X402GW_* from this shell, its own
    cache directory (an npm-fetched anvil would go there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("X402GW_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(path_dirs)
    env["XDG_CACHE_HOME"] = str(cache)
    env["PYTHONUNBUFFERED"] = "1"
    return env
