"""The shared-state contract: what rate limits, DP budgets and feature flags need from a store.

One Protocol, two backends: :mod:`gateway.state.memory` (one process, injectable clock)
and :mod:`gateway.state.redis` (single Redis, Sentinel or Cluster). Both keep exactly the
semantics written here, and ``tests/state`` runs the same cases against both.

Why these operations and not GET/SET: every decision has to be a single atomic
check-and-update on the server, or two replicas racing between the read and the write
admit twice (redis/redis#4548). So each operation below is one Lua script on Redis, one
round trip, with the time read from the server (``TIME``) rather than from whichever
replica asks, and every key it writes carries a TTL set in the same script (a key that
outlives its purpose would block a principal forever: alisaifee/limits#14).

Keys
    A :class:`StateKey` is ``(group, kind, parts)``. ``parts`` are untrusted strings
    (subjects, tenants, addresses from tokens and sockets); backends never splice them into
    a key name: they are hashed, so ``("x", "a:b")`` and ``("x:a", "b")`` cannot collide and
    no user id is readable in Redis. ``group`` picks the Redis Cluster hash slot: keys of one
    group share a slot, so one script may touch them all. Group by tenant for anything a
    request charges together.

Limits (:meth:`SharedState.run_limits`)
    All checks of a request are decided together and are **all-or-nothing**: when every
    check allows, all are charged (and concurrency leases taken); when any refuses, none
    is charged. Refused requests cost nothing. On one server (or Sentinel's master) all
    checks are one script, whatever their groups. On a Cluster, checks in one group are
    one script; checks spanning groups run one script per group concurrently and the
    charged ones are undone if another refuses (a short window in which a concurrent
    request may be refused spuriously; never one in which too many pass).

    * :class:`RateCheck`: GCRA (a token bucket without a refill timer). ``rate`` units per
      ``period_s``; up to ``burst`` units at once; a request costs ``cost`` units.
    * :class:`QuotaCheck`: ``limit`` units per calendar period of ``period_s`` seconds
      aligned to the Unix epoch (86 400 = a UTC day); the count resets at the boundary.
    * :class:`ConcurrencyCheck`: at most ``limit`` leases held at once. A lease expires
      ``lease_ttl_s`` after it was taken, so a replica that dies mid-request frees its slots.

Budgets (:meth:`SharedState.reserve` / ``commit`` / ``refund``)
    A numeric budget per key per calendar period (e.g. ε per tenant per UTC day).
    ``reserve`` debits at once, so a reservation nobody settles (a replica killed between
    reserve and answer) stays spent: budgets fail safe. ``commit`` settles it (optionally
    at a smaller ``actual`` amount, refunding the difference); ``refund`` gives it back.
    Both are idempotent per reservation id, and ``reserve`` is idempotent per id too, so a
    retried call never charges twice.

Documents (:meth:`SharedState.get_document` / ``put_document``)
    A small versioned value with compare-and-set, for flags and settings shared by every
    replica. No TTL.

Failures
    Every backend failure (timeout, refused or reset connection, error reply such as
    ``READONLY`` or ``OOM``) raises :class:`StateUnavailable`, converted at one boundary in
    the backend. Callers decide fail-closed or fail-open; the store never guesses.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

_KIND_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

# Float budgets are compared with this relative slack, so ten charges of 0.1 fit a
# capacity of 1.0 despite binary rounding; it is far below any meaningful ε.
BUDGET_EPSILON: Final = 1e-9


class StateUnavailable(Exception):
    """The shared store could not answer in time or at all.

    ``kind`` is a short, bounded code for metrics and logs: ``timeout``, ``connection``,
    ``readonly``, ``oom``, ``busy``, ``wrongtype`` (one key holds another structure), ``error``,
    ``circuit_open``, ``full``. The message never contains a URL, a password or a key.
    """

    def __init__(self, op: str, kind: str, message: str | None = None) -> None:
        self.op = op
        self.kind = kind
        super().__init__(message or f"shared state unavailable during {op}: {kind}")


class DocumentConflict(Exception):
    """``put_document`` saw a different version than the caller expected."""

    def __init__(self, current: int) -> None:
        self.current = current
        super().__init__(f"document changed concurrently (now version {current})")


@dataclass(frozen=True, slots=True)
class StateKey:
    """Names one piece of shared state; see the module docstring for the three fields.

    The hash is computed once: a key is looked up several times per decision (the memory
    store's dict, the Redis key-name cache), and limiters reuse their keys across requests.
    """

    group: str
    kind: str
    parts: tuple[str, ...] = ()
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _KIND_RE.fullmatch(self.kind):
            raise ValueError(f"state key kind {self.kind!r} must match {_KIND_RE.pattern}")
        object.__setattr__(self, "_hash", hash((self.group, self.kind, self.parts)))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[StateKey], tuple[str, str, tuple[str, ...]]]:
        # String hashes differ between processes: rebuild (and rehash) rather than copy ``_hash``.
        return StateKey, (self.group, self.kind, self.parts)


@dataclass(frozen=True, slots=True)
class RateCheck:
    key: StateKey
    rate: float  # units per period
    period_s: float
    burst: int  # bucket capacity: units that may pass at once
    cost: int = 1

    def __post_init__(self) -> None:
        _positive(self.rate, "rate")
        _positive(self.period_s, "period_s")
        _positive(self.burst, "burst")
        _non_negative(self.cost, "cost")


@dataclass(frozen=True, slots=True)
class QuotaCheck:
    key: StateKey
    limit: int
    period_s: int  # calendar period aligned to the epoch: 60, 3600, 86400...
    cost: int = 1

    def __post_init__(self) -> None:
        _positive(self.limit, "limit")
        _positive(self.period_s, "period_s")
        _non_negative(self.cost, "cost")


@dataclass(frozen=True, slots=True)
class ConcurrencyCheck:
    key: StateKey
    limit: int
    lease_ttl_s: float

    def __post_init__(self) -> None:
        _positive(self.limit, "limit")
        _positive(self.lease_ttl_s, "lease_ttl_s")


LimitCheck = RateCheck | QuotaCheck | ConcurrencyCheck


@dataclass(frozen=True, slots=True)
class Lease:
    """A held concurrency slot; give it back with :meth:`SharedState.release`."""

    key: StateKey
    lease_id: str


@dataclass(frozen=True, slots=True)
class LimitDecision:
    """One check's verdict, with what the IETF RateLimit headers need.

    ``limit`` is the capacity (burst, quota or cap); ``remaining`` the units left after this
    request when allowed, or now when refused; ``reset_s`` the seconds until ``remaining`` is
    back to ``limit`` (end of the quota period; for concurrency, until the oldest lease
    expires); ``retry_after_s`` 0 when allowed, the earliest time the same request could pass
    when refused (``math.inf`` if it never can: its cost exceeds the capacity).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float
    lease: Lease | None = None


@dataclass(frozen=True, slots=True)
class Reservation:
    key: StateKey
    reservation_id: str
    amount: float
    period: int  # index of the calendar period charged (server time // period_s)
    period_s: int


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    granted: bool
    capacity: float
    spent: float  # including this reservation when granted
    reset_s: float  # until the period ends and the budget is whole again
    reservation: Reservation | None = None
    # The store's period index and the account's reservation counter in it (monotonic while
    # the account exists; 0/None where the store keeps no counter, e.g. in process memory).
    period: int | None = None
    seq: int = 0

    @property
    def remaining(self) -> float:
        return max(0.0, self.capacity - self.spent)


@dataclass(frozen=True, slots=True)
class Document:
    version: int
    value: bytes


class StateObserver(Protocol):
    """Told about every backend operation: for latency and error metrics (bounded labels)."""

    def state_op(self, backend: str, op: str, seconds: float, error: str | None) -> None: ...


class SharedState(Protocol):
    """The store every replica shares. Implementations: ``MemoryState``, ``RedisState``."""

    @property
    def backend(self) -> str:
        """``memory``, ``redis``, ``sentinel`` or ``cluster``: a metrics label."""
        ...

    async def run_limits(self, checks: Sequence[LimitCheck]) -> list[LimitDecision]:
        """Decide all ``checks`` at once, all-or-nothing; decisions in the same order."""
        ...

    async def undo_limits(self, checks: Sequence[RateCheck | QuotaCheck]) -> None:
        """Give back what an allowed :meth:`run_limits` charged for these rate/quota checks.

        For a call a later limit refused (its cost, known only once the body is decoded):
        a refused call is charged nothing. Best effort: a quota period that has ended is
        left alone, and a GCRA bucket never goes below empty.
        """
        ...

    async def acquire(self, check: ConcurrencyCheck) -> LimitDecision:
        """One concurrency slot; ``decision.lease`` is set when allowed."""
        ...

    async def release(self, leases: Sequence[Lease]) -> None:
        """Give slots back. Releasing an expired or already released lease is a no-op."""
        ...

    async def reserve(self, key: StateKey, amount: float, *, capacity: float, period_s: int,
                      reservation_id: str | None = None) -> BudgetDecision:
        """Debit ``amount`` from this period's budget if it fits. Idempotent per id."""
        ...

    async def commit(self, reservation: Reservation, *, actual: float | None = None) -> bool:
        """Settle a reservation (refunding ``amount - actual`` if smaller). False if already settled."""
        ...

    async def refund(self, reservation: Reservation) -> bool:
        """Return a reservation's amount. False if already settled or from a past period."""
        ...

    async def get_document(self, key: StateKey) -> Document | None: ...

    async def put_document(self, key: StateKey, value: bytes, *, expected_version: int | None) -> int:
        """Store ``value`` if the version is still ``expected_version`` (``None``: absent).

        Returns the new version; raises :class:`DocumentConflict` otherwise.
        """
        ...

    async def start(self) -> None:
        """Warm up at process start (connections, scripts, cluster topology). Never raises."""
        ...

    async def ping(self) -> None:
        """Raise :class:`StateUnavailable` unless the store answers (readiness)."""
        ...

    async def close(self) -> None: ...


class CheckKind(enum.StrEnum):
    RATE = "r"
    QUOTA = "q"
    CONCURRENCY = "c"


def kind_of(check: LimitCheck) -> CheckKind:
    if isinstance(check, RateCheck):
        return CheckKind.RATE
    if isinstance(check, QuotaCheck):
        return CheckKind.QUOTA
    return CheckKind.CONCURRENCY


def check_unique(checks: Sequence[LimitCheck]) -> None:
    """Two checks on one key would each see the state before the other's charge."""
    keys = {c.key for c in checks}
    if len(keys) != len(checks):
        raise ValueError("run_limits got two checks on the same key")


def seconds(us: int) -> float:
    """Microseconds from a backend to seconds; ``-1`` means never."""
    return math.inf if us < 0 else us / 1e6


def _positive(value: float, name: str) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _non_negative(value: int, name: str) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def clock_us(clock: Callable[[], float]) -> int:
    """An injected clock (seconds) as integer microseconds, the unit every backend computes in."""
    return round(clock() * 1_000_000)


def rate_params(check: RateCheck) -> tuple[float, float]:
    """GCRA emission interval and tolerance in µs, computed once so both backends agree bit for bit."""
    interval = check.period_s * 1_000_000 / check.rate
    return interval, interval * check.burst
