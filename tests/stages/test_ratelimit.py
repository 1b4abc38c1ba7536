"""The rate_limit stage and the pre-authentication limiter, on a RequestContext.

Most cases use the in-memory store with an injected clock (no sleeps); the last class
repeats the essentials against a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from gateway.context import Action, Principal, RequestContext
from gateway.errors import DependencyUnavailable, PayloadTooLarge, RateLimited
from gateway.fronts.client_addr import TrustedProxies, client_address
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.observability.metrics import Metrics
from gateway.pipeline import BoundStage, Pipeline
from gateway.stages.base import Mode
from gateway.stages.ratelimit import (
    NOTE_KEY,
    LimitExceeded,
    RateLimiter,
    RateLimitPolicy,
    build_preauth_limiter,
    build_ratelimit_stage,
    check_references,
    finish_call,
    request_cost,
    response_headers,
)
from gateway.state.base import LimitDecision, StateUnavailable
from gateway.state.memory import MemoryState
from gateway.state.redis import RedisState
from tests.support.liveness import no_hang
from tests.support.redis_server import RedisServer, available

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_767_225_600 + 36_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Recorder:
    """A metrics hook that keeps every (limit, outcome)."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()

    def limit_decision(self, limit: str, outcome: str) -> None:
        self.seen[(limit, outcome)] += 1


class DownState(MemoryState):
    """A store that is always unavailable (Redis down), for the fail modes."""

    async def run_limits(self, checks: Any) -> list[LimitDecision]:
        raise StateUnavailable("limits", "timeout")

    async def release(self, leases: Any) -> None:
        raise StateUnavailable("release", "timeout")


def policy(limits: list[dict[str, Any]], **extra: Any) -> RateLimitPolicy:
    return RateLimitPolicy.model_validate({"limits": limits, **extra})


def ctx(sub: str = "alice", tenant: str = "acme", roles: tuple[str, ...] = ("analyst",), model: str | None = "digits",
        action: Action = Action.INFER) -> RequestContext:
    c = RequestContext(request_id=secrets.token_hex(4), revision="r", action=action, transport="test",
                       client_addr="127.0.0.1", model=model)
    c.principal = Principal(subject=sub, tenant=tenant, roles=frozenset(roles), issuer="test", credential_id="c")
    return c


def batch(rows: int, features: int = 64) -> InferRequest:
    data = np.zeros((rows, features), dtype=np.float32)
    return InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", (rows, features), data)])


async def admitted(stage: RateLimiter, c: RequestContext | None = None) -> bool:
    try:
        await stage.on_call(c or ctx())
    except RateLimited:
        return False
    return True


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def memory(clock: Clock) -> MemoryState:
    return MemoryState(clock=clock)


RATE = {"name": "subject_rate", "kind": "rate", "per": ["tenant", "subject"], "rate": 1, "burst": 3}


class TestPolicy:
    def test_the_shipped_limits_policy_loads(self) -> None:
        raw = yaml.safe_load((ROOT / "policies" / "limits.yaml").read_text())
        loaded = RateLimitPolicy.model_validate(raw)
        assert loaded.pre_auth is not None and loaded.pre_auth.rate > 0
        kinds = {rule.kind for rule in loaded.limits}
        assert kinds == {"rate", "quota", "concurrency", "cost"}
        assert check_references(loaded, tenants={"acme", "globex"}, roles={"analyst"}, models={"digits"}) == []
        assert build_ratelimit_stage(loaded, MemoryState()).name == "rate_limit"

    @pytest.mark.parametrize(
        ("limits", "message"),
        [
            ([{**RATE, "rat": 1}], "Extra inputs are not permitted"),  # a typo is an error, not a default
            ([{**RATE, "rate": "10"}], "Input should be a valid"),  # YAML strings are not numbers
            ([{**RATE, "per": ["subject"]}], "per: \\[tenant, subject\\]"),  # cross-tenant collision
            ([{**RATE, "per": ["tenant", "role"]}], "needs the roles"),  # unbounded keys from token roles
            ([RATE, RATE], "unique"),
            ([{"name": "c", "kind": "cost", "unit": "elements", "limit": 10, "actions": ["metadata"]}],
             "inference only"),
            ([{**RATE, "on_backend_error": "ignore"}], "Input should be"),
            ([{**RATE, "kind": "quota", "limit": 5, "period": "week"}], "Input should be"),
            ([{**RATE, "name": "Tenant Rate"}], "String should match"),
        ],
    )
    def test_invalid_policies_are_refused(self, limits: list[dict[str, Any]], message: str) -> None:
        with pytest.raises(ValidationError, match=message):
            policy(limits)

    def test_unknown_selector_names_are_reported(self) -> None:
        p = policy([{**RATE, "tenants": ["acmee"], "roles": ["analyts"], "models": ["digit"]}])
        issues = check_references(p, tenants={"acme"}, roles={"analyst"}, models={"digits"})
        assert len(issues) == 3 and "acmee" in issues[0]


class TestRequestRate:
    async def test_burst_then_429_with_headers(self, memory: MemoryState, clock: Clock) -> None:
        stage = build_ratelimit_stage(policy([RATE]), memory)
        c = ctx()
        await stage.on_call(c)
        assert response_headers(c) == {"RateLimit-Limit": "3", "RateLimit-Remaining": "2", "RateLimit-Reset": "1"}
        assert await admitted(stage) and await admitted(stage)
        with pytest.raises(LimitExceeded) as err:
            await stage.on_call(ctx())
        exc = err.value
        assert exc.http_status == 429 and exc.reason == "ratelimit_exceeded"
        assert exc.limit_name == "subject_rate"
        assert exc.retry_after_s == pytest.approx(1.0)
        assert exc.headers() == {"RateLimit-Limit": "3", "RateLimit-Remaining": "0", "RateLimit-Reset": "3",
                                 "Retry-After": "1"}
        assert "subject_rate" not in exc.client_message()
        clock.advance(1.0)
        assert await admitted(stage)

    async def test_principals_have_their_own_buckets(self, memory: MemoryState) -> None:
        """RL-04/RL-09: same (tenant, sub) shares one bucket, whatever the token; others do not."""
        stage = build_ratelimit_stage(policy([RATE]), memory)
        for _ in range(3):
            assert await admitted(stage, ctx("a:b", tenant="x"))
        assert not await admitted(stage, ctx("a:b", tenant="x"))
        assert await admitted(stage, ctx("b", tenant="x:a"))
        assert await admitted(stage, ctx("a:b", tenant="y"))
        assert await admitted(stage, ctx("bob", tenant="x"))

    async def test_every_applicable_limit_applies(self, memory: MemoryState) -> None:
        tenant = {"name": "tenant_rate", "kind": "rate", "per": ["tenant"], "rate": 1, "burst": 4}
        stage = build_ratelimit_stage(policy([RATE, tenant]), memory)
        results = [await admitted(stage, ctx(sub)) for sub in ("u1", "u2", "u3", "u4", "u5")]
        assert results == [True, True, True, True, False]  # the tenant bucket ran out first
        with pytest.raises(LimitExceeded) as err:
            await stage.on_call(ctx("u6"))
        assert err.value.limit_name == "tenant_rate"
        assert await admitted(stage, ctx("u1", tenant="globex"))

    @pytest.mark.parametrize(
        ("selectors", "call", "applies"),
        [
            ({"tenants": ["acme"]}, {}, True),
            ({"tenants": ["globex"]}, {}, False),
            ({"exclude_tenants": ["acme"]}, {}, False),
            ({"roles": ["admin"]}, {}, False),
            ({"roles": ["admin", "analyst"]}, {}, True),
            ({"models": ["risk"]}, {}, False),
            ({"models": ["digits"]}, {}, True),
            ({}, {"action": Action.METADATA}, False),  # default: inference only
            ({"actions": ["metadata"]}, {"action": Action.METADATA}, True),
            ({"per": ["model"], "actions": ["server"]}, {"model": None, "action": Action.SERVER}, False),
        ],
    )
    async def test_selectors(self, memory: MemoryState, selectors: dict[str, Any], call: dict[str, Any],
                             applies: bool) -> None:
        rule = {**RATE, "burst": 1, **selectors}
        stage = build_ratelimit_stage(policy([rule]), memory)
        await stage.on_call(ctx(**call))
        assert await admitted(stage, ctx(**call)) is not applies

    async def test_per_role_counts_each_matching_role(self, memory: MemoryState) -> None:
        rule = {"name": "role_rate", "kind": "rate", "per": ["tenant", "role"], "roles": ["analyst", "viewer"],
                "rate": 1, "burst": 2}
        stage = build_ratelimit_stage(policy([rule]), memory)
        assert await admitted(stage, ctx("u1", roles=("analyst", "viewer", "made-up")))
        assert await admitted(stage, ctx("u2", roles=("viewer",)))
        assert not await admitted(stage, ctx("u3", roles=("viewer",)))
        assert await admitted(stage, ctx("u4", roles=("analyst",)))
        assert await admitted(stage, ctx("u5", roles=("made-up",)))  # not a listed role: no bucket at all

    async def test_model_buckets_ignore_the_version(self, memory: MemoryState) -> None:
        """RL-05: one bucket per canonical model, whichever version path was used."""
        rule = {"name": "model_rate", "kind": "rate", "per": ["tenant", "model"], "rate": 1, "burst": 2}
        stage = build_ratelimit_stage(policy([rule]), memory)
        first, second = ctx(), ctx()
        second.version = "1"
        await stage.on_call(first)
        await stage.on_call(second)
        assert not await admitted(stage, ctx())
        assert await admitted(stage, ctx(model="risk"))


class TestQuotaAndConcurrency:
    async def test_daily_quota(self, memory: MemoryState, clock: Clock) -> None:
        rule = {"name": "daily", "kind": "quota", "per": ["tenant"], "limit": 2, "period": "day"}
        stage = build_ratelimit_stage(policy([rule]), memory)
        assert await admitted(stage) and await admitted(stage)
        with pytest.raises(LimitExceeded) as err:
            await stage.on_call(ctx())
        assert err.value.reason == "quota_exceeded"
        assert err.value.headers()["Retry-After"] == str(86_400 - 36_000)
        clock.advance(86_400 - 36_000)
        assert await admitted(stage)

    async def test_slots_come_back_when_the_call_finishes(self, memory: MemoryState) -> None:
        rule = {"name": "inflight", "kind": "concurrency", "per": ["tenant"], "limit": 2}
        stage = build_ratelimit_stage(policy([rule]), memory)
        first, second = ctx(), ctx()
        await stage.on_call(first)
        await stage.on_call(second)
        with pytest.raises(LimitExceeded) as err:
            await stage.on_call(ctx())
        assert err.value.reason == "concurrency_exceeded"
        assert err.value.headers()["Retry-After"] == "1"
        await finish_call(first)
        await finish_call(first)  # idempotent
        await finish_call(ctx())  # a call that took nothing
        assert await admitted(stage)

    async def test_a_slot_is_released_even_when_the_caller_is_cancelled(self, clock: Clock) -> None:
        class SlowRelease(MemoryState):
            async def release(self, leases: Any) -> None:
                await asyncio.sleep(0.01)
                await super().release(leases)

        rule = {"name": "inflight", "kind": "concurrency", "per": ["tenant"], "limit": 1}
        stage = build_ratelimit_stage(policy([rule]), SlowRelease(clock=clock))
        c = ctx()
        await stage.on_call(c)
        task = asyncio.ensure_future(finish_call(c))
        await asyncio.sleep(0)  # the release is under way...
        task.cancel()  # ...when the handler is cancelled (client gone, shutdown)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not await admitted(stage)
        await asyncio.sleep(0.05)
        assert await admitted(stage)

    async def test_a_slot_expires_if_nobody_releases_it(self, memory: MemoryState, clock: Clock) -> None:
        rule = {"name": "inflight", "kind": "concurrency", "per": ["tenant"], "limit": 1, "lease_ttl_s": 30}
        stage = build_ratelimit_stage(policy([rule]), memory)
        await stage.on_call(ctx())
        assert not await admitted(stage)
        clock.advance(30.001)
        assert await admitted(stage)

    async def test_a_refused_call_takes_no_slot(self, memory: MemoryState) -> None:
        rate = {**RATE, "burst": 1}
        slots = {"name": "inflight", "kind": "concurrency", "per": ["tenant"], "limit": 1}
        stage = build_ratelimit_stage(policy([rate, slots]), memory)
        first = ctx("u1")
        await stage.on_call(first)
        await finish_call(first)
        c = ctx("u1")
        assert not await admitted(stage, c)
        assert not c.notes.get(NOTE_KEY) or not c.notes[NOTE_KEY].leases
        assert await admitted(stage, ctx("u2"))


class TestCost:
    COST = {"name": "elements", "kind": "cost", "unit": "elements", "per": ["tenant"], "limit": 6400,
            "period_s": 60}

    async def test_a_batch_of_64_costs_64_rows(self, memory: MemoryState, clock: Clock) -> None:
        stage = build_ratelimit_stage(policy([self.COST]), memory)
        assert request_cost(batch(64), "elements") == 64 * request_cost(batch(1), "elements")
        await stage.on_request(ctx(), batch(64))  # 4096 of 6400
        big = ctx()
        with pytest.raises(LimitExceeded) as err:
            await stage.on_request(big, batch(64))
        assert err.value.reason == "cost_limit_exceeded"
        assert err.value.retry_after_s == pytest.approx((4096 * 2 - 6400) * 60 / 6400)
        for _ in range(36):  # while a batch of 1 still fits
            await stage.on_request(ctx(), batch(1))

    async def test_bytes_unit_counts_bytes_strings_too(self, memory: MemoryState) -> None:
        texts = np.array([b"x" * 100, b"y" * 28], dtype=object)
        req = InferRequest(model="text_echo", version="", inputs=[Tensor("text", "BYTES", (2,), texts)])
        assert request_cost(req, "bytes") == 128
        assert request_cost(batch(2, 4), "bytes") == 32

    async def test_one_request_above_the_burst_is_413_not_429(self, memory: MemoryState) -> None:
        """RL-06: a [4096, 4] batch is charged as 4096 rows, and if that can never fit: 413."""
        rule = {**self.COST, "limit": 1000}
        stage = build_ratelimit_stage(policy([rule]), memory)
        with pytest.raises(PayloadTooLarge) as err:
            await stage.on_request(ctx(), batch(4096, 4))
        assert err.value.http_status == 413
        await stage.on_request(ctx(), batch(250, 4))


class TestBackendFailure:
    async def test_fail_closed_by_default(self) -> None:
        metrics = Recorder()
        stage = build_ratelimit_stage(policy([RATE]), DownState(), metrics)
        with pytest.raises(DependencyUnavailable) as err:
            await stage.on_call(ctx())
        assert err.value.http_status == 503 and err.value.retry_after_s == 1.0
        assert err.value.reason == "ratelimit_backend_unavailable"
        assert metrics.seen[("subject_rate", "backend_denied")] == 1

    async def test_fail_open_notes_the_bypass(self) -> None:
        metrics = Recorder()
        stage = build_ratelimit_stage(policy([{**RATE, "on_backend_error": "allow"}]), DownState(), metrics)
        c = ctx()
        for _ in range(10):
            await stage.on_call(c)
        assert c.notes["rate_limit.failure_mode"] == "allowed"
        assert metrics.seen[("subject_rate", "backend_allowed")] == 10

    async def test_local_fallback_still_limits(self, clock: Clock) -> None:
        """RL-11: with Redis down a non-DP route gets this process's limiter, never unlimited."""
        metrics = Recorder()
        stage = build_ratelimit_stage(policy([{**RATE, "on_backend_error": "local"}]), DownState(), metrics,
                                      local_state=MemoryState(clock=clock))
        results = [await admitted(stage) for _ in range(5)]
        assert results == [True, True, True, False, False]
        assert metrics.seen[("subject_rate", "local_allowed")] == 3
        assert metrics.seen[("subject_rate", "local_limited")] == 2

    async def test_one_fail_closed_limit_closes_the_call(self) -> None:
        limits = [{**RATE, "on_backend_error": "allow"},
                  {"name": "daily", "kind": "quota", "per": ["tenant"], "limit": 9}]
        stage = build_ratelimit_stage(policy(limits), DownState())
        with pytest.raises(DependencyUnavailable):
            await stage.on_call(ctx())

    async def test_file_default_applies_to_limits_without_their_own(self) -> None:
        stage = build_ratelimit_stage(policy([RATE], on_backend_error="allow"), DownState())
        await stage.on_call(ctx())

    async def test_release_failure_is_not_an_error(self, clock: Clock) -> None:
        """The lease expires by itself; the answer is not spoilt by a failed release."""
        rule = {"name": "inflight", "kind": "concurrency", "per": ["tenant"], "limit": 1}
        memory = MemoryState(clock=clock)
        stage = build_ratelimit_stage(policy([rule]), memory)
        c = ctx()
        await stage.on_call(c)
        note = c.notes[NOTE_KEY]
        note.leases = [(DownState(), lease) for _, lease in note.leases]
        await finish_call(c)


class TestMetrics:
    async def test_outcomes_per_limit_name_and_no_user_ids(self, memory: MemoryState) -> None:
        metrics = Recorder()
        stage = build_ratelimit_stage(policy([RATE]), memory, metrics)
        for _ in range(5):
            await admitted(stage, ctx("alice@example.com"))
        assert metrics.seen == Counter({("subject_rate", "allowed"): 3, ("subject_rate", "limited"): 2})
        labels = {value for pair in metrics.seen for value in pair}
        assert not any("alice" in value or "acme" in value for value in labels)


class Hang:
    """An upstream that never answers, so the test can cancel the call as a disconnect would."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()

    async def __call__(self, c: RequestContext, req: InferRequest) -> InferResponse:
        self.reached.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_request_that_reached_the_upstream_counts_even_if_the_client_left(memory: MemoryState) -> None:
    rules = [{"name": "daily", "kind": "quota", "per": ["tenant"], "limit": 2},
             {"name": "inflight", "kind": "concurrency", "per": ["tenant"], "limit": 1},
             {**TestCost.COST, "limit": 4200}]
    stage = build_ratelimit_stage(policy(rules), memory)
    pipeline = Pipeline(revision="r", stages=(BoundStage(stage, Mode.ENFORCE),), metrics=Metrics())
    c = ctx()
    upstream = Hang()

    async def handler() -> None:
        try:
            await pipeline.admit(c)
            await pipeline.infer(c, batch(64), upstream)
        finally:
            await pipeline.complete(c, None)  # on_complete gives the slot back

    task = asyncio.ensure_future(handler())
    await upstream.reached.wait()
    task.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await task
    # The quota and the elements stay charged; the slot came back.
    with pytest.raises(LimitExceeded) as err:
        await stage.on_request(ctx(), batch(2))
    assert err.value.reason == "cost_limit_exceeded"
    second = ctx()
    await stage.on_call(second)  # the slot is free again: the cancelled call's on_complete released it
    await stage.on_complete(second, None)
    with pytest.raises(LimitExceeded) as quota:
        await stage.on_call(ctx())
    assert quota.value.reason == "quota_exceeded"  # the cancelled call's unit is still spent


class TestPreAuth:
    async def test_per_address_before_authentication(self, clock: Clock) -> None:
        p = policy([], pre_auth={"rate": 20, "burst": 20})
        limiter = build_preauth_limiter(p, MemoryState(clock=clock))
        assert limiter is not None
        proxies = TrustedProxies.parse(["10.0.0.0/8"])
        refused = 0
        for i in range(1, 201):  # RL-02: 200 requests from one socket, each claiming another XFF address
            addr = client_address("203.0.113.9", [f"198.51.100.{i}"], proxies)
            try:
                await limiter.admit(addr)
            except LimitExceeded as exc:
                refused += 1
                assert exc.reason == "preauth_rate_exceeded"
                assert exc.headers()["Retry-After"] == "1"
        assert refused == 180
        await limiter.admit("203.0.113.10")  # another address is unaffected
        clock.advance(1.0)
        await limiter.admit("203.0.113.9")

    async def test_an_ipv6_subscriber_is_one_client(self, clock: Clock) -> None:
        limiter = build_preauth_limiter(policy([], pre_auth={"rate": 1, "burst": 2}), MemoryState(clock=clock))
        assert limiter is not None
        await limiter.admit("2001:db8:1:2::1")
        await limiter.admit("2001:db8:1:2:ffff::2")
        with pytest.raises(LimitExceeded):
            await limiter.admit("2001:db8:1:2:abcd::3")
        await limiter.admit("2001:db8:1:3::1")

    async def test_store_down_falls_back_per_policy(self, clock: Clock) -> None:
        local = build_preauth_limiter(policy([], pre_auth={"rate": 1, "burst": 1, "on_backend_error": "local"}),
                                      DownState(), local_state=MemoryState(clock=clock))
        assert local is not None
        await local.admit("198.51.100.1")
        with pytest.raises(LimitExceeded):
            await local.admit("198.51.100.1")
        closed = build_preauth_limiter(policy([], pre_auth={"rate": 1}), DownState())
        assert closed is not None
        with pytest.raises(DependencyUnavailable):
            await closed.admit("198.51.100.1")

    def test_no_pre_auth_section_no_limiter(self) -> None:
        assert build_preauth_limiter(policy([]), MemoryState()) is None


pytestmark_redis = pytest.mark.skipif(not available(), reason="redis-server is not installed")


@pytest.fixture
async def redis_state(redis_server: RedisServer) -> AsyncIterator[RedisState]:
    store = RedisState.from_url(redis_server.url, key_prefix=f"s{secrets.token_hex(4)}")
    yield store
    await store.close()


@pytestmark_redis
class TestOnRedis:
    async def test_limits_headers_and_slots(self, redis_state: RedisState) -> None:
        slots = {"name": "inflight", "kind": "concurrency", "per": ["tenant"], "limit": 1}
        stage = build_ratelimit_stage(policy([{**RATE, "rate": 0.01}, slots]), redis_state)
        first = ctx()
        await stage.on_call(first)
        assert response_headers(first)["RateLimit-Remaining"] == "2"
        with pytest.raises(LimitExceeded) as err:
            await stage.on_call(ctx())
        assert err.value.reason == "concurrency_exceeded"
        await finish_call(first)
        await stage.on_call(ctx())

    async def test_redis_stopped_fails_closed_then_recovers(self, tmp_path: Path) -> None:
        server = RedisServer.start(tmp_path / "r")
        store = RedisState.from_url(server.url, breaker_threshold=0)
        try:
            stage = build_ratelimit_stage(policy([RATE]), store)
            await stage.on_call(ctx())
            server.stop()
            async with no_hang("a call with Redis stopped", expected_s=store.op_timeout_s):
                with pytest.raises(DependencyUnavailable) as err:
                    await stage.on_call(ctx())
            # Refused at connect (nothing listens), fail closed: no timeout had to run out.
            assert err.value.reason == "ratelimit_backend_unavailable"
            assert isinstance(err.value.__cause__, StateUnavailable) and err.value.__cause__.kind == "connection"
            server.launch()
            await stage.on_call(ctx("bob"))
        finally:
            await store.close()
            server.kill()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytestmark_redis)])
async def stepped_store(request: pytest.FixtureRequest, clock: Clock) -> AsyncIterator[Any]:
    """The same clock-step cases on both stores (Redis with the injected clock: its scripts
    run on ``ARGV[1]``, the time the server's ``TIME`` would give after an NTP step)."""
    if request.param == "memory":
        yield MemoryState(clock=clock)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    store = RedisState.from_url(server.url, key_prefix=f"s{secrets.token_hex(4)}", clock=clock)
    yield store
    await store.close()


class TestClockSteps:
    """The wall clock (Redis ``TIME`` or the process's) can step: NTP corrections, a VM resumed."""

    async def test_a_backward_step_does_not_extend_a_lockout(self, stepped_store: Any, clock: Clock) -> None:
        """SECURITY/availability: the stored TAT is in the stepped-back clock's future; unclamped,
        every caller with a live bucket waited the size of the step (an hour here)."""
        stage = build_ratelimit_stage(policy([RATE]), stepped_store)
        for _ in range(3):
            assert await admitted(stage)
        clock.advance(-3600)
        with pytest.raises(LimitExceeded) as err:
            await stage.on_call(ctx())
        assert (err.value.retry_after_s or 0.0) <= 1.0  # one interval of a 1/s rate, not 3600 s
        assert err.value.headers()["Retry-After"] == "1"
        assert 0 <= int(err.value.headers()["RateLimit-Reset"]) <= 3
        clock.advance(1.0)
        assert await admitted(stage)
        assert not await admitted(stage)  # and no extra burst from the step either

    async def test_a_forward_step_refills_at_most_one_burst(self, stepped_store: Any, clock: Clock) -> None:
        stage = build_ratelimit_stage(policy([RATE]), stepped_store)
        for _ in range(3):
            assert await admitted(stage)
        clock.advance(3600)
        assert [await admitted(stage) for _ in range(5)] == [True, True, True, False, False]

    async def test_a_backward_step_over_midnight_does_not_reopen_the_day(self, stepped_store: Any,
                                                                         clock: Clock) -> None:
        """SECURITY: stepping back over a UTC boundary must not hand out the earlier day's
        quota a second time (it counted as a fresh period before)."""
        rule = {"name": "daily", "kind": "quota", "per": ["tenant"], "limit": 2, "period": "day"}
        stage = build_ratelimit_stage(policy([rule]), stepped_store)
        clock.t = T0 - 36_000 + 86_400 + 0.1  # 00:00:00.1 of the next day
        assert await admitted(stage) and await admitted(stage)
        assert not await admitted(stage)
        clock.t -= 0.2  # 23:59:59.9 of the day before
        with pytest.raises(LimitExceeded) as err:
            await stage.on_call(ctx())
        assert err.value.reason == "quota_exceeded"
        assert int(err.value.headers()["Retry-After"]) >= 1
        clock.t = T0 - 36_000 + 2 * 86_400  # the day after: a fresh quota
        assert await admitted(stage)

    async def test_quota_boundary_burst_is_at_most_one_period_each(self, stepped_store: Any, clock: Clock) -> None:
        """The documented window is calendar (fixed): 23:59:59.9 and 00:00:00.1 are two days,
        each at most ``limit``; never more than that in either day."""
        rule = {"name": "daily", "kind": "quota", "per": ["tenant"], "limit": 3, "period": "day"}
        stage = build_ratelimit_stage(policy([rule]), stepped_store)
        clock.t = T0 - 36_000 + 86_400 - 0.1
        before = [await admitted(stage) for _ in range(5)]
        clock.t += 0.2
        after = [await admitted(stage) for _ in range(5)]
        assert before.count(True) == 3 and after.count(True) == 3


class TestRefusedCallsCostNothing:
    """A call a cost limit refuses (decided after decode) gives back its rate and quota units."""

    QUOTA = {"name": "daily", "kind": "quota", "per": ["tenant"], "limit": 5, "period": "day"}
    COST = {"name": "elements", "kind": "cost", "unit": "elements", "per": ["tenant"], "limit": 6400,
            "period_s": 60}

    async def call(self, stage: RateLimiter, rows: int = 64) -> str:
        c = ctx()
        try:
            await stage.on_call(c)
            await stage.on_request(c, batch(rows))
        except (RateLimited, PayloadTooLarge) as exc:
            return exc.reason
        finally:
            await finish_call(c)
        return "ok"

    async def test_cost_refusals_do_not_spend_the_quota_or_the_rate(self, stepped_store: Any, clock: Clock) -> None:
        """SECURITY (availability): before, 4 cost-refused retries spent a daily quota of 5:
        a client hammering while its cost limit refilled locked itself out for the day."""
        stage = build_ratelimit_stage(policy([self.QUOTA, RATE, self.COST]), stepped_store)
        assert await self.call(stage) == "ok"  # 4096 of 6400 elements, 1 of 5 calls, 1 of 3 burst
        for _ in range(6):
            assert await self.call(stage) == "cost_limit_exceeded"
        clock.advance(60)  # the elements (and the request rate) refill; the day's quota does not
        assert [await self.call(stage, rows=1) for _ in range(3)] == ["ok"] * 3
        assert await self.call(stage, rows=1) == "ratelimit_exceeded"  # the burst of 3, undiminished
        clock.advance(60)
        assert await self.call(stage, rows=1) == "ok"  # call 5 of 5: 6 refusals cost nothing
        assert await self.call(stage, rows=1) == "quota_exceeded"

    async def test_a_request_that_can_never_fit_is_not_charged_either(self, stepped_store: Any) -> None:
        stage = build_ratelimit_stage(policy([{**self.QUOTA, "limit": 2}, self.COST]), stepped_store)
        for _ in range(4):
            assert await self.call(stage, rows=128) == "ratelimit_cost_too_large"  # 413
        assert [await self.call(stage, rows=1) for _ in range(3)] == ["ok", "ok", "quota_exceeded"]
