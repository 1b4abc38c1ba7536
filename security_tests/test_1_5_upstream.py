"""CATALOGUE §1.5 HTTP protocol, upstream side: HTTP-17 (redirects) and HTTP-18 (response weirdness).

The gateway talks to Triton over gRPC, which has no redirects; these cases prove that a
302 (HTTP/1.1 or HTTP/2), a ``location`` header or odd response metadata never makes the
gateway call anyone else nor reaches the client, and that every HTTP client the gateway
owns (JWKS, OFREP flags, the drift report CLI) refuses to follow a redirect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import grpc
import pytest

from security_tests.conftest import Tokens
from security_tests.support.side import SideGateway
from security_tests.support.world import PUB_BODY, Client, KeyServer, Response, World
from tests.support.fake_triton import error, ok, redirect, with_metadata
from tests.support.ofrep_server import OfrepServer

# What the gateway legitimately puts on an inference answer (success or refusal). Anything
# else on a response is a header that came from somewhere it should not (HTTP-18).
ALLOWED_RESPONSE_HEADERS = frozenset({
    "content-type", "content-length", "date", "server", "connection", "keep-alive",
    "x-request-id", "x-model-variant", "inference-header-content-length", "retry-after",
    "ratelimit", "ratelimit-policy", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset",
    "x-content-type-options", "cache-control", "referrer-policy", "x-frame-options",
    "content-security-policy", "cross-origin-resource-policy", "strict-transport-security",
    "www-authenticate", "traceparent", "vary", "pragma",
})
UPSTREAM_REASON = re.compile(r"^upstream_")


# -- fixtures ------------------------------------------------------------------------------------


class RedirectingServer:
    """A TCP server that answers anything with a 302 to ``location``.

    ``h2``: speak just enough HTTP/2 (prior knowledge, as gRPC does) to answer each request
    stream with ``:status 302`` and ``location``; else an HTTP/1.1 302 and close.
    """

    def __init__(self, location: str, *, h2: bool) -> None:
        self.location = location
        self.h2 = h2
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.h2:
                await self._serve_h2(reader, writer)
            else:
                await reader.read(65536)
                writer.write(f"HTTP/1.1 302 Found\r\nLocation: {self.location}\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _serve_h2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(15):
            await reader.readexactly(24)  # client connection preface
            writer.write(_frame(0x4, 0, 0, b""))  # our SETTINGS
            answered: set[int] = set()
            while True:
                head = await reader.readexactly(9)
                length = int.from_bytes(head[:3], "big")
                kind, flags = head[3], head[4]
                stream = struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF
                await reader.readexactly(length)
                if kind == 0x4 and not flags & 0x1:  # their SETTINGS: acknowledge
                    writer.write(_frame(0x4, 0x1, 0, b""))
                elif kind == 0x1 and stream not in answered:  # a request: 302 + location
                    answered.add(stream)
                    location = self.location.encode()
                    block = b"\x08\x03302" + b"\x0f\x1f" + bytes([len(location)]) + location
                    writer.write(_frame(0x1, 0x4 | 0x1, stream, block))  # END_HEADERS | END_STREAM
                await writer.drain()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload


@pytest.fixture
def attacker_url(world: World) -> str:
    return f"http://127.0.0.1:{world.attacker.port}/steal"


def assert_generic_upstream_refusal(r: Response, audit: list[dict[str, Any]], attacker_port: int) -> None:
    assert r.status in (502, 503), r.status
    assert set(r.json()) == {"error"}
    assert "location" not in {k.lower() for k in r.headers}
    # The random request id (hex) may contain "302" or the port's digits by chance: look past it.
    request_id = r.headers["X-Request-ID"].encode()
    assert len(request_id) >= 16
    body = r.body.replace(request_id, b"<request-id>")
    assert str(attacker_port).encode() not in body and b"302" not in body
    assert len(audit) == 1 and audit[0]["decision"] == "deny"
    assert UPSTREAM_REASON.match(audit[0]["reason"]), audit[0]["reason"]


# -- HTTP-17: upstream redirects -----------------------------------------------------------------


@pytest.mark.parametrize("h2", [False, True], ids=["http1-302", "h2-302"])
async def test_http_17_upstream_answers_302(world: World, tokens: Tokens, side_gateways: Any, attacker_url: str,
                                            h2: bool) -> None:
    server = RedirectingServer(attacker_url, h2=h2)
    world.loop.run(server.start())
    try:
        side: SideGateway = side_gateways("redirect", backend=f"grpc://127.0.0.1:{server.port}")
        hits = world.attacker.hits
        r = await side.client().infer("pub_clf", PUB_BODY, token=tokens.u1())
        assert server.connections >= 1  # the gateway did reach the redirecting "upstream"
        assert_generic_upstream_refusal(r, side.audit_for(r), world.attacker.port)
        assert world.attacker.hits == hits  # nobody followed the Location
    finally:
        world.loop.run(server.stop())


async def test_http_17_grpc_location_metadata_is_not_followed(gw: Client, world: World, tokens: Tokens,
                                                             fresh_breakers: None, attacker_url: str) -> None:
    hits = world.attacker.hits
    world.fake.set(redirect(attacker_url))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    assert_generic_upstream_refusal(r, world.audit_for(r), world.attacker.port)
    # and on a successful answer a location header is dropped, not passed on or followed
    world.fake.set(with_metadata(ok(), initial=(("location", attacker_url),), trailing=(("location", attacker_url),)))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    assert r.status == 200
    assert "location" not in {k.lower() for k in r.headers}
    assert world.attacker.hits == hits


def _redirector(world: World, location: str) -> KeyServer:
    """A loopback server answering every path with a 302 to ``location`` (JWKS, drift)."""
    server = KeyServer({"keys": []}, mode="redirect", redirect_to=location)
    world.loop.run(server.start())
    return server


async def test_http_17_jwks_fetch_does_not_follow_redirect(world: World, tokens: Tokens, side_gateways: Any,
                                                           attacker_url: str) -> None:
    redirector = _redirector(world, attacker_url)
    try:
        side: SideGateway = side_gateways("jwks")
        side.edit_policy("identity.yaml", f"127.0.0.1:{world.idp.port}/jwks.json",
                         f"127.0.0.1:{redirector.port}/jwks.json")
        hits = world.attacker.hits
        r = await side.client().infer("pub_clf", PUB_BODY, token=tokens.u1())
        assert redirector.hits >= 1  # the JWKS fetch went out and got the 302
        assert r.status in (401, 503), r.status  # no keys: refused, never a pass
        assert world.attacker.hits == hits
        assert len(side.audit_for(r)) == 1 and side.audit_for(r)[0]["decision"] == "deny"
    finally:
        world.loop.run(redirector.stop())


async def test_http_17_ofrep_flag_service_redirect_not_followed(world: World, tokens: Tokens, side_gateways: Any,
                                                                attacker_url: str) -> None:
    flags = json.loads((Path(__file__).parent / "world" / "policies" / "flags.json").read_text())
    flags["flags"]["pub-clf-version"]["targeting"] = {"fractional": [["stable", 0], ["canary", 100]]}
    service = world.loop.run(OfrepServer.start(flags))
    service.redirect_to = attacker_url
    try:
        side: SideGateway = side_gateways("ofrep")
        side.edit_policy("gateway.yaml", "stages:\n", f"flags:\n  provider:\n    kind: ofrep\n"
                                                      f"    url: {service.url}\nstages:\n")
        hits = world.attacker.hits
        r = await side.client().infer("pub_clf", PUB_BODY, token=tokens.u1())
        assert service.hits >= 1
        assert r.status == 200 and r.headers.get("X-Model-Variant") == "stable"  # fell back, did not follow
        assert world.attacker.hits == hits
        assert side.audit_for(r)[0]["variant_reason"] == "error"
    finally:
        world.loop.run(service.stop())


async def test_http_17_drift_report_fetch_does_not_follow_redirect(world: World, attacker_url: str) -> None:
    from gateway.drift.report import fetch

    redirector = _redirector(world, attacker_url)
    try:
        hits = world.attacker.hits
        status, _body = await fetch(f"http://127.0.0.1:{redirector.port}", "pub_clf", "not-a-real-token",
                                    timeout_s=5)
        assert status == 302
        assert redirector.hits == 1 and world.attacker.hits == hits
    finally:
        world.loop.run(redirector.stop())


# -- HTTP-18: upstream response weirdness --------------------------------------------------------


def _assert_only_allowlisted(r: Response) -> None:
    names = {k.decode("latin-1").lower() for k, _v in r.raw_headers}
    assert names <= ALLOWED_RESPONSE_HEADERS, names - ALLOWED_RESPONSE_HEADERS
    assert "triton" not in r.headers.get("Server", "").lower()
    for _k, v in r.raw_headers:
        assert b"\r" not in v and b"\n" not in v and b"injected" not in v


WEIRD_METADATA = (("set-cookie", "session=stolen; Path=/"), ("server", "TritonServer/x"),
                  ("x-internal-host", "triton-0.internal:8001"), ("access-control-allow-origin", "*"))


async def test_http_18_upstream_headers_never_reach_the_client(gw: Client, world: World, tokens: Tokens,
                                                               fresh_breakers: None) -> None:
    world.fake.set(with_metadata(ok(), initial=WEIRD_METADATA, trailing=WEIRD_METADATA))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    assert r.status == 200
    _assert_only_allowlisted(r)
    assert "set-cookie" not in {k.lower() for k in r.headers}
    assert b"stolen" not in r.body and b"internal" not in r.body


@pytest.mark.parametrize("metadata", [
    # CR/LF: only in a binary header; grpc core refuses to send them in a text value
    # ("Illegal header value", validate_metadata.cc), so an upstream cannot produce one.
    (("x-evil-bin", b"a\r\nSet-Cookie: injected=1\r\n"),),
    (("x-huge", "A" * (1024 * 1024)),),  # 1 MB header: past any sane metadata limit
    (("x-huge-bin", b"\r\n" * (512 * 1024)),),
], ids=["crlf-bin", "1mb", "1mb-crlf-bin"])
async def test_http_18_malformed_upstream_metadata(gw: Client, world: World, tokens: Tokens, fresh_breakers: None,
                                                   metadata: tuple[tuple[str, str | bytes], ...]) -> None:
    world.fake.set(with_metadata(ok(), initial=metadata))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    # A header the client library accepts is dropped (200); one it cannot take fails the call:
    # a bad/unavailable upstream, never a 500 and never a hang (the client timeout is 60 s,
    # the upstream deadline 10 s).
    assert r.status in (200, 502, 503), r.status
    _assert_only_allowlisted(r)
    if r.status != 200:
        assert set(r.json()) == {"error"}
        assert UPSTREAM_REASON.match(world.audit_for(r)[0]["reason"])


async def test_http_18_error_trailers_do_not_reach_the_client(gw: Client, world: World, tokens: Tokens,
                                                              fresh_breakers: None) -> None:
    world.fake.set(with_metadata(error(grpc.StatusCode.INTERNAL), initial=WEIRD_METADATA, trailing=WEIRD_METADATA))
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    assert r.status == 502
    _assert_only_allowlisted(r)
    assert set(r.json()) == {"error"}
