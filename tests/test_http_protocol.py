"""Wire-level behaviour, sent byte by byte with a raw socket (HTTP-xx of the catalogue)."""

from __future__ import annotations

import json

from tests.support.raw_http import raw_http

from .conftest import DIGITS_BODY, Client


def _addr(client: Client) -> tuple[str, int]:
    server = client.server
    assert server.port is not None
    return server.host, server.port


async def test_expect_continue_over_cap_is_refused_without_100(client: Client, auth: dict[str, str]) -> None:
    host, port = _addr(client)
    request = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\n{_auth_line(auth)}"
               "Content-Length: 209715200\r\nExpect: 100-continue\r\n\r\n").encode()
    reply = await raw_http(host, port, request, timeout_s=2.0)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"100 Continue" not in reply


async def test_expect_continue_without_token_is_401_without_100(client: Client) -> None:
    host, port = _addr(client)
    request = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n"
               b"Expect: 100-continue\r\n\r\n")
    reply = await raw_http(host, port, request, timeout_s=2.0)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"100 Continue" not in reply


async def test_expect_continue_accepted_request_gets_100_then_answer(client: Client, auth: dict[str, str]) -> None:
    host, port = _addr(client)
    body = json.dumps(DIGITS_BODY).encode()
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\n{_auth_line(auth)}"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").encode()
    reply = await raw_http(host, port, head, read_after_s=0.5, then=body, timeout_s=3.0)
    assert reply.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), reply[:200]


async def test_request_smuggling_cl_and_te_is_refused(client: Client, auth: dict[str, str]) -> None:
    host, port = _addr(client)
    request = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\n{_auth_line(auth)}"
               "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
               "GET /v2/repository/index HTTP/1.1\r\nHost: localhost\r\n\r\n").encode()
    reply = await raw_http(host, port, request, timeout_s=2.0)
    assert reply.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), reply[:200]  # refused by the parser
    assert reply.count(b"HTTP/1.") == 1  # the smuggled request was never processed


async def test_header_injection_in_path_is_refused(client: Client, auth: dict[str, str]) -> None:
    host, port = _addr(client)
    request = (f"GET /v2/models/digits%0d%0aSet-Cookie:%20x=1 HTTP/1.1\r\nHost: localhost\r\n{_auth_line(auth)}"
               "Connection: close\r\n\r\n").encode()
    reply = await raw_http(host, port, request, timeout_s=2.0)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"Set-Cookie" not in reply


async def test_unknown_output_name_is_not_echoed(client: Client, auth: dict[str, str]) -> None:
    body = {**DIGITS_BODY, "outputs": [{"name": "078-05-1120"}]}
    resp = await client.post("/v2/models/digits/infer", json=body, headers=auth)
    assert resp.status in (400, 422)
    assert "078-05-1120" not in await resp.text()


def _auth_line(auth: dict[str, str]) -> str:
    return f"Authorization: {auth['Authorization']}\r\n"


async def test_shipped_policy_serves_loopback_hosts_only(client: Client, auth: dict[str, str]) -> None:
    """HTTP-08 with the shipped policies: a Host outside `http.allowed_hosts` (loopback
    names) is misdirected (421) before anything is parsed or forwarded; health is exempt."""
    host, port = _addr(client)
    body = json.dumps(DIGITS_BODY).encode()
    for name, expected in ((b"evil.example", b"421"), (b"10.0.0.1:8080", b"421"), (b"LOCALHOST:1", b"200"),
                           (b"127.0.0.1", b"200"), (b"[::1]:8080", b"200")):
        request = (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: " + name + b"\r\n"
                   + _auth_line(auth).encode() + b"Content-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        reply = await raw_http(host, port, request, timeout_s=3.0)
        assert reply.startswith(b"HTTP/1.1 " + expected), (name, reply[:200])
    probe = b"GET /v2/health/live HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    health = await raw_http(host, port, probe, timeout_s=3.0)
    assert health.startswith(b"HTTP/1.1 200"), health[:200]
