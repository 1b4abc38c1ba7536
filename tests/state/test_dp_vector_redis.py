"""Gaussian (RDP) privacy budgets shared through a real redis-server (gateway/state/dp_vector.py).

What must hold for two replicas to share one tenant's RDP budget:

- the running vector in Redis is the one the in-memory ledger keeps, bit for bit, and it
  converts to the ε Opacus's ``RDPAccountant`` reports for the same sequence of releases;
- admission stops exactly where the converted ε(δ) would pass the budget, also with 200
  concurrent requests on two ledger instances (two connections, as two replicas);
- a failed request is refunded, a released one never is; periods are the Laplace path's
  (UTC days, server time); Redis down means refuse (fail closed), never a fresh budget;
- the policy compiler accepts Gaussian mechanisms with a Redis ledger.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import DependencyUnavailable, RateLimited, UpstreamUnavailable
from gateway.kserve import InferResponse
from gateway.observability.metrics import Metrics
from gateway.policy.compile import CompileEnv, compile_pipeline
from gateway.policy.loader import build_policy_set
from gateway.stages.dp_noise import DpNoiser, DpPolicy, build_dp_stage, ledger_key
from gateway.state.base import StateKey
from gateway.state.dp_ledger import StateBudgetLedger
from gateway.state.redis import RedisState
from privacy.dp.accounting import RDP_ORDERS, RdpAccountant
from privacy.dp.ledger import (
    BudgetLedger,
    InMemoryBudgetLedger,
    LedgerMismatch,
    LedgerUnavailable,
    PeriodScheme,
    Refused,
    Reservation,
)
from tests.support.dp_stage import MIDNIGHT, T0, Clock, FakeUpstream, call_stage, ctx_for, risk_request
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[2]
KEY = "alpha/risk"
DELTA = 1e-5


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(4)}"  # tests share the server, never each other's keys


@pytest.fixture
async def stores(redis_server: RedisServer, clock: Clock, prefix: str) -> AsyncIterator[list[RedisState]]:
    """Two independent clients of one server: two replicas' views of the shared state.

    A generous op timeout: 200 concurrent scripts on a loaded 2-core machine must not turn
    into LedgerUnavailable here (timeouts have their own tests in tests/state).
    """
    made = [RedisState.from_url(redis_server.url, clock=clock, key_prefix=prefix, op_timeout_s=5.0)
            for _ in range(2)]
    yield made
    for store in made:
        await store.close()


@pytest.fixture
def ledgers(stores: list[RedisState]) -> list[StateBudgetLedger]:
    return [StateBudgetLedger(store) for store in stores]


def sigma_accountant(noise_multiplier: float, budget: float = 1e6) -> RdpAccountant:
    """A Gaussian release with L2 sensitivity 1 and noise σ: ρ = 1 / (2σ²) per row."""
    return RdpAccountant(rho_per_row=1.0 / (2.0 * noise_multiplier**2), budget_epsilon=budget, budget_delta=DELTA)


def opacus_epsilon(history: list[tuple[float, int]]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch import-time deprecations, "optimal order is the largest alpha"
        from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]

        accountant = RDPAccountant()
        for noise_multiplier, rows in history:
            for _ in range(rows):
                accountant.step(noise_multiplier=noise_multiplier, sample_rate=1.0)
        return float(accountant.get_epsilon(DELTA, alphas=list(RDP_ORDERS)))


async def spend(ledger: BudgetLedger, accountant: RdpAccountant, rows: int, *,
                limit: tuple[float, ...] | None = None, t: float = T0) -> Reservation | Refused:
    period = PeriodScheme().at(t)
    result = await ledger.reserve(KEY, period, accountant.charge(rows), limit or accountant.limit())
    if isinstance(result, Reservation):
        await ledger.commit(result)
    return result


# --------------------------------------------------------------------------- accounting


async def test_sequential_spend_matches_memory_and_opacus(ledgers: list[StateBudgetLedger], clock: Clock) -> None:
    """Mixed noise multipliers and batch sizes on one account: the Redis vector equals the
    in-memory ledger's bit for bit, and converts to Opacus's ε for the same steps."""
    redis_ledger, memory = ledgers[0], InMemoryBudgetLedger(clock)
    period = PeriodScheme().at(T0)
    history: list[tuple[float, int]] = []
    in_redis: tuple[float, ...] = ()
    for noise_multiplier, rows in [(1.0, 3), (3.7, 20), (0.8, 1), (10.0, 64), (2.5, 7)]:
        accountant = sigma_accountant(noise_multiplier)
        assert isinstance(await spend(redis_ledger, accountant, rows), Reservation)
        assert isinstance(await spend(memory, accountant, rows), Reservation)
        history.append((noise_multiplier, rows))
        in_redis = await redis_ledger.usage(KEY, period, len(RDP_ORDERS))
        assert in_redis == await memory.usage(KEY, period, len(RDP_ORDERS))
        assert math.isclose(accountant.epsilon(in_redis), opacus_epsilon(history), rel_tol=1e-12)
    # The other replica reads the same vector.
    assert await ledgers[1].usage(KEY, period, len(RDP_ORDERS)) == in_redis


async def test_admission_stops_exactly_at_the_converted_epsilon(ledgers: list[StateBudgetLedger]) -> None:
    accountant = sigma_accountant(6.0, budget=3.0)
    period = PeriodScheme().at(T0)
    granted = 0
    while isinstance(await spend(ledgers[granted % 2], accountant, 1), Reservation):
        granted += 1
    assert granted == accountant.rows_remaining(accountant.zero()) > 1
    used = await ledgers[0].usage(KEY, period, len(RDP_ORDERS))
    assert accountant.epsilon(used) <= 3.0 * (1 + 1e-9)
    # The refused row really would have passed the budget.
    over = [u + c for u, c in zip(used, accountant.charge(1), strict=True)]
    assert accountant.epsilon(over) > 3.0


async def test_two_replicas_and_200_concurrent_requests_never_overspend(ledgers: list[StateBudgetLedger]) -> None:
    accountant = sigma_accountant(3.0, budget=4.0)
    period = PeriodScheme().at(T0)
    rows = [1 + i % 3 for i in range(200)]  # batches of 1-3 rows

    async def one(i: int) -> Reservation | Refused:
        return await ledgers[i % 2].reserve(KEY, period, accountant.charge(rows[i]), accountant.limit())

    results = await asyncio.gather(*(one(i) for i in range(200)))
    held = [r for r in results if isinstance(r, Reservation)]
    assert held and len(held) < 200
    used = await ledgers[0].usage(KEY, period, len(RDP_ORDERS))
    assert accountant.epsilon(used) <= 4.0 * (1 + 1e-9)
    assert sum(r.amount[0] for r in held) / (accountant.rho_per_row * RDP_ORDERS[0]) == pytest.approx(
        sum(rows[i] for i, r in enumerate(results) if isinstance(r, Reservation)))
    # Settling in any order on either replica changes nothing but the open reservations.
    await asyncio.gather(*(ledgers[i % 2].commit(r) for i, r in enumerate(held)))
    assert await ledgers[1].usage(KEY, period, len(RDP_ORDERS)) == used
    # And nothing more fits than the budget leaves.
    assert accountant.rows_remaining(used) == 0 or isinstance(
        await spend(ledgers[1], accountant, accountant.rows_remaining(used) + 1), Refused)


# --------------------------------------------------------------------------- settle, periods, failures


async def test_refund_gives_back_and_commit_is_final(ledgers: list[StateBudgetLedger]) -> None:
    accountant = sigma_accountant(4.0, budget=5.0)
    period = PeriodScheme().at(T0)
    size = len(RDP_ORDERS)
    held = await ledgers[0].reserve(KEY, period, accountant.charge(5), accountant.limit())
    assert isinstance(held, Reservation)
    assert await ledgers[1].usage(KEY, period, size) == accountant.charge(5)  # counted while open
    await ledgers[0].refund(held)
    assert await ledgers[0].usage(KEY, period, size) == accountant.zero()
    await ledgers[0].refund(held)  # idempotent
    kept = await ledgers[0].reserve(KEY, period, accountant.charge(2), accountant.limit())
    assert isinstance(kept, Reservation)
    await ledgers[0].commit(kept)
    await ledgers[0].refund(kept)  # an answer that may have left is never un-charged
    assert await ledgers[0].usage(KEY, period, size) == accountant.charge(2)


async def test_periods_are_utc_days_on_the_server_clock(ledgers: list[StateBudgetLedger], clock: Clock) -> None:
    accountant = sigma_accountant(1.0, budget=5.0)
    while isinstance(await spend(ledgers[0], accountant, 1), Reservation):
        pass
    refused = await spend(ledgers[1], accountant, 1)
    assert isinstance(refused, Refused)
    assert refused.retry_after_s == pytest.approx(MIDNIGHT - T0)  # the Laplace path's Retry-After
    clock.t = MIDNIGHT  # the next UTC day: a whole budget again
    assert isinstance(await spend(ledgers[1], accountant, 1, t=MIDNIGHT), Reservation)
    fresh = await ledgers[0].usage(KEY, PeriodScheme().at(MIDNIGHT), len(RDP_ORDERS))
    assert fresh == accountant.charge(1)


async def test_the_account_expires_with_its_period(ledgers: list[StateBudgetLedger], stores: list[RedisState],
                                                  redis_server: RedisServer) -> None:
    await spend(ledgers[0], sigma_accountant(2.0), 1)
    name = stores[0].key(StateKey(f"dp:{KEY}", "dp.budget", (KEY,)))
    ttl_ms = int(redis_server.cli("PTTL", name))
    assert 0 < ttl_ms <= (MIDNIGHT - T0 + 60) * 1000
    assert KEY not in name  # tenant ids are hashed, not readable in Redis


async def test_a_mechanism_switch_mid_period_fails_closed(ledgers: list[StateBudgetLedger]) -> None:
    """One (tenant, model) account, whatever the mechanism: no second, fresh budget."""
    period = PeriodScheme().at(T0)
    assert isinstance(await ledgers[0].reserve(KEY, period, (0.5,), (5.0,)), Reservation)  # Laplace first
    with pytest.raises(LedgerMismatch):
        await ledgers[1].reserve(KEY, period, sigma_accountant(2.0).charge(1), sigma_accountant(2.0).limit())
    other = "beta/risk"
    accountant = sigma_accountant(2.0)
    assert isinstance(await ledgers[0].reserve(other, period, accountant.charge(1), accountant.limit()), Reservation)
    refused = await ledgers[1].reserve(other, period, (0.5,), (5.0,))  # Gaussian first: Laplace is refused
    assert isinstance(refused, Refused)


async def test_redis_down_fails_closed(tmp_path: Path, clock: Clock) -> None:
    server = RedisServer.start(tmp_path / "redis")
    store = RedisState.from_url(server.url, clock=clock, key_prefix="down", op_timeout_s=0.5)
    ledger = StateBudgetLedger(store)
    accountant = sigma_accountant(2.0)
    period = PeriodScheme().at(T0)
    try:
        held = await ledger.reserve(KEY, period, accountant.charge(1), accountant.limit())
        assert isinstance(held, Reservation)
        server.stop()
        with pytest.raises(LedgerUnavailable):
            await ledger.reserve(KEY, period, accountant.charge(1), accountant.limit())
        with pytest.raises(LedgerUnavailable):
            await ledger.usage(KEY, period, len(RDP_ORDERS))
        with pytest.raises(LedgerUnavailable):
            await ledger.refund(held)  # stays spent in the store: under-use, never overspend
    finally:
        await store.close()
        server.kill()


# --------------------------------------------------------------------------- the stage and the compiler

GAUSSIAN_RISK: dict[str, Any] = {
    "privacy_unit": "one patient's record in the training data",
    "outputs": {"score": {"mechanism": "gaussian", "bounds": [0.0, 1.0], "epsilon": 1.0, "delta": 1e-6,
                          "width": 1}},
    "budget": {"epsilon": 3.0, "delta": DELTA},
    "timing_jitter_ms": 0,
}


async def call(stage: DpNoiser, upstream: FakeUpstream) -> InferResponse:
    return await call_stage(stage, ctx_for(), risk_request(), upstream)


async def test_the_stage_spends_refunds_and_refuses_through_redis(ledgers: list[StateBudgetLedger],
                                                                  clock: Clock) -> None:
    """Two replicas' DP stages on one Redis: a failed request is refunded, answered rows are
    charged, and the shared budget ends at the same row count as one accountant computes."""
    policy = DpPolicy.model_validate({"models": {"risk": GAUSSIAN_RISK}})
    replicas = [build_dp_stage(policy, ledger, clock) for ledger in ledgers]
    accountant = replicas[0].models["risk"].accountant("alpha", frozenset({"score"}))
    key, period, size = ledger_key("alpha", "risk"), PeriodScheme().at(T0), len(RDP_ORDERS)

    failing = FakeUpstream(extra=False, fail=True)
    with pytest.raises(UpstreamUnavailable):
        await call(replicas[0], failing)
    assert failing.calls == 1
    assert await ledgers[1].usage(key, period, size) == accountant.zero()  # refunded

    upstream = FakeUpstream(extra=False)
    with pytest.raises(RateLimited):
        for i in range(1000):
            await call(replicas[i % 2], upstream)
    assert upstream.calls == accountant.rows_remaining(accountant.zero()) > 1
    used = await ledgers[0].usage(key, period, size)
    assert accountant.epsilon(used) <= GAUSSIAN_RISK["budget"]["epsilon"] * (1 + 1e-9)


async def test_redis_down_means_the_stage_refuses(tmp_path: Path, clock: Clock) -> None:
    server = RedisServer.start(tmp_path / "redis")
    store = RedisState.from_url(server.url, clock=clock, key_prefix="down2", op_timeout_s=0.5)
    stage = build_dp_stage(DpPolicy.model_validate({"models": {"risk": GAUSSIAN_RISK}}), StateBudgetLedger(store),
                           clock)
    try:
        server.stop()
        upstream = FakeUpstream(extra=False)
        with pytest.raises(DependencyUnavailable):
            await call(stage, upstream)
        assert upstream.calls == 0  # no budget, no answer: the model is never asked
    finally:
        await store.close()
        server.kill()


GAUSSIAN_PRIVACY_YAML = b"""
models:
  risk:
    privacy_unit: one patient's record in the training data of the risk model
    outputs:
      score:
        mechanism: gaussian
        bounds: [0.0, 1.0]
        epsilon: 0.5
        delta: 1.0e-6
        width: 1
    budget:
      epsilon: 5.0
      delta: 1.0e-5
"""


async def test_gaussian_policy_compiles_with_a_redis_ledger(redis_server: RedisServer) -> None:
    """The compiler used to refuse Gaussian + --redis; RDP vectors are shared now."""
    raw = {p.name: p.read_bytes() for p in (ROOT / "policies").iterdir() if p.is_file()}
    raw["privacy.yaml"] = GAUSSIAN_PRIVACY_YAML
    policy = build_policy_set(raw)
    store = RedisState.from_url(redis_server.url)
    try:
        env = CompileEnv(dp_ledger=StateBudgetLedger(store), repo_dir=ROOT / "triton_repo",
                         pii_hmac_key=secrets.token_bytes(32), pii_token_key=secrets.token_bytes(32))
        pipeline = compile_pipeline(policy, Metrics(), env)
    finally:
        await store.close()
    dp = next(b.stage for b in pipeline.stages if isinstance(b.stage, DpNoiser))
    assert dp.models["risk"].accountant("acme", frozenset({"score"})).kind == "rdp"
