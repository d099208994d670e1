"""Stage 7, respond: the upstream's answer, its status and content headers kept, plus the receipt.

Paid content is ``Cache-Control: private, no-store`` so no shared cache serves it for free.
"""

from __future__ import annotations

from starlette.responses import Response

from gateway.upstream.bridge import DROPPED_RESPONSE_HEADERS, UpstreamResponse
from gateway.pipeline.stages.settle import receipt_headers
from settlement.x402.wire import SettleResponse


def respond(upstream: UpstreamResponse, receipt: SettleResponse | None, request_id: str, version: int = 2) -> Response:
    response = Response(content=upstream.body, status_code=upstream.status)
    headers = response.headers
    for name, value in upstream.headers:
        if name.lower() not in DROPPED_RESPONSE_HEADERS:
            headers.append(name, value)
    headers["Cache-Control"] = "private, no-store"
    headers["X-Request-Id"] = request_id
    if receipt is not None:
        for name, value in receipt_headers(receipt, version).items():
            headers[name] = value
    return response
