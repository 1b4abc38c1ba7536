"""aiohttp's HTTP/1 protocol handler, with parser refusals that quote nothing.

Why: when aiohttp's parser refuses a request (line too long, bad header, smuggling
attempt) its error message holds up to ~100 bytes of the raw input, and aiohttp both
answers it as the 400 body and logs it at ERROR with a traceback (THREAT_MODEL threat
1.11). That input is a bearer token's prefix or a person's data as often as not. Here a
parser refusal is answered with the bare status phrase, logged as one INFO line with the
exception's class name, and sized requests get their own status (414/431).
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway.errors import (
    DependencyUnavailable,
    GatewayError,
    HeadersTooLarge,
    MalformedRequest,
    MisdirectedRequest,
    NotImplementedByGateway,
    UriTooLong,
    VersionNotSupported,
)

log = structlog.get_logger("gateway.http.parser")

SERVER_HEADER = "infergate"


# A chunked body is refused once more than this many bytes arrived for it on the wire and
# they are more than 1.5 times its content (chunk sizes, CRLFs, extensions): chunks of 12
# bytes on average or less. Measured: 8 MiB in 1-byte chunks cost 7 s of event-loop CPU.
CHUNK_OVERHEAD_FLOOR = 64 * 1024
CHUNK_OVERHEAD_RATIO = 1.5

# How long a refused connection keeps reading (and discarding) after its answer was sent.
LINGER_AFTER_REFUSAL_S = 1.0


def half_close(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
               linger_s: float) -> asyncio.TimerHandle | None:
    """Send FIN now and close ``linger_s`` later (None: closed at once, no half-close possible).

    Closing with the client's bytes unread makes the kernel send RST, and the RST makes the
    client drop the answer it has not read yet; input arriving meanwhile is discarded by the
    caller's protocol.
    """
    if transport.is_closing() or not transport.can_write_eof():
        transport.close()
        return None
    try:
        transport.write_eof()
    except (OSError, RuntimeError):
        transport.close()
        return None
    return loop.call_later(linger_s, transport.close)


class LingeringClose:
    """A transport whose ``close`` half-closes first and closes for real a moment later.

    Why: a parser refusal (431, 414, 400) is sent while the client is still sending the
    request it belongs to. Closing a socket whose receive queue holds unread bytes makes
    the kernel answer with RST, and an RST makes the client's kernel drop the refusal it
    has not read yet: the client sees "connection reset" instead of the status that says
    why. As nginx's lingering close does, send FIN after the answer, keep discarding what
    arrives for a bounded time, then close. A second ``close`` (server shutdown) is
    immediate.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop, linger_s: float) -> None:
        self._transport = transport
        self._loop = loop
        self._linger_s = linger_s
        self._timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._transport.close()
            return
        # SECURITY: bounded: a refused client holds its socket for linger_s at most.
        self._timer = half_close(self._transport, self._loop, self._linger_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class QuietRequestHandler(RequestHandler):
    _quiet = False
    # The body the parser is filling: the payload of the last request it emitted.
    _open_body: StreamReader | None = None

    # Bytes received on the wire since the open chunked body's request began.
    _open_wire: int = 0
    _open_chunked: bool = False

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        # start() pops only between awaits, never during this call: what is past ``queued``
        # is what this chunk of input produced.
        for message, payload in list(self._messages)[queued:]:
            if isinstance(message, _ErrInfo):
                self._fail_open_body(message.exc)
            else:
                self._open_body, self._open_chunked, self._open_wire = payload, message.chunked, 0
        body = self._open_body
        if body is not None and self._open_chunked and not body.is_eof():
            self._open_wire += len(data)
            if self._open_wire > CHUNK_OVERHEAD_FLOOR and self._open_wire > CHUNK_OVERHEAD_RATIO * body.total_bytes:
                # SECURITY (availability): every chunk costs the parser and the body reader
                # a Python call (~1 us) whatever its size; 8 MiB sent as one-byte chunks (48 MB
                # on the wire) kept the event loop busy for 7 s, health probes at 113 ms p50.
                # A body whose framing outweighs its content is refused (chunk extensions
                # padding the framing included); real clients send chunks of kilobytes.
                self._fail_open_body(MalformedRequest("chunks too small: the chunked framing outweighs the body",
                                                      reason="body_chunk_overhead"))

    def _fail_open_body(self, exc: BaseException) -> None:
        """Hand a framing error inside a body to the handler reading that body.

        # SECURITY (HTTP-04): aiohttp's C parser drops the request it is filling when the
        # body's framing breaks (a bad chunk size, a bare LF in a chunk line) after the
        # headers arrived in an earlier segment: the error is queued as the *next* message
        # and the reader of this body waits for bytes that never come. The client got a 408
        # after the 30 s body timeout instead of a 400, and a proxy in front saw a
        # connection that hung. The reader now gets the error at once (the front answers
        # 400 ``body_bad_framing``), and nothing more is parsed on this connection: the
        # queued refusal is never answered as a second response.
        """
        body, self._open_body = self._open_body, None
        if body is None or body.is_eof() or body.exception() is not None:
            return
        body.set_exception(exc)
        body.feed_eof()  # nothing to drain after the answer: no lingering read of a broken body
        self._linger_on_close()

    async def shutdown(self, timeout: float | None = 15.0) -> None:  # noqa: ASYNC109 - aiohttp's signature
        """Graceful shutdown: a request still receiving its body is answered 503 at once.

        # SECURITY (AV-10): aiohttp's shutdown stops reading the connection (everything
        # arriving after SIGTERM is discarded) and then waits for the handler, so a request
        # mid-upload could never complete: it held the shutdown for the 30 s body timeout
        # and was answered 408, as if the client had been slow. Nothing of it ran, so it is
        # refused as retryable (503 + Retry-After), audited, without the wait.
        """
        body, self._open_body = self._open_body, None
        if body is not None and not body.is_eof() and body.exception() is None:
            body.set_exception(DependencyUnavailable("the gateway is shutting down", reason="shutting_down",
                                                     retry_after_s=1.0))
            body.feed_eof()
        await super().shutdown(timeout)

    def _linger_on_close(self) -> None:
        transport = self.transport
        if transport is not None and not isinstance(transport, LingeringClose):
            # Nothing more will be parsed on this connection: drop what still arrives.
            self._close = True
            self.transport = cast(asyncio.Transport, LingeringClose(transport, self._loop, LINGER_AFTER_REFUSAL_S))

    def _parse_refusal(self, exc: HttpProcessingError) -> GatewayError:
        """The taxonomy's error for a request the parser refused."""
        text = str(exc.message).lower()
        if isinstance(exc, LineTooLong):
            # SECURITY: size refusals carry their own status; the text is never echoed.
            # The C parser says only which limit it hit: the request-target cap
            # (max_line_size, kept different from max_field_size in app.py) is a 414.
            limit = exc.args[1] if len(exc.args) > 1 else None
            if limit == self.max_line_size or "status line" in text:
                return UriTooLong("request line too long")
            return HeadersTooLarge("header field too large")
        if "too many headers" in text:
            return HeadersTooLarge("too many header fields")
        return MalformedRequest("the request is not valid HTTP/1.1", reason="http_parse_error")

    def _make_error_handler(self, err_info: _ErrInfo) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
        exc = err_info.exc
        hook: ParseRefusalHook | None = getattr(self._manager, "on_parse_refusal", None)
        if hook is None or err_info.status >= 500 or not isinstance(exc, HttpProcessingError):
            return super()._make_error_handler(err_info)
        refusal = self._parse_refusal(exc)

        async def handler(request: BaseRequest) -> web.StreamResponse:
            # SECURITY: a request the parser refuses (smuggling attempts, HTTP-01..06, -11,
            # -15) never reaches the front, so it went unaudited and uncounted: visible
            # only as an INFO log line. It is recorded like the front's own early refusals
            # (pre-authentication: flood-aggregated per client and reason) and answered
            # with a request id; 503 if the record cannot be written (fail closed).
            request_id, status = await hook(request.remote, refusal)
            response = self._refusal_response(request, status, exc)
            response.headers["X-Request-ID"] = request_id
            return response

        return handler

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status < 500 and isinstance(exc, HttpProcessingError):
            return self._refusal_response(request, self._parse_refusal(exc).http_status, exc)
        resp = super().handle_error(request, status, exc, message)
        resp.headers["Server"] = SERVER_HEADER
        return resp

    def _refusal_response(self, request: BaseRequest, status: int, exc: HttpProcessingError) -> web.StreamResponse:
        """The bare status phrase, one INFO line naming the exception class, then close."""
        log.info("http_parse_refused", status=status, error=type(exc).__name__)
        self._linger_on_close()
        self._quiet = True
        try:
            resp = super().handle_error(request, status, None, f"{status} {HTTPStatus(status).phrase}")
        finally:
            self._quiet = False
        resp.headers["Server"] = SERVER_HEADER
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if self._quiet:
            return
        super().log_exception(*args, **kw)


# (client address, refusal) -> (request id, status to answer with): records a parser refusal.
ParseRefusalHook = Callable[[str | None, GatewayError], Awaitable[tuple[str, int]]]


class QuietServer(Server):
    on_parse_refusal: ParseRefusalHook | None = None

    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use :class:`QuietRequestHandler`.

    ``on_parse_refusal`` records the requests aiohttp's parser refuses (audit, metrics);
    it is taken out of the keywords here because ``web_server.Server`` drops *every*
    handler keyword, ``auto_decompress=False`` included, when it meets one it does not know.
    """

    def __init__(self, app: web.Application, *, on_parse_refusal: ParseRefusalHook | None = None,
                 **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._on_parse_refusal = on_parse_refusal

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # Same object, same state; only the protocol factory (``__call__``) differs.
        server.__class__ = QuietServer
        cast(QuietServer, server).on_parse_refusal = self._on_parse_refusal
        return server


async def set_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """# SECURITY: no library or Python versions in ``Server`` (API8:2023)."""
    response.headers["Server"] = SERVER_HEADER


# RFC 9110 §7.2 / RFC 3986 §3.2.2: Host = uri-host [ ":" port ]. Names are DNS-style labels
# (underscores tolerated: some internal service names carry them); IPv6 literals in brackets.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_RE = re.compile(rf"(?P<name>{_LABEL}(?:\.{_LABEL})*\.?|\[(?P<ip6>[0-9A-Fa-f:.]{{2,45}})\])"
                      r"(?::(?P<port>[0-9]{1,5}))?")


# CATALOGUE §0.3: 8 KiB per field (aiohttp's max_field_size), 100 fields (max_headers) and
# 32 KiB for the whole header section, which aiohttp does not bound by itself.
MAX_HEADER_BYTES = 32 * 1024
# CATALOGUE §0.3: request line 8 KiB and 8 KiB per field line, both without the CRLF.
# aiohttp bounds only the request target and the field value (max_line_size and
# max_field_size, about 8 KiB each), so a line made of a long method or name plus a target or
# value just under its cap got through at up to ~8.2 KiB; the exact limits are here.
MAX_REQUEST_LINE_BYTES = 8 * 1024
MAX_FIELD_LINE_BYTES = 8 * 1024


def check_header_size(request: web.BaseRequest) -> None:
    """414 for a request line over MAX_REQUEST_LINE_BYTES; 431 for one field line over
    MAX_FIELD_LINE_BYTES or a header section (names, values, ``: `` and CRLF) over
    MAX_HEADER_BYTES.

    # SECURITY (HTTP-11): each field under the per-field cap, 100 of them still make
    # 800 KiB per request; nothing of the request is looked at beyond this point.
    """
    # raw_path is the request target as sent (origin-, absolute- or authority-form).
    line = len(request.method) + 1 + len(request.raw_path.encode("utf-8", "surrogateescape")) + len(" HTTP/1.1")
    if line > MAX_REQUEST_LINE_BYTES:
        raise UriTooLong(f"request line longer than {MAX_REQUEST_LINE_BYTES} bytes")
    total = 0
    for name, value in request.raw_headers:
        if len(name) + len(value) + 2 > MAX_FIELD_LINE_BYTES:
            raise HeadersTooLarge(f"a header field larger than {MAX_FIELD_LINE_BYTES} bytes")
        total += len(name) + len(value) + 4
        if total > MAX_HEADER_BYTES:
            raise HeadersTooLarge(f"header section larger than {MAX_HEADER_BYTES} bytes")


def request_host(request: web.BaseRequest) -> str | None:
    """The Host header's host, lower case, without port or trailing dot; None when absent
    (HTTP/1.0). Raises 400 for a missing (HTTP/1.1), repeated or malformed Host.

    # SECURITY (HTTP-08): the Host decides nothing here, but anything behind the gateway
    # (logs, an upstream, a cache) may trust it; one well-formed value or a 400, never a
    # guess: "gw@evil", "gw, evil", "gw/x", "gw:abc" and empty values are refused.
    """
    values = request.headers.getall("Host", [])
    if not values:
        if request.version >= (1, 1):
            raise MalformedRequest("an HTTP/1.1 request needs a Host header", reason="http_host_invalid")
        return None
    if len(values) > 1:
        raise MalformedRequest("more than one Host header", reason="http_host_invalid")
    match = _HOST_RE.fullmatch(values[0])
    if match is None or (match["port"] is not None and int(match["port"]) > 65535):
        raise MalformedRequest("the Host header is not a host[:port]", reason="http_host_invalid")
    if match["ip6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["ip6"]))
        except ValueError:
            raise MalformedRequest("the Host header is not a host[:port]", reason="http_host_invalid") from None
    return str(match["name"]).lower().rstrip(".")


def check_host(host: str | None, allowed: tuple[str, ...]) -> None:
    """421 when ``allowed`` (gateway.yaml ``http.allowed_hosts``) is set and ``host`` is not in it.

    # SECURITY: fail closed: with an allowlist, an HTTP/1.0 request naming no host at all
    # is not let through for want of a name to check.
    """
    if not allowed:
        return
    if host is None or (host not in allowed and _canonical_ip(host) not in allowed):
        raise MisdirectedRequest("this gateway does not serve that host")


def _canonical_ip(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def check_framing(request: web.Request) -> None:
    """Refuse framing that HTTP/1.0 cannot carry.

    # SECURITY: Transfer-Encoding is undefined in HTTP/1.0 (RFC 9112 §6.1): a proxy in
    # front may frame such a body by Content-Length or by connection close, we by chunks;
    # two views of one byte stream is how requests get smuggled.
    """
    if request.version < (1, 1) and "Transfer-Encoding" in request.headers:
        raise MalformedRequest("Transfer-Encoding on HTTP/1.0", reason="http_framing")
    codings = request.headers.getall("Transfer-Encoding", [])
    if len(codings) > 1:
        raise MalformedRequest("more than one Transfer-Encoding header", reason="http_framing")
    if codings and codings[0].strip(" \t").lower() != "chunked":
        # SECURITY (HTTP-02): the parser frames any list ending in "chunked" by chunks and
        # ignores the codings before it: "gzip, chunked" was read as a plain body and
        # "identity, chunked" served, where a proxy in front may decode or frame otherwise.
        # The only transfer coding implemented is chunked alone (RFC 9112 §6.1: 501).
        raise NotImplementedByGateway("only Transfer-Encoding: chunked is supported",
                                      reason="http_transfer_coding")


def check_version(request: web.BaseRequest) -> None:
    """505 for anything but HTTP/1.0 and HTTP/1.1 that the parser let through.

    # SECURITY (HTTP-15): a request line without a version (HTTP/0.9 "simple request")
    # was answered as ``HTTP/0.9 200``; a version the gateway does not speak is refused,
    # never guessed at.
    """
    if tuple(request.version) not in {(1, 0), (1, 1)}:
        raise VersionNotSupported("only HTTP/1.0 and HTTP/1.1 on this port")


def check_target(request: web.BaseRequest) -> None:
    """501 for CONNECT, 400 for a request target that is not origin-form.

    # SECURITY (HTTP-08): authority-form (``CONNECT gw:80``) and asterisk-form
    # (``OPTIONS *``) targets never matched the router's one route, so aiohttp answered
    # them itself: no request id, no audit record. The gateway is not a proxy (no CONNECT)
    # and serves no server-wide OPTIONS; both are refused here, and recorded.
    """
    if request.method == "CONNECT":
        raise NotImplementedByGateway("CONNECT is not supported", reason="method_not_implemented")
    if not request.raw_path.startswith("/"):
        raise MalformedRequest("the request target must be a path", reason="path_invalid")
