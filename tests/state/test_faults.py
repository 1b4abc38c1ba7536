"""Redis slow, silent, resetting, stopped or frozen: the state layer answers on time and recovers.

A real ``redis-server`` sits behind a :class:`FaultProxy`. Every failure must surface as
``StateUnavailable`` within about the 100 ms operation timeout (never a hang, never a raw
redis-py exception), and once the fault is gone the same ``RedisState`` must work again
without a restart and without stale connections (a late reply read as the answer to the
next command would be a silent desync).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from gateway.errors import DependencyUnavailable
from gateway.stages.ratelimit import RateLimitPolicy, build_ratelimit_stage
from gateway.state.base import (
    ConcurrencyCheck,
    LimitDecision,
    QuotaCheck,
    RateCheck,
    StateKey,
    StateUnavailable,
)
from gateway.state.redis import DEFAULT_OP_TIMEOUT_S, RedisState
from tests.stages.test_ratelimit import ctx
from tests.support.fault_proxy import FaultProxy
from tests.support.liveness import no_hang
from tests.support.redis_server import RedisServer, available

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed")

# The longest a Redis call may take by design: its op timeout (100 ms), stretched when this
# process's own event loop lagged, never past the lag cap (10 x the op timeout). Failures are
# checked for their kind (which timeout or refusal ended them) and against a hang bound over
# this ceiling (tests/support/liveness.py): a fault must end a call, never hang it.
CALL_CEILING_S = 10 * DEFAULT_OP_TIMEOUT_S
QUOTA = QuotaCheck(StateKey("t:acme", "q.faults", ("acme",)), limit=1_000_000, period_s=86_400)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer.start(tmp_path_factory.mktemp("redis-faults"))
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def proxy(server: RedisServer) -> Iterator[FaultProxy]:
    p = FaultProxy("127.0.0.1", server.port).start()
    yield p
    p.stop()


@pytest.fixture(autouse=True)
def _heal(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "proxy" in request.fixturenames:
        request.getfixturevalue("proxy").pass_()


class Observed:
    def __init__(self) -> None:
        self.ops: list[tuple[str, str, float, str | None]] = []

    def state_op(self, backend: str, op: str, seconds: float, error: str | None) -> None:
        self.ops.append((backend, op, seconds, error))


@pytest.fixture
async def store(proxy: FaultProxy) -> AsyncIterator[RedisState]:
    s = RedisState.from_url(proxy.url_for("redis"), key_prefix=f"f{secrets.token_hex(4)}",
                            observer=Observed(), breaker_threshold=0)
    yield s
    await s.close()


async def failure(store: RedisState) -> StateUnavailable:
    """One call that must fail, and end (never hang) doing so."""
    async with no_hang("a Redis call under a fault", expected_s=CALL_CEILING_S):
        with pytest.raises(StateUnavailable) as err:
            await store.run_limits([QUOTA])
    return err.value


async def recovers(store: RedisState, *, expected_s: float | None = None) -> list[str]:
    """Call until an operation succeeds again; the kinds of the failures met on the way.

    A hang check: the store must heal by itself once the fault is gone.
    """
    kinds: list[str] = []
    async with no_hang("the store healing after the fault", expected_s=expected_s):
        while True:
            try:
                await store.run_limits([QUOTA])
                break
            except StateUnavailable as exc:
                kinds.append(exc.kind)
                await asyncio.sleep(0.02)
    return kinds


async def assert_in_sync(store: RedisState, batches: int = 3, width: int = 10) -> None:
    """Each reply belongs to its own command: consecutive quota counts, concurrently too."""
    before = (await store.run_limits([QUOTA]))[0].remaining
    seen: list[int] = []
    for _ in range(batches):
        results = await asyncio.gather(*(store.run_limits([QUOTA]) for _ in range(width)))
        seen.extend(r[0].remaining for r in results)
    n = batches * width
    assert sorted(seen, reverse=True) == list(range(before - 1, before - 1 - n, -1))


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        (lambda p: p.latency(2000), "timeout"),  # RL-12: slow Redis
        (lambda p: p.blackhole(), "timeout"),  # RL-11: packets lost
        (lambda p: p.half_open(), "timeout"),  # TCP accepted, never answered
        (lambda p: p.reset(), "connection"),  # connections reset
    ],
    ids=["latency", "blackhole", "half_open", "reset"],
)
async def test_a_fault_fails_in_time_and_heals(store: RedisState, proxy: FaultProxy,
                                               fault: Callable[[FaultProxy], None], kind: str) -> None:
    await assert_in_sync(store, 1, 5)  # pooled connections exist before the fault
    fault(proxy)
    for _ in range(3):
        # A timeout, not the reply: with latency(2000) a call without its deadline would succeed.
        assert (await failure(store)).kind == kind
    proxy.pass_()
    await recovers(store)
    await assert_in_sync(store)
    observed = store._observer
    assert isinstance(observed, Observed)
    assert any(e == kind for _, _, _, e in observed.ops)
    assert all(backend == "redis" for backend, *_ in observed.ops)


async def test_latency_under_the_timeout_is_only_slow(store: RedisState, proxy: FaultProxy) -> None:
    proxy.latency(30)
    delayed = proxy.delayed
    async with no_hang("a call with 30 ms of latency", expected_s=CALL_CEILING_S):
        await store.run_limits([QUOTA])  # answered: 30 ms is under the 100 ms op timeout
    assert proxy.delayed > delayed  # and its reply really was held back those 30 ms


async def test_a_late_reply_is_never_read_as_the_next_answer(store: RedisState, proxy: FaultProxy) -> None:
    """Replies held past the timeout arrive later on the old connection; it must have been dropped."""
    proxy.latency(150)
    for _ in range(5):
        await failure(store)
    proxy.pass_()
    await asyncio.sleep(0.2)  # the late replies land now
    await recovers(store)
    await assert_in_sync(store)


async def test_a_slot_taken_by_a_timed_out_call_is_given_back(store: RedisState, proxy: FaultProxy) -> None:
    """The script ran but its reply came too late: the caller got 503, so the slot must not stay held."""
    slots = ConcurrencyCheck(StateKey("t:acme", "c.faults", ("acme",)), limit=1, lease_ttl_s=30)
    await store.run_limits([QUOTA])  # scripts cached, a connection open: the next call runs at once
    proxy.latency(150)
    with pytest.raises(StateUnavailable):
        await store.run_limits([slots])
    proxy.pass_()
    await asyncio.sleep(0.4)  # the late reply, then the blind release, land
    decision = (await store.run_limits([slots]))[0]
    assert decision.allowed


async def test_ttls_survive_resets_mid_stream(store: RedisState, proxy: FaultProxy, server: RedisServer) -> None:
    """RL-10: counter and expiry are one script; a reset at any moment cannot leave a key without TTL."""
    rng = random.Random(10)
    checks = [RateCheck(StateKey("t:acme", "rl.ttl", ("acme", str(i))), rate=1, period_s=3600, burst=5)
              for i in range(20)]

    async def one(check: RateCheck) -> None:
        with contextlib.suppress(StateUnavailable):
            await store.run_limits([check])

    for _ in range(10):
        tasks = [asyncio.ensure_future(one(rng.choice(checks))) for _ in range(20)]
        await asyncio.sleep(rng.random() * 0.003)
        proxy.reset()
        proxy.pass_()
        await asyncio.gather(*tasks)
    names = server.cli("--scan", "--pattern", f"{store.key(checks[0].key).split(':')[0]}:*").split()
    assert names
    for name in names:
        assert 0 < int(server.cli("PTTL", name)) <= 5 * 3600 * 1000


async def test_the_breaker_fails_fast_then_probes(proxy: FaultProxy) -> None:
    observed = Observed()
    store = RedisState.from_url(proxy.url_for("redis"), key_prefix=f"f{secrets.token_hex(4)}",
                                observer=observed, breaker_threshold=3, breaker_cooldown_s=0.3)
    try:
        proxy.blackhole()
        for _ in range(3):
            assert (await failure(store)).kind == "timeout"
        accepted = proxy.accepted
        err = await failure(store)
        # Fast by construction, not by a stopwatch: refused before any I/O (no connection
        # made, recorded as taking no time at all).
        assert err.kind == "circuit_open"
        assert observed.ops[-1][2:] == (0.0, "circuit_open")
        assert proxy.accepted == accepted
        proxy.pass_()
        # Refused (without I/O) until the cooldown ends, then the probe heals it.
        kinds = await recovers(store, expected_s=0.3)
        assert kinds and set(kinds) == {"circuit_open"}
        await assert_in_sync(store)
    finally:
        await store.close()


async def test_redis_stopped_then_restarted(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "stop")
    store = RedisState.from_url(server.url, breaker_threshold=0)
    try:
        await assert_in_sync(store, 1, 5)
        server.stop()
        for _ in range(3):
            assert (await failure(store)).kind == "connection"  # refused at connect: no timeout to wait out
        server.launch()
        await recovers(store)
        await assert_in_sync(store)
    finally:
        await store.close()
        server.kill()


async def test_redis_sigstopped_then_continued(tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "stopped")
    store = RedisState.from_url(server.url, breaker_threshold=0)
    try:
        await assert_in_sync(store, 1, 5)
        server.pause()
        for _ in range(3):
            assert (await failure(store)).kind == "timeout"
        server.resume()
        await recovers(store)
        await assert_in_sync(store)
    finally:
        await store.close()
        server.kill()


async def test_counts_survive_gateway_and_redis_restarts(tmp_path: Path) -> None:
    """State lives in Redis: a new gateway process sees the old counts; with AOF, so does a restarted Redis."""
    server = RedisServer.start(tmp_path / "aof", appendonly=True)
    quota = QuotaCheck(StateKey("t:acme", "q.restart", ("acme",)), limit=5, period_s=86_400)
    try:
        first = RedisState.from_url(server.url)
        for _ in range(3):
            await first.run_limits([quota])
        await first.close()  # the gateway process goes away
        second = RedisState.from_url(server.url)
        assert (await second.run_limits([quota]))[0].remaining == 1
        server.restart()  # SIGTERM flushes the AOF; the new server replays it
        assert (await recovers_with(second, quota)).remaining == 0
        assert not (await second.run_limits([quota]))[0].allowed
        await second.close()
    finally:
        server.kill()


async def recovers_with(store: RedisState, check: QuotaCheck) -> LimitDecision:
    for _ in range(50):
        try:
            return (await store.run_limits([check]))[0]
        except StateUnavailable:
            await asyncio.sleep(0.02)
    raise AssertionError("no recovery after the restart")


async def test_error_replies_are_backend_failures(tmp_path: Path) -> None:
    """AV-08: OOM and READONLY replies are StateUnavailable with a bounded kind, never a 500."""
    server = RedisServer.start(tmp_path / "errors")
    store = RedisState.from_url(server.url, breaker_threshold=0)
    try:
        await store.run_limits([QUOTA])
        server.cli("CONFIG", "SET", "maxmemory", "1")
        err = await failure(store)
        assert err.kind == "oom"
        server.cli("CONFIG", "SET", "maxmemory", "0")
        server.cli("REPLICAOF", "127.0.0.1", "1")
        err = await failure(store)
        assert err.kind == "readonly"
        server.cli("REPLICAOF", "NO", "ONE")
        await store.run_limits([QUOTA])
    finally:
        await store.close()
        server.kill()


async def test_the_password_never_leaks(tmp_path: Path) -> None:
    secret = "s3cr3t-" + secrets.token_hex(8)
    server = RedisServer.start(tmp_path / "auth", extra=("--requirepass", secret))
    good = RedisState.from_url(f"redis://:{secret}@127.0.0.1:{server.port}/0")
    bad = RedisState.from_url(f"redis://:wrong-{secret}@127.0.0.1:{server.port}/0", breaker_threshold=0)
    try:
        await good.run_limits([QUOTA])
        err = await failure(bad)
        assert err.kind == "auth"
        for text in (str(err), repr(err), repr(good), repr(bad), str(err.__cause__)):
            assert secret not in text
    finally:
        await good.close()
        await bad.close()
        server.kill()


class TestStageUnderFaults:
    POLICY = {"limits": [{"name": "subject_rate", "kind": "rate", "per": ["tenant", "subject"], "rate": 100,
                          "burst": 100}]}

    async def test_fail_closed_503_on_time(self, store: RedisState, proxy: FaultProxy) -> None:
        stage = build_ratelimit_stage(RateLimitPolicy.model_validate(self.POLICY), store)
        await stage.on_call(ctx())
        proxy.blackhole()
        async with no_hang("a limited call with Redis blackholed", expected_s=CALL_CEILING_S):
            with pytest.raises(DependencyUnavailable) as err:
                await stage.on_call(ctx())
        assert err.value.http_status == 503
        proxy.pass_()
        await recovers(store)
        await stage.on_call(ctx())

    async def test_fail_open_on_time(self, store: RedisState, proxy: FaultProxy) -> None:
        policy = {"on_backend_error": "allow", **self.POLICY}
        stage = build_ratelimit_stage(RateLimitPolicy.model_validate(policy), store)
        proxy.latency(2000)
        c = ctx()
        async with no_hang("a limited call with 2 s of Redis latency", expected_s=CALL_CEILING_S):
            await stage.on_call(c)
        # Allowed by the fail mode, i.e. after the timeout: waiting for the 2 s reply would
        # have been a plain success, without this note.
        assert c.notes["rate_limit.failure_mode"] == "allowed"
