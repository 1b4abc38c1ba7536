"""Hold the active policy and pipeline; reload by building fully, then swapping one reference.

Readers take no lock: they read :attr:`PolicyStore.current` once per request and keep
that snapshot, so a request in flight finishes on the revision it started with. A
rejected reload keeps the old snapshot and records why (log, metric, ``last_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from gateway.observability.metrics import Metrics
from gateway.pipeline import Pipeline
from gateway.policy.compile import CompileEnv, compile_pipeline
from gateway.policy.loader import PolicyError, PolicySet, load_policy_dir

log = structlog.get_logger("gateway.policy")


@dataclass(frozen=True, slots=True)
class Snapshot:
    policy: PolicySet
    pipeline: Pipeline
    applied_at: float


class PolicyStore:
    def __init__(self, directory: Path, metrics: Metrics, env: CompileEnv | None = None, *,
                 on_change: Callable[[Snapshot], None] | None = None) -> None:
        self.directory = directory
        self.metrics = metrics
        self.env = env or CompileEnv()
        self.on_change = on_change
        self.last_error: str | None = None
        self._current: Snapshot | None = None
        self._lock = asyncio.Lock()
        self._fingerprint = ""

    @property
    def current(self) -> Snapshot:
        if self._current is None:
            raise RuntimeError("policy store used before the first load")
        return self._current

    def build(self) -> Snapshot:
        policy = load_policy_dir(self.directory)
        previous = self._current.pipeline if self._current is not None else None
        pipeline = compile_pipeline(policy, self.metrics, self.env, previous=previous)
        return Snapshot(policy=policy, pipeline=pipeline, applied_at=time.time())

    def load_initial(self) -> Snapshot:
        """First load: an invalid policy at startup is fatal (raise), never a default."""
        self._fingerprint = self._dir_fingerprint()
        snapshot = self.build()
        self._activate(snapshot)
        return snapshot

    async def reload(self, reason: str = "manual") -> bool:
        """Build a candidate and swap it in; on any error keep the current one."""
        async with self._lock:
            try:
                candidate = self.build()
            except PolicyError as exc:
                self.last_error = str(exc)
                self.metrics.policy_reloads.labels(result="rejected").inc()
                self.metrics.policy_last_failure.set(time.time())
                log.error(  # noqa: TRY400 - a refused edit, not a crash: no traceback
                    "policy_reload_rejected", reason=reason, error=str(exc),
                    active_revision=self._current.policy.revision if self._current else None,
                )
                return False
            if self._current is not None and candidate.policy.revision == self._current.policy.revision:
                self.metrics.policy_reloads.labels(result="unchanged").inc()
                return False
            self._activate(candidate)
            self.metrics.policy_reloads.labels(result="applied").inc()
            log.info("policy_reloaded", reason=reason, revision=candidate.policy.revision)
            return True

    def _activate(self, snapshot: Snapshot) -> None:
        self._current = snapshot
        self.last_error = None
        self.metrics.set_revision(snapshot.policy.revision)
        self.metrics.policy_last_success.set(snapshot.applied_at)
        if self.on_change is not None:
            self.on_change(snapshot)

    def _dir_fingerprint(self) -> str:
        """Cheap change detector: names, sizes and mtimes of the policy files."""
        digest = hashlib.sha256()
        with contextlib.suppress(OSError):
            for path in sorted(self.directory.iterdir()):
                if path.is_file():
                    stat = path.stat()
                    digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    async def watch(self, interval_s: float = 1.0) -> None:
        """Poll for edits. Editors write-then-rename, so wait for a quiet interval first."""
        while True:
            await asyncio.sleep(interval_s)
            fingerprint = self._dir_fingerprint()
            if fingerprint == self._fingerprint:
                continue
            await asyncio.sleep(interval_s / 4)  # debounce a burst of writes
            if self._dir_fingerprint() != fingerprint:
                continue
            self._fingerprint = fingerprint
            await self.reload(reason="file_change")
