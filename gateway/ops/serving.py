"""Run an ASGI app with uvicorn on a background thread: for the demo's sample upstream and tests."""

from __future__ import annotations

import threading
from typing import Any

import uvicorn


class ThreadServer:
    """A uvicorn server on its own thread and event loop (no signal handlers off the main thread).

    ``port=0`` picks a free port; ``url`` tells which one after ``start()``.
    """

    def __init__(self, app: Any, port: int = 0, host: str = "127.0.0.1") -> None:
        self.host = host
        self.server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{port}", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> ThreadServer:
        self.thread.start()
        waited = 0.0
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            if waited >= timeout:
                raise RuntimeError("server did not start in time")
            self.thread.join(0.01)  # wait on the thread, not a bare sleep: returns early if it dies
            waited += 0.01
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def __enter__(self) -> ThreadServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
