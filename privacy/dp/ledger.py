"""Per-tenant privacy budgets: reserve before answering, commit or refund after.

A budget is a vector (see :mod:`privacy.dp.accounting`): ``(ε,)`` under basic
composition, the RDP curve at fixed orders under RDP. An *account* is one
``(key, period)``; its ``used`` vector is committed spend **plus** every reservation still
open, so concurrent requests on any number of replicas see each other's reservations and
the budget can never be overspent, even if every request in flight succeeds.

Protocol (:class:`BudgetLedger`), as the stage uses it:

1. ``reserve(key, period, amount, limit)`` — atomically: if, for at least one coordinate
   ``i``, ``used[i] + amount[i] <= limit[i]`` (within :data:`LEDGER_RELATIVE_TOLERANCE`),
   add ``amount`` to ``used``, remember the reservation and return it; otherwise return
   :class:`Refused` with the seconds left in the period. Nothing else happens between
   the check and the add.
2. ``commit(reservation)`` once the noisy answer is released: the reservation becomes
   spend (``used`` is unchanged). Idempotent.
3. ``refund(reservation)`` when no answer was released (upstream failed, a later stage
   refused): ``used -= amount``. A refund after a commit does nothing: an answer that
   may have left is never un-charged. Idempotent.
4. ``usage(key, period, size)`` — the current ``used`` vector (zeros for a new account).

A policy edit of the period length renames the current period; the spend of a period of
the old length that overlaps the new one is carried into it (:func:`carried_spend`; Redis:
``account_standing`` in the scripts), so a reload never grants a fresh budget mid-period.

Periods come from one clock: the stage picks the period with the clock it was built
with, and the ledger measures ``retry_after_s`` with the same clock object. A shared
(Redis) ledger should use one time source for both, e.g. Redis ``TIME``.

Redis mapping (the shared implementation, ``gateway/state/dp_ledger.py`` and
``gateway/state/dp_vector.py``): one hash per (key), the period index in a field, ``used``
as one scalar (basic composition) or one packed vector (RDP, ≤ 69 doubles), one field per
open reservation, expiring a grace minute after the period; reserve/commit/refund are each
one Lua script (the check-and-add above is a loop over the vector). A missing
epoch marker (state lost by ``FLUSHALL`` or a restart without persistence) must raise
:class:`LedgerUnavailable` so the stage fails closed instead of granting a fresh
budget. Abandoned reservations (a replica died mid-request) stay counted until the
period ends: that under-uses the budget, it never overspends it.

The in-memory ledger is for the embedded single-process default and tests: its state
dies with the process (a restart resets budgets), which is acceptable only there.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt

Clock = Callable[[], float]
"""Seconds since the UNIX epoch (UTC), like :func:`time.time`; injectable for tests."""

DAY_S: Final = 86_400

# Relative slack for float sums (0.1 added 50 times is not exactly 5.0). The noise is
# calibrated so that the true cost of a row is below its charged cost by a larger margin
# (privacy.dp.mechanisms.CALIBRATION_MARGIN), so admitting within this slack never lets
# the true spend exceed the budget.
LEDGER_RELATIVE_TOLERANCE: Final = 1e-9


class LedgerUnavailable(Exception):
    """The ledger cannot answer, or its state cannot be trusted (e.g. lost epoch marker).

    Callers fail closed: no reservation, no answer.
    """


class LedgerMismatch(LedgerUnavailable):
    """An account holds a vector of another size (the accounting changed mid-period)."""


def fits(used: Sequence[float], amount: Sequence[float], limit: Sequence[float]) -> bool:
    """The admission rule: some coordinate stays within its limit (see module docstring)."""
    return any(
        u + a <= lim + LEDGER_RELATIVE_TOLERANCE * abs(lim) for u, a, lim in zip(used, amount, limit, strict=True)
    )


@dataclass(frozen=True, slots=True)
class Period:
    """One budget period ``[start_s, end_s)``; ``id`` names it in ledger keys."""

    id: str
    start_s: float
    end_s: float

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.end_s - now)

    def end_iso(self) -> str:
        return datetime.fromtimestamp(self.end_s, UTC).isoformat().replace("+00:00", "Z")

    def start_iso(self) -> str:
        return datetime.fromtimestamp(self.start_s, UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class PeriodScheme:
    """Fixed-length periods aligned to UTC midnight (the UNIX epoch is a UTC midnight).

    The length must divide a day or be a whole number of days, so every UTC day starts
    a period: "ε 5 per UTC day" means exactly that, with no drift.
    """

    length_s: int = DAY_S

    def __post_init__(self) -> None:
        if self.length_s <= 0 or (DAY_S % self.length_s and self.length_s % DAY_S):
            raise ValueError("a budget period must divide a day or be a whole number of days")

    def at(self, now: float) -> Period:
        index = math.floor(now / self.length_s)
        start = index * self.length_s
        return Period(id=f"{self.length_s}s:{index}", start_s=float(start), end_s=float(start + self.length_s))


@dataclass(frozen=True, slots=True)
class Reservation:
    """Budget held for one request until it is committed or refunded."""

    key: str
    period: Period
    amount: tuple[float, ...]
    token: str
    used_after: tuple[float, ...]  # the account's ``used`` right after this reservation


@dataclass(frozen=True, slots=True)
class Refused:
    """Not enough budget left in this period; ``retry_after_s`` runs to the next one."""

    retry_after_s: float
    used: tuple[float, ...]


class BudgetLedger(Protocol):
    """Atomic reserve-then-commit spending of per-(key, period) budget vectors."""

    async def reserve(
        self, key: str, period: Period, amount: Sequence[float], limit: Sequence[float]
    ) -> Reservation | Refused:
        """Hold ``amount`` if :func:`fits`; raise :class:`LedgerUnavailable` if unsure."""
        ...

    async def commit(self, reservation: Reservation) -> None:
        """Turn a reservation into spend; idempotent."""
        ...

    async def refund(self, reservation: Reservation) -> None:
        """Release a reservation that was not committed; a no-op after commit."""
        ...

    async def usage(self, key: str, period: Period, size: int) -> tuple[float, ...]:
        """The account's ``used`` vector (committed + open reservations)."""
        ...


FloatArray = npt.NDArray[np.float64]


@dataclass(slots=True)
class _Account:
    period: Period
    used: FloatArray
    pending: dict[str, FloatArray] = field(default_factory=dict)


def _vector(values: Sequence[float], what: str) -> FloatArray:
    out = np.array(values, dtype=np.float64)  # a copy: the caller's sequence may change
    if out.ndim != 1 or not out.size or not np.isfinite(out).all():
        raise ValueError(f"{what} must be a non-empty vector of finite floats")
    return out


def _fits(used: FloatArray, amount: FloatArray, limit: FloatArray) -> bool:
    """:func:`fits` on arrays (the ledger's hot path; vectors of up to a few hundred floats)."""
    return bool((used + amount <= limit + LEDGER_RELATIVE_TOLERANCE * np.abs(limit)).any())


def carried_spend(others: Iterable[tuple[Period, FloatArray]], period: Period, size: int) -> FloatArray:
    """What a new account of ``period`` starts with: the spend of the same key's accounts
    written under *another* period length whose span overlaps ``period``.

    # SECURITY: a policy edit of ``period_s`` renames the current period; without this the
    # tenant's spend so far would be forgotten and a fresh budget granted mid-period (an
    # exhausted day turned into an hour with a full budget). Overlapping spend is counted
    # in full (an over-estimate when the old period was longer: under-use, never overspend).
    """
    total = np.zeros(size, dtype=np.float64)
    length = period.end_s - period.start_s
    for other, used in others:
        if other.end_s - other.start_s == length or other.end_s <= period.start_s or other.start_s >= period.end_s:
            continue
        if used.size != size:
            raise LedgerMismatch("budget account holds a vector of another size")
        total = total + used
    return total


class InMemoryBudgetLedger:
    """:class:`BudgetLedger` in this process: one lock, no await inside it.

    A thread lock (not an asyncio one) because the critical sections never await: they
    are atomic for coroutines on one loop and also for threads. Accounts are dropped
    ``keep_s`` after their period ends, so memory stays bounded by the live periods.
    """

    def __init__(self, clock: Clock = time.time, *, keep_s: float = 2 * DAY_S) -> None:
        self._clock = clock
        self._keep_s = keep_s
        self._accounts: dict[tuple[str, str], _Account] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    async def reserve(
        self, key: str, period: Period, amount: Sequence[float], limit: Sequence[float]
    ) -> Reservation | Refused:
        amount_v = _vector(amount, "amount")
        limit_v = _vector(limit, "limit")
        if amount_v.shape != limit_v.shape or (amount_v < 0).any():
            raise ValueError("amount and limit must have the same size and amount must be >= 0")
        now = self._clock()
        with self._lock:
            self._expire(now)
            account = self._account(key, period, amount_v.size)
            # SECURITY: check and add under one lock: concurrent requests can never both
            # pass the check against the same headroom.
            if not _fits(account.used, amount_v, limit_v):
                return Refused(retry_after_s=period.seconds_left(now), used=tuple(account.used.tolist()))
            account.used = account.used + amount_v
            token = secrets.token_hex(16)
            account.pending[token] = amount_v
            return Reservation(key=key, period=period, amount=tuple(amount_v.tolist()), token=token,
                               used_after=tuple(account.used.tolist()))

    async def commit(self, reservation: Reservation) -> None:
        with self._lock:
            account = self._accounts.get((reservation.key, reservation.period.id))
            if account is None:
                # The account expired while the request was in flight: the answer is being
                # released, so charge it anyway (never release uncharged).
                account = self._account(reservation.key, reservation.period, len(reservation.amount))
                account.used = account.used + np.asarray(reservation.amount, dtype=np.float64)
                return
            account.pending.pop(reservation.token, None)

    async def refund(self, reservation: Reservation) -> None:
        with self._lock:
            account = self._accounts.get((reservation.key, reservation.period.id))
            if account is None:
                return
            amount = account.pending.pop(reservation.token, None)
            if amount is None:
                return  # committed (or refunded) already: a released answer stays charged
            account.used = np.maximum(account.used - amount, 0.0)

    async def usage(self, key: str, period: Period, size: int) -> tuple[float, ...]:
        with self._lock:
            account = self._accounts.get((key, period.id))
            if account is None:
                return tuple(carried_spend(self._others(key, period), period, size).tolist())
            if account.used.size != size:
                raise LedgerMismatch("budget account holds a vector of another size")
            return tuple(account.used.tolist())

    def open_reservations(self) -> int:
        """Reservations neither committed nor refunded (tests and health checks)."""
        with self._lock:
            return sum(len(a.pending) for a in self._accounts.values())

    def _account(self, key: str, period: Period, size: int) -> _Account:
        account = self._accounts.get((key, period.id))
        if account is None:
            account = _Account(period=period, used=carried_spend(self._others(key, period), period, size))
            self._accounts[(key, period.id)] = account
        elif account.used.size != size:
            # SECURITY: fail closed rather than start a fresh (full) budget mid-period.
            raise LedgerMismatch("budget account holds a vector of another size")
        return account

    def _others(self, key: str, period: Period) -> list[tuple[Period, FloatArray]]:
        return [(a.period, a.used) for (k, pid), a in self._accounts.items() if k == key and pid != period.id]

    def _expire(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60.0
        stale = [k for k, a in self._accounts.items() if a.period.end_s + self._keep_s < now]
        for k in stale:
            del self._accounts[k]
