"""CATALOGUE §1.5 HTTP protocol, sent with the raw client (aiohttp would normalise the attacks)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from security_tests.conftest import Tokens
from security_tests.support.side import SideGateway
from security_tests.support.world import PUB_BODY, Client, Response, World, statuses

BODY = json.dumps(PUB_BODY)
INFER = "POST /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\n"


def first_status(raw: bytes) -> int:
    found = statuses(raw)
    return found[0] if found else 0


def head_block(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


async def test_http_01_cl_te_smuggling(gw: Client, world: World, tokens: Tokens) -> None:
    raw = await gw.raw((f"{INFER}Authorization: Bearer {tokens.u1()}\r\nContent-Length: 4\r\n"
                        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                        "GET /v2/repository/index HTTP/1.1\r\nHost: gw\r\n\r\n").encode())
    assert first_status(raw) == 400
    assert len(statuses(raw)) == 1  # the smuggled request is never answered
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("te", ["Transfer-Encoding: xchunked", "Transfer-Encoding: chunked, identity",
                                "Transfer-Encoding : chunked",
                                "Transfer-Encoding:\tchunked\r\nTransfer-Encoding: chunked", "HTTP/1.0"],
                         ids=["xchunked", "chunked_identity", "space_colon", "two_te", "http10"])
async def test_http_02_te_obfuscation(gw: Client, world: World, tokens: Tokens, te: str) -> None:
    if te == "HTTP/1.0":
        start, te = "POST /v2/models/pub_clf/infer HTTP/1.0\r\nHost: gw\r\n", "Transfer-Encoding: chunked"
    else:
        start = INFER
    chunked = f"{len(BODY):x}\r\n{BODY}\r\n0\r\n\r\n"
    raw = await gw.raw((f"{start}Authorization: Bearer {tokens.u1()}\r\nContent-Type: application/json\r\n{te}\r\n"
                        f"Connection: close\r\n\r\n{chunked}").encode())
    assert first_status(raw) in (400, 501)
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("cl", ["Content-Length: 4\r\nContent-Length: 5", "Content-Length: +5", "Content-Length: -1",
                                "Content-Length: 0x10", "Content-Length: \uff15"],
                         ids=["two", "plus", "negative", "hex", "fullwidth"])
async def test_http_03_content_length(gw: Client, world: World, tokens: Tokens, cl: str) -> None:
    raw = await gw.raw((f"{INFER}Authorization: Bearer {tokens.u1()}\r\n{cl}\r\nConnection: close\r\n\r\n{{}}xx"
                        ).encode())
    assert first_status(raw) == 400
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("variant", ["chunk_ext_lf", "bare_lf"])
async def test_http_04_lf_tricks(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    if variant == "chunk_ext_lf":
        data = (f"{INFER}Authorization: Bearer {tokens.u1()}\r\nTransfer-Encoding: chunked\r\n\r\n"
                "2;\nxx\r\n{}\r\n0\r\n\r\n").encode()
    else:
        data = (f"POST /v2/models/pub_clf/infer HTTP/1.1\nHost: gw\nAuthorization: Bearer {tokens.u1()}\n"
                f"Content-Length: {len(BODY)}\n\n{BODY}").encode()
    raw = await gw.raw(data)
    assert first_status(raw) == 400
    assert world.upstream_calls() <= 1


async def test_http_05_trailers_not_headers(gw: Client, world: World, tokens: Tokens) -> None:
    body = json.dumps(PUB_BODY)
    data = (f"POST /v2/models/beta_fraud/infer HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {tokens.u1()}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            f"{len(body):x}\r\n{body}\r\n0\r\nTransfer-Encoding: chunked\r\nX-Tenant-ID: beta\r\n\r\n").encode()
    raw = await gw.raw(data)
    assert first_status(raw) in (400, 403, 404)
    assert world.upstream_calls() == 0


async def test_http_06_cr_in_header_value(gw: Client, world: World, tokens: Tokens) -> None:
    raw = await gw.raw((f"{INFER}Authorization: Bearer {tokens.u1()}\r\nX-Abc: \rxTransfer-Encoding: chunked\r\n"
                        f"Content-Length: {len(BODY)}\r\n\r\n{BODY}").encode())
    assert first_status(raw) == 400
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("path", ["/v2/models/pub_clf%0d%0aSet-Cookie:%20x=1/infer",
                                  "/v2/models/x/infer%0d%0aSet-Cookie:%20x=1"])
async def test_http_07_reflected_header_injection(gw: Client, world: World, tokens: Tokens, path: str) -> None:
    raw = await gw.raw((f"POST {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {tokens.u1()}\r\n"
                        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n{BODY}").encode())
    assert first_status(raw) in (400, 404)
    assert b"set-cookie" not in head_block(raw).lower()


@pytest.mark.parametrize("variant", ["two_hosts", "absolute_form"])
async def test_http_08_host(gw: Client, world: World, tokens: Tokens, variant: str) -> None:
    if variant == "two_hosts":
        start = "POST /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\nHost: evil\r\n"
    else:
        start = "POST http://evil/v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\n"
    raw = await gw.raw((f"{start}Authorization: Bearer {tokens.u1()}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n{BODY}").encode())
    assert first_status(raw) in (400, 421)
    assert world.upstream_calls() == 0


@pytest.mark.parametrize(("host", "status"), [
    ("", 400),  # HTTP/1.1 without Host
    ("Host: \r\n", 400), ("Host: gw@evil\r\n", 400), ("Host: gw, evil\r\n", 400), ("Host: gw:abc\r\n", 400),
    ("Host: gw:99999\r\n", 400), ("Host: gw/x\r\n", 400), ("Host: [1::2::3]\r\n", 400), ("Host: gw:\r\n", 400),
    ("Host: evil.example\r\n", 421), ("Host: gw.evil\r\n", 421), ("Host: [::2]\r\n", 421),
    ("Host: GW:8080\r\n", 200), ("Host: gw.\r\n", 200), ("Host: 127.0.0.1:1\r\n", 200),
])
async def test_http_08_host_syntax_and_allowlist(gw: Client, world: World, tokens: Tokens, host: str,
                                                 status: int) -> None:
    """HTTP-08 variants: a missing, empty or malformed Host is a 400; a well-formed host
    outside gateway.yaml ``http.allowed_hosts`` a 421 (case, port and a trailing dot aside)."""
    raw = await gw.raw((f"POST /v2/models/pub_clf/infer HTTP/1.1\r\n{host}Authorization: Bearer {tokens.u1()}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\nConnection: close"
                        f"\r\n\r\n{BODY}").encode())
    assert first_status(raw) == status
    assert world.upstream_calls() == (1 if status == 200 else 0)
    if status != 200 and host:  # (no Host at all: aiohttp's parser refuses it before the app)
        rid = re.search(rb"X-Request-ID: ([0-9a-f]+)", raw, re.IGNORECASE)
        assert rid is not None
        recs = [r for r in world.audit_records() if r.get("request_id") == rid.group(1).decode()]
        reason = "http_host_invalid" if status == 400 else "http_host_not_allowed"
        assert [(r["decision"], r["reason"]) for r in recs] == [("deny", reason)]


async def test_http_08_http10_without_host_is_not_let_through(gw: Client, world: World, tokens: Tokens) -> None:
    """HTTP/1.0 may omit Host; with an allowlist set, no host is not an allowed host (421)."""
    raw = await gw.raw((f"POST /v2/models/pub_clf/infer HTTP/1.0\r\nAuthorization: Bearer {tokens.u1()}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n{BODY}").encode())
    assert first_status(raw) == 421
    assert world.upstream_calls() == 0


async def test_http_08_health_answers_any_well_formed_host(gw: Client, world: World) -> None:
    """Kubelets probe pods by IP: health is not held to the allowlist, only to the syntax."""
    ok = await gw.raw(b"GET /v2/health/live HTTP/1.1\r\nHost: 10.1.2.3:8000\r\nConnection: close\r\n\r\n")
    bad = await gw.raw(b"GET /v2/health/live HTTP/1.1\r\nHost: gw@evil\r\nConnection: close\r\n\r\n")
    assert (first_status(ok), first_status(bad)) == (200, 400)


async def test_http_09_hop_by_hop_and_identity_headers(gw: Client, world: World, tokens: Tokens) -> None:
    r = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1(), headers={
        "Connection": "close, Authorization, X-Forwarded-For", "X-Forwarded-For": "10.0.0.1", "X-User": "admin",
        "X-Tenant-ID": "beta", "Forwarded": "for=10.0.0.1", "X-Real-IP": "10.0.0.2"})
    assert r.status == 200
    assert world.upstream_calls() == 1  # metadata checked by invariant I4
    assert world.audit_for(r)[0]["tenant"] == "alpha"


@pytest.mark.parametrize("header", ["X_Tenant_ID: beta", "x-tenant_id: beta"])
async def test_http_10_underscore_headers(gw: Client, world: World, tokens: Tokens, header: str) -> None:
    raw = await gw.raw((f"POST /v2/models/beta_fraud/infer HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                        f"{tokens.u1()}\r\n{header}\r\nContent-Type: application/json\r\nContent-Length: {len(BODY)}"
                        f"\r\nConnection: close\r\n\r\n{BODY}").encode())
    assert first_status(raw) in (400, 403, 404)
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("variant", ["200_headers", "64k_header", "16k_line"])
async def test_http_11_oversize(gw: Client, world: World, variant: str) -> None:
    if variant == "200_headers":
        data = INFER + "".join(f"X-H{i}: v\r\n" for i in range(200)) + "\r\n"
    elif variant == "64k_header":
        data = INFER + "X-Big: " + "a" * 65536 + "\r\n\r\n"
    else:
        data = "GET /" + "a" * 16384 + " HTTP/1.1\r\nHost: gw\r\n\r\n"
    raw = await gw.raw(data.encode())
    assert first_status(raw) in (400, 414, 431)
    assert b"aaaaaaaaaa" not in raw  # nothing of the input echoed (THREAT_MODEL 1.11)


@pytest.mark.parametrize(("fields", "status"), [(4, 200), (5, 431), (90, 431)])
async def test_http_11_header_section_total(gw: Client, world: World, tokens: Tokens, fields: int,
                                            status: int) -> None:
    """HTTP-11 variant: every field under the 8 KiB cap and fewer than 100 of them, but the
    section over 32 KiB (§0.3): 431, nothing echoed, nothing upstream. 4 x 7,000 bytes plus
    the request's own headers stays under the cap and is served."""
    extra = "".join(f"X-Pad-{i}: {'b' * 7000}\r\n" for i in range(fields))
    raw = await gw.raw((f"{INFER}Authorization: Bearer {tokens.u1()}\r\n{extra}Content-Type: application/json\r\n"
                        f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n{BODY}").encode())
    assert first_status(raw) == status
    assert b"bbbbbbbb" not in raw
    assert world.upstream_calls() == (1 if status == 200 else 0)


@pytest.mark.parametrize("line", ["GET / HTTP/0.9", "GET / HTTP/2.0", "GET / HTTP/1.2", "PRI * HTTP/2.0"])
async def test_http_15_versions(gw: Client, world: World, line: str) -> None:
    raw = await gw.raw(f"{line}\r\nHost: gw\r\n\r\n".encode() + (b"SM\r\n\r\n" if line.startswith("PRI") else b""))
    assert first_status(raw) in (0, 400, 505)


async def test_http_16_expect_continue_oversize(gw: Client, world: World, tokens: Tokens) -> None:
    raw = await gw.raw((f"{INFER}Authorization: Bearer {tokens.u1()}\r\nContent-Type: application/json\r\n"
                        "Content-Length: 209715200\r\nExpect: 100-continue\r\n\r\n").encode(), timeout_s=2)
    assert b"100 Continue" not in raw
    assert first_status(raw) in (413, 417)
    assert world.upstream_calls() == 0


async def test_http_19_error_disclosure(gw: Client, world: World, tokens: Tokens) -> None:
    import grpc

    from tests.support.fake_triton import CANARY, error

    bad = await gw.request("POST", "/v2/models/pub_clf/infer", data=b'{"inputs": [', token=tokens.u1(),
                           headers={"Content-Type": "application/json"})
    world.fake.set(error(grpc.StatusCode.INTERNAL))
    up = await gw.infer("pub_clf", PUB_BODY, token=tokens.u1())
    world.fake.reset()
    for r, status in ((bad, 400), (up, 502)):
        assert r.status == status
        text = r.body.decode()
        assert set(r.json()) == {"error"} and r.headers["X-Request-ID"]
        for leak in (CANARY, "Traceback", "aiohttp", "grpc", "127.0.0.1", str(world.fake.port), '"inputs"'):
            assert leak not in text and leak not in json.dumps(r.headers)
        assert "aiohttp" not in r.headers.get("Server", "") and "Python" not in r.headers.get("Server", "")


async def test_http_20_cors(gw: Client, world: World, tokens: Tokens) -> None:
    r = await gw.request("OPTIONS", "/v2/models/pub_clf/infer", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert r.headers.get("Access-Control-Allow-Origin") in (None, "")
    assert world.upstream_calls() == 0


async def test_http_11_64k_header_in_one_byte_segments(gw: Client, world: World) -> None:
    """HTTP-11 (1-byte TCP segments): the parser refuses once the field passes its cap,
    without waiting for (or buffering) the rest of the 64 KiB line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", world.gateway_port, local_addr=(gw.addr, 0))
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    writer.write((INFER + "X-Big: ").encode())
    sent = 0
    answer = b""
    try:
        while sent < 65536:
            writer.write(b"a")
            await writer.drain()
            sent += 1
            if sent % 256 == 0:
                with contextlib.suppress(TimeoutError):
                    answer += await asyncio.wait_for(reader.read(4096), 0.001)
                if answer:
                    break
    except ConnectionError:
        pass
    with contextlib.suppress(TimeoutError, ConnectionError):
        answer += await asyncio.wait_for(reader.read(4096), 3)
    writer.close()
    world.ledger.responses.append(("RAW", "", Response(first_status(answer), {}, answer)))
    assert first_status(answer) == 431
    assert sent < 65536  # refused at the field cap (8 KiB), not after buffering the whole line
    assert b"aaaaaaaaaa" not in answer


# -- HTTP-12/13: slow clients, against a side gateway with short header/body timeouts ----------

@pytest.fixture(scope="module")
def slow_gw(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SideGateway]:
    """Header timeout 1 s (runner setting) and body timeout 1 s (limits.body_timeout_s)."""
    side = SideGateway(world, tmp_path_factory.mktemp("sectest-slow"), runner_kwargs={"keepalive_timeout": 1.0})
    side.start()
    side.edit_policy("gateway.yaml", "  max_inputs: 64\n", "  max_inputs: 64\n  body_timeout_s: 1\n")
    yield side
    side.stop()


async def _drip(port: int, addr: str, head: bytes, *, every_s: float, max_s: float) -> tuple[bytes, bool]:
    """Send ``head``, then one byte every ``every_s``; (what came back, closed by the gateway?)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(addr, 0))
    writer.write(head)
    received = b""
    closed = False
    for _ in range(int(max_s / every_s)):
        try:
            chunk = await asyncio.wait_for(reader.read(4096), every_s)
        except TimeoutError:
            try:
                writer.write(b"x")
                await writer.drain()
            except ConnectionError:
                closed = True
                break
            continue
        except ConnectionError:
            closed = True
            break
        received += chunk
        if not chunk:
            closed = True
            break
    writer.close()
    return received, closed


async def test_http_12_slowloris_headers(slow_gw: SideGateway, world: World, tokens: Tokens) -> None:
    head = b"POST /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\nX-Slow: "
    addrs = [world.next_addr() for _ in range(40)]
    legit = slow_gw.client()

    async def legit_call() -> int:
        await asyncio.sleep(0.3)
        return (await legit.infer("pub_clf", PUB_BODY, token=tokens.u1())).status

    legit_task = asyncio.ensure_future(legit_call())  # served while the drips hold their connections
    drips = await asyncio.gather(*(_drip(slow_gw.gateway_port, a, head, every_s=0.25, max_s=6.0) for a in addrs))
    status = await legit_task
    assert all(closed for _raw, closed in drips)  # every dripping connection closed by the header timeout
    assert status == 200  # legitimate traffic served meanwhile
    slow_gw.check_nl()


async def test_http_13_slow_body(slow_gw: SideGateway, world: World, tokens: Tokens) -> None:
    await slow_body_cut(slow_gw, world, tokens.u1())


async def slow_body_cut(side: SideGateway, world: World, token: str, *, max_s: float = 6.0) -> None:
    """HTTP-13's attack and expectation on a side gateway whose limits.body_timeout_s is 1
    (also run with it raised: test_protection_off)."""
    head = (INFER + f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            "Content-Length: 1048576\r\n\r\n").encode()
    raw, closed = await _drip(side.gateway_port, world.next_addr(), head, every_s=0.2, max_s=max_s)
    assert first_status(raw) == 408
    assert world.upstream_calls() == 0
    rid = re.search(rb"X-Request-ID: (\w+)", raw)
    assert rid is not None
    recs = [r for r in side.audit_records() if r.get("request_id") == rid.group(1).decode()]
    assert len(recs) == 1 and recs[0]["decision"] == "deny"
    assert closed or raw


async def test_http_14_pipelining(gw: Client, world: World) -> None:
    """10,000 pipelined requests (invalid token) on one connection: answered in order,
    bounded, the pre-auth limit refusing the flood; nothing reaches the upstream."""
    one = (INFER + "Authorization: Bearer x.y.z\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(BODY)}\r\n\r\n{BODY}").encode()
    last = (INFER + "Connection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n{BODY}").encode()
    rss_before = _rss_kib()
    raw = await gw.raw(one * 9_999 + last, timeout_s=60.0)
    got = statuses(raw)
    assert got and set(got) <= {401, 429, 503}
    assert len(got) == 10_000  # each request answered once, in order (no desync)
    assert got.count(429) >= 9_000  # the pre-auth limit (20/s per address) refuses the flood
    assert world.upstream_calls() == 0
    assert _rss_kib() - rss_before < 200_000  # bounded: no per-request buffering of the whole pipeline


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- s7 outsider probe (notes/s7/proto-probes.md): framing, targets, versions, exact limits ---

def _records_for(world: World, raw: bytes) -> list[dict[str, object]]:
    """The audit records of the one answer in ``raw`` (by its X-Request-ID)."""
    rid = re.search(rb"X-Request-ID: ([^\r]+)\r\n", raw)
    assert rid is not None, "refusal carries no request id"
    return [r for r in world.audit_records() if r.get("request_id") == rid.group(1).decode()]


def _infer_bytes(token: str, headers: str = "", *, target: str = "/v2/models/pub_clf/infer",
                 body: str = BODY) -> bytes:
    return (f"POST {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\n{headers}Connection: close\r\n\r\n{body}").encode()


@pytest.mark.parametrize("coding", ["identity, chunked", "gzip, chunked", "x-custom, chunked", "deflate,chunked"])
async def test_http_02_transfer_codings_other_than_chunked_are_not_implemented(
        gw: Client, world: World, tokens: Tokens, coding: str) -> None:
    """HTTP-02 variant: the parser frames a TE list ending in ``chunked`` by chunks and drops
    the codings before it (``gzip, chunked`` was read as a plain body and served). A proxy
    in front may decode or frame otherwise: 501, one audit record, nothing upstream."""
    chunked = f"{len(BODY):x}\r\n{BODY}\r\n0\r\n\r\n"
    raw = await gw.raw(_infer_bytes(tokens.u1(), f"Transfer-Encoding: {coding}\r\n", body=chunked))
    assert statuses(raw) == [501]
    assert world.upstream_calls() == 0
    assert [r.get("reason") for r in _records_for(world, raw)] == ["http_transfer_coding"]


@pytest.mark.parametrize("coding", ["chunked", "CHUNKED", "  chunked  "])
async def test_http_02_plain_chunked_still_served(gw: Client, world: World, tokens: Tokens, coding: str) -> None:
    chunked = f"{len(BODY):x}\r\n{BODY}\r\n0\r\n\r\n"
    raw = await gw.raw(_infer_bytes(tokens.u1(), f"Transfer-Encoding: {coding}\r\n", body=chunked))
    assert statuses(raw) == [200]
    assert world.upstream_calls() == 1


def _request_line(length: int) -> str:
    stub = "GET /v2/health/live? HTTP/1.1"
    return "GET /v2/health/live?" + "q" * (length - len(stub)) + " HTTP/1.1"


@pytest.mark.parametrize(("length", "status"), [(8192, 200), (8193, 414), (8200, 414), (8300, 414)])
async def test_http_11_request_line_exact_limit(gw: Client, world: World, length: int, status: int) -> None:
    """HTTP-11 boundary (§0.3: request line 8 KiB): 8,192 bytes served, one more is a 414
    (aiohttp bounded only the target, so lines up to ~8.2 KiB got through, and a target
    over its cap was answered 431)."""
    raw = await gw.raw(f"{_request_line(length)}\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
    assert statuses(raw) == [status]
    assert b"qqqqqqqqqq" not in raw


async def test_http_11_request_line_limit_counts_the_method(gw: Client, world: World, tokens: Tokens) -> None:
    target = "/v2/models/pub_clf/infer?" + "q" * (8192 - len("POST /v2/models/pub_clf/infer? HTTP/1.1") + 1)
    raw = await gw.raw(_infer_bytes(tokens.u1(), f"Content-Length: {len(BODY)}\r\n", target=target))
    assert statuses(raw) == [414]
    assert world.upstream_calls() == 0
    assert [r.get("reason") for r in _records_for(world, raw)] == ["http_request_line_too_long"]


@pytest.mark.parametrize(("length", "status"), [(8192, 200), (8193, 431)])
async def test_http_11_field_line_exact_limit(gw: Client, world: World, tokens: Tokens, length: int,
                                              status: int) -> None:
    """HTTP-11 boundary (§0.3: 8 KiB per field): ``name: value`` of 8,192 bytes served, 8,193
    refused (aiohttp counted the value alone against 8,190)."""
    field = "X-Big: " + "v" * (length - len("X-Big: "))
    raw = await gw.raw(_infer_bytes(tokens.u1(), f"{field}\r\nContent-Length: {len(BODY)}\r\n"))
    assert statuses(raw) == [status]
    assert world.upstream_calls() == (1 if status == 200 else 0)
    assert b"vvvvvvvvvv" not in raw


@pytest.mark.parametrize(("fields", "status"), [(100, 200), (101, 431)])
async def test_http_11_header_count_exact_limit(gw: Client, world: World, tokens: Tokens, fields: int,
                                                status: int) -> None:
    # Host, Authorization, Content-Type, Connection, Content-Length + the fillers.
    filler = "".join(f"X-F{i}: v\r\n" for i in range(fields - 5))
    raw = await gw.raw(_infer_bytes(tokens.u1(), f"{filler}Content-Length: {len(BODY)}\r\n"))
    assert statuses(raw) == [status]
    assert world.upstream_calls() == (1 if status == 200 else 0)


@pytest.mark.parametrize(("line", "status", "reason"), [
    ("CONNECT gw:80 HTTP/1.1", 501, "method_not_implemented"),
    ("CONNECT /v2/models/pub_clf/infer HTTP/1.1", 501, "method_not_implemented"),
    ("OPTIONS * HTTP/1.1", 400, "path_invalid"),
], ids=["connect_authority", "connect_path", "options_asterisk"])
async def test_http_08_non_origin_targets_reach_the_front(gw: Client, world: World, tokens: Tokens, line: str,
                                                          status: int, reason: str) -> None:
    """Authority- and asterisk-form targets never matched the router: aiohttp answered a
    bare 404 (no request id, no audit) and sent ``100 Continue`` to an Expect it had not
    checked. Now: the front refuses them, once, recorded, and invites no body."""
    raw = await gw.raw((f"{line}\r\nHost: gw\r\nAuthorization: Bearer {tokens.u1()}\r\nExpect: 100-continue\r\n"
                        "Content-Length: 10\r\nConnection: close\r\n\r\n").encode())
    assert b"100 Continue" not in raw
    assert statuses(raw) == [status]
    assert [r.get("reason") for r in _records_for(world, raw)] == [reason]
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("data", [b"GET /v2/health/live\r\n\r\n", b"POST /v2/models/pub_clf/infer\r\n\r\n"],
                         ids=["health", "infer"])
async def test_http_15_simple_request_without_version(gw: Client, world: World, data: bytes) -> None:
    """HTTP-15 variant: a request line without a version (HTTP/0.9) was served, answered
    as ``HTTP/0.9 200``. Now a 505, in a status line HTTP/1 clients can read, and closed."""
    raw = await gw.raw(data)
    assert raw.startswith(b"HTTP/1.0 505 ")
    assert statuses(raw) == [505]
    assert [r.get("reason") for r in _records_for(world, raw)] == ["http_version"]
    assert world.upstream_calls() == 0


@pytest.mark.parametrize("upgrade", ["Connection: Upgrade\r\nUpgrade: foo\r\n",
                                     "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n",
                                     "Upgrade: h2c\r\n"], ids=["foo", "websocket", "h2c_no_connection"])
async def test_http_14_upgrade_request_ends_the_connection(gw: Client, world: World, tokens: Tokens,
                                                           upgrade: str) -> None:
    """No upgrade is honoured, but aiohttp stops parsing HTTP after a request asking for
    one: a request pipelined behind it was swallowed, the connection left open. The
    upgrade request is served once and the connection closed; the rest never runs."""
    first = (f"POST /v2/models/pub_clf/infer HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {tokens.u1()}\r\n"
             f"Content-Type: application/json\r\n{upgrade}Content-Length: {len(BODY)}\r\n\r\n{BODY}")
    second = "GET /v2/repository/index HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    raw = await gw.raw((first + second).encode(), timeout_s=30.0)
    assert statuses(raw) == [200]
    assert b"Connection: close" in head_block(raw)
    assert world.upstream_calls() == 1


# --- s8 outsider probe (notes/s8/s8-probe-http-probes.md): body framing after the headers ---

_BROKEN_CHUNKS = {"hex_prefix": b"0x2\r\n{}\r\n0\r\n\r\n", "negative": b"-2\r\n{}\r\n0\r\n\r\n",
                  "overflow": b"FFFFFFFFFFFFFFFFFFFFFF\r\n{}\r\n0\r\n\r\n", "size_bare_lf": b"2\n{}\r\n0\r\n\r\n",
                  "ext_bare_lf": b"2;\nxx\r\n{}\r\n0\r\n\r\n", "data_no_crlf": b"2\r\n{}XX0\r\n\r\n",
                  "bad_trailer": b"2\r\n{}\r\n0\r\nBad Trailer\r\n\r\n"}


@pytest.mark.parametrize("tail", list(_BROKEN_CHUNKS.values()), ids=list(_BROKEN_CHUNKS))
async def test_http_04_chunk_framing_broken_in_a_later_segment(gw: Client, world: World, tokens: Tokens,
                                                               tail: bytes) -> None:
    """HTTP-04 with the headers in one TCP segment and the broken chunked body in the next:
    aiohttp's parser dropped the body it was filling and queued the error as the next
    message, so the reader waited out the 30 s body timeout (a 408) on a connection that
    hung meanwhile. Now a prompt 400 ``body_bad_framing``, audited, and the connection
    closed without a second answer."""
    head = (f"{INFER}Authorization: Bearer {tokens.u1()}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n").encode()
    raw = await gw.raw(head, chunks=[tail], chunk_delay_s=0.3, timeout_s=5.0)
    assert statuses(raw) == [400]
    assert [r.get("reason") for r in _records_for(world, raw)] == ["body_bad_framing"]
    assert world.upstream_calls() == 0


async def test_http_04_chunk_framing_broken_behind_a_pipelined_request(gw: Client, world: World,
                                                                        tokens: Tokens) -> None:
    """The same, the broken body belonging to the second request of a pipeline: the first
    is served, the second refused, nothing after it parsed."""
    first = (f"{INFER}Authorization: Bearer {tokens.u1()}\r\nContent-Type: application/json\r\n"
             f"Content-Length: {len(BODY)}\r\n\r\n{BODY}")
    second = (f"{INFER}Authorization: Bearer {tokens.u1()}\r\nContent-Type: application/json\r\n"
              "Transfer-Encoding: chunked\r\n\r\n")
    third = "GET /v2/repository/index HTTP/1.1\r\nHost: gw\r\n\r\n"
    raw = await gw.raw((first + second).encode(), chunks=[b"0x2\r\n{}\r\n0\r\n\r\n" + third.encode()],
                       chunk_delay_s=0.3, timeout_s=5.0)
    assert statuses(raw) == [200, 400]
    assert world.upstream_calls() == 1


@pytest.mark.parametrize(("data", "status", "reason"), [
    (f"{INFER}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(), 400, "http_parse_error"),
    (f"{INFER}X-Abc: \rxTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{{}}".encode(), 400,
     "http_parse_error"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "http_parse_error"),
    (f"{INFER}X-Big: {'a' * 9000}\r\n\r\n".encode(), 431, "http_headers_too_large"),
    (INFER.encode() + b"".join(b"X-%d: a\r\n" % i for i in range(200)) + b"\r\n", 431, "http_headers_too_large"),
    (f"GET /{'a' * 9000} HTTP/1.1\r\nHost: gw\r\n\r\n".encode(), 414, "http_request_line_too_long"),
], ids=["cl_te", "cr_in_value", "h2_preface", "big_field", "many_fields", "long_target"])
async def test_http_parser_refusals_are_audited(gw: Client, world: World, data: bytes, status: int,
                                               reason: str) -> None:
    """Requests aiohttp's parser refuses (HTTP-01/-06/-11/-15) never reached the front: no
    audit record, no ``gateway_requests_total``/``gateway_refusals_total``, no request id;
    a smuggling attempt showed only as an INFO log line. Now recorded like the front's own
    early refusals, still answered with the bare status phrase."""
    raw = await gw.raw(data)
    assert statuses(raw) == [status]
    records = _records_for(world, raw)
    assert [(r.get("reason"), r.get("status"), r.get("decision")) for r in records] == [(reason, status, "deny")]
    recorded = world.audit_bytes()  # nothing of the refused input is recorded
    assert b"chunked" not in recorded and b"a" * 32 not in recorded
    metrics = (await gw.request("GET", "/metrics")).body
    assert f'gateway_refusals_total{{reason="{reason}"}}'.encode() in metrics
    assert world.upstream_calls() == 0


def _chunked(body: bytes, size: int) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                    for i in range(0, len(body), size)) + b"0\r\n\r\n"


@pytest.mark.parametrize(("size", "status"), [(1, 400), (4, 400), (64, 200), (4096, 200)])
async def test_http_14_chunk_flood_is_refused(gw: Client, world: World, tokens: Tokens, size: int,
                                              status: int) -> None:
    """s8 probe (AV-14 class): every chunk costs a Python call in the parser and the body
    reader whatever its size; 8 MiB in one-byte chunks (48 MB on the wire) held the event
    loop for 7 s (health probes at 113 ms p50). A chunked body whose framing outweighs its
    content (past 64 KiB on the wire) is refused at once; ordinary chunk sizes are served."""
    body = b" " * 400_000 + BODY.encode()  # JSON allows the leading whitespace
    raw = await gw.raw((f"{INFER}Authorization: Bearer {tokens.u1()}\r\nContent-Type: application/json\r\n"
                        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode() + _chunked(body, size),
                       timeout_s=10.0)
    assert statuses(raw) == [status]
    if status == 400:
        assert [r.get("reason") for r in _records_for(world, raw)] == ["body_chunk_overhead"]
    assert world.upstream_calls() == (1 if status == 200 else 0)
