"""A raw TCP client: aiohttp and requests normalise requests and would hide parser bugs."""

from __future__ import annotations

import asyncio
import socket


async def raw_http(host: str, port: int, data: bytes, *, timeout_s: float = 5.0, read_after_s: float = 0.0,
                   then: bytes | None = None) -> bytes:
    """Send ``data`` (optionally ``then`` after ``read_after_s``) and return all bytes the
    server sent until it closed the connection or ``timeout_s`` passed."""
    reader, writer = await asyncio.open_connection(host, port)
    received = bytearray()
    try:
        writer.write(data)
        await writer.drain()
        if then is not None:
            try:
                async with asyncio.timeout(read_after_s):
                    while chunk := await reader.read(65536):
                        received += chunk
            except TimeoutError:
                pass
            writer.write(then)
            await writer.drain()
        try:
            async with asyncio.timeout(timeout_s):
                while chunk := await reader.read(65536):
                    received += chunk
        except TimeoutError:
            pass
    finally:
        writer.close()
    return bytes(received)


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (what it sent first is read and dropped); a
    socket still open with nothing to read is not. Leaves ``sock`` non-blocking."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except OSError:
        return True
    return True
