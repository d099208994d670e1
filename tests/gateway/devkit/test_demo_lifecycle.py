"""``x402gw demo`` ends without leaving anything behind, and starts again at once on the same ports.

Issue 15: after Ctrl-C a restart answered "port 8402 is in use" for a minute (the port check saw the
stopped demo's TIME_WAIT connections), and a demo killed by a signal it cannot handle left anvil
running (it runs in its own session) holding its port.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.devkit.demo import _port_free
from tests.support.demo_process import SERVING, DemoProcess, demo_env, free_ports, listening, wait_gone

REPO = Path(__file__).resolve().parents[3]


def _plain_bind_fails(port: int) -> bool:
    """What the old port check did: bind without SO_REUSEADDR."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_port_check_counts_a_listener_not_time_wait() -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    assert not _port_free(port), "a listening port must count as in use"
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    listener.close()
    served.close()  # the server side closes first, as a stopping server does: its end lingers
    client.close()
    assert _plain_bind_fails(port), "the set-up did not leave the server's end of the connection behind"
    assert _port_free(port), "a connection in TIME_WAIT is not a server holding the port"


@pytest.fixture
def demo_command(tmp_path: Path) -> Iterator[tuple[list[str], dict[str, str]]]:
    ports = free_ports(3)
    command = [sys.executable, "-m", "gateway.cli", "demo", "--calls", "1", "--port", str(ports[0]),
               "--upstream-port", str(ports[1]), "--warehouse-port", str(ports[2])]
    path = [str(Path(sys.executable).parent), str(REPO / "node_modules" / ".bin"), *os.environ["PATH"].split(os.pathsep)]
    env = demo_env(path, tmp_path / "cache")
    env["PYTHONPATH"] = str(REPO)
    yield command, env


def _start_serving(command: list[str], env: dict[str, str], cwd: Path) -> tuple[DemoProcess, int]:
    demo = DemoProcess.start(command, cwd, env)
    demo.read_until(SERVING)
    return demo, os.pidfd_open(demo.anvil_pid())


def _get_tools(gateway_url: str) -> http.client.HTTPConnection:
    host, port = gateway_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/tools")
    response = connection.getresponse()
    assert response.status == 200
    response.read()
    return connection  # kept open: keep-alive, so the gateway is the side that closes it


@pytest.mark.e2e
def test_ctrl_c_stops_everything_and_a_restart_gets_the_same_ports(
    tmp_path: Path, demo_command: tuple[list[str], dict[str, str]]
) -> None:
    command, env = demo_command
    gateway_port = int(command[command.index("--port") + 1])
    demo, anvil_fd = _start_serving(command, env, tmp_path)
    try:
        assert "HTTP 200  tx 0x" in demo.output
        anvil_port = demo.anvil_port
        idle = _get_tools(demo.gateway_url)
        demo.process.send_signal(signal.SIGINT)
        assert demo.finish() == 0, demo.output
        assert "ledger: 1 settled payments" in demo.output
        assert wait_gone(anvil_fd), "anvil outlived the demo"
        assert not listening(anvil_port)
        # The gateway closed the idle keep-alive connection: its end lingers on the port.
        assert _plain_bind_fails(gateway_port)
        idle.close()
    finally:
        demo.kill()
        os.close(anvil_fd)

    again, anvil_fd = _start_serving(command, env, tmp_path)  # at once, same ports, same directory
    try:
        assert f"http://127.0.0.1:{gateway_port}" in again.gateway_url
        assert "HTTP 200  tx 0x" in again.output
        _get_tools(again.gateway_url).close()
        again.process.send_signal(signal.SIGTERM)  # SIGTERM too stops everything
        assert again.finish() == 0, again.output
        assert wait_gone(anvil_fd), "anvil outlived a demo stopped with SIGTERM"
    finally:
        again.kill()
        os.close(anvil_fd)


@pytest.mark.e2e
def test_sigkill_takes_anvil_along_and_a_restart_gets_the_same_ports(
    tmp_path: Path, demo_command: tuple[list[str], dict[str, str]]
) -> None:
    command, env = demo_command
    demo, anvil_fd = _start_serving(command, env, tmp_path)
    try:
        anvil_port = demo.anvil_port
        _get_tools(demo.gateway_url)
        demo.process.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can stop anvil now
        demo.finish()
        assert wait_gone(anvil_fd), "anvil outlived a demo killed with SIGKILL"
        assert not listening(anvil_port)
    finally:
        demo.kill()
        os.close(anvil_fd)

    again, anvil_fd = _start_serving(command, env, tmp_path)
    try:
        assert "HTTP 200  tx 0x" in again.output
        _get_tools(again.gateway_url).close()
        again.process.send_signal(signal.SIGINT)
        assert again.finish() == 0, again.output
        assert wait_gone(anvil_fd)
    finally:
        again.kill()
        os.close(anvil_fd)
