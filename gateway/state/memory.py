"""In-process shared state: the embedded default, and the reference semantics.

Same contract and the same arithmetic as the Redis scripts (integer microseconds, the
GCRA interval and tolerance from :func:`~gateway.state.base.rate_params`), so
``tests/state`` can assert identical decisions from both for one scripted clock.

Atomicity comes from the event loop: no method awaits between reading and writing, so a
decision is never interleaved with another. It is per process: two gateway processes on
the memory backend each enforce the full limit (use Redis to share).

Memory is bounded. Entries expire like Redis keys (lazily, plus a few expired entries
swept per operation via a heap holding one schedule per key). Above ``max_entries``,
limit entries closest to expiry are evicted first, which forgives the least debt; budget
ledgers and documents are never evicted (forgetting a budget would grant it afresh).
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

from gateway.state.base import (
    BUDGET_EPSILON,
    BudgetDecision,
    ConcurrencyCheck,
    Document,
    DocumentConflict,
    Lease,
    LimitCheck,
    LimitDecision,
    QuotaCheck,
    RateCheck,
    Reservation,
    StateKey,
    StateUnavailable,
    check_unique,
    clock_us,
    rate_params,
    seconds,
)

SWEEP_PER_OP: Final = 8
# Quota and budget entries outlive their period a little, as their Redis keys do.
PERIOD_GRACE_US: Final = 60_000_000
# A refused concurrency request may retry after at most this long.
CONCURRENCY_RETRY_US: Final = 1_000_000


@dataclass(slots=True)
class _Quota:
    period: int
    count: int


@dataclass(slots=True)
class _Ledger:
    period: int
    spent: float
    reservations: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class _Entry:
    value: Any  # int (GCRA TAT) | _Quota | dict[str, int] (lease -> expiry) | _Ledger | Document
    expires_at: int | None  # µs; None = never
    evictable: bool = True


@dataclass(slots=True)
class _Plan:
    """What one check will write if every check of the run allows."""

    key: StateKey
    value: Any
    expires_at: int


class MemoryState:
    """:class:`~gateway.state.base.SharedState` in this process's memory."""

    def __init__(self, *, clock: Callable[[], float] = time.time, max_entries: int = 1_000_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[StateKey, _Entry] = {}
        self._schedule: list[tuple[int, int, StateKey]] = []  # (when, tiebreak, key)
        self._tiebreak = 0
        # Lease ids only need to be unique within this store (nothing outside the process
        # sees them): a counter under a random prefix, instead of a urandom call per lease.
        self._lease_prefix = secrets.token_hex(4)
        self._lease_ids = itertools.count()

    @property
    def backend(self) -> str:
        return "memory"

    def __len__(self) -> int:
        return len(self._entries)

    # -- limits --------------------------------------------------------------------------

    async def run_limits(self, checks: Sequence[LimitCheck]) -> list[LimitDecision]:
        if len(checks) > 1:
            check_unique(checks)
        now = self._now()
        decisions: list[LimitDecision] = []
        plans: list[_Plan] = []
        allowed = True
        for check in checks:
            decision, plan = self._decide(check, now)
            decisions.append(decision)
            if plan is not None:
                plans.append(plan)
            allowed = allowed and decision.allowed
        if not allowed:
            # Nothing is charged, so no lease was taken either.
            return [replace(d, lease=None) if d.lease is not None else d for d in decisions]
        for plan in plans:
            self._put(plan.key, plan.value, plan.expires_at)
        return decisions

    async def undo_limits(self, checks: Sequence[RateCheck | QuotaCheck]) -> None:
        now = self._now()
        for check in checks:
            entry = self._get(check.key, now)
            if entry is None:
                continue
            if isinstance(check, RateCheck) and isinstance(entry.value, int):
                tat = math.ceil(entry.value - check.cost * rate_params(check)[0])
                if tat <= now:
                    self._entries.pop(check.key, None)
                else:
                    self._put(check.key, tat, tat)
            elif (isinstance(check, QuotaCheck) and isinstance(entry.value, _Quota)
                  and entry.value.period == now // (check.period_s * 1_000_000)):
                entry.value.count = max(0, entry.value.count - check.cost)

    async def acquire(self, check: ConcurrencyCheck) -> LimitDecision:
        return (await self.run_limits([check]))[0]

    async def release(self, leases: Sequence[Lease]) -> None:
        now = self._now()
        for lease in leases:
            entry = self._get(lease.key, now)
            if entry is not None and isinstance(entry.value, dict):
                entry.value.pop(lease.lease_id, None)

    def _decide(self, check: LimitCheck, now: int) -> tuple[LimitDecision, _Plan | None]:
        entry = self._get(check.key, now)
        if isinstance(check, RateCheck):
            tat = self._typed(entry, int, "limits")
            full = now + math.floor(rate_params(check)[1])
            if tat is not None and tat > full:
                # SECURITY: no TAT is legitimately later than now + tolerance (an empty
                # bucket); one that is was written before the clock stepped back. Lowered to
                # an empty bucket and kept (even if this call is refused), such a step costs a
                # caller at most one bucket's refill, not a lockout the size of the step.
                tat = full
                self._put(check.key, tat, tat)
            return self._gcra(check, now, tat)
        if isinstance(check, QuotaCheck):
            return self._quota(check, now, self._typed(entry, _Quota, "limits"))
        return self._concurrency(check, now, self._typed(entry, dict, "limits"))

    @staticmethod
    def _gcra(check: RateCheck, now: int, stored: int | None) -> tuple[LimitDecision, _Plan | None]:
        interval, tolerance = rate_params(check)
        tat = stored if stored is not None else now
        tat = max(tat, now)
        new_tat = tat + check.cost * interval
        if new_tat - tolerance <= now:
            keep = math.ceil(new_tat)
            remaining = _clamp(math.floor((tolerance - (new_tat - now)) / interval + 1e-6), check.burst)
            decision = LimitDecision(True, check.burst, remaining, seconds(keep - now), 0.0)
            plan = _Plan(check.key, keep, keep) if keep > now else None
            return decision, plan
        remaining = _clamp(math.floor((tolerance - (tat - now)) / interval + 1e-6), check.burst)
        retry = -1 if check.cost * interval > tolerance else math.ceil(new_tat - tolerance - now)
        return LimitDecision(False, check.burst, remaining, seconds(math.ceil(tat - now)), seconds(retry)), None

    @staticmethod
    def _quota(check: QuotaCheck, now: int, stored: _Quota | None) -> tuple[LimitDecision, _Plan | None]:
        period_us = check.period_s * 1_000_000
        period = now // period_us
        if stored is not None and stored.period > period:
            # SECURITY: the clock stepped back over a period boundary: keep counting in the
            # later period rather than reopening an earlier one with a fresh quota.
            period = stored.period
        end = (period + 1) * period_us
        count = stored.count if stored is not None and stored.period == period else 0
        if count + check.cost <= check.limit:
            count += check.cost
            decision = LimitDecision(True, check.limit, check.limit - count, seconds(end - now), 0.0)
            return decision, _Plan(check.key, _Quota(period, count), end + PERIOD_GRACE_US)
        retry = -1 if check.cost > check.limit else end - now
        return LimitDecision(False, check.limit, max(0, check.limit - count), seconds(end - now), seconds(retry)), None

    def _concurrency(self, check: ConcurrencyCheck, now: int,
                     stored: dict[str, int] | None) -> tuple[LimitDecision, _Plan | None]:
        leases = {lid: exp for lid, exp in (stored or {}).items() if exp > now}
        lease_id = f"{self._lease_prefix}{next(self._lease_ids):x}"
        ttl = round(check.lease_ttl_s * 1_000_000)
        if len(leases) < check.limit:
            leases[lease_id] = now + ttl
            oldest = min(leases.values())
            decision = LimitDecision(True, check.limit, check.limit - len(leases), seconds(oldest - now), 0.0,
                                     Lease(check.key, lease_id))
            return decision, _Plan(check.key, leases, max(leases.values()))
        reset = min(leases.values()) - now
        return LimitDecision(False, check.limit, 0, seconds(reset), seconds(min(reset, CONCURRENCY_RETRY_US))), None

    # -- budgets -------------------------------------------------------------------------

    async def reserve(self, key: StateKey, amount: float, *, capacity: float, period_s: int,
                      reservation_id: str | None = None) -> BudgetDecision:
        _check_amount(amount)
        now = self._now()
        rid = reservation_id or secrets.token_hex(12)
        period_us = period_s * 1_000_000
        period = now // period_us
        end = (period + 1) * period_us
        ledger = self._typed(self._get(key, now), _Ledger, "reserve")
        if ledger is None or ledger.period != period:
            ledger = _Ledger(period, 0.0)
        reset = seconds(end - now)
        if rid in ledger.reservations:
            res = Reservation(key, rid, ledger.reservations[rid], period, period_s)
            return BudgetDecision(True, capacity, ledger.spent, reset, res)
        if ledger.spent + amount > capacity * (1 + BUDGET_EPSILON):
            return BudgetDecision(False, capacity, ledger.spent, reset)
        ledger.spent += amount
        ledger.reservations[rid] = amount
        self._put(key, ledger, end + PERIOD_GRACE_US, evictable=False)
        return BudgetDecision(True, capacity, ledger.spent, reset, Reservation(key, rid, amount, period, period_s))

    async def commit(self, reservation: Reservation, *, actual: float | None = None) -> bool:
        if actual is not None:
            _check_amount(actual)
            if actual > reservation.amount:
                raise ValueError("commit cannot charge more than was reserved")
        return self._settle(reservation, refund=None if actual is None else reservation.amount - actual)

    async def refund(self, reservation: Reservation) -> bool:
        return self._settle(reservation, refund=reservation.amount)

    def _settle(self, reservation: Reservation, *, refund: float | None) -> bool:
        now = self._now()
        ledger = self._typed(self._get(reservation.key, now), _Ledger, "settle")
        # A past period's budget is whole again: nothing there to settle.
        current = now // (reservation.period_s * 1_000_000)
        if ledger is None or ledger.period != reservation.period or current != reservation.period:
            return False
        held = ledger.reservations.pop(reservation.reservation_id, None)
        if held is None:
            return False
        if refund is not None:
            ledger.spent = max(0.0, ledger.spent - min(refund, held))
        return True

    # -- documents -----------------------------------------------------------------------

    async def get_document(self, key: StateKey) -> Document | None:
        document: Document | None = self._typed(self._get(key, self._now()), Document, "doc_get")
        return document

    async def put_document(self, key: StateKey, value: bytes, *, expected_version: int | None) -> int:
        current = self._typed(self._get(key, self._now()), Document, "doc_put")
        version = current.version if current is not None else None
        if version != expected_version:
            raise DocumentConflict(version or 0)
        new = Document((version or 0) + 1, bytes(value))
        self._entries[key] = _Entry(new, None, evictable=False)
        return new.version

    async def start(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._schedule.clear()

    # -- storage -------------------------------------------------------------------------

    def _now(self) -> int:
        now = clock_us(self._clock)
        self._sweep(now, SWEEP_PER_OP)
        return now

    def _get(self, key: StateKey, now: int) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at is not None and entry.expires_at <= now:
            del self._entries[key]
            return None
        return entry

    @staticmethod
    def _typed(entry: _Entry | None, kind: type[Any], op: str) -> Any:
        if entry is None:
            return None
        if not isinstance(entry.value, kind):
            # Redis answers WRONGTYPE here; a caller reusing a key kind for two structures is a bug.
            raise StateUnavailable(op, "wrongtype", "state key holds another kind of value")
        return entry.value

    def _put(self, key: StateKey, value: Any, expires_at: int, *, evictable: bool = True) -> None:
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self._max_entries:
                self._make_room()
            self._entries[key] = _Entry(value, expires_at, evictable)
            self._tiebreak += 1
            heapq.heappush(self._schedule, (expires_at, self._tiebreak, key))
        else:
            entry.value, entry.expires_at, entry.evictable = value, expires_at, evictable

    def _sweep(self, now: int, budget: int) -> None:
        """Drop up to ``budget`` expired entries; reschedule entries whose expiry moved on."""
        schedule = self._schedule
        while budget > 0 and schedule and schedule[0][0] <= now:
            _, _, key = heapq.heappop(schedule)
            budget -= 1
            entry = self._entries.get(key)
            if entry is None:
                continue
            if entry.expires_at is None or entry.expires_at <= now:
                if entry.expires_at is not None:
                    del self._entries[key]
                continue
            self._tiebreak += 1
            heapq.heappush(schedule, (entry.expires_at, self._tiebreak, key))

    def _make_room(self) -> None:
        now = clock_us(self._clock)
        self._sweep(now, len(self._schedule))
        target = self._max_entries - max(1, self._max_entries // 10)
        skipped: list[tuple[int, int, StateKey]] = []
        while len(self._entries) > target and self._schedule:
            item = heapq.heappop(self._schedule)
            entry = self._entries.get(item[2])
            if entry is None:
                continue
            if not entry.evictable:
                skipped.append(item)
                continue
            del self._entries[item[2]]
        for item in skipped:
            heapq.heappush(self._schedule, item)
        if len(self._entries) >= self._max_entries:
            raise StateUnavailable("limits", "full", "in-memory state is full of budgets and documents")


def _clamp(value: int, upper: int) -> int:
    return max(0, min(value, upper))


def _check_amount(amount: float) -> None:
    if not amount >= 0 or math.isinf(amount):
        raise ValueError(f"budget amounts must be finite and >= 0, got {amount!r}")
