"""CATALOGUE §1.5 HTTP protocol, sent with the raw client (aiohttp would normalise the attacks)."""

from __future__ import annotations

import json

import pytest

from security_tests.conftest import Tokens
from security_tests.support.world import PUB_BODY, Client, World, statuses

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
