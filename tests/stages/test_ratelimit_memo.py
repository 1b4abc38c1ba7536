"""The limiter's per-caller memo of checks: a hit must be exactly what a fresh build gives.

``RateLimiter`` remembers, per (action, model, tenant, subject, roles), which limits apply
and their keys; ``PreAuthLimiter`` remembers the check of each client address. These cases
vary one input at a time and assert that the buckets stay apart, and that the memos stay
bounded when clients choose fresh subjects or addresses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from gateway.context import NOTE_REQUESTED_MODEL, Action, RequestContext
from gateway.kserve import InferRequest, Tensor
from gateway.stages.ratelimit import (
    PLAN_CACHE_MAX,
    LimitExceeded,
    RateLimiter,
    RateLimitPolicy,
    build_preauth_limiter,
    build_ratelimit_stage,
    finish_call,
    response_headers,
)
from gateway.state.memory import MemoryState
from tests.stages.test_ratelimit import ctx

T0 = 1_767_225_600 + 36_000.0


def clock() -> float:
    return T0


def stage_of(*limits: dict[str, Any]) -> RateLimiter:
    return build_ratelimit_stage(RateLimitPolicy.model_validate({"limits": list(limits)}), MemoryState(clock=clock))


async def passes(stage: RateLimiter, c: RequestContext) -> bool:
    try:
        await stage.on_call(c)
    except LimitExceeded:
        return False
    return True


def digits(rows: int) -> InferRequest:
    data = np.zeros((rows, 64), dtype=np.float32)
    return InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", (rows, 64), data)])


class TestMemoKeepsBucketsApart:
    async def test_subjects(self) -> None:
        stage = stage_of({"name": "s", "kind": "rate", "per": ["tenant", "subject"], "rate": 1, "period_s": 60,
                          "burst": 1})
        assert await passes(stage, ctx("alice"))
        assert await passes(stage, ctx("bob"))
        assert not await passes(stage, ctx("alice"))
        assert await passes(stage, ctx("alice", tenant="globex"))  # same subject, other tenant

    async def test_roles_and_role_selectors(self) -> None:
        stage = stage_of({"name": "r", "kind": "rate", "per": ["tenant", "role"], "roles": ["analyst", "admin"],
                          "rate": 1, "period_s": 60, "burst": 1})
        assert await passes(stage, ctx(roles=("analyst",)))
        assert not await passes(stage, ctx("bob", roles=("analyst",)))  # one bucket per role
        assert await passes(stage, ctx(roles=("admin",)))
        assert await passes(stage, ctx(roles=("viewer",)))  # the limit does not apply to this role
        assert not await passes(stage, ctx(roles=("analyst", "admin")))  # both buckets are spent

    async def test_models_and_actions(self) -> None:
        stage = stage_of({"name": "m", "kind": "quota", "per": ["model"], "limit": 1, "period": "day"})
        assert await passes(stage, ctx(model="digits"))
        assert not await passes(stage, ctx("bob", model="digits"))
        assert await passes(stage, ctx(model="risk"))
        assert await passes(stage, ctx(model="digits", action=Action.METADATA))  # counts infer only

    async def test_name_a_flag_routed_from(self) -> None:
        """Two routing flags send ``digits`` and ``digits_beta`` to one green model. A limit on
        ``digits`` binds calls routed from it (NOTE_REQUESTED_MODEL); the memo must not give a
        call from ``digits`` the plan of an earlier call from ``digits_beta`` (no limit), nor
        the other way round: same routed model, same caller, different requested name."""
        def routed(requested: str, sub: str = "alice") -> RequestContext:
            c = ctx(sub, model="digits_green")
            c.notes[NOTE_REQUESTED_MODEL] = requested
            return c

        for first in ("digits_beta", "digits"):
            stage = stage_of({"name": "m", "kind": "quota", "per": ["tenant", "subject"], "models": ["digits"],
                              "limit": 1, "period": "day"})
            assert await passes(stage, routed(first))
            if first == "digits_beta":
                assert await passes(stage, routed("digits"))  # the first call under the limit
                assert not await passes(stage, routed("digits"))  # was let through by a stale plan
            else:
                assert await passes(stage, routed("digits_beta"))  # not under the limit: never charged
                assert await passes(stage, routed("digits_beta"))
                assert not await passes(stage, routed("digits"))

    async def test_cost_limits_charge_each_request_its_own_cost(self) -> None:
        stage = stage_of({"name": "c", "kind": "cost", "unit": "elements", "per": ["tenant"], "limit": 640,
                          "period_s": 60})
        c = ctx()
        await stage.on_request(c, digits(8))
        assert response_headers(c)["RateLimit-Remaining"] == str(640 - 8 * 64)
        with pytest.raises(LimitExceeded):
            await stage.on_request(ctx(), digits(3))  # 128 left: the memo holds keys, not costs
        await stage.on_request(ctx("bob", tenant="globex"), digits(3))

    async def test_slots_come_back(self) -> None:
        stage = stage_of({"name": "k", "kind": "concurrency", "per": ["tenant"], "limit": 1})
        first = ctx()
        await stage.on_call(first)
        assert not await passes(stage, ctx())
        await finish_call(first)
        assert await passes(stage, ctx())


class TestMemoIsBounded:
    async def test_fresh_subjects(self) -> None:
        stage = stage_of({"name": "s", "kind": "rate", "per": ["tenant", "subject"], "rate": 100, "burst": 100},
                         {"name": "c", "kind": "cost", "unit": "elements", "per": ["tenant"], "limit": 10**9})
        for i in range(PLAN_CACHE_MAX + 50):
            c = ctx(f"u{i}")
            await stage.on_call(c)
            await stage.on_request(c, digits(1))
        assert len(stage._call_plans) == PLAN_CACHE_MAX
        assert len(stage._cost_plans) == PLAN_CACHE_MAX
        assert await passes(stage, ctx("u0"))  # an evicted caller is rebuilt, same bucket

    async def test_fresh_addresses(self) -> None:
        policy = RateLimitPolicy.model_validate({"pre_auth": {"rate": 1, "period_s": 60, "burst": 1}})
        limiter = build_preauth_limiter(policy, MemoryState(clock=clock))
        assert limiter is not None
        for i in range(PLAN_CACHE_MAX + 50):
            await limiter.admit(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        assert len(limiter._checks) == PLAN_CACHE_MAX
        with pytest.raises(LimitExceeded):
            await limiter.admit("10.0.0.0")  # evicted from the memo, not from the store
        with pytest.raises(LimitExceeded):
            await limiter.admit("10.0.0.1")  # still memoized
