"""A facilitator double: a real Starlette app on loopback that answers /verify and /settle well,
or in one of the broken ways real facilitators and the proxies in front of them answer.

Switch the behaviour per endpoint from the test (``double.settle_mode = "html_502"``); every request
received is recorded in ``double.requests`` as ``(path, parsed JSON body)``. The ``timeout`` mode
holds the answer until ``release()`` (called by ``stop()``), so the client's own timeout fires
first without the test sleeping.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.ops.serving import ThreadServer

NETWORK = "eip155:31337"
TX_HASH = "0x" + "ab" * 32
PENDING_TX_HASH = "0x" + "cd" * 32

VERIFY_MODES = ("ok", "timeout", "html_502", "non_json", "truncated_json", "missing_is_valid", "verify_invalid_400",
                "json_503_valid")
SETTLE_MODES = ("ok", "timeout", "html_502", "json_503_success", "non_json", "truncated_json", "success_without_tx",
                "pending", "invalid_transaction_state", "nonce_already_used", "transaction_failed")

SUPPORTED = {
    "kinds": [{"x402Version": 2, "scheme": "exact", "network": NETWORK}],
    "extensions": [],
    "signers": {"eip155:*": ["0x70997970C51812dc3A010C7d01b50e0d17dc79C8"]},
}

HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center></body></html>"


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FacilitatorDouble:
    def __init__(self) -> None:
        self.verify_mode = "ok"
        self.settle_mode = "ok"
        self.requests: list[tuple[str, Any]] = []
        self._released = threading.Event()
        self._server = ThreadServer(
            Starlette(
                routes=[
                    Route("/supported", self._supported, methods=["GET"]),
                    Route("/verify", self._verify, methods=["POST"]),
                    Route("/settle", self._settle, methods=["POST"]),
                ]
            )
        )

    @property
    def url(self) -> str:
        return self._server.url

    def start(self) -> FacilitatorDouble:
        self._server.start()
        return self

    def release(self) -> None:
        self._released.set()

    def stop(self) -> None:
        self.release()
        self._server.stop()

    def bodies(self, path: str) -> list[Any]:
        return [body for p, body in self.requests if p == path]

    async def _record(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            body = raw
        self.requests.append((request.url.path, body))
        return body if isinstance(body, dict) else {}

    async def _hold(self) -> Response:
        await asyncio.to_thread(self._released.wait)
        return JSONResponse({"late": True})

    async def _supported(self, request: Request) -> Response:
        self.requests.append((request.url.path, None))
        return JSONResponse(SUPPORTED)

    async def _verify(self, request: Request) -> Response:
        body = await self._record(request)
        payer = _payer(body)
        mode = self.verify_mode
        if mode == "ok":
            return JSONResponse({"isValid": True, "payer": payer})
        if mode == "verify_invalid_400":
            return JSONResponse({"isValid": False, "invalidReason": "invalid_exact_evm_payload_signature",
                                 "payer": payer}, status_code=400)
        if mode == "json_503_valid":
            return JSONResponse({"isValid": True, "payer": payer}, status_code=503)
        if mode == "missing_is_valid":
            return JSONResponse({"valid": True, "payer": payer})
        return await self._broken(mode, '{"isValid":true,"pay')

    async def _settle(self, request: Request) -> Response:
        body = await self._record(request)
        network = (body.get("paymentRequirements") or {}).get("network", NETWORK)
        payer = _payer(body)
        mode = self.settle_mode
        answers: dict[str, tuple[int, dict[str, Any]]] = {
            "ok": (200, {"success": True, "transaction": TX_HASH, "network": network, "payer": payer}),
            "json_503_success": (503, {"success": True, "transaction": TX_HASH, "network": network}),
            "success_without_tx": (200, {"success": True, "network": network, "payer": payer}),
            "pending": (200, {"success": False, "errorReason": "settlement_pending", "transaction": PENDING_TX_HASH,
                              "network": network, "payer": payer}),
            "invalid_transaction_state": (200, {"success": False, "errorReason": "invalid_transaction_state",
                                                "transaction": "", "network": network}),
            "nonce_already_used": (400, {"success": False, "errorReason": "invalid_exact_evm_nonce_already_used",
                                         "transaction": "", "network": network, "payer": payer}),
            "transaction_failed": (200, {"success": False, "errorReason": "transaction_failed",
                                         "transaction": PENDING_TX_HASH, "network": network, "payer": payer}),
        }
        if mode in answers:
            status, answer = answers[mode]
            return JSONResponse(answer, status_code=status)
        return await self._broken(mode, '{"success":true,"transaction":"' + TX_HASH + '","netw')

    async def _broken(self, mode: str, truncated: str) -> Response:
        if mode == "timeout":
            return await self._hold()
        if mode == "html_502":
            return Response(HTML_502, status_code=502, media_type="text/html")
        if mode == "non_json":
            return Response("upstream connect error or disconnect/reset before headers", media_type="text/plain")
        if mode == "truncated_json":
            return Response(truncated, media_type="application/json")
        raise AssertionError(f"unknown facilitator double mode {mode!r}")


def _payer(body: dict[str, Any]) -> str | None:
    try:
        return str(body["paymentPayload"]["payload"]["authorization"]["from"])
    except (KeyError, TypeError):
        return None
