"""Legacy synchronous audit writer, superseded by :mod:`gateway.audit`.

Kept only so that ``service.py``/``app.py`` keep working until they switch to
``gateway.audit.AuditLog`` (async, durable group commit, MAC + signed checkpoints,
encrypted personal fields); new code must not import this module.

The audit trail: one hash-chained JSON line per request, allowed or refused.

A record holds decisions and counts, never a token, a raw input or an unmasked value;
the subject is a keyed HMAC pseudonym. Each record carries ``seq`` and the SHA-256 of
the previous line, so an edit, a deletion or a reordering breaks the chain. Writes go
through the OS page cache here; durable group commit and signed checkpoints build on
this format.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.errors import DependencyUnavailable

GENESIS = "0" * 64
LOG_NAME = "audit.jsonl"
KEY_NAME = "audit-hmac.key"


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _load_or_create_key(path: Path) -> bytes:
    if path.exists():
        return path.read_bytes()
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key)
    return key


class AuditLog:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._key = _load_or_create_key(directory / KEY_NAME)
        self.path = directory / LOG_NAME
        self._lock = threading.Lock()
        self._seq, self._head = self._recover()
        self._handle = self.path.open("ab")

    def _recover(self) -> tuple[int, str]:
        """Continue the chain after a restart from the last complete line."""
        if not self.path.exists():
            return 0, GENESIS
        last = b""
        with self.path.open("rb") as handle:
            for line in handle:
                if line.endswith(b"\n"):
                    last = line
        if not last:
            return 0, GENESIS
        record = json.loads(last)
        return int(record["seq"]), hashlib.sha256(last.rstrip(b"\n")).hexdigest()

    def pseudonym(self, subject: str) -> str:
        """Linkable across records for review, not reversible without the key."""
        return hmac.new(self._key, subject.encode(), hashlib.sha256).hexdigest()[:32]

    def write(self, record: dict[str, Any]) -> None:
        """Append one record; any failure is a refusal, never silent loss (fail closed)."""
        try:
            with self._lock:
                full = dict(record)
                full["seq"] = self._seq + 1
                full["prev_hash"] = self._head
                full.setdefault("time", datetime.now(UTC).isoformat(timespec="microseconds"))
                line = canonical(full)
                self._handle.write(line + b"\n")
                self._handle.flush()
                self._seq += 1
                self._head = hashlib.sha256(line).hexdigest()
        except (OSError, ValueError, TypeError) as exc:
            raise DependencyUnavailable("audit trail unavailable", reason="audit_unavailable") from exc

    def close(self) -> None:
        with self._lock:
            if not self._handle.closed:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()


def verify_chain(path: Path) -> tuple[bool, int | None]:
    """Check seq continuity and hash links; return the first bad ``seq`` (or line) if any."""
    head, expected = GENESIS, 1
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except ValueError:
                return False, number
            if record.get("seq") != expected or record.get("prev_hash") != head:
                return False, int(record.get("seq", number)) if isinstance(record.get("seq"), int) else number
            head = hashlib.sha256(line.rstrip(b"\n")).hexdigest()
            expected += 1
    return True, None
