"""Clients that stop reading, or vanish, mid-response: cut off, counted, logged, audited.

The gateway writes each response under ``limits.write_timeout_s``; aiohttp alone would
wait for the transport to drain for ever. The listening socket gets a small send buffer
(accepted sockets inherit it) and the client a small receive buffer, so a response of
about 1 MB cannot hide in kernel buffers and the write really blocks.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from gateway.app import SERVICE_KEY, build_app, runner_for
from gateway.audit import iter_records
from gateway.service import InferenceService
from gateway.settings import Settings

WRITE_TIMEOUT_S = 1
BIG_TEXT = {"inputs": [{"name": "text", "shape": [250], "datatype": "BYTES", "data": ["x" * 4000] * 250}]}


class Gateway:
    def __init__(self, runner: web.AppRunner, port: int) -> None:
        self.runner = runner
        self.port = port

    @property
    def service(self) -> InferenceService:
        return self.runner.app[SERVICE_KEY]

    def sample(self, name: str, **labels: str) -> float:
        value = self.service.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@pytest.fixture
async def gateway(settings: Settings, policy_dir: Path) -> AsyncIterator[Gateway]:
    path = policy_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("  max_inputs: 64\n",
                                             f"  max_inputs: 64\n  write_timeout_s: {WRITE_TIMEOUT_S}\n"))
    runner = runner_for(build_app(settings))
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield Gateway(runner, sock.getsockname()[1])
    finally:
        await runner.cleanup()


def _request(token_header: str, body: dict[str, Any], request_id: str) -> bytes:
    payload = json.dumps(body).encode()
    head = (f"POST /v2/models/text_echo/infer HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token_header}\r\n"
            f"Content-Type: application/json\r\nX-Request-ID: {request_id}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n")
    return head.encode() + payload


def _connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the TCP window
    sock.connect(("127.0.0.1", port))
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> tuple[int, str]:
    """Bytes received until the peer closed, and how it closed ("eof" or "reset")."""
    sock.settimeout(limit_s)
    total = 0
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        return total, "reset"
    return total, "eof"


async def _until(predicate: Any, limit_s: float = 15.0) -> None:
    """Wait for a state change (bounded); the test asserts the state, not the timing."""
    for _ in range(int(limit_s / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)


async def test_reader_that_never_reads_is_cut_off_counted_logged_and_audited(
        gateway: Gateway, auth: dict[str, str], settings: Settings) -> None:
    sock = await asyncio.to_thread(_connect, gateway.port)
    try:
        with structlog.testing.capture_logs() as logs:
            await asyncio.to_thread(sock.sendall, _request(auth["Authorization"], BIG_TEXT, "slow-reader-1"))
            await _until(lambda: gateway.sample("gateway_response_write_aborts_total",
                                                route="/v2/models/{model}/infer", reason="write_timeout") >= 1)
        assert gateway.sample("gateway_response_write_aborts_total", route="/v2/models/{model}/infer",
                              reason="write_timeout") == 1
        await _until(lambda: gateway.sample("gateway_requests_in_flight") == 0)
        assert gateway.sample("gateway_requests_in_flight") == 0
        received, how = await asyncio.to_thread(_read_until_closed, sock)
    finally:
        sock.close()
    # The gateway closed the connection (we never closed it) before the whole response left.
    assert how in ("eof", "reset")
    assert received < len(json.dumps(BIG_TEXT))
    assert any(e["event"] == "response_not_delivered" and e["reason"] == "write_timeout" for e in logs)
    records = [r for r in iter_records(settings.audit_dir) if r.get("request_id") == "slow-reader-1"]
    assert [r.get("event") for r in records] == [None, "response_not_delivered"]
    assert records[0]["status"] == 200 and records[0]["decision"] == "allow"  # answered, then not read
    assert records[1]["reason"] == "write_timeout"


async def test_client_that_vanishes_mid_response_loses_no_record_and_the_gateway_serves_on(
        gateway: Gateway, auth: dict[str, str], settings: Settings) -> None:
    sock = await asyncio.to_thread(_connect, gateway.port)
    try:
        await asyncio.to_thread(sock.sendall, _request(auth["Authorization"], BIG_TEXT, "gone-1"))
        first = await asyncio.to_thread(sock.recv, 1024)  # the response has started
        assert first.startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()  # RST: the client is gone with most of the response unread
    await _until(lambda: gateway.sample("gateway_response_write_aborts_total", route="/v2/models/{model}/infer",
                                        reason="client_gone") >= 1)
    assert gateway.sample("gateway_response_write_aborts_total", route="/v2/models/{model}/infer",
                          reason="client_gone") == 1
    assert gateway.sample("gateway_requests_in_flight") == 0
    records = [r for r in iter_records(settings.audit_dir) if r.get("request_id") == "gone-1"]
    assert records[0]["decision"] == "allow" and records[0]["status"] == 200
    assert records[-1]["event"] == "response_not_delivered" and records[-1]["reason"] == "client_gone"
    # Still serving.
    small = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hello"]}]}
    sock = await asyncio.to_thread(_connect, gateway.port)
    try:
        await asyncio.to_thread(sock.sendall, _request(auth["Authorization"], small, "after-gone"))
        head = await asyncio.to_thread(sock.recv, 65536)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200")
