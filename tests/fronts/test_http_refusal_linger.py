"""A parser refusal reaches a client that is still sending (lingering close).

Closing a socket with unread input makes the kernel send RST, and the RST makes the
client's kernel discard the refusal it has not read yet. These tests keep sending after
the refusal point and still expect the status line; they fail without the lingering
close in gateway/fronts/http/protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway.app import runner_for
from gateway.fronts.http import protocol


@pytest.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()

    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/", ok)
    runner = runner_for(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


async def _refused_while_sending(port: int, head: bytes, rounds: int = 30) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = b""
    try:
        writer.write(head)
        # Keep the server's receive queue non-empty after it has answered.
        for _ in range(rounds):
            with contextlib.suppress(ConnectionError):
                writer.write(b"a" * 4096)
                await writer.drain()
            await asyncio.sleep(0.01)
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(3):
                while chunk := await reader.read(65536):
                    answer += chunk
    finally:
        writer.transport.abort()
    return answer


async def test_oversize_header_answer_survives_further_input(port: int) -> None:
    answer = await _refused_while_sending(port, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000)
    assert answer[:13] in (b"HTTP/1.1 431 ", b"HTTP/1.0 431 "), answer[:60]
    assert b"aaaa" not in answer


async def test_garbage_request_line_answer_survives_further_input(port: int) -> None:
    answer = await _refused_while_sending(port, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert answer[:13] in (b"HTTP/1.1 400 ", b"HTTP/1.0 400 "), answer[:60]


async def test_linger_is_bounded(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that never stops sending is cut after the linger time, not served forever."""
    monkeypatch.setattr(protocol, "LINGER_AFTER_REFUSAL_S", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 20_000)
    cut = False
    try:
        async with asyncio.timeout(10):
            while not cut:
                try:
                    writer.write(b"a" * 4096)
                    await writer.drain()
                except ConnectionError:
                    cut = True
                await asyncio.sleep(0.01)
    finally:
        writer.transport.abort()
    assert cut
