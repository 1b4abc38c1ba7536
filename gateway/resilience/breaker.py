"""A circuit breaker per model: stop hammering an upstream that keeps failing.

closed --(N consecutive failures)--> open --(cooldown)--> half-open --(probe ok)--> closed
                                      ^----------------(probe fails)------------------'

While open, calls fail fast with 503 + Retry-After instead of queueing behind a sick
upstream; half-open lets exactly one probe through at a time. Only upstream failures
count (timeouts, unavailability, bad responses); a request the model rejected is the
client's fault and says nothing about the upstream's health.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from gateway.errors import UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable

T = TypeVar("T")

UPSTREAM_FAILURES = (UpstreamUnavailable, UpstreamTimeout, UpstreamBadResponse)


class State(enum.IntEnum):
    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(slots=True)
class Breaker:
    failure_threshold: int = 5
    cooldown_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    state: State = State.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = False

    def before(self) -> None:
        """Raise if the call must not go out now."""
        if self.state is State.CLOSED:
            return
        now = self.clock()
        if self.state is State.OPEN:
            remaining = self.opened_at + self.cooldown_s - now
            if remaining > 0:
                raise UpstreamUnavailable("circuit open", reason="upstream_circuit_open", retry_after_s=remaining)
            self.state = State.HALF_OPEN
        if self.probing:
            raise UpstreamUnavailable("circuit half-open", reason="upstream_circuit_open", retry_after_s=1.0)
        self.probing = True

    def success(self) -> None:
        self.state, self.failures, self.probing = State.CLOSED, 0, False

    def failure(self) -> None:
        self.probing = False
        self.failures += 1
        if self.state is State.HALF_OPEN or self.failures >= self.failure_threshold:
            self.state = State.OPEN
            self.opened_at = self.clock()

    def release(self) -> None:
        """The call ended without a verdict on the upstream (e.g. a client error)."""
        self.probing = False


@dataclass(slots=True)
class Breakers:
    """One breaker per model, created on first use; bounded by the models the policy exposes."""

    failure_threshold: int = 5
    cooldown_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[str, State], None] | None = None
    _by_model: dict[str, Breaker] = field(default_factory=dict)

    def configure(self, failure_threshold: int, cooldown_s: float) -> None:
        """Adopt a policy revision's thresholds, for new breakers and the existing ones alike.

        Called once per revision (not per call), so a reload changes them in one place and
        a breaker's state (failures counted, open since) carries over unchanged.
        """
        self.failure_threshold, self.cooldown_s = failure_threshold, cooldown_s
        for breaker in self._by_model.values():
            breaker.failure_threshold, breaker.cooldown_s = failure_threshold, cooldown_s

    def get(self, model: str) -> Breaker:
        breaker = self._by_model.get(model)
        if breaker is None:
            breaker = self._by_model[model] = Breaker(self.failure_threshold, self.cooldown_s, self.clock)
        return breaker

    async def call(self, model: str, fn: Callable[[], Awaitable[T]]) -> T:
        breaker = self.get(model)
        before = breaker.state
        breaker.before()
        try:
            result = await fn()
        except UPSTREAM_FAILURES:
            breaker.failure()
            self._changed(model, before, breaker.state)
            raise
        except BaseException:
            breaker.release()
            raise
        breaker.success()
        self._changed(model, before, breaker.state)
        return result

    def _changed(self, model: str, before: State, after: State) -> None:
        if before is not after and self.on_change is not None:
            self.on_change(model, after)
