"""Where committed audit lines go: segment files (the record of truth) and stdout.

:class:`FileSink` owns the append-only segment files of the log directory. Only the
group-commit writer thread touches it. A segment is named after the ``seq`` of its
first record and is never reopened for writing once closed (a restarted gateway starts
a new one), so a crashed process's file is left exactly as the crash left it.

:class:`StdoutSink` copies each committed line to stdout as JSON for a log shipper. It
is secondary: it runs after the records are durable on disk, and its failure is counted
and logged, never turned into a lost or refused request (the file sink fails closed).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog

from gateway.audit.records import segment_name
from gateway.files import fsync_dir

log = structlog.get_logger("gateway.audit")


class Sink(Protocol):
    """A secondary destination for committed lines, called in the writer thread."""

    name: str

    def emit(self, lines: Sequence[bytes]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """The current segment of the log directory: open lazily, append, fsync, roll."""

    def __init__(self, log_dir: Path, *, max_records: int, max_bytes: int, max_age_s: float) -> None:
        self.log_dir = log_dir
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._fd: int | None = None
        self.segment: str | None = None
        self.records = 0
        self.size = 0
        self.opened_at = 0.0  # monotonic: a wall-clock step must not roll (or keep) a segment
        self.fsyncs = 0
        # Test seam (fault injection, AUD-08): called with "open", "write" or "fsync" before
        # the operation, in the writer thread; it may raise OSError or block. Never set in
        # production; the tests use it where a small filesystem cannot be mounted.
        self.fault_hook: Callable[[str], None] | None = None

    def _fault(self, op: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(op)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def needs_roll(self, now: float) -> bool:
        if self._fd is None:
            return False
        return (self.records >= self.max_records or self.size >= self.max_bytes
                or now - self.opened_at >= self.max_age_s)

    def _open(self, first_seq: int, now: float) -> None:
        name = segment_name(first_seq)
        self._fault("open")
        # SECURITY: O_EXCL|O_NOFOLLOW: never append to an existing file or follow a
        # planted symlink; a name collision means the chain state is wrong, so stop.
        fd = os.open(self.log_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW,
                     0o640)
        try:
            fsync_dir(self.log_dir)  # the new file's directory entry must survive a crash too
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                (self.log_dir / name).unlink()
            raise
        self._fd, self.segment = fd, name
        self.records, self.size, self.opened_at = 0, 0, now

    def write(self, data: bytes, *, first_seq: int, count: int, now: float) -> int:
        """Append ``data`` (``count`` whole lines); return the offset it started at."""
        if self._fd is None:
            self._open(first_seq, now)
        assert self._fd is not None  # noqa: S101 - set by _open
        offset = self.size
        self._fault("write")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self.size += len(data)
        self.records += count
        return offset

    def sync(self) -> None:
        if self._fd is not None:
            self._fault("fsync")
            os.fsync(self._fd)
            self.fsyncs += 1

    def rollback(self, offset: int, count: int) -> None:
        """Undo a failed batch: cut the file back to ``offset`` (and drop it if empty)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self.size, self.records = offset, max(0, self.records - count)
        if offset == 0 and self.segment is not None:
            name = self.segment
            self.close()
            (self.log_dir / name).unlink()
            fsync_dir(self.log_dir)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self.segment = None
            os.close(fd)


class StdoutSink:
    """Committed lines, verbatim, on stdout (one canonical JSON record per line)."""

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream
        self.failures = 0

    def emit(self, lines: Sequence[bytes]) -> None:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        try:
            stream.write(b"".join(lines))
            stream.flush()
        except (OSError, ValueError) as exc:
            self.failures += 1
            if self.failures == 1 or self.failures % 1000 == 0:
                log.warning("audit_stdout_sink_failed", failures=self.failures, error=type(exc).__name__)

    def close(self) -> None:
        stream = self._stream if self._stream is not None else sys.stdout.buffer
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
