"""The HTTP listener's connection cap: aiohttp's protocol asks the gate before it starts.

A connection over the cap (``limits.max_connections`` total, ``limits.max_connections_per_ip``
per client address; ``resilience/connection_gate.py``) is answered with a canned 503 and
closed in ``connection_made``: no request handler task, no parser run, no keep-alive timer,
nothing it sent is read. Admitted connections are the usual :class:`QuietRequestHandler`.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import ipaddress
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

from gateway.fronts.http.protocol import (
    SERVER_HEADER,
    GatewayRunner,
    QuietRequestHandler,
    QuietServer,
    half_close,
)
from gateway.resilience.connection_gate import ConnectionGate

# A refused connection discards its input for this long after the 503 (see _refuse) ...
REFUSED_LINGER_S: Final = 0.5
# ... and at most this many do so at once (bounded descriptors under a flood).
REFUSED_LINGER_MAX: Final = 256

_BODY = b'{"error":"too many connections, retry later"}'
REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n"
    b"Server: " + SERVER_HEADER.encode() + b"\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


def peer_address(transport: asyncio.BaseTransport) -> str:
    """The socket peer (never a header: nothing has been read yet); IPv4-mapped IPv6 as IPv4."""
    peer = transport.get_extra_info("peername")
    host = peer[0] if isinstance(peer, tuple) and peer else ""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return str(host)  # a Unix socket or an unknown family: one bucket per name
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@dataclass(slots=True)
class LingerBudget:
    """Refused connections that may linger at once (see :meth:`CappedRequestHandler._refuse`)."""

    limit: int = REFUSED_LINGER_MAX
    seconds: float = REFUSED_LINGER_S
    lingering: int = 0


class CappedRequestHandler(QuietRequestHandler):
    """A :class:`QuietRequestHandler` that exists only if the gate admits its connection."""

    def __init__(self, manager: Server, *, gate: ConnectionGate, linger: LingerBudget, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._linger = linger
        self._linger_handle: asyncio.TimerHandle | None = None
        self._gate_address: str | None = None
        self._refused = False
        # True when the connection was counted before its TLS handshake (TlsGateProtocol).
        self.pre_admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.pre_admitted:
            super().connection_made(transport)
            return
        address = peer_address(transport)
        if self._gate.admit(address) is not None:
            self._refused = True
            self._refuse(transport)
            return
        self._gate_address = address
        try:
            super().connection_made(transport)
        except BaseException:
            self._release()
            raise

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        """503, FIN, then close a moment later.

        # SECURITY: refused before anything is parsed: an over-cap connection costs one
        # write and one close, no handler task. Closing at once while the client's request
        # bytes sit unread in our receive queue would make the kernel send RST, and the RST
        # makes the client's kernel drop the 503 it has not read yet. So the refusal is
        # followed by a half-close and the connection lingers (input discarded) for
        # ``seconds``, but only ``limit`` of them at a time: beyond that, close at once.
        """
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            transport.close()
            return
        transport.write(REFUSAL)
        budget = self._linger
        if budget.lingering >= budget.limit:
            transport.close()
            return
        self._linger_handle = half_close(transport, self._loop, budget.seconds)
        if self._linger_handle is not None:
            budget.lingering += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            if self._linger_handle is not None:
                self._linger_handle.cancel()
                self._linger_handle = None
                self._linger.lingering -= 1
            return
        try:
            super().connection_lost(exc)
        finally:
            self._release()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # refused: whatever arrives is discarded, never parsed
        super().data_received(data)

    def eof_received(self) -> None:
        if self._refused and self.transport is not None:
            self.transport.close()  # the client is done: no need to linger
            return
        super().eof_received()

    def _release(self) -> None:
        address, self._gate_address = self._gate_address, None
        if address is not None:
            self._gate.release(address)


class CappedServer(QuietServer):
    _gate: ConnectionGate
    _linger: LingerBudget

    def __call__(self) -> RequestHandler:
        return CappedRequestHandler(self, gate=self._gate, linger=self._linger, loop=self._loop, **self._kwargs)


class CappedRunner(GatewayRunner):
    """``GatewayRunner`` whose listener refuses connections beyond the gate's caps."""

    def __init__(self, app: Any, *, gate: ConnectionGate, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._gate = gate

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # Same object and state as GatewayRunner's; only the protocol factory differs.
        server.__class__ = CappedServer
        server._gate = self._gate  # type: ignore[attr-defined]
        server._linger = LingerBudget()  # type: ignore[attr-defined]
        return server


# -- TLS: the gate is asked at accept, before the handshake --------------------------------


class _GatedSslProtocol(asyncio.sslproto.SSLProtocol):
    """asyncio's TLS protocol that gives the connection's place back to the gate when the
    socket goes, whether or not the handshake ever completed."""

    def __init__(self, *args: Any, gate: ConnectionGate, address: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gate_release: tuple[ConnectionGate, str] | None = (gate, address)

    def connection_lost(self, exc: BaseException | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            held, self._gate_release = self._gate_release, None
            if held is not None:
                held[0].release(held[1])


class TlsGateProtocol(asyncio.Protocol):
    """The raw socket of a TLS connection: the gate decides before any TLS byte is read.

    # SECURITY (AV-09): asyncio calls the HTTP protocol's ``connection_made`` only once the
    # TLS handshake has completed, so the cap (counted there) did not see connections still
    # in their handshake, and asyncio held each of those for 60 s: 1,000 half-open
    # handshakes were all held with a cap of 200, past the 10 s header timeout. Here the
    # connection is counted at accept (over the cap: closed at once; no 503 can be sent
    # before TLS) and its handshake must finish within the header timeout.
    """

    def __init__(self, app_factory: Callable[[], asyncio.Protocol], ssl_context: ssl.SSLContext,
                 gate: ConnectionGate, handshake_timeout_s: float) -> None:
        self._app_factory = app_factory
        self._ssl_context = ssl_context
        self._gate = gate
        self._handshake_timeout_s = handshake_timeout_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        address = peer_address(transport)
        if self._gate.admit(address) is not None:
            transport.close()
            return
        loop = asyncio.get_running_loop()
        app = self._app_factory()
        if isinstance(app, CappedRequestHandler):
            app.pre_admitted = True  # counted here, released by _GatedSslProtocol
        waiter: asyncio.Future[None] = loop.create_future()
        # A failed or timed-out handshake is the client's problem, not an unretrieved error.
        waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
        tls = _GatedSslProtocol(loop, app, self._ssl_context, waiter, server_side=True,
                                ssl_handshake_timeout=self._handshake_timeout_s, gate=self._gate, address=address)
        assert isinstance(transport, asyncio.Transport)  # noqa: S101 - a stream server's transport
        transport.set_protocol(tls)
        tls.connection_made(transport)


class GatedSite(web.TCPSite):
    """``web.TCPSite`` whose TLS connections pass the runner's connection gate at accept
    (plain connections already do, in :class:`CappedRequestHandler`)."""

    def __init__(self, runner: web.BaseRunner, *args: Any, handshake_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(runner, *args, **kwargs)
        self._handshake_timeout_s = handshake_timeout_s

    async def start(self) -> None:
        gate = getattr(self._runner, "_gate", None)
        if self._ssl_context is None or gate is None:
            await super().start()
            return
        self._runner._reg_site(self)  # what BaseSite.start does
        server = self._runner.server
        assert server is not None  # noqa: S101 - the runner is set up before its sites start
        ssl_context = self._ssl_context

        def factory() -> asyncio.Protocol:
            return TlsGateProtocol(server, ssl_context, gate, self._handshake_timeout_s)

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(factory, self._host, self._port, backlog=self._backlog,
                                                reuse_address=self._reuse_address, reuse_port=self._reuse_port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port
