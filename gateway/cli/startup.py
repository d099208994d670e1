"""``serve``'s start-up refusals: what the app's lifespan refuses ends the process with one line.

The app checks the chains, the tokens, the remote facilitators, the state store and its
BatchSettlers in its lifespan, once the server has started. Left to uvicorn, such a refusal is a
traceback and exit status 3, which a ``--workers`` supervisor reads as a crash and restarts. Here it
is what a refusal before the server started is: ``error: <message> [<code>]`` on stderr and exit
status 2 (a worker's 2 stops its supervisor and the other workers: a configuration error).
Anything else that fails at start-up is one line too, its details at DEBUG.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import GatewayConfigError

__all__ = ["RefusesAtStartUp", "refusal_line"]

log = logging.getLogger("x402gw")


def refusal_line(exc: BaseException) -> str:
    """The one line a start-up failure is told as: never ``str(exc)`` of an unexpected error (it may quote a secret URL)."""
    if isinstance(exc, GatewayConfigError):
        return f"error: {exc} [{exc.code}]"
    code = getattr(exc, "code", None)
    return (f"error: the gateway could not start ({type(exc).__name__}); X402GW_LOG_LEVEL=DEBUG logs the details "
            f"[{code if isinstance(code, str) else 'startup_failed'}]")


def _exit_now(status: int) -> None:
    sys.stderr.flush()
    os._exit(status)  # inside the server's event loop: nothing is served yet, nothing to hand over


class RefusesAtStartUp:
    """The app, whose lifespan start-up failure is told in one line and ends the process with status 2."""

    def __init__(self, app: ASGIApp, exit: Callable[[int], None] = _exit_now) -> None:
        self.app = app
        self._exit = exit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "lifespan.startup.failed":
                return  # told by the except below, in one line (the message is a traceback)
            if message["type"] == "lifespan.startup.complete":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise  # a shutdown failure: uvicorn reports it as it does
            log.debug("start-up failed", exc_info=True)
            print(refusal_line(exc), file=sys.stderr)
            self._exit(2)
            raise
