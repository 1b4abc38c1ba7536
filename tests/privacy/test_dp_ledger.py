"""The in-memory budget ledger: atomic reserve-then-commit, refunds, periods from one clock."""

from __future__ import annotations

import asyncio
import random
import threading
from datetime import UTC, datetime

import pytest

from privacy.dp.accounting import RdpAccountant
from privacy.dp.ledger import (
    DAY_S,
    InMemoryBudgetLedger,
    LedgerMismatch,
    PeriodScheme,
    Refused,
    Reservation,
)

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC).timestamp()
MIDNIGHT = datetime(2026, 12, 3, tzinfo=UTC).timestamp()
KEY = "dp:alpha:risk"


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(clock: Clock) -> InMemoryBudgetLedger:
    return InMemoryBudgetLedger(clock)


class TestPeriods:
    def test_utc_day_boundaries(self) -> None:
        period = PeriodScheme().at(T0)
        assert period.start_iso() == "2026-12-02T00:00:00Z"
        assert period.end_iso() == "2026-12-03T00:00:00Z"
        assert PeriodScheme().at(MIDNIGHT - 1e-6).id == period.id
        assert PeriodScheme().at(MIDNIGHT).id != period.id

    def test_shorter_periods_align_to_midnight(self) -> None:
        hour = PeriodScheme(3600).at(MIDNIGHT + 5400)
        assert hour.start_iso() == "2026-12-03T01:00:00Z"

    @pytest.mark.parametrize("length", [0, -60, 7000, DAY_S + 1])
    def test_misaligned_periods_are_refused(self, length: int) -> None:
        with pytest.raises(ValueError, match="divide a day"):
            PeriodScheme(length)


class TestReserveCommitRefund:
    async def test_reservations_count_before_commit(self, ledger: InMemoryBudgetLedger) -> None:
        """An open reservation already holds budget: a second request sees it."""
        period = PeriodScheme().at(T0)
        first = await ledger.reserve(KEY, period, (3.0,), (5.0,))
        assert isinstance(first, Reservation)
        assert first.used_after == (3.0,)
        assert isinstance(await ledger.reserve(KEY, period, (3.0,), (5.0,)), Refused)
        assert await ledger.usage(KEY, period, 1) == (3.0,)

    async def test_refund_returns_the_budget(self, ledger: InMemoryBudgetLedger) -> None:
        period = PeriodScheme().at(T0)
        held = await ledger.reserve(KEY, period, (3.0,), (5.0,))
        assert isinstance(held, Reservation)
        await ledger.refund(held)
        await ledger.refund(held)  # idempotent
        assert await ledger.usage(KEY, period, 1) == (0.0,)
        assert isinstance(await ledger.reserve(KEY, period, (5.0,), (5.0,)), Reservation)

    async def test_commit_is_final_and_idempotent(self, ledger: InMemoryBudgetLedger) -> None:
        """A committed reservation is never refunded (the answer may have left)."""
        period = PeriodScheme().at(T0)
        held = await ledger.reserve(KEY, period, (2.0,), (5.0,))
        assert isinstance(held, Reservation)
        await ledger.commit(held)
        await ledger.commit(held)
        await ledger.refund(held)
        assert await ledger.usage(KEY, period, 1) == (2.0,)
        assert ledger.open_reservations() == 0

    async def test_commit_after_the_account_expired_still_charges(self, clock: Clock) -> None:
        """A request that outlived its account's retention is charged on commit, not lost."""
        ledger = InMemoryBudgetLedger(clock, keep_s=0)
        period = PeriodScheme().at(T0)
        held = await ledger.reserve(KEY, period, (1.0,), (5.0,))
        assert isinstance(held, Reservation)
        clock.t = MIDNIGHT + 3600
        await ledger.reserve("dp:other:risk", PeriodScheme().at(clock.t), (1.0,), (5.0,))  # sweeps old accounts
        await ledger.commit(held)
        assert await ledger.usage(KEY, period, 1) == (1.0,)

    async def test_refused_says_when_the_period_ends(self, ledger: InMemoryBudgetLedger, clock: Clock) -> None:
        clock.t = MIDNIGHT - 90
        period = PeriodScheme().at(clock.t)
        refused = await ledger.reserve(KEY, period, (6.0,), (5.0,))
        assert isinstance(refused, Refused)
        assert refused.retry_after_s == 90

    async def test_period_rollover_with_an_injected_clock(self, ledger: InMemoryBudgetLedger, clock: Clock) -> None:
        scheme = PeriodScheme()
        assert isinstance(await ledger.reserve(KEY, scheme.at(clock()), (5.0,), (5.0,)), Reservation)
        assert isinstance(await ledger.reserve(KEY, scheme.at(clock()), (0.5,), (5.0,)), Refused)
        clock.t = MIDNIGHT
        assert isinstance(await ledger.reserve(KEY, scheme.at(clock()), (0.5,), (5.0,)), Reservation)

    async def test_vector_size_change_fails_closed(self, ledger: InMemoryBudgetLedger) -> None:
        """Switching a model from Laplace to Gaussian mid-period never opens a fresh budget."""
        period = PeriodScheme().at(T0)
        await ledger.reserve(KEY, period, (1.0,), (5.0,))
        with pytest.raises(LedgerMismatch):
            await ledger.reserve(KEY, period, (0.1, 0.2), (5.0, 5.0))
        with pytest.raises(LedgerMismatch):
            await ledger.usage(KEY, period, 2)

    @pytest.mark.parametrize(("amount", "limit"), [((-1.0,), (5.0,)), ((float("nan"),), (5.0,)), ((1.0,), (5.0, 1.0))])
    async def test_bad_vectors_are_refused(self, ledger: InMemoryBudgetLedger, amount: tuple[float, ...],
                                           limit: tuple[float, ...]) -> None:
        with pytest.raises(ValueError, match="."):
            await ledger.reserve(KEY, PeriodScheme().at(T0), amount, limit)


class TestAtomicity:
    async def test_200_concurrent_reservations_never_overspend(self, ledger: InMemoryBudgetLedger) -> None:
        """200 coroutines reserve 0.5 against 5.0, then commit or refund at random: exactly
        10 hold budget at any time, and the committed total never passes 5.0."""
        period = PeriodScheme().at(T0)
        rng = random.Random(7)
        granted: list[Reservation] = []

        async def one(i: int) -> None:
            await asyncio.sleep(rng.random() / 1000)
            result = await ledger.reserve(KEY, period, (0.5,), (5.0,))
            if isinstance(result, Reservation):
                granted.append(result)
                await asyncio.sleep(0)
                assert (await ledger.usage(KEY, period, 1))[0] <= 5.0
                if i % 3 == 0:
                    await ledger.refund(result)
                else:
                    await ledger.commit(result)

        for _ in range(3):  # refunds free budget for later rounds
            await asyncio.gather(*(one(i) for i in range(200)))
        used = (await ledger.usage(KEY, period, 1))[0]
        assert used <= 5.0
        assert used == 5.0
        assert ledger.open_reservations() == 0

    def test_threads_cannot_overspend_either(self, ledger: InMemoryBudgetLedger) -> None:
        """The lock is a thread lock: 8 threads x 50 reservations still admit exactly 10."""
        period = PeriodScheme().at(T0)
        wins: list[int] = []

        def worker() -> None:
            loop = asyncio.new_event_loop()
            try:
                for _ in range(50):
                    if isinstance(loop.run_until_complete(ledger.reserve(KEY, period, (0.5,), (5.0,))), Reservation):
                        wins.append(1)
            finally:
                loop.close()

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 10

    async def test_rdp_vectors_are_admitted_by_the_converted_epsilon(self, ledger: InMemoryBudgetLedger) -> None:
        """With RDP vectors, 200 concurrent rows stop exactly where the ε(δ) budget ends."""
        acct = RdpAccountant(rho_per_row=0.02, budget_epsilon=3.0, budget_delta=1e-5)
        period = PeriodScheme().at(T0)
        results = await asyncio.gather(
            *(ledger.reserve(KEY, period, acct.charge(1), acct.limit()) for _ in range(200))
        )
        granted = sum(isinstance(r, Reservation) for r in results)
        assert granted == acct.rows_remaining(acct.zero())
        used = await ledger.usage(KEY, period, len(acct.orders))
        assert acct.epsilon(used) <= 3.0 * (1 + 1e-9)
