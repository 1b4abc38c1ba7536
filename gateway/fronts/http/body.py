"""Read an HTTP request body under a hard cap, and decide which bodies we read at all.

The app server runs with aiohttp's automatic request decompression OFF: the runner is
built as ``web.AppRunner(app, auto_decompress=False, ...)`` (``gateway.app.runner_for``;
the keyword travels AppRunner -> ``Application._make_handler`` -> ``web_server.Server``
-> ``RequestHandler(auto_decompress=...)`` -> ``HttpRequestParser``). Left on, aiohttp
would inflate ``Content-Encoding: gzip`` bodies itself with a cap unrelated to ours
(GHSA-6mq8-rvhq-8wgg). Here the raw bytes are read in chunks and inflated incrementally
with ``max_length``, so both the bytes on the wire and the bytes after decompression
stop at ``max_bytes`` (plus at most one chunk) before anything larger exists in memory.

Beware: ``web_server.Server.__call__`` silently drops every custom handler keyword,
``auto_decompress`` included, if any one of them is unknown (it logs a warning and
falls back). ``tests/fronts/test_http_body.py`` therefore checks through the real
runner that compressed bytes reach :func:`read_body` untouched.
"""

from __future__ import annotations

import zlib
from typing import Final, Literal

from aiohttp import web
from aiohttp.http_exceptions import ContentLengthError, HttpProcessingError

from gateway.errors import MalformedRequest, PayloadTooLarge, UnsupportedMediaType

__all__ = ["READ_CHUNK", "check_content_type", "content_coding", "read_body"]

READ_CHUNK: Final = 64 * 1024
# Largest single inflate step: keeps the transient output buffer small next to the body.
_INFLATE_STEP: Final = 256 * 1024

Coding = Literal["identity", "gzip", "deflate"]

# RFC 9110 §8.4.1: "deflate" is the zlib format (RFC 1950), which is what tritonclient's
# request_compression_algorithm="deflate" sends (zlib.compress); "x-gzip" is gzip.
_WBITS: Final[dict[str, int]] = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_CODINGS: Final[dict[str, Coding]] = {"identity": "identity", "gzip": "gzip", "x-gzip": "gzip",
                                      "deflate": "deflate"}

# Media types an infer body may declare. tritonclient.http (geventhttpclient) sends no
# Content-Type in either mode; tritonclient.http.aio (aiohttp) sends
# application/octet-stream for JSON and binary bodies alike. The binary extension is
# signalled by Inference-Header-Content-Length, never by the media type.
_JSON_TYPES: Final = frozenset({"application/json"})
_BINARY_TYPES: Final = frozenset({"application/octet-stream"})


def content_coding(request: web.BaseRequest) -> Coding:
    """The single content coding of the body, or 415.

    # SECURITY: only codings we decompress under a cap are accepted; stacked codings
    # ("gzip, gzip") and ones we cannot bound (br, zstd, compress) are refused rather
    # than forwarded or half-decoded (IN-11).
    """
    tokens = [token.strip().lower()
              for value in request.headers.getall("Content-Encoding", [])
              for token in value.split(",")]
    tokens = [token for token in tokens if token]
    if not tokens:
        return "identity"
    if len(tokens) == 1 and tokens[0] in _CODINGS:
        return _CODINGS[tokens[0]]
    raise UnsupportedMediaType("Content-Encoding must be one of identity, gzip, deflate",
                               reason="input_content_encoding")


def check_content_type(request: web.BaseRequest) -> str | None:
    """Refuse infer bodies that are not JSON or the binary extension (415).

    Returns the media type, or None when the client sent none (tritonclient.http).

    # SECURITY: a form or multipart body must never be parsed as a tensor request, and a
    # charset other than UTF-8 would make the JSON mean something else (IN-15).
    """
    values = request.headers.getall("Content-Type", [])
    if not values:
        return None
    if len(values) > 1:
        raise UnsupportedMediaType("more than one Content-Type header")
    media, *params = values[0].split(";")
    media = media.strip().lower()
    if media not in _JSON_TYPES and media not in _BINARY_TYPES:
        raise UnsupportedMediaType("Content-Type must be application/json or application/octet-stream")
    for param in params:
        key, sep, value = param.partition("=")
        key, value = key.strip().lower(), value.strip().strip('"').lower()
        if not key and not sep:
            continue  # a stray ";"
        if media in _JSON_TYPES and key == "charset" and value in ("utf-8", "utf8"):
            continue
        raise UnsupportedMediaType("only the parameter charset=utf-8 is accepted, and only for JSON")
    return media


async def read_body(request: web.BaseRequest, *, max_bytes: int) -> bytes:
    """The request body, decoded from its content coding, never longer than ``max_bytes``.

    Raises 413 as soon as either the received or the decompressed size passes the cap
    (a declared Content-Length above it is refused before a byte is read), 415 for a
    content coding we do not accept, 400 for a corrupt compressed stream. The caller
    should close the connection after a 413: the rest of the body is left unread.
    """
    coding = content_coding(request)
    declared = request.content_length
    # SECURITY: refuse by declaration first, so a 200 MB upload costs nothing (IN-10).
    if declared is not None and declared > max_bytes:
        raise PayloadTooLarge(f"body larger than {max_bytes} bytes")
    if coding == "identity":
        return await _read_plain(request, max_bytes)
    return await _read_compressed(request, max_bytes, _WBITS[coding])


async def _next_chunk(request: web.BaseRequest) -> bytes:
    """The next piece of the body; a client that leaves mid-body is a refused request.

    # SECURITY: a connection lost before the declared body arrived (a slow sender giving
    # up, a reset) surfaced as ConnectionResetError: a 500 with a traceback. It is the
    # client's incomplete input: 400 body_incomplete, logged and audited like any refusal;
    # a broken chunked framing is a 400 body_bad_framing.
    """
    try:
        return await request.content.read(READ_CHUNK)
    except (ConnectionError, ContentLengthError) as exc:
        raise MalformedRequest("the connection closed before the whole body arrived",
                               reason="body_incomplete") from exc
    except HttpProcessingError as exc:
        # SECURITY (HTTP-04): the body's framing broke (chunk size, chunk line endings); the
        # protocol handler stops parsing this connection (fronts/http/protocol.py).
        raise MalformedRequest("the body's chunked framing is invalid", reason="body_bad_framing") from exc


async def _read_plain(request: web.BaseRequest, max_bytes: int) -> bytes:
    body = bytearray()
    while chunk := await _next_chunk(request):
        # SECURITY: chunked bodies have no Content-Length; count as we go and stop at
        # the cap, never buffering past it.
        if len(body) + len(chunk) > max_bytes:
            raise PayloadTooLarge(f"body larger than {max_bytes} bytes")
        body += chunk
    return bytes(body)


async def _read_compressed(request: web.BaseRequest, max_bytes: int, wbits: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    body = bytearray()
    received = 0
    while chunk := await _next_chunk(request):
        received += len(chunk)
        if received > max_bytes:
            raise PayloadTooLarge(f"body larger than {max_bytes} bytes")
        if inflater.eof:
            raise MalformedRequest("data after the end of the compressed body", reason="body_bad_encoding")
        _inflate(inflater, chunk, body, max_bytes)
    # Drain anything zlib still holds (bounded by the same cap), then insist the stream
    # actually ended: a truncated body is not a shorter valid one.
    _inflate(inflater, b"", body, max_bytes)
    if not inflater.eof:
        raise MalformedRequest("the compressed body is truncated", reason="body_bad_encoding")
    return bytes(body)


def _inflate(inflater: zlib._Decompress, data: bytes, body: bytearray, max_bytes: int) -> None:
    """Inflate ``data`` into ``body`` in bounded steps, stopping one byte past the cap.

    # SECURITY: ``max_length`` bounds every step's output and unconsumed input is fed
    # back only while there is room, so a 1 GiB gzip bomb costs about ``max_bytes`` of
    # memory and is refused there (IN-11).
    """
    while True:
        step = min(max_bytes - len(body) + 1, _INFLATE_STEP)
        try:
            piece = inflater.decompress(data, step)
        except zlib.error:
            raise MalformedRequest("the compressed body is corrupt", reason="body_bad_encoding") from None
        body += piece
        if len(body) > max_bytes:
            raise PayloadTooLarge(f"decompressed body larger than {max_bytes} bytes")
        if inflater.eof:
            if inflater.unused_data:
                raise MalformedRequest("data after the end of the compressed body",
                                       reason="body_bad_encoding")
            return
        tail = inflater.unconsumed_tail
        if len(piece) < step:
            if tail:  # zlib neither filled the step nor took the input: cannot happen, refuse
                raise MalformedRequest("the compressed body is corrupt", reason="body_bad_encoding")
            return  # input consumed and nothing held back
        data = tail  # the step was full: more output may be pending, even with no input left
