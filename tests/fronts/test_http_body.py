"""Body reading and media-type checks, against a real aiohttp server started like production.

The server under test is built with ``gateway.app.runner_for`` — the very function the
real gateway uses, i.e. ``web.AppRunner(app, auto_decompress=False, ...)`` — so these
tests fail if automatic request decompression is ever switched back on (or silently
dropped by aiohttp's handler-kwargs fallback). A tiny app replaces the gateway's routes:
its handlers call :func:`check_content_type`, :func:`read_body` and the codec directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import os
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from aiohttp import ClientSession, web
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from gateway.app import runner_for
from gateway.errors import GatewayError, MalformedRequest, PayloadTooLarge, UnsupportedMediaType
from gateway.fronts.http.body import READ_CHUNK, check_content_type, read_body
from gateway.fronts.http.codec import CodecLimits, decode_infer_request, encode_infer_response
from gateway.kserve import InferResponse, Tensor
from tests.support.liveness import no_hang

CAP = 1024 * 1024


@dataclass
class Seen:
    """What the handlers observed, for assertions the HTTP response cannot carry."""

    refused_after_bytes: list[int] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)


SEEN = web.AppKey("seen", Seen)


def _refusal(request: web.Request, exc: GatewayError) -> web.Response:
    request.app[SEEN].refused_after_bytes.append(request.content.total_bytes)
    return web.json_response({"error": exc.client_message(), "reason": exc.reason}, status=exc.http_status)


async def _echo(request: web.Request) -> web.Response:
    try:
        media = check_content_type(request)
        body = await read_body(request, max_bytes=CAP)
    except GatewayError as exc:
        return _refusal(request, exc)
    return web.json_response({"length": len(body), "sha256": hashlib.sha256(body).hexdigest(), "media": media})


async def _raw(request: web.Request) -> web.Response:
    """What actually reaches the app: must be the bytes on the wire, still compressed."""
    body = await request.content.read()
    return web.json_response({"length": len(body), "sha256": hashlib.sha256(body).hexdigest()})


async def _infer(request: web.Request) -> web.Response:
    """An identity model: every input comes back as output '<name>_out'."""
    request.app[SEEN].headers.append(dict(request.headers))
    try:
        check_content_type(request)
        body = await read_body(request, max_bytes=CAP)
        req = decode_infer_request(request.match_info["model"], "", body,
                                   header_length=request.headers.get("Inference-Header-Content-Length"),
                                   limits=CodecLimits())
        resp = InferResponse(model_name=req.model, model_version="1", id=req.id,
                             outputs=[Tensor(f"{t.name}_out", t.datatype, t.shape, t.data) for t in req.inputs])
        payload, headers = encode_infer_response(resp, req.outputs, binary_default=req.binary_data_output)
    except GatewayError as exc:
        return _refusal(request, exc)
    return web.Response(body=payload, headers=headers)


@dataclass
class Server:
    url: str
    port: int
    seen: Seen


async def _start(**overrides: Any) -> AsyncIterator[Server]:
    app = web.Application()
    app[SEEN] = Seen()
    app.router.add_post("/echo", _echo)
    app.router.add_post("/raw", _raw)
    app.router.add_post("/v2/models/{model}/infer", _infer)
    runner = runner_for(app)  # production's runner: auto_decompress=False
    runner._kwargs.update(overrides)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield Server(f"http://{host}:{port}", port, app[SEEN])
    finally:
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async for running in _start():
        yield running


@pytest.fixture
async def short_linger_server() -> AsyncIterator[Server]:
    """Production options except lingering_time: after refusing a body mid-stream aiohttp
    keeps the handler reading (and discarding) for lingering_time, 10 s by default, and
    in aiohttp 3.14.5 it does so even after the client has gone (reading is paused, so
    the FIN goes unnoticed). Not what these tests measure; it would only slow teardown."""
    async for running in _start(lingering_time=0.5):
        yield running


@pytest.fixture
async def session() -> AsyncIterator[ClientSession]:
    async with ClientSession() as client:
        yield client


async def _post(session: ClientSession, server: Server, body: bytes | Any, headers: Any = None,
                path: str = "/echo", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    # BytesIO: aiohttp warns (ResourceWarning) about large raw-bytes bodies.
    data = io.BytesIO(body) if isinstance(body, bytes) else body
    async with session.post(server.url + path, data=data, headers=headers, **kwargs) as resp:
        return resp.status, await resp.json()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


PAYLOAD = json.dumps({"inputs": [{"name": "x", "shape": [4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}).encode()


# --- the decompression switch ------------------------------------------------------------


async def test_aiohttp_does_not_decompress(server: Server, session: ClientSession) -> None:
    """The handler sees the compressed bytes: aiohttp's auto_decompress is really off."""
    packed = gzip.compress(PAYLOAD)
    status, got = await _post(session, server, packed, {"Content-Encoding": "gzip"}, path="/raw")
    assert status == 200
    assert got == {"length": len(packed), "sha256": _sha(packed)}


def test_runner_for_turns_decompression_off() -> None:
    runner = runner_for(web.Application())
    assert runner._kwargs["auto_decompress"] is False  # the keyword aiohttp 3.14 honours


# --- content coding ------------------------------------------------------------------------


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


CODINGS: list[tuple[list[str], bytes, int, str]] = [
    # no coding
    ([], PAYLOAD, 200, ""),
    # identity, in any case
    (["identity"], PAYLOAD, 200, ""),
    (["IDENTITY"], PAYLOAD, 200, ""),
    # gzip and its legacy alias
    (["gzip"], gzip.compress(PAYLOAD), 200, ""),
    (["x-gzip"], gzip.compress(PAYLOAD), 200, ""),
    (["GZip"], gzip.compress(PAYLOAD), 200, ""),
    # deflate is the zlib format (RFC 9110 §8.4.1.2), as tritonclient sends it
    (["deflate"], zlib.compress(PAYLOAD), 200, ""),
    # raw deflate without the zlib wrapper is not "deflate"
    (["deflate"], _raw_deflate(PAYLOAD), 400, "corrupt"),
    # IN-11 codecs we do not decompress
    (["br"], b"\x1b\x00", 415, "Content-Encoding"),
    (["zstd"], b"\x28\xb5\x2f\xfd", 415, "Content-Encoding"),
    (["compress"], PAYLOAD, 415, "Content-Encoding"),
    (["unknown"], PAYLOAD, 415, "Content-Encoding"),
    # IN-11 stacked codings, in one header or two
    (["gzip, gzip"], gzip.compress(gzip.compress(PAYLOAD)), 415, "Content-Encoding"),
    (["gzip", "gzip"], gzip.compress(gzip.compress(PAYLOAD)), 415, "Content-Encoding"),
    (["identity, gzip"], gzip.compress(PAYLOAD), 415, "Content-Encoding"),
    # gzip header claimed, plain body
    (["gzip"], PAYLOAD, 400, "corrupt"),
    # truncated gzip stream
    (["gzip"], gzip.compress(PAYLOAD)[:-10], 400, "truncated"),
    # empty body declared gzip
    (["gzip"], b"", 400, "truncated"),
    # bytes after the end of the gzip member (a second member included)
    (["gzip"], gzip.compress(PAYLOAD) + b"junk", 400, "after the end"),
    (["gzip"], gzip.compress(PAYLOAD) + gzip.compress(PAYLOAD), 400, "after the end"),
    # corrupt deflate data inside a valid gzip header
    (["gzip"], gzip.compress(PAYLOAD)[:10] + b"\xff" * 40, 400, "corrupt"),
    # IN-11 gzip / deflate bombs: 64 MiB of zeros from ~64 KiB, capped on the inflated size
    (["gzip"], gzip.compress(b"\0" * (64 << 20), compresslevel=9), 413, "decompressed"),
    (["deflate"], zlib.compress(b"\0" * (64 << 20), 9), 413, "decompressed"),
    # compressed exactly to the cap: accepted; one more byte: refused
    (["gzip"], gzip.compress(b"\0" * CAP), 200, ""),
    (["gzip"], gzip.compress(b"\0" * (CAP + 1)), 413, "decompressed"),
    # incompressible data: the compressed size itself passes the cap
    (["gzip"], gzip.compress(os.urandom(CAP + 1024)), 413, "larger than"),
]


@pytest.mark.parametrize(("encodings", "body", "status", "needle"), CODINGS,
                         ids=[f"{i}-{'+'.join(row[0]) or 'none'}-{row[2]}" for i, row in enumerate(CODINGS)])
async def test_content_coding(server: Server, session: ClientSession, encodings: list[str], body: bytes,
                              status: int, needle: str) -> None:
    headers = CIMultiDict(("Content-Encoding", value) for value in encodings)
    got_status, got = await _post(session, server, body, headers)
    assert got_status == status, got
    if status == 200:
        plain = zlib.decompress(body, 47) if encodings and "identity" not in encodings[0].lower() else body
        assert got["sha256"] == _sha(plain)
    else:
        assert needle in got["error"]


# --- content type ---------------------------------------------------------------------------


APPLICATION_JSON = "application/json"
CONTENT_TYPES: list[tuple[list[str], int]] = [
    # tritonclient.http sends none at all
    ([], 200),
    ([APPLICATION_JSON], 200),
    (["application/json; charset=utf-8"], 200),
    (["Application/JSON;charset=UTF-8"], 200),
    (['application/json; charset="utf-8"'], 200),
    (["application/json;"], 200),
    # tritonclient.http.aio (aiohttp) sends octet-stream, JSON or binary alike
    (["application/octet-stream"], 200),
    # IN-15 anything else
    (["text/plain"], 415),
    (["text/plain; charset=utf-8"], 415),
    (["application/x-www-form-urlencoded"], 415),
    (["multipart/form-data; boundary=xyz"], 415),
    (["application/xml"], 415),
    (["application/vnd.sagemaker-triton.binary+json;json-header-size=10"], 415),
    (["application/jsonx"], 415),
    ([""], 415),
    # a charset other than UTF-8, or any other parameter
    (["application/json; charset=utf-16"], 415),
    (["application/json; charset=latin-1"], 415),
    (["application/json; boundary=x"], 415),
    (["application/octet-stream; charset=utf-8"], 415),
    # two Content-Type headers, even if both are fine: aiohttp's parser already answers 400
    # (check_content_type refuses them too, in case the parser ever lets them through)
    ([APPLICATION_JSON, APPLICATION_JSON], 400),
]


@pytest.mark.parametrize(("values", "status"), CONTENT_TYPES,
                         ids=[f"{i}-{status}" for i, (_, status) in enumerate(CONTENT_TYPES)])
async def test_content_type(server: Server, session: ClientSession, values: list[str], status: int) -> None:
    headers = CIMultiDict(("Content-Type", value) for value in values)
    async with session.post(server.url + "/echo", data=PAYLOAD, headers=headers,
                            skip_auto_headers=[] if values else ["Content-Type"]) as resp:
        got_status, text = resp.status, await resp.text()
    assert got_status == status, text
    if status == 400:
        return  # aiohttp's own plain-text refusal
    got = json.loads(text)
    if status == 415:
        assert got["reason"] == "input_media_type"
    if status == 200:
        assert got["media"] == (values[0].split(";")[0].strip().lower() if values else None)


# --- size caps ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "chunked", "status"),
    [
        (CAP, False, 200),  # exactly the cap
        (CAP + 1, False, 413),  # one byte over, declared in Content-Length
        (CAP, True, 200),  # exactly the cap, chunked (no Content-Length)
        (CAP + 1, True, 413),  # one byte over, chunked
        (0, False, 200),  # empty body
    ],
)
async def test_size_cap(server: Server, session: ClientSession, size: int, chunked: bool, status: int) -> None:
    data = os.urandom(size)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, size, 100_000):
            yield data[start:start + 100_000]

    got_status, got = await _post(session, server, stream() if chunked else data)
    assert got_status == status, got
    if status == 200:
        assert got == {"length": size, "sha256": _sha(data), "media": "application/octet-stream"}
    else:
        assert got["reason"] == "input_too_large"


async def _status_line(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        async with no_hang("the status line"):
            return await reader.readline()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_declared_length_over_cap_is_refused_before_reading(server: Server) -> None:
    """IN-10: Content-Length 200 MB, no body sent at all: 413 at once.

    No body ever comes, so a server that waited for it would never answer (the hang bound
    of ``_status_line`` fails the test); ``refused_after_bytes`` shows it read none.
    """
    line = await _status_line(server.port, b"POST /echo HTTP/1.1\r\nHost: gw\r\nContent-Length: 209715200\r\n\r\n")
    assert line.startswith(b"HTTP/1.1 413 ")
    assert server.seen.refused_after_bytes == [0]


async def test_gzip_declared_length_over_cap_is_refused_before_reading(server: Server) -> None:
    line = await _status_line(server.port, b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Encoding: gzip\r\n"
                                           b"Content-Length: 209715200\r\n\r\n")
    assert line.startswith(b"HTTP/1.1 413 ")


async def test_chunked_flood_is_not_buffered_past_the_cap(short_linger_server: Server) -> None:
    """IN-10: a 200 MB chunked stream is refused once the cap is passed, not buffered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", short_linger_server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
    frame = b"%x\r\n" % READ_CHUNK + b"\0" * READ_CHUNK + b"\r\n"

    async def pump() -> None:
        for _ in range((200 << 20) // READ_CHUNK):
            writer.write(frame)
            await writer.drain()

    sender = asyncio.create_task(pump())
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        # End the chunked body cleanly (the pump only stops between frames): aiohttp's
        # lingering close otherwise keeps reading the refused body for lingering_time.
        with contextlib.suppress(ConnectionError):
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert line.startswith(b"HTTP/1.1 413 ")
    (received,) = short_linger_server.seen.refused_after_bytes
    # What aiohttp had accepted off the socket when we refused: the cap plus read-ahead.
    assert received < CAP + 512 * 1024


# --- read_body as a unit: an endless or bomb-sized stream ---------------------------------------


class _Stream:
    """A request payload that yields chunks from an iterator and counts what was read."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""
        self.consumed = 0

    async def read(self, n: int = -1) -> bytes:
        if not self._pending:
            self._pending = next(self._chunks, b"")
        out, self._pending = self._pending[:n], self._pending[n:]
        self.consumed += len(out)
        return out


def _endless_zeros() -> Iterator[bytes]:
    block = b"\0" * READ_CHUNK
    while True:
        yield block


def _lazy_bomb(total: int, wbits: int) -> Iterator[bytes]:
    """gzip/zlib of ``total`` zero bytes, compressed only as far as it is read."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = b"\0" * (1 << 20)
    for _ in range(total // len(block)):
        if out := packer.compress(block):
            yield out
    yield packer.flush()


@pytest.mark.parametrize(
    ("encoding", "chunks", "needle"),
    [
        # endless plain stream
        (None, _endless_zeros(), "body larger than"),
        # 1 GiB gzip bomb (~1 MB compressed)
        ("gzip", _lazy_bomb(1 << 30, 31), "decompressed"),
        # 1 GiB deflate (zlib) bomb
        ("deflate", _lazy_bomb(1 << 30, 15), "decompressed"),
    ],
    ids=["endless-plain", "gzip-bomb-1GiB", "deflate-bomb-1GiB"],
)
async def test_read_body_memory_is_bounded(encoding: str | None, chunks: Iterator[bytes], needle: str) -> None:
    stream = _Stream(chunks)
    headers = {"Content-Encoding": encoding} if encoding else {}
    request = make_mocked_request("POST", "/", headers=headers, payload=stream)  # type: ignore[arg-type]
    cap = 8 * 1024 * 1024  # the catalogue's profile value
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge) as info:
            await read_body(request, max_bytes=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert needle in info.value.client_message()
    assert stream.consumed <= cap + READ_CHUNK
    # The cap, one growth step of the buffer and a chunk: never the bomb.
    assert peak < 2 * cap + 4 * READ_CHUNK


async def test_read_body_refuses_declared_length_without_reading() -> None:
    stream = _Stream(_endless_zeros())
    request = make_mocked_request("POST", "/", headers={"Content-Length": str(CAP + 1)},
                                  payload=stream)  # type: ignore[arg-type]
    with pytest.raises(PayloadTooLarge):
        await read_body(request, max_bytes=CAP)
    assert stream.consumed == 0


def test_check_content_type_refuses_duplicates() -> None:
    headers = CIMultiDict([("Content-Type", APPLICATION_JSON), ("Content-Type", APPLICATION_JSON)])
    with pytest.raises(UnsupportedMediaType, match="more than one"):
        check_content_type(make_mocked_request("POST", "/", headers=headers))


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ({"Content-Encoding": "br"}, UnsupportedMediaType),  # refused before reading
        ({"Content-Encoding": "gzip"}, MalformedRequest),  # zeros are not gzip
    ],
)
async def test_read_body_errors(headers: dict[str, str], error: type[GatewayError]) -> None:
    request = make_mocked_request("POST", "/", headers=headers,
                                  payload=_Stream(iter([b"\0" * 100])))  # type: ignore[arg-type]
    with pytest.raises(error):
        await read_body(request, max_bytes=CAP)


# --- an unmodified tritonclient ------------------------------------------------------------------


def _sample_inputs(binary: bool) -> tuple[list[httpclient.InferInput], np.ndarray, np.ndarray]:
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    text = np.array([b"caf\xc3\xa9", b"john"], dtype=object)
    a = httpclient.InferInput("x", [2, 3], "FP32")
    a.set_data_from_numpy(x, binary_data=binary)
    b = httpclient.InferInput("t", [2], "BYTES")
    b.set_data_from_numpy(text, binary_data=binary)
    return [a, b], x, text


def _as_bytes(array: np.ndarray) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()]


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_unmodified_tritonclient_http(server: Server, binary: bool, compression: str | None) -> None:
    """tritonclient.http (gevent, blocking: run in a thread) in both modes, compressed or not."""

    def call() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            inputs, _, _ = _sample_inputs(binary)
            outputs = [httpclient.InferRequestedOutput("x_out", binary_data=binary),
                       httpclient.InferRequestedOutput("t_out", binary_data=binary)]
            result = client.infer("echo", inputs, outputs=outputs, request_id="r-1",
                                  request_compression_algorithm=compression)
            return result.as_numpy("x_out"), result.as_numpy("t_out"), result.get_response()
        finally:
            client.close()

    x_out, t_out, response = await asyncio.to_thread(call)
    _, x, text = _sample_inputs(binary)
    np.testing.assert_array_equal(x_out, x)
    assert _as_bytes(t_out) == text.tolist()
    assert response["id"] == "r-1"
    (sent,) = server.seen.headers
    assert "Content-Type" not in sent  # what the check must tolerate
    assert ("Inference-Header-Content-Length" in sent) == binary
    assert sent.get("Content-Encoding") == compression


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
async def test_unmodified_tritonclient_http_aio(server: Server, binary: bool, compression: str | None) -> None:
    """tritonclient.http.aio (aiohttp) sends application/octet-stream for JSON bodies too."""
    client = aiohttpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    try:
        inputs, x, text = _sample_inputs(binary)
        result = await client.infer("echo", inputs, request_id="r-2",
                                    request_compression_algorithm=compression)  # no outputs: binary default
    finally:
        await client.close()
    np.testing.assert_array_equal(result.as_numpy("x_out"), x)
    assert _as_bytes(result.as_numpy("t_out")) == text.tolist()
    (sent,) = server.seen.headers
    assert sent.get("Content-Type") == "application/octet-stream"
    assert sent.get("Content-Encoding") == compression


async def test_tritonclient_sees_our_refusal(server: Server) -> None:
    """A refusal reaches tritonclient as an exception carrying our message, not a crash."""

    def call() -> str:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            inp = httpclient.InferInput("x", [1], "FP32")
            inp.set_data_from_numpy(np.array([1], np.float32), binary_data=False)
            try:
                client.infer("echo", [inp], priority=1)
            except Exception as exc:
                return str(exc)
            return ""
        finally:
            client.close()

    assert "'priority' is not allowed" in await asyncio.to_thread(call)
