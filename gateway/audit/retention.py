"""Retention: delete the oldest sealed segments behind a signed tombstone.

Only a prefix of the chain is ever deleted (oldest segments first, stopping at the first
one still inside the retention period, never the segment holding the head), so what
remains is one contiguous chain. Before a single file is removed the writer appends a
``tombstone`` record, signed with the anchor key and MACed like any record, naming each
deleted segment with its first and last ``seq`` and the hash of its last record.
``verify`` then accepts a log starting at ``seq`` > 1 only if tombstones cover every
missing ``seq`` and the first remaining record links to the last deleted hash; deleting
a segment any other way is reported as tampering.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.audit.records import RecordFormatError, list_segments, parse_line, parse_time
from gateway.files import fsync_dir

_TAIL_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class SegmentSummary:
    name: str
    first_seq: int
    last_seq: int
    last_hash: str
    last_time: datetime | None

    def as_record(self) -> dict[str, Any]:
        return {"name": self.name, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "last_hash": self.last_hash, "records": self.last_seq - self.first_seq + 1}


def last_line(path: Path) -> bytes | None:
    """The last complete line of a file (without ``\\n``), read backwards from the end."""
    with path.open("rb") as handle:
        pos = handle.seek(0, os.SEEK_END)
        buffer = b""
        while pos > 0:
            start = max(0, pos - _TAIL_CHUNK)
            handle.seek(start)
            buffer = handle.read(pos - start) + buffer
            pos = start
            newline = buffer.rfind(b"\n")
            if newline == -1:
                continue
            previous = buffer.rfind(b"\n", 0, newline)
            if previous != -1:
                return buffer[previous + 1:newline]
            if pos == 0:
                return buffer[:newline]
    return None


def summarize(path: Path, first_seq: int) -> SegmentSummary | None:
    raw = last_line(path)
    if raw is None:
        return None
    try:
        parsed = parse_line(raw)
    except RecordFormatError:
        return None
    time_value = parsed.record.get("time")
    when = parse_time(time_value) if isinstance(time_value, str) else None
    return SegmentSummary(path.name, first_seq, int(parsed.record["seq"]), parsed.hash, when)


def plan(log_dir: Path, *, keep: str | None, cutoff: datetime) -> list[SegmentSummary]:
    """Oldest-first segments whose newest record is older than ``cutoff``."""
    chosen: list[SegmentSummary] = []
    segments = list_segments(log_dir)
    for index, segment in enumerate(segments):
        if segment.path.name == keep or index == len(segments) - 1:
            break
        summary = summarize(segment.path, segment.first_seq)
        if summary is None or summary.last_time is None or summary.last_time >= cutoff:
            break
        if chosen and summary.first_seq != chosen[-1].last_seq + 1:
            break  # a gap is a problem for verify to report, not for retention to hide
        chosen.append(summary)
    return chosen


def tombstone(segments: list[SegmentSummary], *, retention_s: float, cutoff: datetime) -> dict[str, Any]:
    """The payload of a tombstone record (the caller signs it)."""
    return {
        "type": "tombstone",
        "segments": [s.as_record() for s in segments],
        "retention_s": int(retention_s),
        "cutoff": cutoff.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }


def delete(log_dir: Path, segments: list[SegmentSummary]) -> None:
    """Unlink oldest first, each made durable before the next: a crash leaves a prefix gone."""
    for summary in segments:
        (log_dir / summary.name).unlink(missing_ok=True)
        fsync_dir(log_dir)
