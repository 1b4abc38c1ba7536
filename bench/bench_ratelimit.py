"""Limiter CPU per request: the rate_limit stage on the in-memory store and on a real Redis.

Drives the stage the way the front does for one inference call (``on_call`` → ``on_request``
→ ``finish_call``) with the shape of ``policies/limits.yaml`` (tenant and subject rates,
a daily quota, a concurrency cap, an elements-per-minute cost limit) but limits high enough
that every request is allowed, so the common path is measured. Variants:

- ``rate only``: one rate limit, i.e. exactly one state round trip per request;
- ``full policy``: every kind of limit: one round trip for ``on_call`` (rates + quota +
  slot), one for the cost limit in ``on_request``, one to release the slot;
- ``multi group``: limits keyed per tenant, per model and for everyone (three groups, i.e.
  three Cluster slots) with two concurrency caps: on one server ``on_call`` is one script
  and the release one more round trip.

``RT/req`` is the number of Redis round trips per request, counted at the client socket
(one ``send`` per command or pipeline).

CPU is process time of this (gateway) process per request; for Redis the server's CPU per
request is read from ``/proc/<pid>/stat``. ``c`` is the number of concurrent requests. Each
row is the median of ``--repeat`` runs (the machine this was written on is shared and noisy:
compare CPU per request, not req/s).

    .venv/bin/python bench/bench_ratelimit.py [--n 5000] [--repeat 3] [--redis-url redis://...]

Without ``--redis-url`` a ``redis-server`` is started on a free loopback port (and stopped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.context import Action, Principal, RequestContext  # noqa: E402
from gateway.kserve import InferRequest, Tensor  # noqa: E402
from gateway.stages.ratelimit import RateLimiter, RateLimitPolicy, build_ratelimit_stage, finish_call  # noqa: E402
from gateway.state.base import SharedState  # noqa: E402
from gateway.state.memory import MemoryState  # noqa: E402
from gateway.state.redis import RedisState  # noqa: E402

BIG = 10**9
FULL = {
    "limits": [
        {"name": "tenant_rate", "kind": "rate", "per": ["tenant"], "rate": BIG, "burst": BIG},
        {"name": "subject_rate", "kind": "rate", "per": ["tenant", "subject"], "rate": BIG, "burst": BIG},
        {"name": "tenant_daily_quota", "kind": "quota", "per": ["tenant"], "limit": BIG, "period": "day"},
        {"name": "tenant_concurrency", "kind": "concurrency", "per": ["tenant"], "limit": 100_000},
        {"name": "tenant_elements_per_minute", "kind": "cost", "unit": "elements", "per": ["tenant"],
         "limit": BIG * 1000, "period_s": 60},
    ],
}
RATE_ONLY = {"limits": [FULL["limits"][1]]}
MULTI_GROUP = {
    "limits": [
        FULL["limits"][0],
        {"name": "model_rate", "kind": "rate", "per": ["model"], "rate": BIG, "burst": BIG},
        {"name": "tenant_concurrency", "kind": "concurrency", "per": ["tenant"], "limit": 100_000},
        {"name": "global_concurrency", "kind": "concurrency", "per": [], "limit": 100_000},
    ],
}


class SendCounter:
    """Counts Redis round trips: every command or pipeline goes out in one ``send_packed_command``."""

    def __init__(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.count = 0
        self._cls = AbstractConnection
        self._original = AbstractConnection.send_packed_command
        counter = self

        async def counted(conn: Any, *args: Any, **kwargs: Any) -> None:
            counter.count += 1
            await counter._original(conn, *args, **kwargs)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign,assignment]

    def close(self) -> None:
        self._cls.send_packed_command = self._original  # type: ignore[method-assign]

PRINCIPAL = Principal(subject="alice", tenant="acme", roles=frozenset({"analyst"}), issuer="bench",
                      credential_id="c")
REQUEST = InferRequest(model="digits", version="", inputs=[
    Tensor("pixels", "FP32", (1, 64), np.zeros((1, 64), dtype=np.float32))])


def ctx() -> RequestContext:
    c = RequestContext(request_id="r", revision="r", action=Action.INFER, transport="bench",
                       client_addr="127.0.0.1", model="digits")
    c.principal = PRINCIPAL
    return c


async def one(stage: RateLimiter) -> None:
    c = ctx()
    try:
        await stage.on_call(c)
        await stage.on_request(c, REQUEST)
    finally:
        await finish_call(c)


def server_cpu(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(state: SharedState, policy: dict[str, Any], n: int, concurrency: int,
                  redis_pid: int | None) -> dict[str, float]:
    stage = build_ratelimit_stage(RateLimitPolicy.model_validate(policy), state)
    for _ in range(300):  # warm-up: connections, scripts, caches
        await one(stage)
    per_worker = n // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await one(stage)

    done = per_worker * concurrency
    sends = SendCounter()
    try:
        cpu0, wall0, srv0 = time.process_time(), time.perf_counter(), server_cpu(redis_pid)
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu, wall, srv = time.process_time() - cpu0, time.perf_counter() - wall0, server_cpu(redis_pid) - srv0
    finally:
        sends.close()
    return {"cpu_us_per_request": cpu / done * 1e6, "server_cpu_us_per_request": srv / done * 1e6,
            "requests_per_s": done / wall, "n": done, "concurrency": concurrency,
            "round_trips_per_request": sends.count / done}


async def run(n: int, repeat: int, redis_url: str | None, redis_pid: int | None) -> list[dict[str, Any]]:
    """Each scenario ``repeat`` times; the run with the median CPU per request is reported."""
    rows: list[dict[str, Any]] = []
    for backend in ("memory", "redis"):
        for name, policy in (("rate only", RATE_ONLY), ("full policy", FULL), ("multi group", MULTI_GROUP)):
            for concurrency in (1, 32):
                runs = []
                for attempt in range(repeat):
                    if backend == "memory":
                        state: SharedState = MemoryState()
                    else:
                        assert redis_url is not None
                        state = RedisState.from_url(redis_url, key_prefix=f"bench{len(rows)}x{attempt}",
                                                    op_timeout_s=1.0)
                    try:
                        runs.append(await measure(state, policy, n, concurrency,
                                                  redis_pid if backend == "redis" else None))
                    finally:
                        await state.close()
                runs.sort(key=lambda r: r["cpu_us_per_request"])
                median = runs[len(runs) // 2]
                spread = [round(r["cpu_us_per_request"], 1) for r in runs]
                rows.append({"backend": backend, "policy": name, **median, "cpu_us_runs": spread})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--redis-url")
    args = parser.parse_args()
    server = None
    url, pid = args.redis_url, None
    if url is None:
        from tests.support.redis_server import RedisServer

        server = RedisServer.start(Path(tempfile.mkdtemp(prefix="bench-redis-")))
        url, pid = server.url, server.pid
    try:
        rows = asyncio.run(run(args.n, args.repeat, url, pid))
    finally:
        if server is not None:
            server.kill()
    print(f"{'backend':8} {'policy':12} {'c':>3} {'CPU µs/req':>11} {'redis µs/req':>13} {'RT/req':>7} "
          f"{'req/s':>9}  runs")
    for row in rows:
        print(f"{row['backend']:8} {row['policy']:12} {row['concurrency']:>3} {row['cpu_us_per_request']:>11.1f} "
              f"{row['server_cpu_us_per_request']:>13.1f} {row['round_trips_per_request']:>7.2f} "
              f"{row['requests_per_s']:>9.0f}  {row['cpu_us_runs']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
