"""Capacity caps: open connections on the HTTP listener (AV-09) and calls in flight per model (AV-11)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import BaseTestServer

from gateway.app import SERVICE_KEY, build_app, build_service
from gateway.errors import DependencyUnavailable
from gateway.observability.metrics import Metrics
from gateway.resilience.connection_gate import REFUSED_PER_ADDRESS, REFUSED_TOTAL, ConnectionGate
from gateway.resilience.model_slots import REASON, ModelSlots
from gateway.settings import Settings
from gateway.upstream.model_repo import load_repository
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.support.fake_triton import FakeTriton, slow

from .conftest import DIGITS_BODY, TRITON_REPO, Client, GatewayTestServer


class _Limits:
    def __init__(self, total: int, per_ip: int | None) -> None:
        self.max_connections = total
        self.max_connections_per_ip = per_ip


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


class TestConnectionGate:
    def test_total_cap_refuses_and_release_readmits(self) -> None:
        metrics = Metrics()
        gate = ConnectionGate(limits=lambda: _Limits(2, None), metrics=metrics)
        assert gate.admit("10.0.0.1") is None
        assert gate.admit("10.0.0.2") is None
        assert gate.admit("10.0.0.3") == REFUSED_TOTAL
        assert _sample(metrics, "gateway_connections_open") == 2
        assert _sample(metrics, "gateway_connections_refused_total", reason=REFUSED_TOTAL) == 1
        gate.release("10.0.0.1")
        assert gate.admit("10.0.0.3") is None
        assert gate.by_address == {"10.0.0.2": 1, "10.0.0.3": 1}

    def test_per_address_cap_leaves_other_addresses_in(self) -> None:
        metrics = Metrics()
        gate = ConnectionGate(limits=lambda: _Limits(100, 2), metrics=metrics)
        assert [gate.admit("10.0.0.1") for _ in range(3)] == [None, None, REFUSED_PER_ADDRESS]
        assert gate.admit("10.0.0.2") is None
        for _ in range(2):
            gate.release("10.0.0.1")
        gate.release("10.0.0.2")
        assert gate.by_address == {}  # nothing open, nothing remembered
        assert gate.open_total == 0
        assert _sample(metrics, "gateway_connections_open") == 0

    def test_limits_are_read_per_connection(self) -> None:
        limits = _Limits(1, None)
        gate = ConnectionGate(limits=lambda: limits, metrics=Metrics())
        assert gate.admit("10.0.0.1") is None
        assert gate.admit("10.0.0.1") == REFUSED_TOTAL
        limits.max_connections = 5  # a policy reload raises the cap
        assert gate.admit("10.0.0.1") is None


class TestModelSlots:
    def test_cap_sheds_without_queueing_and_frees_on_exit(self) -> None:
        shed: list[int] = []
        slots = ModelSlots(on_shed=lambda: shed.append(1))
        with slots.hold("m", 1):
            with pytest.raises(DependencyUnavailable) as info, slots.hold("m", 1):
                pass
            assert info.value.reason == REASON and info.value.retry_after_s == 1
            with slots.hold("other", 1):  # another model keeps its own slots
                assert slots.held == {"m": 1, "other": 1}
        assert slots.held == {}
        assert shed == [1]

    def test_no_cap_counts_nothing(self) -> None:
        slots = ModelSlots()
        with slots.hold("m", None), slots.hold("m", None):
            assert slots.held == {}

    def test_slot_freed_when_the_call_fails(self) -> None:
        slots = ModelSlots()
        with pytest.raises(RuntimeError), slots.hold("m", 1):
            raise RuntimeError("upstream broke")
        assert slots.held == {}


# -- over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeTriton]:
    async with FakeTriton([m.metadata for m in load_repository(TRITON_REPO).models]) as server:
        yield server


def _set_limits(policy_dir: Path, extra: str) -> None:
    path = policy_dir / "gateway.yaml"
    path.write_text(path.read_text().replace("  max_inputs: 64\n", f"  max_inputs: 64\n{extra}"))


async def _gateway(settings: Settings, fake: FakeTriton,
                   aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    service = build_service(settings, upstream=TritonGrpcUpstream(fake.url))
    server: BaseTestServer = GatewayTestServer(build_app(settings, service=service))
    return await aiohttp_client(server)


async def _idle(port: int, source: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the gateway sends before it closes (bounded wait: a hang fails the test)."""
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        async with asyncio.timeout(10):
            while chunk := await reader.read(4096):
                data += chunk
    return bytes(data)


async def _still_open(reader: asyncio.StreamReader) -> bool:
    try:
        async with asyncio.timeout(0.2):
            return await reader.read(1) != b""
    except TimeoutError:
        return True


async def test_connections_beyond_the_cap_get_503_and_are_closed(
    settings: Settings, fake: FakeTriton, policy_dir: Path, auth: dict[str, str],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    _set_limits(policy_dir, "  max_connections: 3\n")
    gw = await _gateway(settings, fake, aiohttp_client)
    port = gw.server.port
    assert port is not None
    held = [await _idle(port) for _ in range(3)]
    over_reader, over_writer = await _idle(port)
    over_writer.write(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    refusal = await _until_closed(over_reader)
    over_writer.close()
    assert refusal.startswith(b"HTTP/1.1 503 ")
    assert b"Retry-After: 1\r\n" in refusal and b"Connection: close\r\n" in refusal
    assert all([await _still_open(r) for r, _w in held])  # the admitted ones are untouched
    # One admitted connection still serves a request.
    reader, writer = held[0]
    writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    for _r, w in held:
        w.close()
    metrics = gw.app[SERVICE_KEY].metrics
    for _ in range(200):  # the gateway sees the closes on its next loop turns
        if _sample(metrics, "gateway_connections_open") == 0:
            break
        await asyncio.sleep(0.01)
    assert _sample(metrics, "gateway_connections_open") == 0
    assert _sample(metrics, "gateway_connections_refused_total", reason=REFUSED_TOTAL) == 1
    resp = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=auth)
    assert resp.status == 200  # room again once they are gone


async def test_per_address_cap(settings: Settings, fake: FakeTriton, policy_dir: Path,
                               aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    _set_limits(policy_dir, "  max_connections_per_ip: 2\n")
    gw = await _gateway(settings, fake, aiohttp_client)
    port = gw.server.port
    assert port is not None
    held = [await _idle(port, "127.0.0.7") for _ in range(2)]
    refused_reader, refused_writer = await _idle(port, "127.0.0.7")
    assert (await _until_closed(refused_reader)).startswith(b"HTTP/1.1 503 ")
    refused_writer.close()
    other_reader, other_writer = await _idle(port, "127.0.0.8")
    assert await _still_open(other_reader)
    metrics = gw.app[SERVICE_KEY].metrics
    assert _sample(metrics, "gateway_connections_refused_total", reason=REFUSED_PER_ADDRESS) == 1
    for _r, w in [*held, (other_reader, other_writer)]:
        w.close()


async def test_slow_model_is_shed_at_its_cap_and_others_are_served(
    settings: Settings, fake: FakeTriton, policy_dir: Path, token: Callable[..., str],
    aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    path = policy_dir / "gateway.yaml"
    text = path.read_text()
    path.write_text(text.replace("models:\n  digits:\n", "models:\n  digits:\n    max_in_flight: 2\n", 1))
    gw = await _gateway(settings, fake, aiohttp_client)
    fake.set(slow(1.0), model="digits")
    headers = [{"Authorization": f"Bearer {token(sub=f'user{i}')}"} for i in range(5)]

    async def call(i: int) -> int:
        resp = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=headers[i])
        await resp.read()
        return resp.status

    slow_calls = [asyncio.ensure_future(call(i)) for i in range(2)]
    for _ in range(500):  # until both slots are taken (the upstream holds them)
        if fake.counts["ModelInfer"] >= 2:
            break
        await asyncio.sleep(0.01)
    excess = await asyncio.gather(*(call(i) for i in range(2, 5)))
    assert excess == [503, 503, 503]
    assert not any(t.done() for t in slow_calls)  # shed while the slow ones were still running
    echo = await gw.post("/v2/models/text_echo/infer", headers=headers[4],
                         json={"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]})
    assert echo.status == 200, await echo.text()  # another model is not affected
    assert await asyncio.gather(*slow_calls) == [200, 200]
    assert fake.counts["ModelInfer"] == 3  # two digits calls and the echo: nothing queued
    scrape = (await (await gw.get("/metrics")).read()).decode()
    assert re.search(r'^gateway_refusals_total\{reason="model_load_shed"\} 3\.0$', scrape, re.M)
    assert re.search(r"^gateway_load_shed_total 3\.0$", scrape, re.M)


async def test_refused_connections_linger_within_budget_and_give_it_back(
    settings: Settings, fake: FakeTriton, policy_dir: Path, aiohttp_client: Callable[..., Awaitable[Client]],
) -> None:
    _set_limits(policy_dir, "  max_connections: 1\n")
    gw = await _gateway(settings, fake, aiohttp_client)
    port = gw.server.port
    assert port is not None and gw.server.runner is not None
    budget = gw.server.runner.server._linger  # type: ignore[union-attr]
    budget.limit = 2
    held = await _idle(port)
    refused = [await _idle(port) for _ in range(4)]
    for reader, writer in refused:
        writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # unread when the refusal goes out
        assert (await _until_closed(reader)).startswith(b"HTTP/1.1 503 ")
        writer.close()
    for _ in range(300):  # lingering ones close within REFUSED_LINGER_S
        if budget.lingering == 0:
            break
        await asyncio.sleep(0.01)
    assert budget.lingering == 0  # every lingering slot was given back
    held[1].close()
