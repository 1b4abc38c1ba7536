"""A TCP proxy on loopback that injects network faults between a client and a server.

It runs its own event loop in a daemon thread, so one proxy can serve tests on any loop
(pytest-asyncio gives each test its own) and clients in other processes. Modes apply at
once to existing and new connections:

``pass_()``        relay bytes both ways.
``latency(ms)``    relay, but hold every server-to-client chunk ``ms`` first (a slow server).
``blackhole()``    read and drop every byte both ways; connections stay open (a lost path).
``half_open()``    close the upstream side of existing connections; new connections are
                   accepted but never read from or answered (a hung server whose kernel
                   still completes handshakes).
``reset()``        abort every existing connection with RST; new ones are reset on accept.

Usage::

    proxy = FaultProxy("127.0.0.1", redis_port).start()
    proxy.url_for("redis")          # redis://127.0.0.1:<proxy port>/0
    proxy.latency(2000); ...; proxy.pass_()
    proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

PASS, LATENCY, BLACKHOLE, HALF_OPEN, RESET = "pass", "latency", "blackhole", "half_open", "reset"


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter | None) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self, *, rst: bool) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            if rst:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self.mode = PASS
        self.delay_s = 0.0
        self.accepted = 0
        self.delayed = 0  # replies held back delay_s by the latency fault, then sent on
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None

    # -- control (any thread) --------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self._server = self._run(self._listen())
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def url_for(self, scheme: str = "redis") -> str:
        return f"{scheme}://{self.host}:{self.port}/0" if scheme == "redis" else f"{scheme}://{self.host}:{self.port}"

    def pass_(self) -> None:
        self._set(PASS)

    def latency(self, ms: float) -> None:
        self.delay_s = ms / 1000
        self._set(LATENCY)

    def blackhole(self) -> None:
        self._set(BLACKHOLE)

    def half_open(self) -> None:
        self._set(HALF_OPEN, lambda link: link.upstream.transport.abort() if link.upstream else None)

    def reset(self) -> None:
        self._set(RESET, lambda link: link.abort(rst=True))

    @property
    def connections(self) -> int:
        return len(self._links)

    def _set(self, mode: str, on_each: Callable[[_Link], Any] | None = None) -> None:
        def apply() -> None:
            self.mode = mode
            if on_each is not None:
                for link in list(self._links):
                    on_each(link)
                    if mode == RESET:
                        self._links.discard(link)

        self._run_sync(apply)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def _run_sync(self, fn: Callable[[], None]) -> None:
        async def call() -> None:
            fn()

        self._run(call())

    # -- proxy loop --------------------------------------------------------------------------

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._accept, self.host, 0)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for link in list(self._links):
            link.abort(rst=False)
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == RESET:
            _Link(writer, None).abort(rst=True)
            return
        if self.mode == HALF_OPEN:
            link = _Link(writer, None)
            self._links.add(link)
            return  # accepted, never read, never answered
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(reader, up_writer, link, to_client=False)),
            asyncio.create_task(self._pump(up_reader, writer, link, to_client=True)),
        ]

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, link: _Link, *,
                    to_client: bool) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                if self.mode in (BLACKHOLE, HALF_OPEN):
                    continue
                if self.mode == LATENCY and to_client:
                    await asyncio.sleep(self.delay_s)
                    if self.mode in (BLACKHOLE, HALF_OPEN, RESET):
                        continue
                    self.delayed += 1
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            # In a blackhole the server's FIN is lost too: the client side stays silently open.
            if not to_client or self.mode != BLACKHOLE:
                link.abort(rst=False)
                self._links.discard(link)
