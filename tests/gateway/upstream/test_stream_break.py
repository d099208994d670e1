"""A streamed answer whose upstream breaks off: what arrived before the break is still relayed,
then the break is ``upstream_stream_broken`` (aiohttp's readers raise the connection's error before
handing out what is buffered, so events and the break landing together used to lose the events)."""

from __future__ import annotations

import asyncio
from unittest.mock import Mock

import aiohttp
import pytest

from gateway.errors import GatewayError
from gateway.upstream.transport import _chunks


class Answer:
    """The parts of an aiohttp response ``_chunks`` reads: its body stream and ``release``."""

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self.content = content
        self.released = False

    def release(self) -> None:
        self.released = True


async def relayed(feed: list[bytes], broken: bool) -> tuple[list[bytes], GatewayError | None, bool]:
    content = aiohttp.StreamReader(Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    for data in feed:
        content.feed_data(data)
    if broken:
        content.set_exception(aiohttp.ClientPayloadError("Response payload is not completed"))
    else:
        content.feed_eof()
    answer = Answer(content)
    got: list[bytes] = []
    error = None
    try:
        async for chunk in _chunks(answer):  # type: ignore[arg-type]
            got.append(chunk)
    except GatewayError as err:
        error = err
    return got, error, answer.released


@pytest.mark.parametrize("feed", [[b"data: 1\n\n", b"data: 2\n\n"], [b"data: 1\n\n"]])
def test_what_arrived_before_the_break_is_relayed_then_the_break_is_told(feed: list[bytes]) -> None:
    got, error, released = asyncio.run(relayed(feed, broken=True))
    assert b"".join(got) == b"".join(feed)
    assert error is not None and error.code == "upstream_stream_broken" and error.status == 502
    assert released


def test_a_break_with_nothing_unread_relays_nothing_more() -> None:
    got, error, _ = asyncio.run(relayed([], broken=True))
    assert got == [] and error is not None and error.code == "upstream_stream_broken"


def test_a_complete_stream_is_relayed_whole() -> None:
    got, error, released = asyncio.run(relayed([b"data: 1\n\n", b"data: [DONE]\n\n"], broken=False))
    assert b"".join(got) == b"data: 1\n\ndata: [DONE]\n\n" and error is None and released


