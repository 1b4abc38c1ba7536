"""State deadlines measure Redis, not the event loop's lag (a real ``redis-server``).

A saturated gateway reads a reply that Redis sent in 1 ms only after its own backlog; the
op timeout must not call that an outage (503s, a dropped connection, a tripped breaker).
A Redis that is really gone must still fail closed: at ``op_timeout_s`` on an idle loop,
within ``lag_cap_s`` on a lagging one, never a hang (tests/support/liveness.py bounds).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.observability.metrics import Metrics
from gateway.state.base import QuotaCheck, StateKey, StateUnavailable
from gateway.state.redis import RedisState
from tests.state.test_loop_lag import block
from tests.support.liveness import no_hang
from tests.support.redis_server import RedisServer, available

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed")

QUOTA = QuotaCheck(StateKey("t:acme", "q.lag", ("acme",)), limit=1_000_000, period_s=86_400)


class Observed(Metrics):
    """The gateway's metrics, plus a record of what the state layer reported."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[str | None] = []
        self.extensions: list[tuple[str, str]] = []

    def state_op(self, backend: str, op: str, seconds: float, error: str | None) -> None:
        super().state_op(backend, op, seconds, error)
        self.errors.append(error)

    def state_deadline_extension(self, backend: str, op: str, outcome: str) -> None:
        super().state_deadline_extension(backend, op, outcome)
        self.extensions.append((op, outcome))

    def extended(self, outcome: str) -> float:
        return self.state_deadline_extended.labels(outcome=outcome)._value.get()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer.start(tmp_path_factory.mktemp("redis-lag"))
    yield srv
    srv.kill()


@pytest.fixture
async def store(server: RedisServer) -> AsyncIterator[RedisState]:
    s = RedisState.from_url(server.url, key_prefix=f"l{secrets.token_hex(4)}", observer=Observed(),
                            breaker_threshold=2, breaker_cooldown_s=30)
    yield s
    await s.close()


def observed(store: RedisState) -> Observed:
    obs = store._observer
    assert isinstance(obs, Observed)
    return obs


def connections_received(server: RedisServer) -> int:
    stats = dict(line.split(":", 1) for line in server.cli("INFO", "stats").split() if ":" in line)
    return int(stats["total_connections_received"])


@pytest.mark.parametrize("yields", [1, 5], ids=["queued", "sent"])
async def test_replies_read_late_by_a_blocked_loop_are_used(store: RedisState, server: RedisServer,
                                                           yields: int) -> None:
    """The loop blocks for 3x the op timeout while calls are in flight, their deadlines armed.

    ``sent``: the commands went out before the block, the replies wait in the sockets (and
    are in by the time the deadline is looked at). ``queued``: the commands go out only
    after the block, so the deadline has passed with no reply: the call waits on, since
    the loop's lag, not Redis, used the budget. Either way Redis answered in time: every call
    succeeds on its own connection and the breaker (threshold 2) stays closed."""
    width = 8
    for _ in range(3):  # a pooled connection per concurrent call, scripts loaded
        await asyncio.gather(*(store.run_limits([QUOTA]) for _ in range(width)))
    before = (await store.run_limits([QUOTA]))[0].remaining
    opened = connections_received(server)
    calls = [asyncio.ensure_future(store.run_limits([QUOTA])) for _ in range(width)]
    for _ in range(yields):
        await asyncio.sleep(0)  # 1: deadlines armed, commands not sent; 5: commands sent
    block(3 * store.op_timeout_s)
    results = await asyncio.gather(*calls)
    assert sorted(r[0].remaining for r in results) == list(range(before - width, before))
    assert store._breaker.failures == 0
    # Nothing dropped, nothing reconnected: the one new connection is redis-cli's own INFO.
    assert connections_received(server) == opened + 1
    obs = observed(store)
    assert all(e is None for e in obs.errors)
    if yields == 1:
        assert ("limits", "extended") in obs.extensions and ("limits", "answered") in obs.extensions
        assert obs.extended("answered") == obs.extended("extended") >= 1  # exported for operators
    assert obs.extended("failed") == 0
    assert ("limits", "failed") not in obs.extensions
    assert (await store.run_limits([QUOTA]))[0].remaining == before - width - 1  # still in sync


async def test_a_stopped_redis_on_an_idle_loop_fails_at_the_op_timeout(store: RedisState,
                                                                       server: RedisServer) -> None:
    await store.run_limits([QUOTA])
    server.pause()
    try:
        for _ in range(2):
            async with no_hang("a call to a stopped Redis, idle loop", expected_s=store.op_timeout_s):
                with pytest.raises(StateUnavailable) as err:
                    await store.run_limits([QUOTA])
            assert err.value.kind == "timeout"
        # Real failures still trip the breaker: the next call is refused without waiting.
        with pytest.raises(StateUnavailable) as err:
            await store.run_limits([QUOTA])
        assert err.value.kind == "circuit_open"
    finally:
        server.resume()


async def _hog(stop: asyncio.Event, chunk_s: float) -> None:
    """A loop that never catches up: blocks, yields once, blocks again."""
    while not stop.is_set():
        block(chunk_s)
        await asyncio.sleep(0)


async def test_a_stopped_redis_on_a_lagging_loop_fails_within_the_cap(server: RedisServer) -> None:
    store = RedisState.from_url(server.url, key_prefix=f"l{secrets.token_hex(4)}", observer=Observed(),
                                breaker_threshold=0)
    await store.run_limits([QUOTA])
    server.pause()
    stop = asyncio.Event()
    hog = asyncio.ensure_future(_hog(stop, 0.03))
    try:
        for _ in range(2):
            async with no_hang("a call to a stopped Redis, lagging loop", expected_s=store.lag_cap_s):
                with pytest.raises(StateUnavailable) as err:
                    await store.run_limits([QUOTA])
            assert err.value.kind == "timeout"
        outcomes = [o for _, o in observed(store).extensions]
        assert outcomes.count("extended") == 2 and outcomes.count("failed") == 2
        assert "answered" not in outcomes
    finally:
        stop.set()
        await hog
        server.resume()
        await store.close()


class _AllLag:
    """A monitor reporting that the loop lagged the whole time (deterministic attribution)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.running = True

    def lag_total(self) -> float:
        return time.perf_counter()


async def test_the_cap_reached_through_lag_alone_does_not_trip_the_breaker(store: RedisState,
                                                                           server: RedisServer) -> None:
    store.lag_cap_s = 3 * store.op_timeout_s
    await store.run_limits([QUOTA])
    store._lag = _AllLag()  # type: ignore[assignment]
    server.pause()
    try:
        for _ in range(3):  # threshold 2: a counted failure would open the breaker
            with pytest.raises(StateUnavailable) as err:
                await store.run_limits([QUOTA])
            assert err.value.kind == "timeout"
        assert store._breaker.failures == 0
    finally:
        server.resume()
    assert (await store.run_limits([QUOTA]))[0].allowed  # not refused as circuit_open
    assert [o for _, o in observed(store).extensions].count("failed") == 3


async def test_a_cancelled_caller_during_an_extension_abandons_the_call(store: RedisState,
                                                                        server: RedisServer) -> None:
    await store.run_limits([QUOTA])
    store._lag = _AllLag()  # type: ignore[assignment]
    server.pause()
    try:
        call = asyncio.ensure_future(store.run_limits([QUOTA]))
        await asyncio.sleep(2 * store.op_timeout_s)  # past the op timeout: in the extension
        assert not call.done()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
        assert call.cancelled()
        assert store._breaker.failures == 0
    finally:
        server.resume()
    assert (await store.run_limits([QUOTA]))[0].allowed


async def test_the_cap_defaults_to_ten_op_timeouts_and_is_configurable(server: RedisServer) -> None:
    default = RedisState.from_url(server.url)
    custom = RedisState.from_url(server.url, op_timeout_s=0.05, lag_cap_s=0.2)
    floor = RedisState.from_url(server.url, op_timeout_s=0.05, lag_cap_s=0.01)
    try:
        assert default.lag_cap_s == pytest.approx(10 * default.op_timeout_s)
        assert custom.lag_cap_s == pytest.approx(0.2)
        assert floor.lag_cap_s == pytest.approx(0.05)  # never below the op timeout
    finally:
        for s in (default, custom, floor):
            await s.close()
