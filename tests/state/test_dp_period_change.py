"""A policy edit of ``period_s`` mid-period never hands out a fresh budget (catalogue DP-05 variant).

Probe (s8): with Redis, an acme tenant that had spent its daily ε on ``risk`` got 10 more
rows at once after ``privacy.yaml`` changed ``period_s`` from 86400 to 3600 and was
reloaded (the account was keyed by the period index of the *new* length, so the script
deleted the day's spend as "an earlier period"); changing it back then latched every DP
call into 503 until a restart (the loss check compared period indexes of two lengths).
The file and in-memory ledgers keyed accounts by period id, which names the length: the
same fresh budget. Expected: the spend made in a period that is still running counts in
the first period of the new length that overlaps it; nothing latches.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.state.dp_file_ledger import FileBudgetLedger
from gateway.state.dp_ledger import StateBudgetLedger
from gateway.state.redis import RedisState
from privacy.dp.ledger import BudgetLedger, InMemoryBudgetLedger, PeriodScheme
from tests.support.dp_stage import Clock, spend_once
from tests.support.redis_server import RedisServer

KEY = "acme/risk"
DAY, HOUR = 86_400, 3_600
T_1430 = datetime(2026, 12, 3, 14, 30, tzinfo=UTC).timestamp()
NEXT_MIDNIGHT = datetime(2026, 12, 4, tzinfo=UTC).timestamp()


async def spend(ledger: BudgetLedger, clock: Clock, period_s: int, n: int, *, size: int = 1) -> list[str]:
    """n one-row requests of ε 0.5 against ε 5 per period of ``period_s``: ok / 429 / 503."""
    return [await spend_once(ledger, KEY, PeriodScheme(period_s).at(clock()), (0.5,) * size, (5.0,) * size)
            for _ in range(n)]


@pytest.fixture
def clock() -> Clock:
    return Clock(T_1430)


@pytest.fixture
async def redis_state(redis_server: RedisServer, clock: Clock) -> AsyncIterator[RedisState]:
    store = RedisState.from_url(redis_server.url, clock=clock, key_prefix=f"t{secrets.token_hex(4)}",
                                op_timeout_s=5.0)
    yield store
    await store.close()


Make = Callable[[Clock, Path, RedisState], BudgetLedger]
LEDGERS: dict[str, tuple[Make, int]] = {
    "memory": (lambda clock, _path, _state: InMemoryBudgetLedger(clock), 1),
    "file": (lambda clock, path, _state: FileBudgetLedger(path / "dp-ledger.json", clock), 1),
    "redis": (lambda _clock, _path, state: StateBudgetLedger(state), 1),
    "redis-vector": (lambda _clock, _path, state: StateBudgetLedger(state), 2),
}


@pytest.mark.parametrize("kind", sorted(LEDGERS))
async def test_a_period_edit_keeps_the_spend_and_latches_nothing(kind: str, clock: Clock, tmp_path: Path,
                                                                  redis_state: RedisState) -> None:
    make, size = LEDGERS[kind]
    ledger = make(clock, tmp_path, redis_state)
    assert await spend(ledger, clock, DAY, 11, size=size) == ["ok"] * 10 + ["429"]  # the day's budget
    # privacy.yaml: period_s 86400 -> 3600, reloaded at 14:30: still nothing left now
    assert await spend(ledger, clock, HOUR, 1, size=size) == ["429"]
    usage = await ledger.usage(KEY, PeriodScheme(HOUR).at(clock()), size)
    assert usage[0] == pytest.approx(5.0)  # what the budget report shows too
    # and back to 86400: the day stays spent, and the ledger keeps answering (no 503 latch)
    assert await spend(ledger, clock, DAY, 1, size=size) == ["429"]
    assert await spend(ledger, clock, HOUR, 1, size=size) == ["429"]
    clock.t = NEXT_MIDNIGHT  # a real boundary of both lengths: fresh
    assert await spend(ledger, clock, DAY, 11, size=size) == ["ok"] * 10 + ["429"]


@pytest.mark.parametrize("kind", sorted(LEDGERS))
async def test_a_shorter_period_starts_fresh_once_the_edit_period_is_over(kind: str, clock: Clock,
                                                                          tmp_path: Path,
                                                                          redis_state: RedisState) -> None:
    """Hour -> day at 14:30: the hour's spend counts in the day; a later hour of an hourly
    policy starts fresh at its own boundary."""
    make, size = LEDGERS[kind]
    ledger = make(clock, tmp_path, redis_state)
    assert await spend(ledger, clock, HOUR, 11, size=size) == ["ok"] * 10 + ["429"]
    assert await spend(ledger, clock, DAY, 1, size=size) == ["429"]  # the hour's 10 rows count today
    clock.t = NEXT_MIDNIGHT + 3_600
    assert await spend(ledger, clock, HOUR, 11, size=size) == ["ok"] * 10 + ["429"]
