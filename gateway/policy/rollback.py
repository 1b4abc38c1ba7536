"""The newest accepted signing time of a policy bundle, kept across restarts.

``check_not_replayed`` (gateway/policy/bundle.py) refuses an older bundle while the gateway
runs; this file makes the same rule survive a restart. ``<state_dir>/policy-highwater.json``
holds the signing time, revision and signer of the newest bundle any worker ever accepted.
A bundle signed before it is refused at startup (exit 2) and on reload (``replayed``).

Several workers share the state directory: each compare-and-advance runs under an
exclusive ``flock`` on a lock file, and the file is replaced atomically (written whole
under a private name, fsynced, renamed), so no worker's advance is lost and no reader
sees half a file. Escape hatch (a bundle signed with a clock far in the future): stop the
gateway and delete the file; the next start accepts the bundle on disk and records it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from gateway.files import write_private
from gateway.keyfiles import secret_file_problem
from gateway.policy.bundle import BundleError, BundleInfo
from gateway.policy.loader import PolicyError, PolicyIssue

HIGHWATER_FILE = "policy-highwater.json"
LOCK_FILE = ".policy-highwater.lock"
FORMAT = "infergate-policy-highwater/1"
MAX_FILE_BYTES = 4096
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.strptime(value, _TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class HighWater:
    """The newest bundle accepted so far (what a candidate must not be older than)."""

    signed_at: str
    revision: str
    key_id: str


class RollbackGuard:
    """Compare a bundle's signing time with the persisted high-water mark; advance it."""

    def __init__(self, state_dir: Path, *, allow_insecure: bool = False) -> None:
        self.path = state_dir / HIGHWATER_FILE
        self.lock_path = state_dir / LOCK_FILE
        self.allow_insecure = allow_insecure

    def _error(self, message: str) -> PolicyError:
        error = PolicyError([PolicyIssue(str(self.path), 1, 1, message,
                                         "stop the gateway and delete the file to accept the bundle on disk")])
        error.reason = "error"
        return error

    def read(self) -> HighWater | None:
        """The recorded mark, ``None`` before the first signed bundle; fail closed on a bad file."""
        try:
            with self.path.open("rb") as handle:
                content = handle.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._error(f"cannot read the policy rollback state: {exc.strerror}") from exc
        problem = secret_file_problem(self.path)
        if problem is not None and not self.allow_insecure:
            # SECURITY: a mark another user may rewrite can be moved back, re-opening the rollback.
            raise self._error(f"policy rollback state is unsafe: {problem}")
        mark: HighWater | None = None
        try:
            data = json.loads(content)
            parsed = HighWater(signed_at=data["signed_at"], revision=data["revision"], key_id=data["key_id"])
            if (len(content) <= MAX_FILE_BYTES and data.get("format") == FORMAT
                    and all(isinstance(v, str) for v in (parsed.signed_at, parsed.revision, parsed.key_id))
                    and _parse_time(parsed.signed_at) is not None):
                mark = parsed
        except (ValueError, KeyError, TypeError, AttributeError):
            mark = None
        if mark is None:
            # SECURITY: fail closed: a corrupt mark is not "no mark" (that would accept any old bundle).
            raise self._error("policy rollback state is corrupt")
        return mark

    def check(self, candidate: BundleInfo) -> HighWater | None:
        """Refuse a candidate signed before the recorded mark (no write); return the mark."""
        then = _parse_time(candidate.signed_at)
        if then is None:
            # SECURITY: a time that cannot be compared is refused, never recorded (a mark
            # that does not parse would refuse every later start).
            raise BundleError("replayed", [PolicyIssue("BUNDLE.sig", 1, 1,
                                                       f"signed_at {candidate.signed_at!r} is not a signing time")])
        mark = self.read()
        if mark is None:
            return None
        recorded = _parse_time(mark.signed_at)
        if recorded is not None and then < recorded:
            # SECURITY: a rollback across a restart: the bundle is validly signed but older
            # than one this gateway (or another worker sharing the state) already accepted.
            raise BundleError("replayed", [PolicyIssue(
                "BUNDLE.sig", 1, 1,
                f"signed at {candidate.signed_at}, before the newest accepted bundle (revision {mark.revision}, "
                f"signed at {mark.signed_at}, recorded in {self.path}); re-sign the policy to go back to it",
            )])
        return mark

    def advance(self, candidate: BundleInfo) -> None:
        """Compare and record as one step under the lock: refuse an older candidate, else
        move the mark forward (a bundle signed in the same second as the mark leaves it)."""
        with self._locked():
            mark = self.check(candidate)
            then = _parse_time(candidate.signed_at)
            if mark is not None and then is not None and then <= (_parse_time(mark.signed_at) or then):
                return
            self._write(HighWater(signed_at=candidate.signed_at, revision=candidate.revision,
                                  key_id=candidate.key_id))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise self._error(f"cannot lock the policy rollback state: {exc.strerror}") from exc
        try:
            # SECURITY: workers sharing the state directory serialise compare-and-advance;
            # without it two could each read an old mark and one advance would be lost.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, mark: HighWater) -> None:
        body = json.dumps({"format": FORMAT, "signed_at": mark.signed_at, "revision": mark.revision,
                           "key_id": mark.key_id}, sort_keys=True).encode() + b"\n"
        try:
            # SECURITY: 0600 from creation, written whole then renamed: a crash leaves the
            # old mark or the new one, never a torn file (which would refuse start-up).
            write_private(self.path, body, replace=True)
        except OSError as exc:
            raise self._error(f"cannot record the policy rollback state: {exc.strerror}") from exc
