"""Flood control for refusals: the first denial per (client, reason, minute) is recorded
individually, the rest of that minute as one counter record.

A client hammering the gateway without a token would otherwise make the audit trail
(and its fsyncs) the attacker's amplifier. No refusal goes unrecorded: each minute's
suppressed denials end up in a ``denial_aggregate`` record with their count. Memory is
bounded: beyond ``max_keys`` distinct keys in flight, further refusals share one
overflow bucket per reason (an attacker rotating source addresses cannot grow it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from gateway.audit.log import SUBJECT_TENANT
from gateway.audit.records import utc_now_iso
from gateway.errors import GatewayError

log = structlog.get_logger("gateway.audit")

OVERFLOW_KEY = "*overflow*"
# Fields of the first refusal carried into the counter record (never request ids of the
# suppressed ones: they were never recorded individually).
_CARRIED = ("tenant", "subject_id", SUBJECT_TENANT, "client_addr", "route", "action", "model", "model_version",
            "transport", "decision", "status", "policy_revision")


class Appender(Protocol):
    async def append(self, record: Mapping[str, Any]) -> int: ...


@dataclass(slots=True)
class _Bucket:
    first: dict[str, Any]
    first_seq: int
    suppressed: int = 0


class AuditAggregator:
    """Records refusals, aggregating floods per (key, reason, window)."""

    def __init__(self, log: Appender, *, window_s: int = 60, max_keys: int = 10_000,
                 clock: Callable[[], float] = time.time) -> None:
        if window_s < 1 or max_keys < 1:
            raise ValueError("window_s and max_keys must be at least 1")
        self._log = log
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: dict[tuple[str, str, int], _Bucket] = {}
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def _window(self, now: float) -> int:
        return int(now // self.window_s) * self.window_s

    async def refusal(self, record: Mapping[str, Any], *, key: str) -> bool:
        """Record one refusal; True if written individually, False if counted.

        ``key`` is who is refused: the client address before authentication, the
        principal after. Raises DependencyUnavailable like ``AuditLog.append`` when an
        individual record cannot be written.
        """
        reason = str(record.get("reason") or "unknown")
        window = self._window(self._clock())
        bucket_key = (key, reason, window)
        bucket = self._buckets.get(bucket_key)
        if bucket is None and len(self._buckets) >= self.max_keys:
            bucket_key = (OVERFLOW_KEY, reason, window)
            bucket = self._buckets.get(bucket_key)
        if bucket is not None:
            bucket.suppressed += 1
            return False
        # Reserve the bucket before awaiting so concurrent refusals count, not write.
        placeholder = _Bucket(dict(record), 0)
        self._buckets[bucket_key] = placeholder
        try:
            placeholder.first_seq = await self._log.append(record)
        except BaseException:
            # Nobody counted on it yet: let the next refusal try to be recorded itself.
            if placeholder.suppressed == 0 and self._buckets.get(bucket_key) is placeholder:
                del self._buckets[bucket_key]
            raise
        return True

    async def flush(self, *, force: bool = False) -> int:
        """Write counter records for finished windows (all windows if ``force``)."""
        current = self._window(self._clock())
        written = 0
        for bucket_key in [k for k in self._buckets if force or k[2] < current]:
            # Taken out before awaiting, so a concurrent flush cannot write it twice.
            bucket = self._buckets.pop(bucket_key, None)
            if bucket is None or bucket.suppressed == 0:
                continue
            key, reason, window = bucket_key
            record: dict[str, Any] = {k: bucket.first[k] for k in _CARRIED if k in bucket.first}
            record.update({
                "type": "denial_aggregate",
                "reason": reason,
                "window_start": utc_now_iso(window),
                "window_s": self.window_s,
                "count": bucket.suppressed,
                "first_seq": bucket.first_seq,
                "overflow": key == OVERFLOW_KEY,
            })
            if key == OVERFLOW_KEY:
                record.pop("client_addr", None)
                record.pop("subject_id", None)
                record.pop(SUBJECT_TENANT, None)
            try:
                await self._log.append(record)
            except GatewayError:
                log.error("audit_aggregate_write_failed", reason=reason)  # noqa: TRY400 - retried next flush
                self._merge_back(bucket_key, bucket)
                continue
            written += 1
        return written

    def _merge_back(self, bucket_key: tuple[str, str, int], bucket: _Bucket) -> None:
        current = self._buckets.get(bucket_key)
        if current is None:
            self._buckets[bucket_key] = bucket
        else:
            current.suppressed += bucket.suppressed

    async def run(self, interval_s: float = 1.0) -> None:
        """Flush finished windows until :meth:`close` (run as a background task)."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await self._stop.wait()
            try:
                await self.flush()
            except Exception:
                log.exception("audit_aggregate_flush_failed")

    def start(self, interval_s: float = 1.0) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run(interval_s), name="audit-aggregator")

    async def close(self) -> None:
        """Stop the background flusher and write every pending counter (before closing the log).

        The flusher is stopped, not cancelled: cancelling it mid-append could leave a
        counter both written and still pending, and so written twice.
        """
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.flush(force=True)
