"""The same state layer on Redis Cluster (3 masters + 3 replicas) and behind Sentinel.

The cluster is made in the fixture from Debian's ``redis-server`` with
``redis-cli --cluster create`` on loopback ports. The failover cases kill a master with
SIGKILL while requests are in flight and require: every failure is ``StateUnavailable``
within the op timeout, the slots of the dead master are served again by its promoted
replica through the *same* client (MOVED/refresh handled by redis-py), and the counts
carried over.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from gateway.stages.ratelimit import LimitExceeded, RateLimitPolicy, build_ratelimit_stage, finish_call
from gateway.state.base import ConcurrencyCheck, QuotaCheck, RateCheck, StateKey, StateUnavailable
from gateway.state.redis import DEFAULT_OP_TIMEOUT_S, RedisState
from tests.stages.test_ratelimit import ctx
from tests.support.liveness import eventually, no_hang
from tests.support.redis_server import RedisClusterProcess, RedisServer, available

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed")

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400
# A call's longest wait by design is the event-loop-lag cap, 10 x its 100 ms op timeout
# (gateway/state/redis.py); twice that is a hang on any machine, however busy.
CALL_HANG_S = 2 * 10 * DEFAULT_OP_TIMEOUT_S
# What a Sentinel failover takes here (down-after 300 ms, election, promotion): ~1.5 s; the
# hang bound is 10 x that (tests/support/liveness.py).
SENTINEL_FAILOVER_S = 1.5


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    c = RedisClusterProcess.start(tmp_path_factory.mktemp("redis-cluster"), masters=3, replicas=1)
    yield c
    c.stop()


@pytest.fixture
async def store(cluster: RedisClusterProcess) -> AsyncIterator[RedisState]:
    s = RedisState.from_url(cluster.url, key_prefix=f"c{secrets.token_hex(4)}")
    await s.start()
    yield s
    await s.close()


def quota(tenant: str, limit: int = 1_000_000) -> QuotaCheck:
    return QuotaCheck(StateKey(f"t:{tenant}", "q.load", (tenant,)), limit=limit, period_s=DAY)


class TestCluster:
    async def test_the_contract_holds_on_a_cluster(self, store: RedisState) -> None:
        assert store.backend == "cluster"
        tenant = RateCheck(StateKey("t:acme", "rl.t", ("acme",)), rate=1, period_s=60, burst=2)
        subject = RateCheck(StateKey("t:acme", "rl.s", ("acme", "alice")), rate=1, period_s=60, burst=1)
        slots = ConcurrencyCheck(StateKey("t:acme", "c", ("acme",)), limit=1, lease_ttl_s=30)
        first = await store.run_limits([tenant, subject, slots])
        assert all(d.allowed for d in first)
        assert [d.allowed for d in await store.run_limits([tenant, subject, slots])] == [True, False, False]
        assert first[2].lease is not None
        await store.release([first[2].lease])
        budget = await store.reserve(StateKey("t:acme", "dp"), 0.5, capacity=1.0, period_s=DAY)
        assert budget.granted and budget.reservation is not None
        assert await store.refund(budget.reservation)
        assert await store.put_document(StateKey("g:flags", "flags"), b"{}", expected_version=None) == 1
        await store.ping()

    async def test_a_tenant_is_one_slot_and_tenants_spread(self, store: RedisState,
                                                           cluster: RedisClusterProcess) -> None:
        node = cluster.any_node()
        slots = {node.cli("CLUSTER", "KEYSLOT", store.key(StateKey("t:acme", kind, parts)))
                 for kind, parts in (("rl.t", ("acme",)), ("rl.s", ("acme", "u1")), ("q", ("acme",)))}
        assert len(slots) == 1
        masters = {cluster.master_for_key(store.key(quota(f"tenant{i}").key)).port for i in range(30)}
        assert len(masters) == 3

    async def test_limits_spanning_slots_stay_all_or_nothing(self, store: RedisState) -> None:
        tenant = RateCheck(StateKey("t:acme", "rl.t", ("acme",)), rate=1, period_s=60, burst=100)
        model = RateCheck(StateKey("m:digits", "rl.m", ("digits",)), rate=1, period_s=60, burst=1)
        assert all(d.allowed for d in await store.run_limits([tenant, model]))
        assert [d.allowed for d in await store.run_limits([tenant, model])] == [True, False]
        await asyncio.sleep(0.05)  # the undo runs in the background
        assert (await store.run_limits([tenant]))[0].remaining == 98

    async def test_the_shipped_policy_on_a_cluster(self, store: RedisState) -> None:
        raw = yaml.safe_load((ROOT / "policies" / "limits.yaml").read_text())
        for rule in raw["limits"]:  # the shipped file with a tight per-subject rate
            if rule["name"] == "subject_rate":
                rule.update(rate=1, burst=10)
        policy = RateLimitPolicy.model_validate(raw)
        stage = build_ratelimit_stage(policy, store)
        for _ in range(10):
            c = ctx("bob", tenant="globex")
            await stage.on_call(c)
            await finish_call(c)
        with pytest.raises(LimitExceeded):
            await stage.on_call(ctx("bob", tenant="globex"))

    async def test_a_master_killed_mid_load_fails_over(self, store: RedisState,
                                                       cluster: RedisClusterProcess) -> None:
        """SIGKILL the master serving tenant0 while 8 workers load all three masters."""
        tenants = [f"tenant{i}" for i in range(30)]
        victim = cluster.master_for_key(store.key(quota("tenant0").key))
        heirs = cluster.replicas_of(victim)
        assert heirs
        on_victim = [t for t in tenants if cluster.master_for_key(store.key(quota(t).key)) is victim]
        log: list[tuple[float, str, str, float]] = []  # (when, tenant, outcome, latency)
        stop = asyncio.Event()

        async def worker(offset: int) -> None:
            i = offset
            while not stop.is_set():
                tenant = tenants[i % len(tenants)]
                i += 1
                start = time.perf_counter()
                try:
                    await store.run_limits([quota(tenant)])
                    outcome = "ok"
                except StateUnavailable as exc:  # anything else fails the test
                    outcome = exc.kind
                    await asyncio.sleep(0.01)
                log.append((time.perf_counter(), tenant, outcome, time.perf_counter() - start))

        stalls: list[tuple[float, float]] = []  # when this process itself did not run (busy 2-core VM)

        async def ticker() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                await asyncio.sleep(0.01)
                if time.perf_counter() - start > 0.06:
                    stalls.append((start, time.perf_counter()))

        def stalled(end: float, latency: float) -> bool:
            return any(a < end and end - latency < b for a, b in stalls)

        workers = [asyncio.ensure_future(worker(n * 7)) for n in range(8)] + [asyncio.ensure_future(ticker())]
        try:
            await asyncio.sleep(0.5)
            before = sum(1 for _, t, o, _ in log if t == "tenant0" and o == "ok")
            killed_at = time.perf_counter()
            victim.kill()
            promoted = await asyncio.to_thread(cluster.wait_failover, heirs)
            healed_at = time.perf_counter()
            await asyncio.sleep(1.0)
        finally:
            stop.set()
            await asyncio.gather(*workers)
        try:
            after = [entry for entry in log if entry[0] > healed_at + 0.5]
            unhealed = [(round(w - healed_at, 3), t, o) for w, t, o, lat in after if o != "ok" and not stalled(w, lat)]
            assert after and not unhealed, unhealed
            assert any(t in on_victim for _, t, _, _ in after)
            failures = [entry for entry in log if entry[2] != "ok"]
            assert failures, "the kill should have been noticed"
            early = [(round(w - killed_at, 3), t, o) for w, t, o, _ in failures if w < killed_at]
            assert not early, early  # a warmed-up client fails only once the master is gone
            hung = [(round(w - killed_at, 3), t, o, round(lat, 3)) for w, t, o, lat in log
                    if lat > CALL_HANG_S and not stalled(w, lat)]
            assert not hung, hung  # each call ended by its deadline, none waited for the failover
            # Tenants on the other masters kept being served during the failover.
            during = [e for e in log if killed_at < e[0] < healed_at and e[1] not in on_victim]
            assert sum(o == "ok" for _, _, o, _ in during) > len(during) // 2
            # Counts carried over to the promoted replica (replication is asynchronous: allow a few).
            count = int(promoted.cli("HGET", store.key(quota("tenant0").key), "n") or 0)
            total = sum(1 for _, t, o, _ in log if t == "tenant0" and o == "ok")
            assert before > 0 and total - 5 <= count <= total
        finally:
            victim.launch()  # it rejoins as a replica of its heir
            cluster.wait_healthy(timeout=20)


class TestSentinel:
    @pytest.fixture
    def sentinel_setup(self, tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, RedisServer]]:
        master = RedisServer.start(tmp_path / "master")
        replica = RedisServer.start(tmp_path / "replica", extra=("--replicaof", "127.0.0.1", str(master.port)))
        sentinel = RedisServer.start_sentinel(tmp_path / "sentinel", master.port, down_after_ms=300)
        try:
            yield master, replica, sentinel
        finally:
            for server in (sentinel, replica, master):
                server.kill()

    async def test_sentinel_finds_the_master_and_follows_a_failover(
            self, sentinel_setup: tuple[RedisServer, RedisServer, RedisServer]) -> None:
        master, replica, sentinel = sentinel_setup
        store = RedisState.from_url(f"redis+sentinel://127.0.0.1:{sentinel.port}/mymaster", breaker_threshold=0)
        try:
            assert store.backend == "sentinel"
            # The Sentinel must know the replica (it learns it from the master's INFO), and the
            # replica must be in sync before the write that has to survive.
            await eventually(lambda: str(replica.port) in sentinel.cli("SENTINEL", "REPLICAS", "mymaster")
                             and "master_link_status:up" in replica.cli("INFO", "replication"),
                             "the Sentinel knowing an in-sync replica", expected_s=SENTINEL_FAILOVER_S, poll_s=0.05)
            check = quota("acme")
            assert (await store.run_limits([check]))[0].remaining == 999_999
            # Replication is asynchronous (and WAIT was seen answering 1 right after a diskless
            # sync while the replica still lacked the write): wait until the replica has it.
            await eventually(lambda: "n" in replica.cli("HGETALL", store.key(check.key)).split(),
                             "the write reaching the replica", expected_s=SENTINEL_FAILOVER_S)
            master.kill()
            decision = None
            async with no_hang("a failover through Sentinel", expected_s=SENTINEL_FAILOVER_S):
                while decision is None:
                    try:
                        decision = (await store.run_limits([check]))[0]
                    except StateUnavailable:
                        await asyncio.sleep(0.05)
            assert decision.remaining == 999_998  # the count survived on the promoted replica
            assert "role:master" in replica.cli("INFO", "replication")
        finally:
            await store.close()
