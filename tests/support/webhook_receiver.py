"""A real webhook receiver on loopback: checks each delivery's signature as the README tells a
receiver to (HMAC-SHA256 of "t.body" with the shared secret, compared in constant time), records
it, and answers 503 while ``down``. Written from the documented format, not from the gateway's code."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer


@dataclass
class Delivery:
    event_id: str
    event_type: str
    body: dict[str, Any]
    signed: bool  # the signature verified with the secret
    answered: int  # what the receiver answered


@dataclass
class Receiver:
    secret: bytes
    down: bool = False
    deliveries: list[Delivery] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)
    server: ThreadServer | None = None

    def check(self, header: str, body: bytes) -> bool:
        parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
        expected = hmac.new(self.secret, parts.get("t", "").encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, parts.get("v1", ""))

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        status = 503 if self.down else 200
        delivery = Delivery(request.headers.get("x402gw-event-id", ""), request.headers.get("x402gw-event-type", ""),
                            json.loads(body), self.check(request.headers.get("x402gw-signature", ""), body), status)
        with self.changed:
            self.deliveries.append(delivery)
            self.changed.notify_all()
        return Response(status_code=status)

    def accepted(self) -> list[Delivery]:
        return [d for d in self.deliveries if d.answered == 200]

    def wait_accepted(self, count: int, timeout: float = 20.0) -> list[Delivery]:
        """Blocks until ``count`` deliveries were accepted (a condition, not a sleep)."""
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.accepted()) >= count, timeout), self.deliveries
            return self.accepted()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"{self.server.url}/hooks"

    def start(self, port: int = 0) -> Receiver:
        self.server = ThreadServer(Starlette(routes=[Route("/hooks", self.handle, methods=["POST"])]), port=port).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
