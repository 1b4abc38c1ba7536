"""AUD-08 / AUD-11: sink faults (disk full, EIO, EACCES, stall) and wall-clock steps.

The promise under test: no acknowledgement without a durable record; a request refused
because of the audit sink gets a truthful record once the sink heals (never an ``allow``
that could be counted as a 2xx); the writer recovers without a restart; the chain
verifies across the failure; intervals and retention do not trust the wall clock.
"""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import AuditLog, list_segments
from gateway.audit.records import segment_name
from gateway.errors import DependencyUnavailable

from . import check, fill, make_config, records, request_record

DAY = 86_400.0
T0 = 1_750_000_000.0


class Faults:
    """A FileSink fault hook: raise an errno on one operation, or block fsync on a gate."""

    def __init__(self) -> None:
        self.fail: dict[str, int] = {}
        self.gate: threading.Event | None = None
        self.blocked = threading.Event()

    def __call__(self, op: str) -> None:
        if op == "fsync" and self.gate is not None:
            self.blocked.set()
            assert self.gate.wait(10)
        code = self.fail.get(op)
        if code is not None:
            raise OSError(code, f"injected {errno.errorcode[code]} on {op}")


class Clocks:
    """Wall and monotonic clocks under test control (AUD-11)."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def faulty(tmp_path: Path, **overrides: Any) -> tuple[AuditLog, Faults]:
    log = AuditLog(make_config(tmp_path, **overrides))
    faults = Faults()
    log.file_sink.fault_hook = faults
    return log, faults


def answered_allow(recs: list[dict[str, Any]]) -> set[str]:
    """Request ids an allow record claims were answered 2xx (allow minus abandoned markers)."""
    abandoned = {r["ref_seq"] for r in recs if r.get("type") == "abandoned"}
    return {r["request_id"] for r in recs if r.get("decision") == "allow" and r["seq"] not in abandoned}


async def refused(log: AuditLog, n: int) -> None:
    with pytest.raises(DependencyUnavailable) as info:
        await log.append(request_record(n))
    assert info.value.reason == "audit_unavailable" and info.value.http_status == 503


async def settle(log: AuditLog, until: Callable[[], bool]) -> None:
    """Give the writer its periodic turn (internal records are retried on its tick)."""
    for _ in range(100):
        if until():
            return
        await asyncio.sleep(0.05)


class TestSinkFaults:
    @pytest.mark.parametrize(("op", "code"), [("write", errno.ENOSPC), ("fsync", errno.ENOSPC),
                                              ("fsync", errno.EIO), ("open", errno.EACCES)])
    async def test_refused_request_gets_a_truthful_record_after_healing(
        self, tmp_path: Path, op: str, code: int
    ) -> None:
        log, faults = faulty(tmp_path, segment_max_records=3 if op == "open" else 1000)
        assert await fill(log, 3) == [1, 2, 3]  # with segment_max_records=3 the next batch opens a segment
        faults.fail[op] = code
        await refused(log, 10)
        await refused(log, 11)
        del faults.fail[op]
        assert await log.append(request_record(12)) > 3  # healed: no restart needed
        await settle(log, lambda: log.stats.deferred == 2 and not log._internal)
        await log.close()
        recs = records(log.config)
        assert answered_allow(recs) == {"req-0", "req-1", "req-2", "req-12"}
        late = {r["request_id"]: r for r in recs if "deferred" in r}
        assert set(late) == {"req-10", "req-11"}
        for rec in late.values():
            assert (rec["decision"], rec["reason"], rec["status"]) == ("deny", "audit_unavailable", 503)
            assert rec["deferred"]["decision"] == "allow" and rec["deferred"]["cause"] == "io_error"
        assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
        result = check(log.config)
        assert result.ok, result

    async def test_fsync_error_retires_the_segment(self, tmp_path: Path) -> None:
        log, faults = faulty(tmp_path)
        await fill(log, 4)
        faults.fail["fsync"] = errno.EIO
        await refused(log, 9)
        del faults.fail["fsync"]
        assert await log.append(request_record(5)) == 5
        await log.close()
        # SECURITY: never fsync again on a file whose fsync failed: new records, new file.
        assert [s.first_seq for s in list_segments(log.config.log_dir)] == [1, 5]
        assert check(log.config).ok

    async def test_callers_cannot_forge_a_deferred_refusal(self, tmp_path: Path) -> None:
        log = AuditLog(make_config(tmp_path))
        with pytest.raises(DependencyUnavailable):
            await log.append(request_record(1, deferred={"cause": "io_error"}))
        with pytest.raises(DependencyUnavailable):
            await log.append({"type": "refusals_dropped", "count": 1})
        await log.close()

    async def test_aggregates_and_events_are_left_to_their_caller(self, tmp_path: Path) -> None:
        """The aggregator retries its own counts; a deferred copy would double them."""
        log, faults = faulty(tmp_path)
        await log.start()
        faults.fail["write"] = errno.ENOSPC
        for record in ({"type": "denial_aggregate", "decision": "deny", "count": 7}, {"event": "canary_rollback"}):
            with pytest.raises(DependencyUnavailable):
                await log.append(record)
        del faults.fail["write"]
        await log.append(request_record(1))
        await log.close()
        assert log.stats.deferred == 0
        assert [r["type"] for r in records(log.config)] == ["request"]

    async def test_refusals_beyond_the_bound_are_counted(self, tmp_path: Path) -> None:
        log, faults = faulty(tmp_path, queue_max=2)
        await log.start()
        faults.fail["write"] = errno.ENOSPC
        for n in range(5):
            await refused(log, n)
        del faults.fail["write"]
        await log.append(request_record(9))
        await settle(log, lambda: not log._internal and log._deferred_dropped == 0)
        await log.close()
        recs = records(log.config)
        deferred = [r for r in recs if "deferred" in r]
        [dropped] = [r for r in recs if r.get("type") == "refusals_dropped"]
        assert len(deferred) + dropped["count"] == 5 and len(deferred) == 2
        assert check(log.config).ok


class TestStall:
    async def test_a_stalled_fsync_is_bounded_and_nothing_says_allow_for_a_503(self, tmp_path: Path) -> None:
        log, faults = faulty(tmp_path, append_timeout_s=0.3)
        assert await fill(log, 2) == [1, 2]
        faults.gate = threading.Event()
        first = asyncio.create_task(log.append(request_record(10)))  # its batch hangs in fsync
        await asyncio.to_thread(faults.blocked.wait, 10)
        second = asyncio.create_task(log.append(request_record(11)))  # queued behind the stall
        for task in (first, second):
            with pytest.raises(DependencyUnavailable):
                await task
        await refused(log, 12)  # the writer is known stuck: refused at once
        assert log.stats.stalled == 1 and log.stats.timeouts == 2
        faults.gate.set()  # the disk answers again
        await settle(log, lambda: not log.stalled)
        assert not log.stalled
        assert await log.append(request_record(13)) > 2
        await settle(log, lambda: log.stats.abandoned == 1 and not log._internal)
        await log.close()
        recs = records(log.config)
        # req-10 reached the disk after its 503: its allow record is followed by a marker
        # with the answer it got; req-11/12 were never written and are recorded as refusals.
        assert answered_allow(recs) == {"req-0", "req-1", "req-13"}
        [marker] = [r for r in recs if r.get("type") == "abandoned"]
        assert (marker["cause"], marker["status"], marker["reason"]) == ("audit_timeout", 503, "audit_unavailable")
        assert marker["request_id"] == "req-10"
        late = {r["request_id"]: r["deferred"]["cause"] for r in recs if "deferred" in r}
        assert late == {"req-11": "audit_timeout", "req-12": "audit_stalled"}
        assert check(log.config).ok


class TestClockSteps:
    async def test_stepped_back_wall_clock_does_not_stop_time_checkpoints(self, tmp_path: Path) -> None:
        clocks = Clocks()
        log = AuditLog(make_config(tmp_path, checkpoint_every=1000, checkpoint_interval_s=5.0),
                       clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
        await fill(log, 2)
        clocks.wall -= 3600.0  # stepped back 1 h
        clocks.mono += 6.0  # while 6 s really pass
        await fill(log, 2, start=2)
        await settle(log, lambda: log.stats.checkpoints >= 1)
        assert log.stats.checkpoints >= 1
        await log.close()
        recs = records(log.config)
        assert [r["seq"] for r in recs] == [1, 2, 3, 4]
        assert recs[1]["time"] > recs[2]["time"]  # ts goes backwards, seq does not
        assert check(log.config).ok

    async def test_wall_clock_jump_forward_deletes_no_fresh_segment(self, tmp_path: Path) -> None:
        clocks = Clocks()
        log = AuditLog(make_config(tmp_path, segment_max_records=10, retention_s=7 * DAY),
                       clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
        await fill(log, 35)
        clocks.wall += 365 * DAY  # a bad time source: the wall clock jumps a year ahead
        assert await log.apply_retention() == []
        assert [s.first_seq for s in list_segments(log.config.log_dir)] == [1, 11, 21, 31]
        clocks.advance(10 * DAY)  # ...whereas real elapsed time does expire them
        assert await log.apply_retention() == [segment_name(1), segment_name(11), segment_name(21)]
        await log.close()
        assert check(log.config).ok

    async def test_segment_age_uses_the_monotonic_clock(self, tmp_path: Path) -> None:
        clocks = Clocks()
        log = AuditLog(make_config(tmp_path, segment_max_age_s=60.0),
                       clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
        await fill(log, 2)
        clocks.wall += 7200.0  # a forward step alone does not age the segment
        await fill(log, 1, start=2)
        clocks.mono += 61.0
        await fill(log, 1, start=3)
        await log.close()
        assert [s.first_seq for s in list_segments(log.config.log_dir)] == [1, 4]
