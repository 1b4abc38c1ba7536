"""The rollback tracker: per-variant windows, thresholds, sticky overrides, sharing."""

from __future__ import annotations

import pytest

from gateway.flags.rollback import (
    DETECTOR_RATE,
    ERROR_RATE,
    LATENCY_P99,
    PII_RATE,
    CallOutcome,
    MemoryRollbackStore,
    RollbackTracker,
    RollbackTrip,
    Thresholds,
)

OK = CallOutcome(error=False, latency_s=0.01)
FAIL = CallOutcome(error=True, latency_s=0.01)
DEFAULTS = Thresholds()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tracker(**kwargs: object) -> tuple[RollbackTracker, Clock, list[RollbackTrip]]:
    clock = Clock()
    trips: list[RollbackTrip] = []
    return RollbackTracker(on_trip=trips.append, clock=clock, **kwargs), clock, trips  # type: ignore[arg-type]


def feed(t: RollbackTracker, outcome: CallOutcome, n: int, *, variant: str = "canary",
         thresholds: Thresholds = DEFAULTS, definition: str = "h1") -> RollbackTrip | None:
    trip = None
    for _ in range(n):
        trip = trip or t.record("f", definition, variant, "stable", thresholds, outcome)
    return trip


class TestThresholds:
    def test_error_rate_breach_trips_once_with_the_reason(self) -> None:
        t, _, trips = tracker()
        feed(t, OK, 20)
        feed(t, FAIL, 2)  # 2/22 = 9% > 5%
        assert len(trips) == 1
        trip = trips[0]
        assert (trip.reason, trip.from_variant, trip.to_variant) == (ERROR_RATE, "canary", "stable")
        assert trip.observed > 0.05 and trip.requests == 22
        assert t.override("f", "h1") is trip
        feed(t, FAIL, 10)
        assert len(trips) == 1  # already rolled back: no second trip

    def test_below_min_requests_nothing_trips(self) -> None:
        t, _, trips = tracker()
        feed(t, FAIL, 19)
        assert trips == []
        feed(t, FAIL, 1)
        assert len(trips) == 1

    def test_stable_variant_never_trips(self) -> None:
        t, _, trips = tracker()
        feed(t, FAIL, 100, variant="stable")
        assert trips == [] and t.override("f", "h1") is None
        assert t.stats("f", "h1", "stable").errors == 100

    def test_disabled_rollback_only_counts(self) -> None:
        t, _, trips = tracker()
        feed(t, FAIL, 100, thresholds=Thresholds(enabled=False))
        assert trips == []

    def test_old_errors_leave_the_window(self) -> None:
        t, clock, trips = tracker()
        th = Thresholds(window_s=10, min_requests=5, max_error_rate=0.5)
        feed(t, FAIL, 2, thresholds=th)
        clock.now += 11  # those two are now outside the window
        feed(t, OK, 4, thresholds=th)
        feed(t, FAIL, 1, thresholds=th)  # 1/5 in window
        assert trips == []
        assert t.stats("f", "h1", "canary").requests == 5

    def test_latency_p99(self) -> None:
        t, _, trips = tracker()
        th = Thresholds(min_requests=100, max_error_rate=1, max_p99_latency_s=0.5)
        feed(t, OK, 99, thresholds=th)
        feed(t, CallOutcome(error=False, latency_s=2.0), 1, thresholds=th)  # exactly 1%: p99 still fast
        assert trips == []
        feed(t, CallOutcome(error=False, latency_s=2.0), 1, thresholds=th)  # > 1% slow
        assert trips[0].reason == LATENCY_P99
        assert trips[0].observed == 2.0

    @pytest.mark.parametrize(("outcome", "field", "reason"), [
        (CallOutcome(error=False, latency_s=0.01, detector_hit=True), "max_detector_rate", DETECTOR_RATE),
        (CallOutcome(error=False, latency_s=0.01, pii_hit=True), "max_pii_rate", PII_RATE),
    ])
    def test_security_signals(self, outcome: CallOutcome, field: str, reason: str) -> None:
        t, _, trips = tracker()
        th = Thresholds(min_requests=10, **{field: 0.1})  # type: ignore[arg-type]
        feed(t, OK, 18, thresholds=th)
        feed(t, outcome, 2, thresholds=th)  # 2/20 = 10%: not above
        assert trips == []
        feed(t, outcome, 1, thresholds=th)
        assert trips[0].reason == reason

    def test_window_memory_is_bounded(self) -> None:
        t, _, _ = tracker(max_events=50)
        feed(t, OK, 500, thresholds=Thresholds(min_requests=10_000))
        assert t.stats("f", "h1", "canary").requests == 50


class TestStickiness:
    def test_override_holds_after_the_window_until_the_definition_changes(self) -> None:
        t, clock, _ = tracker()
        t.observe_definition("f", "h1", generation=1)
        feed(t, FAIL, 20)
        clock.now += 3600  # the window is long gone; the rollback is not
        assert t.override("f", "h1") is not None
        t.observe_definition("f", "h1", generation=2)  # another flag edited: same definition
        assert t.override("f", "h1") is not None
        t.observe_definition("f", "h2", generation=3)  # a person edited this flag
        assert t.override("f", "h1") is None and t.override("f", "h2") is None
        assert t.stats("f", "h1", "canary").requests == 0  # old statistics dropped too

    def test_editing_back_to_the_failed_text_is_an_edit(self) -> None:
        t, _, _ = tracker()
        t.observe_definition("f", "h1", generation=1)
        feed(t, FAIL, 20)
        t.observe_definition("f", "h2", generation=2)  # weights 100/0
        t.observe_definition("f", "h1", generation=3)  # back to 90/10 after the fix
        assert t.override("f", "h1") is None

    def test_a_straggler_on_an_older_revision_cannot_clear_a_newer_trip(self) -> None:
        t, _, _ = tracker()
        t.observe_definition("f", "h2", generation=5)
        feed(t, FAIL, 20, definition="h2")
        t.observe_definition("f", "h1", generation=4)  # request pinned before the swap
        assert t.override("f", "h2") is not None

    def test_a_failing_hook_does_not_raise(self) -> None:
        def boom(trip: RollbackTrip) -> None:
            raise RuntimeError("audit down")

        t = RollbackTracker(on_trip=boom)
        assert feed(t, FAIL, 20) is not None
        assert t.override("f", "h1") is not None


class TestSharing:
    async def test_a_trip_published_by_one_replica_is_adopted_by_another(self) -> None:
        store = MemoryRollbackStore()
        one, _, trips_one = tracker(store=store)
        two, clock, trips_two = tracker(store=store, store_refresh_s=5)
        await two.refresh("f", "h1")  # nothing yet
        trip = feed(one, FAIL, 20)
        assert trip is not None
        await one.publish(trip)
        await two.refresh("f", "h1")
        assert two.override("f", "h1") is None  # refreshed less than 5 s ago
        clock.now += 6
        await two.refresh("f", "h1")
        assert two.override("f", "h1") == trip
        assert trips_one == [trip] and trips_two == []  # audited once, by the replica that tripped

    async def test_store_outage_keeps_the_local_view(self) -> None:
        class Down:
            async def load(self, flag: str, definition_hash: str) -> RollbackTrip | None:
                raise ConnectionError("redis down")

            async def save(self, trip: RollbackTrip) -> None:
                raise ConnectionError("redis down")

        t, _, _ = tracker(store=Down())
        trip = feed(t, FAIL, 20)
        assert trip is not None
        await t.publish(trip)
        await t.refresh("f", "h2")
        assert t.override("f", "h1") is trip

    def test_audit_fields_are_flat_and_bounded(self) -> None:
        t, _, _ = tracker()
        trip = feed(t, FAIL, 20)
        assert trip is not None
        fields = trip.audit_fields()
        assert fields["event"] == "canary_rollback" and fields["reason"] == ERROR_RATE
        assert all(isinstance(v, str | int | float) for v in fields.values())


class TestSignalCallers:
    """Detector and PII signals trip only with enough distinct callers (s8 probe)."""

    def test_one_caller_never_trips_the_security_signals(self) -> None:
        t, _, trips = tracker()
        th = Thresholds(min_requests=5, max_error_rate=None, max_detector_rate=0.1, max_pii_rate=0.1,
                        min_signal_callers=3)
        feed(t, CallOutcome(error=False, latency_s=0.01, detector_hit=True, pii_hit=True, caller="1:a:x"), 100,
             thresholds=th)
        assert trips == []

    def test_callers_leave_with_their_events(self) -> None:
        t, clock, trips = tracker()
        th = Thresholds(window_s=60, min_requests=5, max_error_rate=None, max_detector_rate=0.1,
                        min_signal_callers=3)
        for caller in ("a", "b"):
            feed(t, CallOutcome(error=False, latency_s=0.01, detector_hit=True, caller=caller), 5, thresholds=th)
        clock.now += 61  # a and b leave the window
        feed(t, CallOutcome(error=False, latency_s=0.01, detector_hit=True, caller="c"), 10, thresholds=th)
        assert trips == []
        feed(t, CallOutcome(error=False, latency_s=0.01, detector_hit=True, caller="d"), 1, thresholds=th)
        feed(t, CallOutcome(error=False, latency_s=0.01, detector_hit=True, caller="e"), 1, thresholds=th)
        assert [trip.reason for trip in trips] == [DETECTOR_RATE]
