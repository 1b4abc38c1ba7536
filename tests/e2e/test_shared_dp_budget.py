"""Two gateway replicas sharing one redis-server never spend more privacy budget than the policy
allows, under 200 concurrent requests; and the ledger adapter keeps the ledger contract."""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from pathlib import Path

from gateway.state.dp_ledger import StateBudgetLedger
from gateway.state.memory import MemoryState
from privacy.dp.ledger import PeriodScheme, Refused, Reservation
from tests.support.gateway_proc import post_json, start_gateway
from tests.support.redis_server import RedisServer

from ..conftest import POLICIES, TRITON_REPO


def _post(url: str, token: str, i: int) -> int:
    # every request differs, so none is answered free from the repeat cache
    body = {"inputs": [{"name": "features", "shape": [1, 30], "datatype": "FP32", "data": [1.0 + i] * 30}]}
    return post_json(url, "/v2/models/risk/infer", body, token)


def test_two_replicas_never_overspend(tmp_path: Path) -> None:
    redis = RedisServer.start(tmp_path / "redis")
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES, policies)
    gateways = []
    try:
        (tmp_path / "a").mkdir()
        gateways.append(start_gateway(tmp_path / "a", backend=f"local:{TRITON_REPO}", policies=policies,
                                      extra=["--redis", redis.url]))
        (tmp_path / "b" / "state").mkdir(parents=True)
        shutil.copy(gateways[0].state_dir / "dev-issuer-ed25519.pem", tmp_path / "b" / "state")
        gateways.append(start_gateway(tmp_path / "b", backend=f"local:{TRITON_REPO}", policies=policies,
                                      extra=["--redis", redis.url]))
        token = gateways[0].token()
        urls = [f"http://{gw.url}" for gw in gateways] * 100
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(lambda a: _post(a[1], token, a[0]), enumerate(urls)))
        refused_unavailable = statuses.count(503)
        # A 503 is the fail-closed answer when Redis misses its 100 ms deadline on a loaded
        # machine; ask those again one by one so every request ends in 200 or 429.
        for i in range(len(statuses)):
            for _ in range(5):
                if statuses[i] != 503:
                    break
                statuses[i] = _post(urls[i], token, i)
        assert set(statuses) <= {200, 429}, statuses
        # the shipped policy: ε 0.5 per row, 5 per tenant per UTC day -> exactly 10 answers in total
        # SECURITY: never more than the budget; a 503 may strand a reservation until it
        # expires (fail closed: under-use), so exactness holds only without 503s.
        assert 10 - refused_unavailable <= statuses.count(200) <= 10, statuses
        assert statuses.count(200) + statuses.count(429) == 200
    finally:
        for gw in gateways:
            gw.stop()
        redis.stop()


async def test_state_ledger_keeps_the_ledger_contract() -> None:
    ledger = StateBudgetLedger(MemoryState())
    period = PeriodScheme().at(time.time())
    held = [await ledger.reserve("acme/risk", period, (0.5,), (5.0,)) for _ in range(12)]
    assert [isinstance(r, Reservation) for r in held] == [True] * 10 + [False] * 2
    assert isinstance(held[-1], Refused)
    assert held[-1].retry_after_s > 0
    first = held[0]
    assert isinstance(first, Reservation)
    await ledger.refund(first)
    await ledger.refund(first)  # idempotent
    assert await ledger.usage("acme/risk", period, 1) == (4.5,)
    second = held[1]
    assert isinstance(second, Reservation)
    await ledger.commit(second)
    await ledger.refund(second)  # after a commit: nothing
    assert await ledger.usage("acme/risk", period, 1) == (4.5,)
