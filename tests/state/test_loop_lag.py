"""The event-loop lag monitor: it records a blocked loop, and its numbers reach Prometheus."""

from __future__ import annotations

import asyncio
import gc
import time

from gateway.observability.metrics import Metrics
from gateway.resilience import loop_lag
from gateway.resilience.loop_lag import LoopLagMonitor


def block(seconds: float) -> None:
    """Hold the event loop's thread, as a synchronous hot section would."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_blocked_loop_is_recorded_as_lag() -> None:
    """The pending tick was due at most one interval after the block began: its lateness is
    at least the block's length minus that interval, whenever the block started."""
    mon = LoopLagMonitor(asyncio.get_running_loop(), interval_s=0.005, slack_s=0.001)
    seen: list[float] = []
    mon.add_sink(seen.append)
    try:
        await asyncio.sleep(0.03)  # a few ticks on an idle loop
        ticks = mon.ticks
        assert ticks >= 1 and len(seen) == ticks
        before = mon.lag_total()
        block(0.2)
        overdue = mon.lag_total() - before  # the tick has not run yet: counted as overdue
        assert overdue >= 0.2 - mon.interval_s - mon.slack_s
        await asyncio.sleep(0.02)  # the late tick runs now
        assert mon.ticks > ticks
        assert max(seen) >= 0.2 - mon.interval_s
        assert mon.max_lag_s == max(seen)
        assert mon.total_s - before >= 0.2 - mon.interval_s - mon.slack_s
    finally:
        mon.stop()
    assert not mon.running


async def test_two_blocks_add_up() -> None:
    mon = LoopLagMonitor(asyncio.get_running_loop(), interval_s=0.005)
    try:
        await asyncio.sleep(0.01)
        before = mon.lag_total()
        for _ in range(2):
            block(0.1)
            await asyncio.sleep(0.01)  # let the late tick run and reschedule
        assert mon.lag_total() - before >= 2 * (0.1 - mon.interval_s - mon.slack_s)
    finally:
        mon.stop()


async def test_one_monitor_per_loop_restarted_after_stop() -> None:
    first = loop_lag.monitor()
    assert loop_lag.monitor() is first
    assert first.running and first.loop is asyncio.get_running_loop()
    first.stop()
    second = loop_lag.monitor()
    assert second is not first and second.running
    second.stop()


def test_a_monitor_does_not_keep_its_loop_alive() -> None:
    loop = asyncio.new_event_loop()
    try:
        mon = loop_lag.monitor(loop)
        for _ in range(500):  # a liveness bound: a loaded machine may need more than one tick's time
            loop.run_until_complete(asyncio.sleep(0.01))
            if mon.ticks >= 1:
                break
        assert mon.ticks >= 1
    finally:
        loop.close()
    del loop
    gc.collect()
    assert mon.loop is None
    assert mon.lag_total() == mon.total_s  # a dead loop reads as no new lag


def test_invalid_settings_are_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        for interval, slack in ((0.0, 0.001), (0.01, -1.0)):
            try:
                LoopLagMonitor(loop, interval_s=interval, slack_s=slack)
            except ValueError:
                continue
            raise AssertionError(f"accepted interval={interval} slack={slack}")
    finally:
        loop.close()


async def test_lag_and_extensions_are_exported() -> None:
    metrics = Metrics()
    mon = LoopLagMonitor(asyncio.get_running_loop(), interval_s=0.005)
    mon.add_sink(metrics.loop_lag)
    mon.add_sink(metrics.loop_lag)  # idempotent: one observation per tick
    try:
        await asyncio.sleep(0.005)
        block(0.06)
        await asyncio.sleep(0.02)
    finally:
        mon.stop()
    metrics.state_deadline_extension("redis", "limits", "extended")
    metrics.state_deadline_extension("redis", "limits", "answered")
    text = metrics.render().decode()
    count = next(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("gateway_event_loop_lag_seconds_count"))
    assert count == mon.ticks
    over = next(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith('gateway_event_loop_lag_seconds_bucket{le="0.025"}'))
    assert over < count  # the 60 ms block's tick landed above 25 ms
    assert 'gateway_state_deadline_extended_total{outcome="extended"} 1.0' in text
    assert 'gateway_state_deadline_extended_total{outcome="answered"} 1.0' in text
