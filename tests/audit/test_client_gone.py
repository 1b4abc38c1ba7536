"""Nothing is lost when the client goes away: one truthful audit record per request.

A real TCP client sends an inference request and closes its socket while the request
waits: on the audit group commit (a stalled fsync), on the upstream (a slow model). The
audit trail must then hold exactly one record of that request, with the real decision,
and an ``abandoned`` marker (cause ``client_gone``) saying no 2xx reached the client.
The same holds when the handler task itself is cancelled (the server stops, or aiohttp
runs with ``handler_cancellation``): the record still lands.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest

from gateway.app import SERVICE_KEY
from gateway.service import InferenceService

from ..conftest import DIGITS_BODY, Client
from . import records


class StallFsync:
    """FileSink fault hook: the next fsync blocks until released (in the writer thread)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()

    def __call__(self, op: str) -> None:
        if op == "fsync" and not self.release.is_set():
            self.blocked.set()
            assert self.release.wait(10)


def _request(rid: str, bearer: str) -> bytes:
    body = json.dumps(DIGITS_BODY).encode()
    head = (f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {bearer}\r\n"
            f"X-Request-ID: {rid}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def _until(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never happened: {what}")


def _mine(service: InferenceService, rid: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(request records, abandoned markers) of request ``rid``."""
    recs = records(service.audit_log.config)
    mine = [r for r in recs if r.get("request_id") == rid and r.get("type", "request") == "request"]
    seqs = {r["seq"] for r in mine}
    markers = [r for r in recs if r.get("type") == "abandoned" and r.get("ref_seq") in seqs]
    return mine, markers


async def _send_and_vanish(client: Client, rid: str, bearer: str, waiting: Callable[[], bool]) -> None:
    """Send the request over a real socket, wait until it is parked, then reset the connection."""
    assert client.server.host is not None and client.server.port is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(_request(rid, bearer))
    await writer.drain()
    await _until(waiting, "request parked")
    writer.transport.abort()  # RST: the client is gone, it never reads an answer
    del reader


async def test_client_gone_during_audit_commit_is_recorded(client: Client, auth: dict[str, str]) -> None:
    service = client.app[SERVICE_KEY]
    warm = await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)
    assert warm.status == 200
    stall = StallFsync()
    service.audit_log.file_sink.fault_hook = stall
    bearer = auth["Authorization"].split(" ", 1)[1]
    await _send_and_vanish(client, "gone-audit-1", bearer, stall.blocked.is_set)
    await asyncio.sleep(0.2)  # the server notices the reset while the commit is still stalled
    stall.release.set()

    def landed() -> bool:
        mine, markers = _mine(service, "gone-audit-1")
        return bool(mine) and bool(markers)

    await _until(landed, "record and marker of the vanished client")
    mine, markers = _mine(service, "gone-audit-1")
    assert len(mine) == 1 and mine[0]["decision"] == "allow" and mine[0]["upstream_called"] is True
    [marker] = markers  # written before the waiter left: the log's own marker
    assert marker["cause"] == "waiter_gone" and marker["request_id"] == "gone-audit-1"


async def test_client_gone_while_queued_behind_a_commit_is_recorded(client: Client, auth: dict[str, str]) -> None:
    """The record waits in the queue (not yet picked up) when its client leaves: still written."""
    service = client.app[SERVICE_KEY]
    assert (await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)).status == 200
    stall = StallFsync()
    service.audit_log.file_sink.fault_hook = stall
    first = asyncio.ensure_future(client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth))
    await _until(stall.blocked.is_set, "first commit stalled")
    bearer = auth["Authorization"].split(" ", 1)[1]
    await _send_and_vanish(client, "gone-queued-1", bearer, lambda: service.audit_log.stats.queue_depth >= 1)
    await asyncio.sleep(0.2)
    stall.release.set()
    assert (await first).status == 200
    await _until(lambda: all(_mine(service, "gone-queued-1")), "record and marker of the queued request")
    mine, markers = _mine(service, "gone-queued-1")
    assert len(mine) == 1 and (mine[0]["decision"], mine[0]["status"]) == ("allow", 200)
    assert [m["cause"] for m in markers] == ["waiter_gone"]


class SlowUpstream:
    """The real upstream behind a gate: ``infer`` waits until released (or cancelled)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def infer(self, request: Any, *, timeout_s: float) -> Any:
        self.entered.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await self.inner.infer(request, timeout_s=timeout_s)


async def test_client_gone_while_upstream_works_is_recorded(client: Client, auth: dict[str, str]) -> None:
    """Cancelled at the upstream await: one allow record (client_gone, 499), marked abandoned."""
    service = client.app[SERVICE_KEY]
    assert (await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)).status == 200
    slow = SlowUpstream(service.upstream)
    service.upstream = slow  # a duck-typed stand-in
    bearer = auth["Authorization"].split(" ", 1)[1]
    await _send_and_vanish(client, "gone-upstream-1", bearer, slow.entered.is_set)
    await _until(lambda: all(_mine(service, "gone-upstream-1")), "record and marker of the vanished client")
    mine, markers = _mine(service, "gone-upstream-1")
    assert len(mine) == 1
    rec = mine[0]
    assert (rec["decision"], rec["reason"], rec["status"], rec["upstream_called"]) == ("allow", "client_gone", 499,
                                                                                        True)
    assert [(m["cause"], m["request_id"]) for m in markers] == [("client_gone", "gone-upstream-1")]
    assert slow.cancelled == 1  # the upstream call itself was dropped
    slow.release.set()
    # The gateway goes on serving, and the next call is recorded as usual.
    assert (await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)).status == 200


async def test_client_gone_before_admission_is_a_deny(client: Client, auth: dict[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while admission waits (identity, shared limits): one deny record, client_gone."""
    service = client.app[SERVICE_KEY]
    assert (await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)).status == 200
    pipeline = type(service.pin().pipeline)
    admit = pipeline.admit
    entered = asyncio.Event()

    async def stalled_admit(self: Any, ctx: Any) -> None:
        entered.set()
        await asyncio.Event().wait()  # never decided: only cancellation ends it
        await admit(self, ctx)

    monkeypatch.setattr(pipeline, "admit", stalled_admit)
    bearer = auth["Authorization"].split(" ", 1)[1]
    await _send_and_vanish(client, "gone-admit-1", bearer, entered.is_set)
    await _until(lambda: bool(_mine(service, "gone-admit-1")[0]), "record of the vanished client")
    monkeypatch.undo()
    assert (await client.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)).status == 200
    mine, markers = _mine(service, "gone-admit-1")
    assert [(r["decision"], r["reason"], r["status"], r["upstream_called"]) for r in mine] == [
        ("deny", "client_gone", 499, False)]
    assert markers == []
