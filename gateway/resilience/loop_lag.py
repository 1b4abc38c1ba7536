"""How late the event loop runs: a tick that measures its own lateness.

Why: deadlines in this process are measured on the event loop's clock, so when the loop is
saturated (every connection's work queued behind every other's) a dependency that answered
in 1 ms looks like one that answered in 150 ms, because its reply sits in the socket until
the loop gets round to it. A deadline that fires then blames the dependency for the
gateway's own load, and a breaker counting those "failures" turns overload into refusals
of healthy traffic. Deadlines that must measure the dependency (see
:meth:`gateway.state.redis.RedisState._call`) subtract the lag recorded here.

How: one callback per loop reschedules itself every ``interval_s`` (10 ms) with
``loop.call_at`` and records how late it ran. The lateness beyond ``slack_s`` (1 ms:
epoll rounds its timeout up to the millisecond, so an idle loop is that late anyway) is
added to a running total; :meth:`LoopLagMonitor.lag_total` also counts a tick that is due
but has not run yet (the loop is busy right now), so the lag over any interval is the
difference of two readings. Cost: ~100 callbacks a second per process, nothing per request.

One monitor per event loop, started on first use by :func:`monitor` (the gateway's loop,
and each test's own loop); ``gateway_event_loop_lag_seconds`` is fed from it (app.py).

Which deadlines wait out the lag: the shared-state calls (rate limits, concurrency slots,
quotas, the DP ledger, documents: all through ``RedisState._call``), whose 100 ms budget
a saturated loop consumes by itself and whose breaker would turn that into refusals.
Deliberately not the others: the JWKS fetch (``fetch_timeout_s`` 2 s, requests wait at
most ``request_wait_s`` 1.5 s) and the audit append (``append_timeout_s`` 2 s) have
budgets 20x larger than the lag of a saturated gateway (p50 ~150 ms at 64 connections);
a lag that long means the process is failing anyway. Neither has a breaker fed by these
timeouts: a late JWKS fetch backs off and the cached keys keep being served (within
``max_stale_s``), and the audit writer's stall detection (``AuditLog.stalled``) is timed
by the writer thread itself, not by the loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Final

DEFAULT_INTERVAL_S: Final = 0.01
DEFAULT_SLACK_S: Final = 0.001

LagSink = Callable[[float], None]


class LoopLagMonitor:
    """The lateness of a self-rescheduling tick on one event loop (module docstring)."""

    __slots__ = ("_due", "_loop", "_running", "_sinks", "interval_s", "max_lag_s", "slack_s", "ticks", "total_s",
                 "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop, *, interval_s: float = DEFAULT_INTERVAL_S,
                 slack_s: float = DEFAULT_SLACK_S) -> None:
        if interval_s <= 0 or slack_s < 0:
            raise ValueError("interval_s must be > 0 and slack_s >= 0")
        # A weak reference: the global registry holds monitors, and a monitor must not keep a
        # closed loop (and everything it references) alive.
        self._loop = weakref.ref(loop)
        self.interval_s = interval_s
        self.slack_s = slack_s
        self.total_s = 0.0  # lag counted so far (each tick's lateness beyond the slack)
        self.max_lag_s = 0.0  # the largest single lateness seen
        self.ticks = 0
        self._sinks: list[LagSink] = []
        self._running = True
        # The timer handle is not kept: it references the loop (see ``_loop``).
        self._due = loop.time() + interval_s
        loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        loop = self._loop()
        if loop is None or not self._running:
            return
        now = loop.time()
        late = now - self._due
        if late < 0:
            late = 0.0  # asyncio runs timers up to one clock resolution early
        self.ticks += 1
        if late > self.slack_s:
            self.total_s += late - self.slack_s
        if late > self.max_lag_s:
            self.max_lag_s = late
        self._due = now + self.interval_s
        loop.call_at(self._due, self._tick)  # first: a failing sink must not stop the ticks
        for sink in self._sinks:
            sink(late)

    def lag_total(self) -> float:
        """Seconds of lag counted so far, including a tick that is overdue right now."""
        loop = self._loop()
        if loop is None or not self._running:
            return self.total_s
        overdue = loop.time() - self._due - self.slack_s
        return self.total_s + overdue if overdue > 0 else self.total_s

    def add_sink(self, sink: LagSink) -> None:
        """Call ``sink(lateness_s)`` on every tick (a metrics histogram); idempotent."""
        if sink not in self._sinks:
            self._sinks.append(sink)

    def stop(self) -> None:
        """No more ticks (the pending one returns at once); :func:`monitor` starts a new one."""
        self._running = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop()

    @property
    def running(self) -> bool:
        return self._running


_MONITORS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLagMonitor] = weakref.WeakKeyDictionary()


def monitor(loop: asyncio.AbstractEventLoop | None = None) -> LoopLagMonitor:
    """The monitor of ``loop`` (default: the running loop), started on first use."""
    loop = loop or asyncio.get_running_loop()
    found = _MONITORS.get(loop)
    if found is None or not found.running:
        found = _MONITORS[loop] = LoopLagMonitor(loop)
    return found
