"""aiohttp's HTTP/1 protocol handler, with parser refusals that quote nothing.

Why: when aiohttp's parser refuses a request (line too long, bad header, smuggling
attempt) its error message holds up to ~100 bytes of the raw input, and aiohttp both
answers it as the 400 body and logs it at ERROR with a traceback (THREAT_MODEL threat
1.11). That input is a bearer token's prefix or a person's data as often as not. Here a
parser refusal is answered with the bare status phrase, logged as one INFO line with the
exception's class name, and sized requests get their own status (414/431).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from gateway.errors import MalformedRequest

log = structlog.get_logger("gateway.http.parser")

SERVER_HEADER = "infergate"


class QuietRequestHandler(RequestHandler):
    _quiet = False

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status < 500 and isinstance(exc, HttpProcessingError):
            text = str(exc.message)
            if isinstance(exc, LineTooLong):
                # SECURITY: size refusals carry their own status; the text is never echoed.
                status = 414 if "status line" in text.lower() else 431
            elif "too many headers" in text.lower():
                status = 431
            log.info("http_parse_refused", status=status, error=type(exc).__name__)
            self._quiet = True
            try:
                resp = super().handle_error(request, status, None, f"{status} {HTTPStatus(status).phrase}")
            finally:
                self._quiet = False
        else:
            resp = super().handle_error(request, status, exc, message)
        resp.headers["Server"] = SERVER_HEADER
        return resp

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if self._quiet:
            return
        super().log_exception(*args, **kw)


class QuietServer(Server):
    def __call__(self) -> RequestHandler:
        return QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections use :class:`QuietRequestHandler`."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # Same object, same state; only the protocol factory (``__call__``) differs.
        server.__class__ = QuietServer
        return server


async def set_server_header(_request: web.Request, response: web.StreamResponse) -> None:
    """# SECURITY: no library or Python versions in ``Server`` (API8:2023)."""
    response.headers["Server"] = SERVER_HEADER


def check_framing(request: web.Request) -> None:
    """Refuse framing that HTTP/1.0 cannot carry.

    # SECURITY: Transfer-Encoding is undefined in HTTP/1.0 (RFC 9112 §6.1): a proxy in
    # front may frame such a body by Content-Length or by connection close, we by chunks;
    # two views of one byte stream is how requests get smuggled.
    """
    if request.version < (1, 1) and "Transfer-Encoding" in request.headers:
        raise MalformedRequest("Transfer-Encoding on HTTP/1.0", reason="http_framing")
