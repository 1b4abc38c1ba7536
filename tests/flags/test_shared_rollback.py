"""Automatic rollbacks shared by replicas through a real redis-server.

One replica trips, every replica serves stable; an edit of the flag clears it on all; a
store that cannot answer holds the flag on stable (fail closed) until it answers again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import structlog
from aiohttp.test_utils import BaseTestServer

from gateway.app import SERVICE_KEY, build_app
from gateway.audit import iter_records
from gateway.flags.rollback import (
    HELD_ROLLED_BACK,
    HELD_UNAVAILABLE,
    CallOutcome,
    RollbackTracker,
    RollbackTrip,
    Thresholds,
)
from gateway.flags.shared import UNREADABLE, StateRollbackStore
from gateway.settings import Settings
from gateway.state.redis import RedisState
from tests.conftest import DIGITS_BODY, Client, GatewayTestServer
from tests.support.redis_server import RedisServer

FAIL = CallOutcome(error=True, latency_s=0.01)
TH = Thresholds(window_s=60, min_requests=5, max_error_rate=0.1)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer.start(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
async def states(redis: RedisServer) -> AsyncIterator[list[RedisState]]:
    opened = [RedisState.from_url(redis.url, breaker_cooldown_s=0.05) for _ in range(3)]
    yield opened
    for state in opened:
        await state.close()


def replica(state: RedisState) -> tuple[RollbackTracker, list[RollbackTrip]]:
    trips: list[RollbackTrip] = []
    return RollbackTracker(on_trip=trips.append, store=StateRollbackStore(state), store_refresh_s=0.0), trips


async def trip(tracker: RollbackTracker, definition: str = "h1") -> RollbackTrip:
    result = None
    for _ in range(TH.min_requests):
        result = result or tracker.record("f", definition, "canary", "stable", TH, FAIL, revision="r1")
    assert result is not None
    await tracker.publish(result)
    return result


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a condition that depends on Redis's breaker re-probing (not a timed assertion)."""
    for _ in range(400):
        if await check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


class TestSharedTrips:
    async def test_one_replica_trips_every_replica_holds(self, states: list[RedisState]) -> None:
        a, a_trips = replica(states[0])
        b, b_trips = replica(states[1])
        for tracker in (a, b):
            await tracker.refresh("f", "h1")
            assert tracker.held("f", "h1") is None
        tripped = await trip(a)
        assert a.held("f", "h1") == HELD_ROLLED_BACK and a_trips == [tripped]
        await b.refresh("f", "h1")
        assert b.held("f", "h1") == HELD_ROLLED_BACK
        shared = b.override("f", "h1")
        assert shared is not None and shared.reason == tripped.reason and shared.from_variant == "canary"
        assert b_trips == []  # the audit record and metric belong to the replica that tripped

        # a replica started later (or restarted) reads it on its first call
        c, _ = replica(states[2])
        await c.refresh("f", "h1")
        assert c.held("f", "h1") == HELD_ROLLED_BACK

    async def test_editing_the_flag_clears_it_on_every_replica(self, states: list[RedisState]) -> None:
        a, _ = replica(states[0])
        b, _ = replica(states[1])
        for tracker in (a, b):
            tracker.observe_definition("f", "h1", 1)
            await tracker.refresh("f", "h1")
        await trip(a)
        await b.refresh("f", "h1")
        assert (a.held("f", "h1"), b.held("f", "h1")) == (HELD_ROLLED_BACK, HELD_ROLLED_BACK)
        for tracker in (a, b):  # a person edits the flag: a new definition in a newer revision
            tracker.observe_definition("f", "h2", 2)
            await tracker.refresh("f", "h2")
            assert tracker.held("f", "h2") is None

    async def test_the_first_trip_stands(self, states: list[RedisState]) -> None:
        a, _ = replica(states[0])
        b, _ = replica(states[1])
        first = await trip(a)
        await trip(b)  # b tripped on its own traffic before it read a's trip
        stored = await StateRollbackStore(states[2]).load("f", "h1")
        assert stored is not None and stored.at == first.at

    async def test_an_unreadable_document_still_holds_stable(self, states: list[RedisState]) -> None:
        await states[0].put_document(StateRollbackStore.key("f", "h1"), b"\xffnot json", expected_version=None)
        b, _ = replica(states[1])
        await b.refresh("f", "h1")
        assert b.held("f", "h1") == HELD_ROLLED_BACK
        held = b.override("f", "h1")
        assert held is not None and held.reason == UNREADABLE
        forged = json.dumps({"flag": "other", "definition_hash": "h9"}).encode()
        await states[0].put_document(StateRollbackStore.key("f", "h2"), forged, expected_version=None)
        trip_h2 = await StateRollbackStore(states[1]).load("f", "h2")
        assert trip_h2 is not None and trip_h2.reason == UNREADABLE


class TestStoreDown:
    async def test_unreachable_store_holds_stable_then_recovers(self, redis: RedisServer,
                                                                states: list[RedisState]) -> None:
        a, _ = replica(states[0])
        b, _ = replica(states[1])
        await b.refresh("f", "h1")
        assert b.held("f", "h1") is None
        redis.pause()
        try:
            with structlog.testing.capture_logs() as logs:
                await b.refresh("f", "h1")
                # SECURITY: fail closed: b cannot confirm nobody rolled the canary back
                assert b.held("f", "h1") == HELD_UNAVAILABLE
                tripped = await trip(a)  # a trips during the outage: held locally, not published
                assert a.held("f", "h1") == HELD_ROLLED_BACK
            events = {entry["event"] for entry in logs}
            assert "canary_rollback_store_unavailable" in events
        finally:
            redis.resume()

        async def published() -> bool:
            await a.refresh("f", "h1")  # a's next call publishes what it could not
            return await StateRollbackStore(states[2]).load("f", "h1") is not None

        await until(published, "the trip made during the outage is published")

        async def adopted() -> bool:
            await b.refresh("f", "h1")
            return b.held("f", "h1") == HELD_ROLLED_BACK

        await until(adopted, "b adopts the trip once Redis answers")
        shared = b.override("f", "h1")
        assert shared is not None and shared.at == tripped.at

    async def test_without_a_store_nothing_is_held_for_want_of_one(self) -> None:
        tracker = RollbackTracker()
        await tracker.refresh("f", "h1")
        assert tracker.held("f", "h1") is None


# -- two whole gateways sharing one Redis --------------------------------------------------------


def _policies(policy_dir: Path, *, edit: str = "") -> None:
    flags = json.loads((policy_dir / "flags.json").read_text())
    flag = flags["flags"]["digits-version"]
    flag["targeting"] = {"fractional": [["stable", 0], ["canary", 100]]}
    # Every call is "slow" against a 1 µs p99 limit: a deterministic breach after 3 calls.
    flag["metadata"].update({"rollback.min_requests": 3, "rollback.max_p99_ms": 0.001,
                             "description": f"canary under test {edit}"})
    (policy_dir / "flags.json").write_text(json.dumps(flags))


async def _gateway(settings: Settings, name: str, redis: RedisServer, repo: Path,
                   aiohttp_client: Callable[..., Awaitable[Client]]) -> Client:
    replica_settings = Settings(policies=settings.policies, backend=f"local:{repo}", redis_url=redis.url,
                                audit_dir=settings.audit_dir.parent / f"audit-{name}", state_dir=settings.state_dir,
                                dev=True, policy_poll_s=3600)
    app = build_app(replica_settings)
    # A replica looks at the shared trips on every routed call (default: every 5 s).
    app[SERVICE_KEY].store.env.flags_runtime.tracker.store_refresh_s = 0.0
    server: BaseTestServer = GatewayTestServer(app)
    return await aiohttp_client(server)


async def test_two_gateways_share_a_rollback(settings: Settings, policy_dir: Path, redis: RedisServer,
                                             two_version_repo: Path, token: Callable[..., str],
                                             aiohttp_client: Callable[..., Awaitable[Client]]) -> None:
    _policies(policy_dir)
    (policy_dir / "limits.yaml").write_text(
        (policy_dir / "limits.yaml").read_text().replace("on_backend_error: deny", "on_backend_error: local"))
    a = await _gateway(settings, "a", redis, two_version_repo, aiohttp_client)
    b = await _gateway(settings, "b", redis, two_version_repo, aiohttp_client)
    headers = {"Authorization": f"Bearer {token()}"}

    async def served(gw: Client) -> tuple[str, str]:
        resp = await gw.post("/v2/models/digits/infer", json=DIGITS_BODY, headers=headers)
        assert resp.status == 200, await resp.text()
        return resp.headers["X-Model-Variant"], (await resp.json())["model_version"]

    def last_reason(name: str) -> str:
        records = [r for r in iter_records(settings.audit_dir.parent / f"audit-{name}") if "request_id" in r]
        return str(records[-1]["variant_reason"])

    assert await served(b) == ("canary", "2")
    for _ in range(3):
        assert await served(a) == ("canary", "2")
    assert await served(a) == ("stable", "1")  # a tripped on its own traffic
    assert await served(b) == ("stable", "1")  # and b follows, without a single slow call of its own
    assert (last_reason("a"), last_reason("b")) == (HELD_ROLLED_BACK, HELD_ROLLED_BACK)
    b_metrics = await (await b.get("/metrics")).text()
    a_metrics = await (await a.get("/metrics")).text()
    assert 'gateway_canary_rollbacks_total{flag="digits-version"} 1.0' in a_metrics
    assert 'gateway_canary_rollbacks_total{flag="digits-version"}' not in b_metrics  # one record: a's

    _policies(policy_dir, edit="(edited)")  # a person edits the flag
    for gw in (a, b):
        assert await gw.app[SERVICE_KEY].store.reload("test")
        assert await served(gw) == ("canary", "2")

    redis.pause()
    try:
        with structlog.testing.capture_logs() as logs:
            assert await served(b) == ("stable", "1")  # fail closed while Redis cannot answer
        assert last_reason("b") == HELD_UNAVAILABLE
        assert any(e["event"] == "canary_rollback_store_unavailable" for e in logs)
        metrics = await (await b.get("/metrics")).text()
        assert 'gateway_flag_evaluation_errors_total{flag="digits-version"}' in metrics
    finally:
        redis.resume()
