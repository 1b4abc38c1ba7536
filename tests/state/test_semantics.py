"""One contract, two backends: the in-memory store and real Redis decide identically.

Every test here runs against ``MemoryState`` and ``RedisState`` (a real ``redis-server``)
with the same injected clock, so no test sleeps to move time. The last tests pin what only
Redis has: server ``TIME``, script caching, key naming.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from collections.abc import AsyncIterator

import pytest

from gateway.state import open_state
from gateway.state.base import (
    ConcurrencyCheck,
    DocumentConflict,
    Lease,
    LimitCheck,
    LimitDecision,
    QuotaCheck,
    RateCheck,
    SharedState,
    StateKey,
    StateUnavailable,
)
from gateway.state.memory import MemoryState
from gateway.state.redis import SCRIPTS, RedisState, encode_key
from tests.support.redis_server import RedisServer, available

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed")

DAY = 86_400
# Mid-morning of a UTC day, so quota and budget periods have a known end.
T0 = 1_767_225_600 + 36_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def _make(kind: str, server: RedisServer, clock: Clock) -> SharedState:
    if kind == "memory":
        return MemoryState(clock=clock)
    # A fresh key prefix per test: tests share one server but never each other's keys.
    return RedisState.from_url(server.url, clock=clock, key_prefix=f"t{secrets.token_hex(4)}")


@pytest.fixture(params=["memory", "redis"])
async def state(request: pytest.FixtureRequest, redis_server: RedisServer, clock: Clock) -> AsyncIterator[SharedState]:
    store = await _make(request.param, redis_server, clock)
    yield store
    await store.close()


def key(group: str = "t:acme", kind: str = "rl.x", *parts: str) -> StateKey:
    return StateKey(group, kind, parts or ("acme",))


def brief(d: LimitDecision) -> tuple[bool, int, int, float, float]:
    return d.allowed, d.limit, d.remaining, round(d.reset_s, 6), d.retry_after_s


class TestRate:
    async def test_burst_then_one_per_interval(self, state: SharedState, clock: Clock) -> None:
        """10/s with burst 5: five at once, the sixth waits exactly one interval."""
        check = RateCheck(key(), rate=10, period_s=1, burst=5)
        got = [await state.run_limits([check]) for _ in range(6)]
        assert [d[0].allowed for d in got] == [True] * 5 + [False]
        assert [d[0].remaining for d in got] == [4, 3, 2, 1, 0, 0]
        assert got[4][0].reset_s == pytest.approx(0.5)
        assert got[5][0].retry_after_s == pytest.approx(0.1)
        clock.advance(0.1)
        assert (await state.run_limits([check]))[0].allowed
        assert not (await state.run_limits([check]))[0].allowed

    async def test_a_refused_request_costs_nothing(self, state: SharedState, clock: Clock) -> None:
        check = RateCheck(key(), rate=1, period_s=1, burst=1)
        assert (await state.run_limits([check]))[0].allowed
        for _ in range(50):
            assert not (await state.run_limits([check]))[0].allowed
        clock.advance(1.0)
        assert (await state.run_limits([check]))[0].allowed

    async def test_cost_weighs_the_request(self, state: SharedState, clock: Clock) -> None:
        """A batch of 64 drains 64 units; a cost above the burst can never pass."""
        small = RateCheck(key(), rate=100, period_s=60, burst=100, cost=1)
        big = RateCheck(key(), rate=100, period_s=60, burst=100, cost=64)
        assert (await state.run_limits([big]))[0].remaining == 36
        refused = (await state.run_limits([big]))[0]
        assert not refused.allowed
        assert refused.retry_after_s == pytest.approx(28 * 0.6)
        assert (await state.run_limits([small]))[0].remaining == 35
        never = (await state.run_limits([RateCheck(key(), rate=100, period_s=60, burst=100, cost=101)]))[0]
        assert not never.allowed
        assert math.isinf(never.retry_after_s)

    async def test_any_window_admits_at_most_rate_plus_burst(self, state: SharedState, clock: Clock) -> None:
        """RL-08: 60/min burst 10, hammered around a minute boundary: never more than 70 per 60 s."""
        check = RateCheck(key(), rate=60, period_s=60, burst=10)
        admitted: list[float] = []
        for _ in range(1200):  # every 0.1 s for 120 s
            if (await state.run_limits([check]))[0].allowed:
                admitted.append(clock.t)
            clock.advance(0.1)
        for start in admitted:
            in_window = [t for t in admitted if start <= t < start + 60]
            assert len(in_window) <= 70
        assert len(admitted) >= 125


class TestQuota:
    async def test_calendar_day_quota(self, state: SharedState, clock: Clock) -> None:
        check = QuotaCheck(key(kind="q.day"), limit=3, period_s=DAY)
        got = [(await state.run_limits([check]))[0] for _ in range(4)]
        assert [d.allowed for d in got] == [True, True, True, False]
        assert [d.remaining for d in got] == [2, 1, 0, 0]
        until_midnight = DAY - 36_000
        assert got[3].retry_after_s == pytest.approx(until_midnight)
        assert got[0].reset_s == pytest.approx(until_midnight)
        clock.advance(until_midnight - 1)
        assert not (await state.run_limits([check]))[0].allowed
        clock.advance(1)
        fresh = (await state.run_limits([check]))[0]
        assert fresh.allowed and fresh.remaining == 2

    async def test_cost_larger_than_the_quota_never_passes(self, state: SharedState) -> None:
        decision = (await state.run_limits([QuotaCheck(key(kind="q"), limit=3, period_s=60, cost=4)]))[0]
        assert not decision.allowed and math.isinf(decision.retry_after_s)


class TestConcurrency:
    async def test_cap_release_and_expiry(self, state: SharedState, clock: Clock) -> None:
        check = ConcurrencyCheck(key(kind="c"), limit=2, lease_ttl_s=30)
        first, second, third = [await state.acquire(check) for _ in range(3)]
        assert first.allowed and second.allowed and not third.allowed
        assert first.lease is not None and second.lease is not None and third.lease is None
        assert (first.remaining, second.remaining) == (1, 0)
        assert third.retry_after_s == pytest.approx(1.0)
        await state.release([first.lease])
        await state.release([first.lease])  # twice: a no-op
        again = await state.acquire(check)
        assert again.allowed
        # A replica that died never releases: its slots come back when the leases expire.
        clock.advance(30.001)
        assert (await state.acquire(check)).allowed
        assert (await state.acquire(check)).allowed
        assert not (await state.acquire(check)).allowed


class TestAllOrNothing:
    async def test_one_refusal_charges_nothing(self, state: SharedState) -> None:
        tenant = RateCheck(key(kind="rl.tenant"), rate=1, period_s=60, burst=100)
        subject = RateCheck(key("t:acme", "rl.subject", "acme", "alice"), rate=1, period_s=60, burst=1)
        slots = ConcurrencyCheck(key(kind="c"), limit=5, lease_ttl_s=30)
        ok = await state.run_limits([tenant, subject, slots])
        assert all(d.allowed for d in ok)
        assert ok[2].lease is not None
        refused = await state.run_limits([tenant, subject, slots])
        assert [d.allowed for d in refused] == [True, False, True]
        assert all(d.lease is None for d in refused)
        after = await state.run_limits([tenant, slots])
        assert after[0].remaining == 98  # the refused run left the tenant bucket alone
        assert after[1].remaining == 3  # and took no slot

    async def test_across_groups_too(self, state: SharedState) -> None:
        """Keys in different groups (Cluster slots): the charged group is undone."""
        tenant = RateCheck(key("t:acme", "rl.tenant"), rate=1, period_s=60, burst=100)
        model = RateCheck(StateKey("m:digits", "rl.model", ("digits",)), rate=1, period_s=60, burst=1)
        assert all(d.allowed for d in await state.run_limits([tenant, model]))
        assert [d.allowed for d in await state.run_limits([tenant, model])] == [True, False]
        await asyncio.sleep(0.05)  # on Redis the undo runs in the background
        assert (await state.run_limits([tenant]))[0].remaining == 98

    async def test_two_checks_on_one_key_are_refused(self, state: SharedState) -> None:
        check = RateCheck(key(), rate=1, period_s=1, burst=1)
        with pytest.raises(ValueError, match="same key"):
            await state.run_limits([check, check])


class TestBudget:
    async def test_reserve_commit_refund(self, state: SharedState, clock: Clock) -> None:
        k = StateKey("t:acme", "dp.eps", ("acme", "tab_dp"))
        grants = [await state.reserve(k, 0.5, capacity=5.0, period_s=DAY) for _ in range(11)]
        assert [g.granted for g in grants] == [True] * 10 + [False]
        assert grants[9].spent == pytest.approx(5.0) and grants[10].remaining == 0.0
        first = grants[0].reservation
        assert first is not None
        assert await state.refund(first)
        assert not await state.refund(first)  # idempotent
        assert not await state.commit(first)  # already settled
        assert (await state.reserve(k, 0.5, capacity=5.0, period_s=DAY)).granted
        second = grants[1].reservation
        assert second is not None
        assert await state.commit(second, actual=0.25)  # charged less than reserved
        decision = await state.reserve(k, 0.25, capacity=5.0, period_s=DAY)
        assert decision.granted and decision.spent == pytest.approx(5.0)
        clock.advance(DAY)
        old = grants[2].reservation
        assert old is not None
        assert not await state.refund(old)  # a past period's reservation
        fresh = await state.reserve(k, 5.0, capacity=5.0, period_s=DAY)
        assert fresh.granted and fresh.spent == pytest.approx(5.0)

    async def test_reserve_is_idempotent_per_id(self, state: SharedState) -> None:
        k = StateKey("t:acme", "dp.eps", ("acme",))
        a = await state.reserve(k, 1.0, capacity=2.0, period_s=DAY, reservation_id="req-1")
        b = await state.reserve(k, 1.0, capacity=2.0, period_s=DAY, reservation_id="req-1")
        assert a.granted and b.granted and b.spent == pytest.approx(1.0)
        assert b.reservation == a.reservation

    async def test_float_charges_fit_exactly(self, state: SharedState) -> None:
        k = StateKey("t:acme", "dp.eps", ("acme",))
        grants = [await state.reserve(k, 0.1, capacity=1.0, period_s=DAY) for _ in range(11)]
        assert sum(g.granted for g in grants) == 10


class TestDocuments:
    async def test_compare_and_set(self, state: SharedState) -> None:
        k = StateKey("g:flags", "flags", ())
        assert await state.get_document(k) is None
        assert await state.put_document(k, b"v1", expected_version=None) == 1
        with pytest.raises(DocumentConflict) as err:
            await state.put_document(k, b"other", expected_version=None)
        assert err.value.current == 1
        assert await state.put_document(k, b"v2", expected_version=1) == 2
        with pytest.raises(DocumentConflict):
            await state.put_document(k, b"v3", expected_version=1)
        doc = await state.get_document(k)
        assert doc is not None and (doc.version, doc.value) == (2, b"v2")


class TestKeys:
    async def test_principals_never_collide(self, state: SharedState) -> None:
        """RL-09: sub "a:b" in tenant "x" and sub "b" in tenant "x:a" are two principals."""
        one = RateCheck(StateKey("t:x", "rl.s", ("x", "a:b")), rate=1, period_s=60, burst=1)
        two = RateCheck(StateKey("t:x:a", "rl.s", ("x:a", "b")), rate=1, period_s=60, burst=1)
        assert (await state.run_limits([one]))[0].allowed
        assert (await state.run_limits([two]))[0].allowed
        assert encode_key("ig", one.key) != encode_key("ig", two.key)

    @pytest.mark.parametrize("subject", ["*", "a\r\nFLUSHALL\r\n", "x" * 10_000, "nul\x00byte", "{tag}", "\ud800",
                                         "ünï©ødé"])
    async def test_hostile_subjects_are_just_keys(self, state: SharedState, subject: str) -> None:
        check = RateCheck(StateKey("t:acme", "rl.s", ("acme", subject)), rate=1, period_s=60, burst=1)
        assert (await state.run_limits([check]))[0].allowed
        assert not (await state.run_limits([check]))[0].allowed

    def test_kind_is_validated(self) -> None:
        with pytest.raises(ValueError, match="kind"):
            StateKey("t:a", "rl x{", ())

    async def test_wrong_structure_under_one_key_is_a_backend_error(self, state: SharedState) -> None:
        k = StateKey("t:acme", "mixed", ())
        await state.run_limits([RateCheck(k, rate=1, period_s=60, burst=5)])
        with pytest.raises(StateUnavailable):
            await state.run_limits([QuotaCheck(k, limit=5, period_s=60)])


async def _script(store: SharedState, clock: Clock, seed: int) -> list[tuple[object, ...]]:
    rng = random.Random(seed)
    leases: list[Lease] = []
    checks: list[LimitCheck] = [
        RateCheck(key(kind="r1"), rate=5, period_s=60, burst=3),
        RateCheck(key(kind="r2"), rate=7.5, period_s=60, burst=4, cost=2),
        RateCheck(key(kind="r3"), rate=1000, period_s=3600, burst=250, cost=37),
        QuotaCheck(key(kind="q1"), limit=6, period_s=60),
        ConcurrencyCheck(key(kind="c1"), limit=3, lease_ttl_s=20),
    ]
    out: list[tuple[object, ...]] = []
    for _ in range(400):
        op = rng.random()
        if op < 0.1 and leases:
            await store.release([leases.pop(rng.randrange(len(leases)))])
            out.append(("release",))
        else:
            chosen = rng.sample(checks, rng.randint(1, 3))
            decisions = await store.run_limits(chosen)
            leases.extend(d.lease for d in decisions if d.lease is not None)
            out.append(tuple(brief(d) for d in decisions))
        clock.advance(rng.choice([0, 0, 0.05, 0.5, 3, 11]))
    return out


async def test_memory_and_redis_decide_identically(redis_server: RedisServer) -> None:
    """A random mix of 400 operations under one clock script: the same decisions, bit for bit."""
    results = []
    for kind in ("memory", "redis"):
        clock = Clock()
        store = await _make(kind, redis_server, clock)
        try:
            results.append(await _script(store, clock, seed=14))
        finally:
            await store.close()
    assert results[0] == results[1]


class TestRedisOnly:
    async def test_time_comes_from_the_server(self, redis_server: RedisServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
        """Without an injected clock the scripts read TIME: a replica's wrong clock changes nothing."""
        store = RedisState.from_url(redis_server.url, key_prefix=f"t{secrets.token_hex(4)}")
        monkeypatch.setattr(time, "time", lambda: 0.0)
        try:
            decision = (await store.run_limits([QuotaCheck(key(kind="q"), limit=5, period_s=DAY)]))[0]
            server_now = float(redis_server.cli("TIME").split()[0])
            assert decision.reset_s == pytest.approx(DAY - server_now % DAY, abs=2)
        finally:
            await store.close()

    async def test_scripts_are_loaded_once_and_reloaded_after_a_flush(self, redis_server: RedisServer) -> None:
        store = RedisState.from_url(redis_server.url, key_prefix=f"t{secrets.token_hex(4)}")
        try:
            await store.start()
            shas = [s.sha for s in SCRIPTS]
            assert redis_server.cli("SCRIPT", "EXISTS", *shas).split() == ["1"] * len(shas)
            redis_server.cli("SCRIPT", "FLUSH")
            check = RateCheck(key(), rate=1, period_s=60, burst=2)
            assert (await store.run_limits([check]))[0].remaining == 1  # NOSCRIPT -> EVAL
            assert (await store.run_limits([check]))[0].remaining == 0  # cached again: EVALSHA
        finally:
            await store.close()

    async def test_every_limit_key_expires_and_names_no_user(self, redis_server: RedisServer, clock: Clock) -> None:
        """RL-10: counter and TTL are written by one script; no key lives forever or shows a subject."""
        prefix = f"t{secrets.token_hex(4)}"
        store = RedisState.from_url(redis_server.url, clock=clock, key_prefix=prefix)
        try:
            subject = "alice@example.com"
            await store.run_limits([
                RateCheck(StateKey("t:acme", "rl.s", ("acme", subject)), rate=1, period_s=1, burst=1),
                QuotaCheck(StateKey("t:acme", "q.d", ("acme", subject)), limit=9, period_s=DAY),
                ConcurrencyCheck(StateKey("t:acme", "c", ("acme",)), limit=9, lease_ttl_s=60),
            ])
            await store.reserve(StateKey("t:acme", "dp", ("acme",)), 1.0, capacity=2.0, period_s=DAY)
            names = redis_server.cli("--scan", "--pattern", f"{prefix}:*").split()
            assert len(names) == 4
            for name in names:
                assert subject not in name and "acme" not in name
                assert 0 < int(redis_server.cli("PTTL", name)) <= (DAY + 60) * 1000
        finally:
            await store.close()

    def test_one_group_is_one_cluster_slot(self) -> None:
        keys = [encode_key("ig", StateKey("t:acme", kind, parts))
                for kind, parts in (("rl.a", ("acme",)), ("rl.b", ("acme", "u1")), ("q", ("acme", "x" * 500)))]
        tags = {k[k.index("{"):k.index("}") + 1] for k in keys}
        assert len(tags) == 1

    def test_open_state_picks_the_backend(self, redis_server: RedisServer) -> None:
        assert open_state(None).backend == "memory"
        assert open_state("memory://").backend == "memory"
        assert open_state(redis_server.url).backend == "redis"


async def test_memory_state_stays_bounded() -> None:
    """An address-spraying flood cannot grow the in-process store without bound; budgets stay."""
    clock = Clock()
    store = MemoryState(clock=clock, max_entries=1000)
    budget = StateKey("t:acme", "dp", ())
    await store.reserve(budget, 1.0, capacity=1.0, period_s=DAY)
    for i in range(5000):
        await store.run_limits([RateCheck(StateKey(f"a:{i}", "pre", (str(i),)), rate=1, period_s=60, burst=1)])
    assert len(store) <= 1000
    assert not (await store.reserve(budget, 1.0, capacity=1.0, period_s=DAY)).granted
    clock.advance(61)
    for _ in range(200):
        await store.get_document(StateKey("g", "d", ()))
    assert len(store) == 1  # every limit entry expired and was swept; the budget stays

