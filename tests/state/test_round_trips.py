"""Round trips to Redis per call: counted at the socket (one ``send`` is one round trip).

Each Redis round trip costs the gateway ~200 µs of CPU (bench/bench_ratelimit.py), more
than everything else the limiter does, so the number per call is part of the contract:

- pre-authentication: one script;
- ``on_call``: one script for every rate, quota and concurrency limit that applies, in any
  number of groups on one server (a Cluster needs one per slot);
- ``on_request``: one script for the cost limits;
- completion: one command to give back every concurrency slot the call holds.

Against a real ``redis-server``: the counts and the decisions both come from it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from redis.asyncio.connection import AbstractConnection

from gateway.context import Action, Principal, RequestContext
from gateway.kserve import InferRequest, Tensor
from gateway.stages.ratelimit import (
    LimitExceeded,
    RateLimitPolicy,
    build_preauth_limiter,
    build_ratelimit_stage,
    call_note,
    finish_call,
)
from gateway.state.redis import RedisState
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]


class Sends:
    """Counts what the client writes to Redis: one ``send_packed_command`` per round trip."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        original = AbstractConnection.send_packed_command

        async def counted(conn: AbstractConnection, *args: Any, **kwargs: Any) -> None:
            self.count += 1
            await original(conn, *args, **kwargs)

        monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)

    def take(self) -> int:
        seen, self.count = self.count, 0
        return seen


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisState]:
    s = RedisState.from_url(redis_server.url, key_prefix=f"rt{secrets.token_hex(4)}", op_timeout_s=1.0)
    await s.start()  # connection and scripts loaded: the counts below are the steady state
    yield s
    await s.close()


@pytest.fixture
def sends(monkeypatch: pytest.MonkeyPatch) -> Sends:
    return Sends(monkeypatch)


def ctx(sub: str = "alice", tenant: str = "acme") -> RequestContext:
    c = RequestContext(request_id=secrets.token_hex(4), revision="r", action=Action.INFER, transport="test",
                       client_addr="127.0.0.1", model="digits")
    c.principal = Principal(subject=sub, tenant=tenant, roles=frozenset({"analyst"}), issuer="test",
                            credential_id="c")
    return c


def digits(rows: int = 1) -> InferRequest:
    data = np.zeros((rows, 64), dtype=np.float32)
    return InferRequest(model="digits", version="", inputs=[Tensor("pixels", "FP32", (rows, 64), data)])


def shipped_policy() -> RateLimitPolicy:
    return RateLimitPolicy.model_validate(yaml.safe_load((ROOT / "policies" / "limits.yaml").read_text()))


class TestRoundTrips:
    async def test_the_shipped_policy_costs_four_round_trips_per_inference(self, store: RedisState,
                                                                            sends: Sends) -> None:
        policy = shipped_policy()
        stage = build_ratelimit_stage(policy, store)
        preauth = build_preauth_limiter(policy, store)
        assert preauth is not None
        await stage.on_call(ctx())  # warm the connection pool
        await finish_call(ctx())
        sends.take()
        c = ctx()
        await preauth.admit("192.0.2.7", c)
        assert sends.take() == 1
        await stage.on_call(c)  # tenant rate, subject rate, daily quota, concurrency slot
        assert sends.take() == 1
        assert len(call_note(c).leases) == 1
        await stage.on_request(c, digits())
        assert sends.take() == 1
        await finish_call(c)
        assert sends.take() == 1

    async def test_limits_in_several_groups_are_one_script_on_one_server(self, store: RedisState,
                                                                          sends: Sends) -> None:
        policy = RateLimitPolicy.model_validate({"limits": [
            {"name": "tenant_rate", "kind": "rate", "per": ["tenant"], "rate": 100, "burst": 100},
            {"name": "model_slots", "kind": "concurrency", "per": ["model"], "limit": 1},
            {"name": "everyone_slots", "kind": "concurrency", "per": [], "limit": 5},
        ]})
        stage = build_ratelimit_stage(policy, store)
        first = ctx()
        sends.take()
        await stage.on_call(first)
        assert sends.take() == 1  # three groups (t:, m:, g:), one script
        assert len(call_note(first).leases) == 2
        second = ctx("bob")
        with pytest.raises(LimitExceeded) as refused:
            await stage.on_call(second)
        assert refused.value.limit_name == "model_slots"
        assert sends.take() == 1  # refused atomically: no undo round trip either
        await finish_call(first)
        assert sends.take() == 1  # both slots, two groups, one script
        await stage.on_call(ctx("carol"))  # the slots are free again, and the refusal charged nothing
        assert sends.take() == 1
        probe = await store.run_limits([stage.call_limits[0].check(next(stage.call_limits[0].keys(
            ctx(), ctx().require_principal())))])
        assert probe[0].remaining == 97  # alice and carol charged; bob's refused call was not
