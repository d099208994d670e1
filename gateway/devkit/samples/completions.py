"""A toy text-completion endpoint that reports its token usage, as LLM APIs do: the sample of a tool
charged by usage (``upto``), buffered or streamed as server-sent events.

``POST /v1/completions`` with ``{"prompt": "...", "max_tokens": 16, "stream": false}``:

* buffered: ``{"id", "text", "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}``,
  and the total in the ``X-Usage-Total-Tokens`` header;
* ``"stream": true``: ``text/event-stream``, one ``data:`` event per token, each with the usage so
  far (``usage.completion_tokens``, ``usage.total_tokens``), then ``data: [DONE]``.

Tokens are words, made up deterministically from the prompt, so tests can predict them. A prompt
of N words counts N prompt tokens; ``max_tokens`` (1..512) is how many tokens come back.
``first_token_seconds`` (``create_app``) is how long the model "thinks" before its first token, and
``token_seconds`` the wait between streamed tokens: what a streamed call's time to first byte is
measured against (bench/streaming.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["Completions", "USAGE_HEADER"]

USAGE_HEADER = "X-Usage-Total-Tokens"
MAX_TOKENS = 512
_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
          "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango")


def _tokens(prompt: str, count: int) -> list[str]:
    digest = hashlib.sha256(prompt.encode()).digest()
    return [_WORDS[(digest[i % len(digest)] + i) % len(_WORDS)] for i in range(count)]


class Completions:
    """The endpoint; ``first_token_seconds`` delays the first token (buffered and streamed alike),
    ``token_seconds`` each next streamed one."""

    def __init__(self, first_token_seconds: float = 0.0, token_seconds: float = 0.0) -> None:
        self.first_token_seconds = first_token_seconds
        self.token_seconds = token_seconds

    def routes(self) -> list[Route]:
        return [Route("/v1/completions", self.complete, methods=["POST"])]

    async def complete(self, request: Request) -> Response:
        try:
            body: Any = json.loads(await request.body())
        except ValueError:
            body = None
        prompt = body.get("prompt") if isinstance(body, dict) else None
        count = body.get("max_tokens", 16) if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_TOKENS:
            return JSONResponse({"error": {"code": "invalid_request", "message": "prompt (string) and max_tokens 1..512"}},
                                status_code=400)
        prompt_tokens = len(prompt.split())
        tokens = _tokens(prompt, count)
        if body.get("stream") is True:
            return StreamingResponse(self._events(tokens, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if self.first_token_seconds:
            await asyncio.sleep(self.first_token_seconds)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count, "total_tokens": prompt_tokens + count}
        return JSONResponse({"id": "cmpl-" + hashlib.sha256(prompt.encode()).hexdigest()[:12], "text": " ".join(tokens),
                             "usage": usage}, headers={USAGE_HEADER: str(prompt_tokens + count)})

    async def _events(self, tokens: list[str], prompt_tokens: int) -> AsyncIterator[bytes]:
        if self.first_token_seconds:
            await asyncio.sleep(self.first_token_seconds)
        for index, token in enumerate(tokens, start=1):
            if index > 1 and self.token_seconds:
                await asyncio.sleep(self.token_seconds)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": index, "total_tokens": prompt_tokens + index}
            yield b"data: " + json.dumps({"text": token, "usage": usage}, separators=(",", ":")).encode() + b"\n\n"
        yield b"data: [DONE]\n\n"
