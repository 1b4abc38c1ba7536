"""Two gateway processes, one redis-server: limits hold in total, not per process.

Each worker is a separate Python process (``spawn``) that builds the real ``rate_limit``
stage on a ``RedisState`` and drives ``on_call`` like the HTTP front would, 100 requests
at once per process, both processes released by one barrier. The workers run every
scenario once (a module fixture); each test below checks one scenario's totals.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.redis_server import RedisServer, available

pytestmark = pytest.mark.skipif(not available(), reason="redis-server is not installed")

PROCESSES = 2
CONCURRENT = 100
RATE_N, RATE_BURST, RATE_SECONDS = 50, 10, 1.5

SCENARIOS: dict[str, dict[str, Any]] = {
    # 200 concurrent requests when 10 tokens remain (RL-07).
    "tokens": {"kind": "rate", "rate": 0.001, "burst": 10},
    # A quota of 10 per day.
    "quota": {"kind": "quota", "limit": 10, "period": "day"},
    # 5 slots, held until the end.
    "slots": {"kind": "concurrency", "limit": 5},
    # N per second with burst, hammered for RATE_SECONDS by both processes.
    "per_second": {"kind": "rate", "rate": RATE_N, "burst": RATE_BURST},
}


def _worker(url: str, prefix: str, barrier: Any, results: Any) -> None:
    asyncio.run(_worker_main(url, prefix, barrier, results))


async def _worker_main(url: str, prefix: str, barrier: Any, results: Any) -> None:
    from gateway.context import Action, Principal, RequestContext
    from gateway.errors import GatewayError, RateLimited
    from gateway.stages.ratelimit import RateLimitPolicy, build_ratelimit_stage
    from gateway.state.redis import RedisState

    # The test is about atomicity, not about timeouts: a generous op timeout keeps a busy
    # 2-core machine from turning a slow answer into an error.
    store = RedisState.from_url(url, key_prefix=prefix, op_timeout_s=5.0)
    principal = Principal(subject="alice", tenant="acme", roles=frozenset({"analyst"}), issuer="i", credential_id="c")

    def ctx() -> RequestContext:
        c = RequestContext(request_id="r", revision="r", action=Action.INFER, transport="test",
                           client_addr="127.0.0.1", model="digits")
        c.principal = principal
        return c

    async def one(stage: Any) -> str:
        try:
            await stage.on_call(ctx())
        except RateLimited:
            return "limited"
        except GatewayError as exc:
            return exc.reason
        return "allowed"

    await asyncio.gather(*(store.ping() for _ in range(CONCURRENT)))  # warm the pool
    try:
        for name, rule in SCENARIOS.items():
            policy = RateLimitPolicy.model_validate({"limits": [{"name": name, "per": ["tenant"], **rule}]})
            stage = build_ratelimit_stage(policy, store)
            await asyncio.to_thread(barrier.wait)
            start = time.time()
            if name == "per_second":
                outcomes: list[str] = []

                async def hammer(stage: Any = stage, start: float = start, outcomes: list[str] = outcomes) -> None:
                    while time.time() - start < RATE_SECONDS:
                        outcomes.append(await one(stage))

                await asyncio.gather(*(hammer() for _ in range(4)))
            else:
                outcomes = list(await asyncio.gather(*(one(stage) for _ in range(CONCURRENT))))
            results.put((name, start, time.time(), outcomes))
    finally:
        await store.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[tuple[float, float, list[str]]]]]:
    server = RedisServer.start(tmp_path_factory.mktemp("redis-multiprocess"))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    results = context.Queue()
    prefix = f"mp{secrets.token_hex(4)}"
    workers = [context.Process(target=_worker, args=(server.url, prefix, barrier, results), daemon=True)
               for _ in range(PROCESSES)]
    try:
        for worker in workers:
            worker.start()
        collected: dict[str, list[tuple[float, float, list[str]]]] = {}
        for _ in range(PROCESSES * len(SCENARIOS)):
            name, start, end, outcomes = results.get(timeout=60)
            collected.setdefault(name, []).append((start, end, outcomes))
        for worker in workers:
            worker.join(timeout=10)
            assert worker.exitcode == 0
        yield collected
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
        server.kill()


def totals(runs: dict[str, list[tuple[float, float, list[str]]]], name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, _, outcomes in runs[name]:
        for outcome in outcomes:
            counts[outcome] = counts.get(outcome, 0) + 1
    return counts


@pytest.mark.parametrize(("scenario", "admitted"), [("tokens", 10), ("quota", 10), ("slots", 5)])
def test_concurrent_requests_from_two_processes_admit_exactly_the_limit(
        runs: dict[str, list[tuple[float, float, list[str]]]], scenario: str, admitted: int) -> None:
    counts = totals(runs, scenario)
    assert counts == {"allowed": admitted, "limited": PROCESSES * CONCURRENT - admitted}
    (start_a, end_a, _), (start_b, end_b, _) = runs[scenario]
    assert start_a < end_b and start_b < end_a  # the two processes really ran at the same time


def test_n_per_second_is_shared_not_per_process(runs: dict[str, list[tuple[float, float, list[str]]]]) -> None:
    """A limit of N/s with burst B admits about B + N·t in total across both processes."""
    counts = totals(runs, "per_second")
    window = max(end for _, end, _ in runs["per_second"]) - min(start for start, _, _ in runs["per_second"])
    ceiling = RATE_BURST + RATE_N * window + 1
    assert counts.get("allowed", 0) <= ceiling
    assert counts.get("allowed", 0) >= RATE_BURST + RATE_N * RATE_SECONDS * 0.9
    assert counts.get("limited", 0) > counts["allowed"]  # both processes were pushing hard
    assert set(counts) == {"allowed", "limited"}
    per_process = [sum(o == "allowed" for o in outcomes) for _, _, outcomes in runs["per_second"]]
    assert all(n > 0 for n in per_process)
