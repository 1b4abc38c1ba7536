"""The audit log: segments, hash chain, MAC, signed checkpoints and durable group commit.

Concurrency model. Requests call :meth:`AuditLog.append` on the event loop; it queues
the record and waits. One writer task takes everything queued (up to ``batch_max``),
hands the batch to one dedicated writer thread, which assigns ``seq``, links, MACs and
encrypts each record, writes the whole batch with one ``write`` and makes it durable
with one ``fsync`` (group commit), then the task wakes every waiter. A 2xx is therefore
sent only after its record is on stable storage, while a busy gateway pays one fsync
per batch rather than per request. All chain state (``seq``, head, files) belongs to
the writer thread: there is exactly one writer, so the chain cannot fork (AUD-12).

Failure model (fail closed, never silent loss). A full queue, a write or fsync error,
a stall longer than ``append_timeout_s`` or an unwritable anchor store all raise
:class:`gateway.errors.DependencyUnavailable` (``audit_unavailable`` → 503). A failed
batch is cut back off the file, so its ``allow`` never exists; the request is recorded
instead, as soon as the sink heals, as the 503 it got (``deny``, ``audit_unavailable``,
the original decision under ``deferred``). If even the cut fails the writer re-reads the
tail from disk before the next batch and marks any record that reached the disk without
an acknowledgement with an ``abandoned`` record. A waiter that gives up after its record
was written gets an ``abandoned`` record too (with ``status: 503`` after a deadline); one
cancelled (its client gone) still has its record written, then the marker, so
"every 2xx has a record" and "every allow record had its 2xx" can both be checked. While
one batch is stuck past the deadline, new appends are refused at once. After a failed
fsync the segment is retired and the next batch starts a new one. The writer never
restarts: the next batch simply tries again.

Crash recovery. Each process writes to new segments only. At start the last segment's
torn tail (bytes after the last complete record, from a crash mid-write; never
acknowledged since acknowledgement follows fsync) is moved to ``quarantine/``, a
``recovery`` record notes it, and the chain continues from the last complete record.
A log that ends before its newest signed checkpoint was truncated or rolled back: the
writer refuses to start rather than fork the chain.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from gateway.audit import retention
from gateway.audit._thread import WriterThread
from gateway.audit.anchors import (
    AnchorKeys,
    AnchorStore,
    Checkpoint,
    check_signature,
    public_raw,
    sign_with,
)
from gateway.audit.config import AuditConfig
from gateway.audit.crypto import KeyStore, address_owner, owner_for, seal, subject_owner
from gateway.audit.records import (
    GENESIS,
    RESERVED,
    RecordFormatError,
    canonical,
    encode_line,
    iter_lines,
    list_segments,
    normalize,
    parse_line,
    utc_now_iso,
)
from gateway.audit.sinks import FileSink, Sink, StdoutSink
from gateway.errors import DependencyUnavailable
from gateway.files import ensure_dir, fsync_dir, write_private

log = structlog.get_logger("gateway.audit")

T = TypeVar("T")
INBOX = "inbox"
QUARANTINE = "quarantine"
LOCK_FILE = ".lock"
KeyFamilyName = Literal["anchor", "mac", "pseudonym"]
_CREDENTIAL_KEYS = frozenset({"authorization", "token", "bearer", "password", "secret", "api_key", "apikey",
                              "access_token", "id_token", "refresh_token", "cookie"})
INTERNAL_TYPES = frozenset({"tombstone", "erasure", "key_rotation", "recovery", "abandoned", "checkpoint",
                            "refusals_dropped"})
# Set only by the log on a record it writes late for a request it refused (AUD-08).
DEFERRED = "deferred"
# The tenant of a record's ``subject_id``, exactly as authenticated: with it the subject
# names one person (see crypto.subject_owner). Never written in clear: it only ever goes
# into the encrypted personal fields. (The clear ``tenant`` field may be redacted.)
SUBJECT_TENANT = "subject_tenant"


class AuditIntegrityError(Exception):
    """The log on disk contradicts its anchors (truncated, rolled back) or is locked."""


def _unavailable(cause: str) -> DependencyUnavailable:
    # SECURITY: the client sees one fixed text (no queue or disk state); the cause is kept
    # as a note for logs and tracebacks, and counted in AuditStats.
    exc = DependencyUnavailable("audit trail unavailable", reason="audit_unavailable")
    exc.add_note(cause)
    return exc


@dataclass(slots=True)
class AuditStats:
    """Counters for metrics and the benchmark (read them from the event loop)."""

    records: int = 0
    batches: int = 0
    fsyncs: int = 0
    failures: int = 0
    rejected_full: int = 0
    timeouts: int = 0
    abandoned: int = 0
    checkpoints: int = 0
    last_batch: int = 0
    queue_depth: int = 0
    stalled: int = 0  # refused at once: the writer was already stuck longer than append_timeout_s
    deferred: int = 0  # refusals queued to be recorded once the sink heals
    deferred_dropped: int = 0  # refusals beyond the bound: recorded as one count


@dataclass(slots=True, eq=False)
class _Pending:
    record: dict[str, Any]
    future: asyncio.Future[int]  # cancelled = the waiter gave up (timeout or cancellation)
    cause: str | None = None  # why it gave up: "audit_timeout" (answered 503) or "waiter_gone"


@dataclass(slots=True)
class _Recovered:
    seq: int = 0
    head: str = GENESIS
    segment: str | None = None
    quarantined: list[dict[str, Any]] = field(default_factory=list)


def _consume(fut: asyncio.Future[int]) -> None:
    """Retrieve a future's exception so an abandoned waiter never triggers a loop warning."""
    if not fut.cancelled():
        fut.exception()


class AuditLog:
    """One append-only, tamper-evident audit trail with a single writer.

    Use::

        audit = AuditLog(AuditConfig.for_dir(Path("var/audit")))
        await audit.start()                  # recovery; optional: append starts lazily
        seq = await audit.append({...})      # returns once the record is durable
        await audit.close()                  # drains, final checkpoint, releases the lock
    """

    def __init__(self, config: AuditConfig, *, sinks: Sequence[Sink] = (),
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_fsync: Callable[[float], None] | None = None) -> None:
        self.config = config
        # Called from the writer thread with each group commit's fsync time (must be thread-safe).
        self._on_fsync = on_fsync
        # SECURITY (AUD-11): the wall clock only stamps ``time`` (informational; order is
        # ``seq``). Intervals (checkpoints, segment age, retention checks) use ``monotonic``,
        # so stepping the wall clock back cannot stop checkpoints and stepping it forward
        # cannot make retention delete fresh segments (see :meth:`_retention_now`).
        self._clock = clock
        self._mono = monotonic
        self._wall_base, self._mono_base = clock(), monotonic()
        self._clock_jump_logged = False
        self.keys = KeyStore(config.key_dir)
        self.anchor_keys = AnchorKeys(config.key_dir)
        self._anchors = AnchorStore(config.anchor_dir, self.anchor_keys)
        self._file = FileSink(config.log_dir, max_records=config.segment_max_records,
                              max_bytes=config.segment_max_bytes, max_age_s=config.segment_max_age_s)
        self._sinks: list[Sink] = [*sinks, *([StdoutSink()] if config.stdout else [])]
        self._executor = WriterThread("audit-writer")
        self._stats = AuditStats()
        # Writer-thread state: touched only inside the executor.
        self._seq = 0
        self._head = GENESIS
        self._head_segment: str | None = None
        self._ckpt_seq = 0
        self._ckpt_time = 0.0
        self._checkpoint_failed = False
        self._needs_reopen = False
        self._carry: list[dict[str, Any]] = []  # markers owed after a reopen, until written
        self._last_retention = 0.0
        self._lock_fd: int | None = None
        # Event-loop state.
        self._state: Literal["new", "running", "closing", "closed"] = "new"
        self._pending: deque[_Pending] = deque()
        self._internal: deque[dict[str, Any]] = deque()
        self._control: deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._retry_at = 0.0
        self._retry_start_at = 0.0
        self._start_failed = False
        self._write_failing = False
        self._commit_started: float | None = None  # time.monotonic() of the batch in the writer thread
        self._deferred_dropped = 0
        self._tick_s = min(1.0, config.checkpoint_interval_s)

    # ------------------------------------------------------------------ public API

    @property
    def stats(self) -> AuditStats:
        self._stats.queue_depth = len(self._pending)
        self._stats.fsyncs = self._file.fsyncs
        return self._stats

    @property
    def clock(self) -> Callable[[], float]:
        """The wall clock stamping ``time`` (injectable: the security suite steps it, AUD-11)."""
        return self._clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self._clock = clock

    @property
    def stalled(self) -> bool:
        """The writer has been stuck in one batch for ``append_timeout_s`` or more (AUD-08)."""
        started = self._commit_started
        return started is not None and time.monotonic() - started >= self.config.append_timeout_s

    @property
    def healthy(self) -> bool:
        """False while records cannot be written: the last start or batch write failed, or
        the writer is stalled. Readiness reports it (``/v2/health/ready`` 503), so a load
        balancer drains a gateway that can only answer 503 ``audit_unavailable``; the writer
        retries its deferred refusal records every second, so a healed disk turns it back."""
        if self._state in ("closing", "closed"):
            return False
        return not (self._start_failed or self._write_failing or self.stalled)

    @property
    def file_sink(self) -> FileSink:
        """The segment writer (tests set its ``fault_hook`` to inject disk faults, AUD-08)."""
        return self._file

    def mark_abandoned(self, seq: int, request_id: str, cause: str) -> None:
        """Follow record ``seq`` with an ``abandoned`` marker: the caller it answers went away
        (client gone) after it was written, so no 2xx left for it (see :meth:`_abandon`)."""
        self._abandon(seq, request_id, cause)

    def pseudonym(self, tenant: str, subject_id: str) -> str:
        """The keyed pseudonym a record carries for ``subject_id`` of ``tenant`` (linkable, not reversible)."""
        return self.keys.pseudonym(subject_owner(tenant, subject_id))

    async def start(self) -> None:
        """Recover the chain head (sealing a torn tail) and start the writer."""
        async with self._start_lock:
            if self._state == "running":
                return
            if self._state != "new":
                raise _unavailable("audit trail closed")
            loop = asyncio.get_running_loop()
            try:
                await self._executor.run(self._open_sync)
            except BaseException:
                self._retry_start_at = time.monotonic() + 1.0  # lazy start retries, not in a tight loop
                self._start_failed = True
                raise
            self._start_failed = False
            self._wake = asyncio.Event()
            self._state = "running"
            self._task = loop.create_task(self._writer(), name="audit-writer")

    async def append(self, record: Mapping[str, Any]) -> int:
        """Append one record; return its ``seq`` once it is durable.

        Raises :class:`DependencyUnavailable` (``audit_unavailable``) when the record
        cannot be made durable in time: the caller must refuse the request (503).
        """
        if self._state == "new":
            if time.monotonic() < self._retry_start_at:
                raise _unavailable("audit trail could not be opened")
            try:
                await self.start()
            except AuditIntegrityError as exc:
                raise _unavailable("audit trail failed its integrity check") from exc
            except OSError as exc:
                raise _unavailable("audit trail cannot be opened") from exc
        if self._state != "running" or self._wake is None:
            raise _unavailable("audit trail closed")
        try:
            body = _checked_body(record)
            self._check_subject(body)
        except (TypeError, ValueError) as exc:
            log.error("audit_record_rejected", error=str(exc))  # noqa: TRY400 - a bug, but no trace needed
            raise _unavailable("audit record not representable") from exc
        if not isinstance(body.get("time"), str):
            body["time"] = utc_now_iso(self._clock())
        if len(self._pending) >= self.config.queue_max:
            self._stats.rejected_full += 1
            self._defer_refusal(body, "queue_full")
            raise _unavailable("audit queue full")
        if self.stalled:
            # The writer is stuck (a stalled fsync): waiting the full deadline would only
            # pile up requests behind it; refuse at once until it moves again.
            self._stats.stalled += 1
            self._defer_refusal(body, "audit_stalled")
            raise _unavailable("audit writer stalled")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        pending = _Pending(body, fut)
        self._pending.append(pending)
        self._wake.set()
        # Giving up at the deadline cancels ``fut`` after ``cause`` is set: a record not
        # yet picked up is then never written (a refusal is recorded instead); one already
        # being written gets an ``abandoned`` marker, since nobody will answer 2xx for it.
        try:
            done, _ = await asyncio.wait((fut,), timeout=self.config.append_timeout_s)
        except asyncio.CancelledError:
            # SECURITY (nothing lost): the caller went away (client gone, shutdown), its
            # record stays queued: written, then an ``abandoned`` marker (no 2xx left).
            pending.cause = "waiter_gone"
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._abandon(fut.result(), body.get("request_id"), "waiter_gone")
            raise
        if not done:
            pending.cause = "audit_timeout"
            fut.cancel()
            self._stats.timeouts += 1
            raise _unavailable("audit write stalled")
        return fut.result()  # raises the batch's DependencyUnavailable if it failed

    async def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint of the current head now (normally done every N records / T s)."""
        return await self._call(self._checkpoint_now)

    async def apply_retention(self, now: float | None = None) -> list[str]:
        """Delete sealed segments older than ``retention_s`` behind a signed tombstone."""
        return await self._call(lambda: self._retention_sync(self._retention_now() if now is None else now))

    async def erase(self, *, subject_id: str | None = None, tenant: str | None = None,
                    client_addr: str | None = None) -> dict[str, Any]:
        """Crypto-shred a data subject's keys and record a signed erasure in the chain.

        A subject is named with its ``tenant`` (ValueError without it): the same ``sub`` in
        another tenant is another person, whose keys stay.
        """
        owner = owner_for(subject_id=subject_id, tenant=tenant, client_addr=client_addr)
        return await self._call(lambda: self._erase_sync(owner))

    async def rotate_key(self, family: KeyFamilyName) -> str:
        """Rotate the anchor, chain-MAC or pseudonym key; the rotation is itself recorded."""
        return await self._call(lambda: self._rotate_sync(family))

    async def close(self) -> None:
        """Drain queued records, sign a final checkpoint, release files and the lock."""
        if self._state == "new":
            self._state = "closed"
            self._executor.shutdown()
            return
        if self._state != "running":
            return
        self._state = "closing"
        assert self._wake is not None and self._task is not None  # noqa: S101 - set by start
        self._wake.set()
        with contextlib.suppress(Exception):
            await self._task
        try:
            await self._executor.run(self._close_sync)
        finally:
            self._state = "closed"
            self._executor.shutdown()

    # ------------------------------------------------------------------ event-loop side

    def _check_subject(self, body: Mapping[str, Any]) -> None:
        """A record naming a subject must name the subject's tenant (ValueError otherwise).

        Checked here, before the record is queued, so a bad one is refused alone (503)
        rather than failing the batch it would have been written in.
        """
        subject_id = body.get("subject_id")
        if "subject_id" in self.config.personal_fields and isinstance(subject_id, str) and subject_id:
            tenant = body.get(SUBJECT_TENANT)
            # SECURITY: no fallback to sub alone or to the clear (redacted) tenant: either
            # would merge two tenants' people under one pseudonym and one key.
            subject_owner(tenant if isinstance(tenant, str) else "", subject_id)

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._state == "new":
            await self.start()
        if self._state != "running" or self._wake is None:
            raise _unavailable("audit trail closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._control.append((fn, fut))
        self._wake.set()
        result: T = await fut
        return result

    def _has_work(self, now: float) -> bool:
        return bool(self._pending or self._control or (self._internal and now >= self._retry_at))

    async def _writer(self) -> None:
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None  # noqa: S101
        next_tick = time.monotonic() + self._tick_s
        # One timer per tick period wakes the writer for its periodic work, rather than a
        # timeout around every wait (that cost as much as the rest of an idle-to-busy step).
        timer: asyncio.TimerHandle | None = None
        timer_for = -1.0  # the next_tick the armed timer is for; -1 once it has fired

        def tick_due() -> None:
            nonlocal timer_for
            timer_for = -1.0
            wake.set()

        while True:
            closing = self._state == "closing"
            if not self._has_work(time.monotonic()) and not (closing and self._internal):
                if closing:
                    if timer is not None:
                        timer.cancel()
                    return
                if timer_for != next_tick:  # a timer may fire a hair early: then re-arm
                    if timer is not None:
                        timer.cancel()
                    timer = loop.call_later(max(0.0, next_tick - time.monotonic()), tick_due)
                    timer_for = next_tick
                await wake.wait()
                wake.clear()
            try:
                next_tick = await self._step(loop, closing=closing, next_tick=next_tick)
            except Exception:
                # A bug here must not kill the only writer: waiters time out (503) meanwhile.
                log.exception("audit_writer_error")
                await asyncio.sleep(0.1)

    async def _step(self, loop: asyncio.AbstractEventLoop, *, closing: bool, next_tick: float) -> float:
        """Run queued control operations, one batch, and the periodic work when due."""
        while self._control:
            fn, fut = self._control.popleft()
            try:
                result = await self._executor.run(fn)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                if not fut.done():
                    fut.set_exception(exc)
            else:
                if not fut.done():
                    fut.set_result(result)
        await self._write_batch(loop, force_internal=closing)
        if time.monotonic() >= next_tick:
            next_tick = time.monotonic() + self._tick_s
            try:
                await self._executor.run(self._tick_sync)
            except Exception:
                log.exception("audit_tick_failed")
        return next_tick

    async def _write_batch(self, loop: asyncio.AbstractEventLoop, *, force_internal: bool) -> None:
        items: list[_Pending] = []
        while self._pending and len(items) < self.config.batch_max:
            item = self._pending.popleft()
            if item.future.cancelled():  # the waiter left before the write began: never written
                if item.cause == "audit_timeout":
                    self._defer_refusal(item.record, "audit_timeout")
                continue
            items.append(item)
        internal: list[dict[str, Any]] = []
        if force_internal or time.monotonic() >= self._retry_at:
            if self._deferred_dropped:
                internal.append({"type": "refusals_dropped", "count": self._deferred_dropped,
                                 "reason": "audit_unavailable", "time": utc_now_iso(self._clock())})
                self._deferred_dropped = 0
            while self._internal and len(internal) < self.config.batch_max:
                internal.append(self._internal.popleft())
        if not items and not internal:
            return
        records = [*internal, *(i.record for i in items)]
        self._commit_started = time.monotonic()
        try:
            seqs = await self._executor.run(self._commit, records)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the batch (fail closed)
            self._commit_started = None
            self._stats.failures += 1
            self._write_failing = True
            self._retry_at = time.monotonic() + 1.0
            log.error("audit_write_failed", error=type(exc).__name__, detail=str(exc),  # noqa: TRY400
                      records=len(records))
            if not force_internal:
                self._internal.extendleft(reversed(internal))
            for item in items:
                if not item.future.done():
                    err = _unavailable("audit trail unavailable")
                    err.__cause__ = exc
                    item.future.set_exception(err)
                    self._defer_refusal(item.record, "io_error")
                elif item.cause == "audit_timeout":
                    self._defer_refusal(item.record, "audit_timeout")  # rolled back: never written
            return
        self._commit_started = None
        self._write_failing = False
        self._stats.batches += 1
        self._stats.records += len(records)
        self._stats.last_batch = len(records)
        for item, seq in zip(items, seqs[len(internal):], strict=True):
            if item.cause is not None:  # its waiter gave up or went away: nobody answers 2xx
                self._abandon(seq, item.record.get("request_id"), item.cause)
            if not item.future.done():
                item.future.set_result(seq)

    def _abandon(self, seq: int, request_id: Any, cause: str) -> None:
        """Queue the marker for a record written after its waiter gave up.

        SECURITY (AUD-08): a record whose waiter hit the deadline during a stall reaches the
        disk after its request was answered 503. The chain is append-only, so it cannot be
        taken back (cutting it out after the fsync would also race a crash); it stays, and
        says the truth about the *decision* (allow: the request was authorised and served
        upstream). The marker that follows it says the truth about the *answer*: status
        503, ``audit_unavailable``. Readers pair them by ``ref_seq``: an ``allow`` record
        with an ``abandoned`` marker is not a 2xx (NL counts allow minus abandoned).
        """
        self._stats.abandoned += 1
        marker: dict[str, Any] = {"type": "abandoned", "ref_seq": seq, "cause": cause,
                                  "request_id": request_id, "time": utc_now_iso(self._clock())}
        if cause == "audit_timeout":
            marker |= {"status": 503, "reason": "audit_unavailable"}
        self._internal.append(marker)
        if self._wake is not None:
            self._wake.set()

    def _defer_refusal(self, record: Mapping[str, Any], cause: str) -> None:
        """Queue the record of a request refused because its own record could not be written.

        SECURITY (AUD-08, nothing lost): the request was answered 503, so its record must
        not say ``allow``; it is rewritten as the refusal the client saw (``deny``,
        ``audit_unavailable``, 503) with the original decision kept under ``deferred``,
        and written as soon as the sink heals. Memory-bound: beyond ``queue_max`` waiting
        refusals only a count is kept (a ``refusals_dropped`` record). A crash before the
        sink heals loses these deny records, never an allow: no 2xx depends on them.
        """
        if "decision" not in record or record.get("type", "request") != "request" or DEFERRED in record:
            return  # not a request (an event, an aggregate): its caller handles the failure
        if len(self._internal) >= self.config.queue_max:
            self._deferred_dropped += 1
            self._stats.deferred_dropped += 1
            return
        self._stats.deferred += 1
        self._internal.append({
            **record, "decision": "deny", "reason": "audit_unavailable", "status": 503,
            DEFERRED: {"cause": cause, "decision": record.get("decision"), "reason": record.get("reason"),
                       "status": record.get("status"), "time": utc_now_iso(self._clock())},
        })

    # ------------------------------------------------------------------ writer thread

    def _open_sync(self) -> None:
        cfg = self.config
        ensure_dir(cfg.log_dir)
        lock_fd = os.open(cfg.log_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(lock_fd)
            # SECURITY: two writers on one log would fork the chain.
            raise AuditIntegrityError(f"{cfg.log_dir} is in use by another audit writer") from exc
        self._lock_fd = lock_fd
        try:
            self.keys.mac.current()
            self.keys.pseudonyms.current()
            self.anchor_keys.current()
            rec = self._recover_tail()
            last = self._anchors.open()
            self._check_against_anchor(rec, last)
            self._seq, self._head, self._head_segment = rec.seq, rec.head, rec.segment
            self._ckpt_seq = last.seq if last else 0
            self._ckpt_time = self._mono()
            self._last_retention = self._mono()
            if rec.quarantined:
                self._commit([{"type": "recovery", "time": utc_now_iso(self._clock()), "torn": rec.quarantined}])
        except BaseException:
            self._release_lock()
            self._anchors.close()
            raise

    def _check_against_anchor(self, rec: _Recovered, last: Checkpoint | None) -> None:
        if last is None:
            return
        problem = check_signature(last.record, self.anchor_keys.public_keys())
        if problem:
            raise AuditIntegrityError(f"newest checkpoint (seq {last.seq}) is not valid: {problem}")
        if last.seq > rec.seq:
            raise AuditIntegrityError(
                f"the log ends at seq {rec.seq} but a signed checkpoint covers seq {last.seq}: "
                "it was truncated or rolled back; run `infergate audit verify`")
        if last.seq == rec.seq and last.head != rec.head:
            raise AuditIntegrityError(f"record {rec.seq} differs from its signed checkpoint")

    def _recover_tail(self) -> _Recovered:
        """Find the chain head on disk; quarantine a torn tail left by a crash."""
        out = _Recovered()
        for segment in reversed(list_segments(self.config.log_dir)):
            last_end, last_line = 0, None
            for offset, raw, complete in iter_lines(segment.path):
                if not complete:
                    break
                with contextlib.suppress(RecordFormatError):
                    last_line = parse_line(raw)
                    last_end = offset + len(raw) + 1
            size = segment.path.stat().st_size
            if last_end < size:
                out.quarantined.append(self._quarantine(segment.path, last_end, size))
            if last_line is None:
                segment.path.unlink()  # nothing but torn bytes: its content is in quarantine
                fsync_dir(self.config.log_dir)
                continue
            out.seq, out.head, out.segment = int(last_line.record["seq"]), last_line.hash, segment.path.name
            return out
        return out

    def _quarantine(self, path: Path, start: int, end: int) -> dict[str, Any]:
        with path.open("rb") as handle:
            handle.seek(start)
            torn = handle.read(end - start)
        folder = self.config.log_dir / QUARANTINE
        ensure_dir(folder)
        write_private(folder / f"{path.name}.{start}.torn", torn, replace=True)
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, start)
            os.fsync(fd)
        finally:
            os.close(fd)
        log.warning("audit_torn_tail_quarantined", segment=path.name, offset=start, bytes=len(torn))
        return {"segment": path.name, "offset": start, "bytes": len(torn),
                "sha256": hashlib.sha256(torn).hexdigest()}

    def _commit(self, records: list[dict[str, Any]]) -> list[int]:
        """Chain, encrypt, write and (per policy) fsync one batch; all or nothing."""
        if self._needs_reopen:
            self._carry += self._reopen()
        prefix = list(self._carry)
        if self._checkpoint_failed:
            self._checkpoint_now()  # SECURITY: no new records while the anchor store is failing
        now = self._mono()
        if self._file.needs_roll(now):
            self._roll()
        all_records = [*prefix, *records]
        mac_kid, mac_key = self.keys.mac.current()
        seq, head = self._seq, self._head
        lines: list[bytes] = []
        for record in all_records:
            seq += 1
            body = canonical(self._prepare(record, seq, head, mac_kid))
            digest = hashlib.sha256(body).digest()  # = records.body_hash(body), kept as bytes for the MAC
            head = digest.hex()
            mac = hmac.digest(mac_key, digest, "sha256").hex()
            lines.append(encode_line(body, mac))
        was_open = self._file.is_open
        offset, count_before = (self._file.size, self._file.records) if was_open else (0, 0)
        sync_failed = False
        try:
            self._file.write(b"".join(lines), first_seq=self._seq + 1, count=len(lines), now=now)
            if self.config.durability == "fsync":
                started = time.perf_counter()
                try:
                    self._file.sync()
                except OSError:
                    sync_failed = True
                    raise
                if self._on_fsync is not None:
                    self._on_fsync(time.perf_counter() - started)
        except BaseException:
            self._undo(offset, count_before, retire=sync_failed)
            raise
        self._seq, self._head, self._head_segment = seq, head, self._file.segment
        self._carry.clear()
        for sink in self._sinks:
            sink.emit(lines)
        if self._seq - self._ckpt_seq >= self.config.checkpoint_every:
            self._try_checkpoint()
        first = self._seq - len(all_records) + 1
        return list(range(first + len(prefix), self._seq + 1))

    def _prepare(self, record: Mapping[str, Any], seq: int, head: str, mac_kid: str) -> dict[str, Any]:
        body = dict(record)
        subject_tenant = body.pop(SUBJECT_TENANT, None)  # never in clear (see SUBJECT_TENANT)
        personal = {k: body.pop(k) for k in self.config.personal_fields if k in body}
        personal = {k: v for k, v in personal.items() if v not in (None, "")}
        owner: str | None = None
        subject_id, client_addr = personal.get("subject_id"), personal.get("client_addr")
        if isinstance(client_addr, str):
            body["client"] = self.keys.pseudonym(address_owner(client_addr))
            owner = body["client"]
        if isinstance(subject_id, str) and isinstance(subject_tenant, str):  # checked on append
            body["subject"] = self.keys.pseudonym(subject_owner(subject_tenant, subject_id))
            personal[SUBJECT_TENANT] = subject_tenant
            owner = body["subject"]
        if personal:
            if owner is None:
                # Personal data without a known person: a per-day key, shredded by retention.
                owner = self.keys.pseudonym("day:" + str(body.get("time", ""))[:10])
            kid, aead = self.keys.subjects.for_pseudonym(owner)
            body["enc"] = seal(aead, kid, personal, seq=seq)
        body.setdefault("type", "request")
        body["seq"], body["prev_hash"], body["key_id"] = seq, head, mac_kid
        return body

    def _undo(self, offset: int, count_before: int, *, retire: bool = False) -> None:
        try:
            self._file.rollback(offset, count_before)
        except OSError:
            log.error("audit_rollback_failed")  # noqa: TRY400 - state re-read from disk next time
            with contextlib.suppress(OSError):
                self._file.close()
            self._needs_reopen = True
            return
        if retire and self._file.is_open:
            # SECURITY: after a failed fsync the kernel may have dropped the dirty pages and
            # reports the error only once per file, so a later fsync on the same file can
            # succeed without the data being on disk ("fsyncgate"). The acknowledged records
            # before ``offset`` were fsynced earlier; new records go to a fresh segment (it
            # links to the same head, so the chain and its verification are unchanged).
            log.warning("audit_segment_retired_after_fsync_error", segment=self._file.segment)
            self._file.close()

    def _reopen(self) -> list[dict[str, Any]]:
        """Re-read the head from disk after a failed rollback; mark unacknowledged records."""
        self._file.close()
        rec = self._recover_tail()
        if rec.seq < self._seq:
            raise AuditIntegrityError(f"acknowledged records after seq {rec.seq} are gone from disk")
        markers: list[dict[str, Any]] = []
        now = utc_now_iso(self._clock())
        if rec.quarantined:
            markers.append({"type": "recovery", "time": now, "torn": rec.quarantined})
        markers += [{"type": "abandoned", "ref_seq": s, "cause": "io_error", "time": now}
                    for s in range(self._seq + 1, rec.seq + 1)]
        self._seq, self._head, self._head_segment = rec.seq, rec.head, rec.segment
        self._needs_reopen = False
        return markers

    def _roll(self) -> None:
        if self._seq > self._ckpt_seq:
            self._checkpoint_now()  # anchor each segment's end: removing it shows
        self._file.close()

    def _try_checkpoint(self) -> None:
        try:
            self._checkpoint_now()
        except OSError as exc:
            self._checkpoint_failed = True
            log.error("audit_checkpoint_failed", error=type(exc).__name__)  # noqa: TRY400

    def _checkpoint_now(self) -> Checkpoint | None:
        if self._seq == 0 or (self._seq == self._ckpt_seq and not self._checkpoint_failed):
            return self._anchors.last
        if self.config.durability != "fsync":
            self._file.sync()  # never sign a head that a power cut could take back
        checkpoint = self._anchors.write(seq=self._seq, head=self._head, segment=self._head_segment or "",
                                         time=utc_now_iso(self._clock()))
        self._ckpt_seq, self._ckpt_time, self._checkpoint_failed = self._seq, self._mono(), False
        self._stats.checkpoints += 1
        return checkpoint

    def _tick_sync(self) -> None:
        now = self._mono()
        if self._checkpoint_failed or (self._seq > self._ckpt_seq
                                       and now - self._ckpt_time >= self.config.checkpoint_interval_s):
            self._try_checkpoint()
        self._process_inbox()
        if self.config.retention_s is not None and now - self._last_retention >= self.config.retention_check_s:
            self._retention_sync(self._retention_now())

    def _retention_now(self) -> float:
        """The wall time retention may act on: never ahead of the monotonic clock's account.

        SECURITY (AUD-11): a wall clock stepped forward (bad NTP source, operator error, an
        attacker with clock access) would move the cutoff forward and delete fresh segments.
        The wall time is capped at start-time wall clock + monotonic elapsed time, so a jump
        forward deletes nothing early; a step back only delays retention (keeps more). A
        clock already wrong when the process starts cannot be told apart from real elapsed
        time; the tombstone then still records exactly what was deleted.
        """
        wall = self._clock()
        steady = self._wall_base + (self._mono() - self._mono_base)
        if wall > steady + 60.0 and not self._clock_jump_logged:
            self._clock_jump_logged = True
            log.warning("audit_clock_ahead_of_monotonic", ahead_s=round(wall - steady, 3))
        return min(wall, steady)

    def _process_inbox(self) -> None:
        """Append erasure notices left by ``infergate audit erase`` while we hold the log."""
        folder = self.config.log_dir / INBOX
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.json")):
            try:
                notice = normalize(json.loads(path.read_bytes()))
            except (OSError, ValueError, TypeError, RecursionError):
                notice = None
            trusted = self.anchor_keys.public_keys()
            if (not isinstance(notice, dict) or notice.get("type") != "erasure"
                    or check_signature(notice, trusted) is not None or RESERVED.intersection(notice)):
                # SECURITY: only notices signed by the anchor key are accepted.
                log.warning("audit_inbox_notice_rejected", file=path.name)
                path.replace(folder / f"{path.name}.rejected")
                continue
            pseudonyms = notice.get("pseudonyms")
            for pseudonym in pseudonyms if isinstance(pseudonyms, list) else []:
                if isinstance(pseudonym, str):
                    self.keys.subjects.evict(pseudonym)
            notice.setdefault("time", utc_now_iso(self._clock()))
            self._commit([notice])
            path.unlink()
            fsync_dir(folder)

    def _erase_sync(self, owner: str) -> dict[str, Any]:
        erasure = self.keys.erase_owner(owner)
        notice = erasure_notice(self.anchor_keys, erasure.owner_pseudonyms, erasure.key_ids,
                                utc_now_iso(self._clock()))
        [seq] = self._commit([notice])
        return {**notice, "seq": seq}

    def _retention_sync(self, now: float) -> list[str]:
        self._last_retention = self._mono()
        if self.config.retention_s is None:
            return []
        cutoff = datetime.fromtimestamp(now - self.config.retention_s, UTC)
        plan = retention.plan(self.config.log_dir, keep=self._head_segment, cutoff=cutoff)
        if not plan:
            return []
        tombstone = self.anchor_keys.sign(retention.tombstone(plan, retention_s=self.config.retention_s,
                                                              cutoff=cutoff))
        tombstone["time"] = utc_now_iso(now)
        self._commit([tombstone])  # durable before anything is deleted
        retention.delete(self.config.log_dir, plan)
        log.info("audit_retention_applied", segments=[s.name for s in plan])
        return [s.name for s in plan]

    def _rotate_sync(self, family: KeyFamilyName) -> str:
        now = utc_now_iso(self._clock())
        if family == "anchor":
            self._checkpoint_now()
            old_kid, old_key = self.anchor_keys.current()
            _old, new_kid = self.anchor_keys.rotate()
            _kid, new_key = self.anchor_keys.current()
            record = sign_with(old_kid, old_key, {
                "type": "key_rotation", "family": "anchor", "old_key_id": old_kid, "new_key_id": new_kid,
                "public": base64.b64encode(public_raw(new_key.public_key())).decode("ascii")})
            self._anchors.publish_current()
        elif family == "mac":
            new_kid = self.keys.mac.rotate()
            record = {"type": "key_rotation", "family": "mac", "new_key_id": new_kid}
        else:
            new_kid = self.keys.pseudonyms.rotate()
            record = {"type": "key_rotation", "family": "pseudonym", "new_key_id": new_kid}
        record["time"] = now
        self._commit([record])
        return new_kid

    def _close_sync(self) -> None:
        try:
            if self._seq > self._ckpt_seq or self._checkpoint_failed:
                self._try_checkpoint()
        finally:
            self._file.close()
            self._anchors.close()
            for sink in self._sinks:
                sink.close()
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _checked_body(record: Mapping[str, Any]) -> dict[str, Any]:
    """A normalized deep copy of a caller's record; reserved chain fields are refused."""
    body = normalize(record)
    if not isinstance(body, dict):
        raise TypeError("an audit record is a mapping")
    forged = RESERVED.intersection(body)
    if forged:
        # SECURITY: a caller (or a field copied from a request) must not forge chain state.
        raise ValueError(f"reserved audit fields set by caller: {sorted(forged)}")
    if body.get("type") in INTERNAL_TYPES or DEFERRED in body:
        # SECURITY: nor the log's own statements (a fake "abandoned" would discredit a record).
        raise ValueError(f"record type {body.get('type')!r} or {DEFERRED!r}: written by the log itself")
    for key, value in body.items():
        # SECURITY: last line of defence (AUD-10): a credential passed by mistake is never
        # written, whatever field it was put in.
        # (The cheap prefix test first: it rules out nearly every value without a call.)
        if key.lower() in _CREDENTIAL_KEYS or (
                isinstance(value, str) and value[:3] == "eyJ" and _looks_like_jwt(value)):
            body[key] = "[redacted]"
    return body


def _looks_like_jwt(value: str) -> bool:
    return value.startswith("eyJ") and value.count(".") == 2 and len(value) > 40


def erasure_notice(keys: AnchorKeys, pseudonyms: Sequence[str], key_ids: Sequence[str],
                   requested_at: str) -> dict[str, Any]:
    """The signed statement that a subject's keys were destroyed (chain record or inbox notice)."""
    return keys.sign({"type": "erasure", "pseudonyms": list(pseudonyms), "key_ids": list(key_ids),
                      "requested_at": requested_at})
