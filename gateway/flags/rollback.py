"""Per-variant health over a sliding window, and the sticky automatic rollback it trips.

Every admitted call routed by a flag ends in :meth:`RollbackTracker.record`: whether it
failed on the server side (5xx, never the client's 4xx nor the gateway's own shedding or
dependency outages), how long it took, whether an
adversarial detector fired and whether PII was found in the model's output. When a
non-stable variant breaches one of the flag's thresholds over the window (and has seen
at least ``min_requests`` calls, so three unlucky requests do not end a rollout), the
tracker trips: traffic for that flag goes back to the stable variant, the ``on_trip``
callback tells the audit log and the metrics why, and the override stays.

Why sticky, and until when: a rollback that undid itself when the window cooled down
would flap a broken canary on and off. The override is keyed by the flag's
*definition hash*, so it holds until a person edits that flag (any edit, even back to
the exact text that failed: a newer policy generation with a different definition
clears it) and survives edits to other flags.

State lives in process memory and belongs to the app lifecycle, shared by every policy
revision. With a :class:`RollbackStore` (:class:`gateway.flags.shared.StateRollbackStore`
over Redis) a trip is shared: the replica that trips publishes it, every other replica
reads it at most ``store_refresh_s`` later and serves stable too, and a restart keeps it.
Without one each replica trips on its own traffic and a restart forgets a trip.

Fail closed when the store cannot answer: a flag definition whose shared state could not
be read (store down, or not yet read since the last failure) serves its stable variant
(:meth:`RollbackTracker.held` says ``rollback_state_unavailable``) until a read succeeds.
Keeping the last known answer instead would let a replica go on serving a canary that
another replica has just rolled back for leaking PII. A trip that could not be published
is kept locally and published again on the next read. Event-loop confined: no locks.

The same holds for the flag file: when a reload finds ``flags.json`` unusable (garbage,
truncated, invalid, or deleted while routes were active) the revision is refused and,
until a usable file is built, every route serves its stable variant (``flag_file_unusable``).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

__all__ = [
    "DETECTOR_RATE",
    "ERROR_RATE",
    "HELD_FLAG_FILE",
    "HELD_ROLLED_BACK",
    "HELD_UNAVAILABLE",
    "LATENCY_P99",
    "PII_RATE",
    "CallOutcome",
    "MemoryRollbackStore",
    "RollbackStore",
    "RollbackTracker",
    "RollbackTrip",
    "Thresholds",
    "WindowStats",
]

log = structlog.get_logger("gateway.flags")

ERROR_RATE: Final = "error_rate"
LATENCY_P99: Final = "latency_p99"
DETECTOR_RATE: Final = "detector_rate"
PII_RATE: Final = "pii_rate"

# Why a definition serves its stable variant now (the variant ``reason`` of a call).
HELD_ROLLED_BACK: Final = "rolled_back"
HELD_UNAVAILABLE: Final = "rollback_state_unavailable"
HELD_FLAG_FILE: Final = "flag_file_unusable"

# More than 1% of calls slower than the limit means the 99th percentile is above it: an
# O(1) running count instead of sorting the window on every call.
_P99_TAIL: Final = 0.01


@dataclass(frozen=True, slots=True)
class Thresholds:
    """When a variant is unhealthy. ``None`` disables a check; rates are fractions (0..1)."""

    window_s: float = 60.0
    min_requests: int = 20
    max_error_rate: float | None = 0.05
    max_p99_latency_s: float | None = None
    max_detector_rate: float | None = None
    max_pii_rate: float | None = None
    enabled: bool = True
    # Distinct callers whose calls must carry a detector hit (or PII in the output) before
    # those signals may trip: both are driven by what a client sends (see _breach).
    min_signal_callers: int = 1


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """What one completed call says about the variant that served it."""

    error: bool
    latency_s: float
    detector_hit: bool = False
    pii_hit: bool = False
    caller: str = ""  # pseudonymous key of the principal ("" = unknown: one anonymous caller)


@dataclass(frozen=True, slots=True)
class RollbackTrip:
    """Why a flag was rolled back: the audit record's and the metric's payload."""

    flag: str
    definition_hash: str
    from_variant: str
    to_variant: str
    reason: str  # error_rate | latency_p99 | detector_rate | pii_rate
    observed: float
    threshold: float
    requests: int
    window_s: float
    revision: str
    at: float  # wall clock, seconds since the epoch

    def audit_fields(self) -> dict[str, object]:
        """Flat, bounded fields for an audit record (no subject, no request data)."""
        return {
            "event": "canary_rollback",
            "flag": self.flag,
            "flag_definition": self.definition_hash,
            "from_variant": self.from_variant,
            "to_variant": self.to_variant,
            "reason": self.reason,
            "observed": round(self.observed, 6),
            "threshold": self.threshold,
            "window_requests": self.requests,
            "window_s": self.window_s,
            "policy_revision": self.revision,
        }


@dataclass(frozen=True, slots=True)
class WindowStats:
    requests: int
    errors: int
    slow: int
    detector_hits: int
    pii_hits: int

    def rate(self, count: int) -> float:
        return count / self.requests if self.requests else 0.0


class RollbackStore(Protocol):
    """Where trips are shared between replicas and kept across restarts (e.g. Redis).

    Both calls may raise. A failed ``load`` holds the definition on stable until a read
    succeeds; a failed ``save`` keeps the trip locally and retries it on the next read.
    An outage never un-does a rollback and never fails a request.
    """

    async def load(self, flag: str, definition_hash: str) -> RollbackTrip | None: ...

    async def save(self, trip: RollbackTrip) -> None: ...


@dataclass(slots=True)
class MemoryRollbackStore:
    """A :class:`RollbackStore` in one process's memory: tests, and the shape to copy."""

    trips: dict[tuple[str, str], RollbackTrip] = field(default_factory=dict)

    async def load(self, flag: str, definition_hash: str) -> RollbackTrip | None:
        return self.trips.get((flag, definition_hash))

    async def save(self, trip: RollbackTrip) -> None:
        self.trips.setdefault((trip.flag, trip.definition_hash), trip)


TripCallback = Callable[[RollbackTrip], None]


class _Window:
    """Calls of one (flag, definition, variant) in the last ``window_s``, with running sums."""

    __slots__ = ("detector_callers", "detector_hits", "errors", "events", "max_events", "pii_callers", "pii_hits",
                 "slow", "window_s")

    def __init__(self, window_s: float, max_events: int) -> None:
        self.events: deque[tuple[float, float, bool, bool, bool, bool, str]] = deque()
        self.window_s = window_s  # fixed: thresholds belong to the definition, which keys the window
        self.max_events = max_events
        self.errors = self.slow = self.detector_hits = self.pii_hits = 0
        # caller -> hits in the window (only callers with hits are kept: bounded by the events)
        self.detector_callers: dict[str, int] = {}
        self.pii_callers: dict[str, int] = {}

    def add(self, now: float, outcome: CallOutcome, slow: bool) -> None:
        if len(self.events) >= self.max_events:
            self._drop()
        self.events.append((now, outcome.latency_s, outcome.error, slow, outcome.detector_hit, outcome.pii_hit,
                            outcome.caller))
        self.errors += outcome.error
        self.slow += slow
        self.detector_hits += outcome.detector_hit
        self.pii_hits += outcome.pii_hit
        if outcome.detector_hit:
            self.detector_callers[outcome.caller] = self.detector_callers.get(outcome.caller, 0) + 1
        if outcome.pii_hit:
            self.pii_callers[outcome.caller] = self.pii_callers.get(outcome.caller, 0) + 1

    def evict(self, now: float) -> None:
        oldest = now - self.window_s
        while self.events and self.events[0][0] < oldest:
            self._drop()

    def _drop(self) -> None:
        _, _, error, slow, detector, pii, caller = self.events.popleft()
        self.errors -= error
        self.slow -= slow
        self.detector_hits -= detector
        self.pii_hits -= pii
        if detector:
            _forget(self.detector_callers, caller)
        if pii:
            _forget(self.pii_callers, caller)

    def stats(self) -> WindowStats:
        return WindowStats(len(self.events), self.errors, self.slow, self.detector_hits, self.pii_hits)

    def p99(self) -> float:
        latencies = sorted(event[1] for event in self.events)
        if not latencies:
            return 0.0
        return latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]


def _forget(callers: dict[str, int], caller: str) -> None:
    left = callers.get(caller, 0) - 1
    if left > 0:
        callers[caller] = left
    else:
        callers.pop(caller, None)


class RollbackTracker:
    """Sliding-window statistics per variant and the sticky overrides they trip.

    ``generation`` (see :meth:`observe_definition`) orders policy revisions as they were
    built, so a request still pinned to an older revision cannot clear a newer trip.
    """

    def __init__(self, *, on_trip: TripCallback | None = None, store: RollbackStore | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 max_events: int = 100_000, store_refresh_s: float = 5.0) -> None:
        self.on_trip = on_trip
        self.store = store
        self.clock = clock
        self.wall_clock = wall_clock
        self.max_events = max_events
        self.store_refresh_s = store_refresh_s
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._overrides: dict[tuple[str, str], RollbackTrip] = {}
        self._latest: dict[str, tuple[int, str]] = {}
        self._refreshed: dict[tuple[str, str], float] = {}
        self._confirmed: dict[tuple[str, str], bool] = {}  # last read of the store succeeded
        self._unpublished: dict[tuple[str, str], RollbackTrip] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.flag_file_fault: str | None = None
        self.routing_seen = False

    # -- the flag file itself ----------------------------------------------------------

    def flag_file_failed(self, why: str) -> None:
        """The policy's flag file cannot be used (garbage, truncated, invalid, deleted).

        # SECURITY: the active revision's file may be the very split being rolled back; a
        # broken replacement must not leave it routing. Every route serves its stable
        # variant (:meth:`held`) until a usable file is built again (catalogue AV-12).
        """
        if self.flag_file_fault is None:
            log.warning("flag_file_unusable", error=why[:200], fallback="stable_variant")
        self.flag_file_fault = why

    def flag_file_loaded(self, *, routes: bool) -> None:
        """A usable flag file was built; ``routes``: it routes at least one model."""
        if self.flag_file_fault is not None:
            log.info("flag_file_recovered")
        self.flag_file_fault = None
        self.routing_seen = self.routing_seen or routes

    # -- definitions -------------------------------------------------------------------

    def observe_definition(self, flag: str, definition_hash: str, generation: int) -> None:
        """Note the definition a request evaluated; a newer, different one clears old state.

        This is how "until a person changes the flag" is kept: the edit produces a new
        definition hash in a newer generation, and the old override and windows go.
        """
        latest = self._latest.get(flag)
        if latest is not None and generation < latest[0]:
            return  # a straggler pinned to an older revision
        if latest is not None and latest[1] != definition_hash:
            for key in [k for k in self._overrides if k[0] == flag and k[1] != definition_hash]:
                trip = self._overrides.pop(key)
                log.info("canary_rollback_cleared", flag=flag, old_definition=trip.definition_hash,
                         new_definition=definition_hash)
            for wkey in [k for k in self._windows if k[0] == flag and k[1] != definition_hash]:
                del self._windows[wkey]
            for rkey in [k for k in self._refreshed if k[0] == flag and k[1] != definition_hash]:
                del self._refreshed[rkey]
            for ckey in [k for k in self._confirmed if k[0] == flag and k[1] != definition_hash]:
                del self._confirmed[ckey]
        self._latest[flag] = (generation, definition_hash)

    def override(self, flag: str, definition_hash: str) -> RollbackTrip | None:
        """The trip that holds this flag definition on its stable variant, if any."""
        return self._overrides.get((flag, definition_hash))

    def held(self, flag: str, definition_hash: str) -> str | None:
        """Why this definition must serve its stable variant now, or None when it may route.

        # SECURITY: with a shared store, "not rolled back" must be confirmed by it; an
        # unreadable store holds the flag on stable (see the module docstring).
        """
        if (flag, definition_hash) in self._overrides:
            return HELD_ROLLED_BACK
        if self.flag_file_fault is not None:
            return HELD_FLAG_FILE
        if self.store is not None and not self._confirmed.get((flag, definition_hash), False):
            return HELD_UNAVAILABLE
        return None

    # -- statistics --------------------------------------------------------------------

    def record(self, flag: str, definition_hash: str, variant: str, stable_variant: str,
               thresholds: Thresholds, outcome: CallOutcome, *, revision: str = "") -> RollbackTrip | None:
        """Add one call; return the trip if this call made the variant breach its thresholds."""
        now = self.clock()
        key = (flag, definition_hash, variant)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(thresholds.window_s, self.max_events)
        window.evict(now)
        limit = thresholds.max_p99_latency_s
        window.add(now, outcome, slow=limit is not None and outcome.latency_s > limit)
        if (not thresholds.enabled or variant == stable_variant
                or (flag, definition_hash) in self._overrides):
            return None
        breach = self._breach(window, thresholds)
        if breach is None:
            return None
        reason, observed, threshold = breach
        trip = RollbackTrip(flag=flag, definition_hash=definition_hash, from_variant=variant,
                            to_variant=stable_variant, reason=reason, observed=observed, threshold=threshold,
                            requests=len(window.events), window_s=thresholds.window_s, revision=revision,
                            at=self.wall_clock())
        self._trip(trip)
        return trip

    def stats(self, flag: str, definition_hash: str, variant: str) -> WindowStats:
        window = self._windows.get((flag, definition_hash, variant))
        if window is None:
            return WindowStats(0, 0, 0, 0, 0)
        window.evict(self.clock())
        return window.stats()

    @staticmethod
    def _breach(window: _Window, t: Thresholds) -> tuple[str, float, float] | None:
        s = window.stats()
        if s.requests < t.min_requests:
            return None
        if t.max_error_rate is not None and s.rate(s.errors) > t.max_error_rate:
            return ERROR_RATE, s.rate(s.errors), t.max_error_rate
        if t.max_p99_latency_s is not None and s.rate(s.slow) > _P99_TAIL:
            return LATENCY_P99, window.p99(), t.max_p99_latency_s
        # SECURITY: detector hits and PII in the output follow from what clients send (an
        # adversarial-looking input, a text the model echoes); one caller in the canary
        # cohort could otherwise roll the canary back for everyone. They trip only when at
        # least `min_signal_callers` distinct callers produced them.
        if (t.max_detector_rate is not None and s.rate(s.detector_hits) > t.max_detector_rate
                and len(window.detector_callers) >= t.min_signal_callers):
            return DETECTOR_RATE, s.rate(s.detector_hits), t.max_detector_rate
        if (t.max_pii_rate is not None and s.rate(s.pii_hits) > t.max_pii_rate
                and len(window.pii_callers) >= t.min_signal_callers):
            return PII_RATE, s.rate(s.pii_hits), t.max_pii_rate
        return None

    def _trip(self, trip: RollbackTrip, *, local: bool = True) -> None:
        self._overrides[(trip.flag, trip.definition_hash)] = trip
        log.warning("canary_rolled_back", flag=trip.flag, from_variant=trip.from_variant,
                    to_variant=trip.to_variant, reason=trip.reason, observed=round(trip.observed, 6),
                    threshold=trip.threshold, source="local" if local else "shared")
        if local and self.on_trip is not None:
            try:
                self.on_trip(trip)
            except Exception:  # bookkeeping must not turn an answered call into an error (logged with trace)
                log.exception("canary_rollback_hook_failed", flag=trip.flag)

    # -- sharing across replicas -------------------------------------------------------

    async def refresh(self, flag: str, definition_hash: str) -> None:
        """Read the shared state of this definition, at most once per ``store_refresh_s``.

        Concurrent calls share one read (none serves stable merely because another call's
        read is still in flight); a failed read marks the definition unconfirmed.
        """
        key = (flag, definition_hash)
        if self.store is None or (key in self._overrides and not self._unpublished):
            return
        task = self._inflight.get(key)
        if task is None:
            now = self.clock()
            last = self._refreshed.get(key)
            if last is not None and now - last < self.store_refresh_s:
                return
            self._refreshed[key] = now
            task = asyncio.ensure_future(self._read(key))
            self._inflight[key] = task
            task.add_done_callback(lambda _t, k=key: self._inflight.pop(k, None))  # type: ignore[misc]
        await asyncio.shield(task)

    async def _read(self, key: tuple[str, str]) -> None:
        assert self.store is not None  # noqa: S101 - refresh() checked it
        await self._publish_pending()
        if key in self._overrides:
            return  # held here already; the read was only to publish
        try:
            trip = await self.store.load(*key)
        except Exception as exc:  # noqa: BLE001 - any store failure holds the flag on stable
            if self._confirmed.get(key, True):
                log.warning("canary_rollback_store_unavailable", op="load", flag=key[0],
                            error=type(exc).__name__, fallback="stable_variant")
            self._confirmed[key] = False
            return
        if self._confirmed.get(key) is False:
            log.info("canary_rollback_store_recovered", flag=key[0])
        self._confirmed[key] = True
        if trip is not None and key not in self._overrides:
            self._trip(trip, local=False)

    async def publish(self, trip: RollbackTrip) -> None:
        """Share a local trip; on failure it is kept and retried by the next read."""
        if self.store is None:
            return
        try:
            await self.store.save(trip)
        except Exception as exc:  # noqa: BLE001 - the local rollback already holds; sharing retries
            self._unpublished[(trip.flag, trip.definition_hash)] = trip
            log.warning("canary_rollback_store_unavailable", op="save", flag=trip.flag, error=type(exc).__name__)

    async def _publish_pending(self) -> None:
        if self.store is None:
            return
        for key, trip in list(self._unpublished.items()):
            try:
                await self.store.save(trip)
            except Exception:  # noqa: BLE001 - still down: keep it for the next read
                return
            self._unpublished.pop(key, None)
            log.info("canary_rollback_published_late", flag=trip.flag)
