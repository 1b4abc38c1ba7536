"""DP budget state lost or rolled back on a real redis-server (catalogue DP-08 variants).

DP-08's FLUSHALL loses the epoch marker with the budgets; these are the losses that keep
the marker: one account's key deleted (``DEL``/``UNLINK``), expired by an ``EXPIRE`` put on
it, evicted (a ``maxmemory-policy`` other than ``noeviction``), or restored from an older
snapshot (``RESTORE`` of an earlier ``DUMP``: what a restart from an old RDB/AOF or a
failover to a lagging replica does to it), and a server clock gone back a period. Each
must fail closed (:class:`LedgerUnavailable`, the stage's 503) instead of granting the
account a fresh budget, while legitimate refunds by another replica (spend goes *down*)
must not trip it. See ``gateway/state/dp_ledger.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from structlog.testing import capture_logs

from gateway.state.dp_ledger import StateBudgetLedger
from gateway.state.redis import RedisState, eviction_policy_of
from privacy.dp.accounting import RDP_ORDERS, RdpAccountant
from privacy.dp.ledger import LedgerUnavailable, Period, PeriodScheme, Refused, Reservation
from tests.support.dp_stage import MIDNIGHT, T0, Clock, spend_once
from tests.support.redis_server import RedisServer

KEY = "alpha/tab_dp"
EPS, BUDGET = 0.5, 5.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def stores(redis_server: RedisServer, clock: Clock) -> AsyncIterator[list[RedisState]]:
    """Two clients of one server (two replicas); a key prefix of their own per test."""
    prefix = f"t{secrets.token_hex(4)}"
    made = [RedisState.from_url(redis_server.url, clock=clock, key_prefix=prefix, op_timeout_s=5.0)
            for _ in range(2)]
    yield made
    for store in made:
        await store.close()


def period_at(clock: Clock) -> Period:
    return PeriodScheme().at(clock())


async def spend(ledger: StateBudgetLedger, clock: Clock, n: int, key: str = KEY) -> list[str]:
    """n one-query requests; what each got: ok (answered and committed), 429, 503."""
    return [await spend_once(ledger, key, period_at(clock), (EPS,), (BUDGET,)) for _ in range(n)]


def account_key(store: RedisState, key: str = KEY) -> str:
    return store.key(StateBudgetLedger._key(key))


Loss = Callable[[RedisServer, str], Awaitable[None]]


async def _delete(server: RedisServer, key: str) -> None:
    assert server.cli("DEL", key) == "1"


async def _unlink(server: RedisServer, key: str) -> None:
    assert server.cli("UNLINK", key) == "1"


async def _expire(server: RedisServer, key: str) -> None:
    assert server.cli("EXPIRE", key, "0") == "1"  # an EXPIRE in the past deletes at once


@pytest.mark.parametrize("loss", [_delete, _unlink, _expire], ids=["DEL", "UNLINK", "EXPIRE"])
async def test_one_account_lost_fails_closed(loss: Loss, redis_server: RedisServer, stores: list[RedisState],
                                             clock: Clock) -> None:
    """The marker survives, the exhausted account does not: no fresh budget, every account refused."""
    ledger = StateBudgetLedger(stores[0])
    assert await spend(ledger, clock, 11) == ["ok"] * 10 + ["429"]
    await loss(redis_server, account_key(stores[0]))
    with capture_logs() as logs:
        assert await spend(ledger, clock, 3) == ["503"] * 3
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["dp_budget_state_lost"]
    # Latched: the store is no longer trusted for any account (an operator restarts the gateway).
    assert await spend(ledger, clock, 1, key="beta/tab_dp") == ["503"]
    with pytest.raises(LedgerUnavailable):
        await ledger.usage(KEY, period_at(clock), 1)


async def test_older_snapshot_of_one_account_fails_closed(redis_server: RedisServer, stores: list[RedisState],
                                                          clock: Clock) -> None:
    """A restore from an earlier snapshot (spend and counter both older; marker unchanged):
    the replica that saw the later state refuses instead of re-granting the lost queries."""
    a, b = StateBudgetLedger(stores[0]), StateBudgetLedger(stores[1])
    key = account_key(stores[0])
    assert await spend(a, clock, 4) == ["ok"] * 4
    snapshot = await stores[0]._client.dump(key)
    assert await spend(b, clock, 6) == ["ok"] * 6  # another replica spends the rest
    assert await spend(a, clock, 1) == ["429"]  # a has now seen the full account
    await stores[0]._client.restore(key, 0, snapshot, replace=True)
    assert await spend(a, clock, 2) == ["503", "503"]


async def test_refunds_by_another_replica_do_not_trip_the_check(stores: list[RedisState], clock: Clock) -> None:
    """Spend going down is legitimate (a refund); only the reservation counter going back is loss."""
    a, b = StateBudgetLedger(stores[0]), StateBudgetLedger(stores[1])
    assert await spend(a, clock, 3) == ["ok"] * 3
    held = [await b.reserve(KEY, period_at(clock), (EPS,), (BUDGET,)) for _ in range(7)]
    assert all(isinstance(r, Reservation) for r in held)
    assert isinstance(await a.reserve(KEY, period_at(clock), (EPS,), (BUDGET,)), Refused)
    for reservation in held:
        assert isinstance(reservation, Reservation)
        await b.refund(reservation)
    assert await a.usage(KEY, period_at(clock), 1) == (3 * EPS,)
    assert await spend(a, clock, 8) == ["ok"] * 7 + ["429"]


async def test_a_new_period_is_fresh_but_a_period_back_is_refused(stores: list[RedisState], clock: Clock) -> None:
    """DP-05: the budget resets at the boundary, not before; a server clock that goes back
    a period afterwards must not re-open the earlier day's budget."""
    ledger = StateBudgetLedger(stores[0])
    clock.t = MIDNIGHT - 1
    assert await spend(ledger, clock, 11) == ["ok"] * 10 + ["429"]
    clock.t = MIDNIGHT - 0.001
    assert await spend(ledger, clock, 1) == ["429"]  # not one millisecond early
    clock.t = MIDNIGHT
    assert await spend(ledger, clock, 1) == ["ok"]
    clock.t = MIDNIGHT - 1  # the server's clock steps back over the boundary
    assert await spend(ledger, clock, 1) == ["503"]


async def test_the_server_clock_decides_the_period_not_the_gateway(redis_server: RedisServer) -> None:
    """A gateway clock skewed by a day (the Period it passes) opens no other period: the spend
    lands in the account of the server's period and the exhausted account stays exhausted."""
    store = RedisState.from_url(redis_server.url, key_prefix=f"t{secrets.token_hex(4)}", op_timeout_s=5.0)
    try:
        ledger = StateBudgetLedger(store)  # no injected clock: Redis TIME
        now = PeriodScheme().at(T0 + 365 * 86400.0)  # any gateway-side period of the same length
        for skew in (0.0, 3600.0, -3600.0, 86400.0):
            period = PeriodScheme().at(now.start_s + skew)
            for _ in range(10 if skew == 0.0 else 1):
                result = await ledger.reserve(KEY, period, (EPS,), (BUDGET,))
                if skew == 0.0:
                    assert isinstance(result, Reservation)
                    await ledger.commit(result)
                else:
                    assert isinstance(result, Refused), skew
    finally:
        await store.close()


async def test_vector_account_lost_fails_closed(redis_server: RedisServer, stores: list[RedisState],
                                                clock: Clock) -> None:
    """The RDP (Gaussian) path keeps the same counter in the same hash."""
    accountant = RdpAccountant(rho_per_row=0.5, budget_epsilon=1e6, budget_delta=1e-5)
    ledger = StateBudgetLedger(stores[0])
    for _ in range(3):
        result = await ledger.reserve(KEY, period_at(clock), accountant.charge(1), accountant.limit())
        assert isinstance(result, Reservation)
        await ledger.commit(result)
    assert redis_server.cli("DEL", account_key(stores[0])) == "1"
    with pytest.raises(LedgerUnavailable):
        await ledger.usage(KEY, period_at(clock), len(RDP_ORDERS))
    with pytest.raises(LedgerUnavailable):
        await ledger.reserve(KEY, period_at(clock), accountant.charge(1), accountant.limit())


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-lru", "volatile-ttl", "allkeys-random"])
async def test_an_evicting_server_is_refused(policy: str, redis_server: RedisServer, stores: list[RedisState],
                                             clock: Clock) -> None:
    """Budget keys carry a TTL, so even ``volatile-*`` policies can evict them: refuse (503)."""
    redis_server.cli("CONFIG", "SET", "maxmemory-policy", policy)
    try:
        ledger = StateBudgetLedger(stores[0])
        with capture_logs() as logs:
            assert await spend(ledger, clock, 1) == ["503"]
        assert any(e["event"] == "dp_eviction_policy_unsafe" and e["policy"] == policy for e in logs)
    finally:
        redis_server.cli("CONFIG", "SET", "maxmemory-policy", "noeviction")
    assert await spend(StateBudgetLedger(stores[0]), clock, 1) == ["ok"]


async def test_config_forbidden_warns_and_serves(redis_server: RedisServer, clock: Clock) -> None:
    """Managed Redis refuses ``CONFIG``: the policy is unknown, a warning says so, budgets work."""
    user, password = f"dp{secrets.token_hex(3)}", secrets.token_hex(8)
    assert redis_server.cli("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all", "-config") == "OK"
    store = RedisState.from_url(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/0", clock=clock,
                                key_prefix=f"t{secrets.token_hex(4)}", op_timeout_s=5.0)
    try:
        with capture_logs() as logs:
            assert await spend(StateBudgetLedger(store), clock, 11) == ["ok"] * 10 + ["429"]
    finally:
        await store.close()
        redis_server.cli("ACL", "DELUSER", user)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["dp_eviction_policy_unknown"]


@pytest.mark.parametrize(("reply", "policy"), [
    ({"maxmemory-policy": "noeviction"}, "noeviction"),
    ({b"maxmemory-policy": b"allkeys-lru"}, "allkeys-lru"),
    ({"127.0.0.1:7000": {"maxmemory-policy": "noeviction"}, "127.0.0.1:7001": {"maxmemory-policy": "volatile-lru"}},
     "volatile-lru"),
    ({"127.0.0.1:7000": {"maxmemory-policy": "noeviction"}, "127.0.0.1:7001": {}}, None),
    ({}, None),
    (None, None),
])
def test_eviction_policy_of_a_cluster_is_the_worst_master(reply: object, policy: str | None) -> None:
    """On a cluster every master is read: one evicting master is reported, one unreadable is unknown."""
    assert eviction_policy_of(reply) == policy


async def test_replies_answered_out_of_order_are_no_loss(redis_server: RedisServer, stores: list[RedisState],
                                                         clock: Clock) -> None:
    """Concurrent calls on a pool of connections are answered in any order: a reply whose
    counter is below one read meanwhile comes from a script Redis ran earlier, not from a
    lost account. Only what was seen before a call was sent may judge its reply (the old
    rule latched 503 for every DP account on such a reorder)."""
    import asyncio

    store = stores[0]
    ledger = StateBudgetLedger(store)
    assert await spend(ledger, clock, 1) == ["ok"]  # armed, counter seen
    real = store.reserve
    first_ran, released = asyncio.Event(), asyncio.Event()
    calls = 0

    async def reordered(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:  # Redis runs this script first, its reply is read last
            answer = await real(*args, **kwargs)  # type: ignore[arg-type]
            first_ran.set()
            await released.wait()
            return answer
        await first_ran.wait()
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    store.reserve = reordered  # type: ignore[method-assign]
    try:
        tasks = [asyncio.ensure_future(ledger.reserve(KEY, period_at(clock), (EPS,), (BUDGET,))) for _ in range(2)]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and isinstance(next(iter(done)).result(), Reservation)  # the later script
        released.set()
        results = await asyncio.gather(*tasks)
    finally:
        store.reserve = real  # type: ignore[method-assign]
    assert calls == 2 and all(isinstance(r, Reservation) for r in results)
    assert await spend(ledger, clock, 1) == ["ok"]  # not latched
    # A real loss is still caught after the reorder.
    assert redis_server.cli("DEL", account_key(store)) == "1"
    assert await spend(ledger, clock, 1) == ["503"]
