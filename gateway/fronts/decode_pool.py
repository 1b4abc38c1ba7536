"""Parse very large request bodies in a worker process, not in a thread (AV-14).

Why: ``json.loads`` is one C call that holds the GIL for its whole run (about 230 ms for
8 MB of numbers on the reference machine). Handing it to a thread (``asyncio.to_thread``)
keeps it off the event loop's *code* but not off its *interpreter*: the loop cannot run a
single callback until the parse ends, so every connection stalls for that long. A worker
process has its own GIL. The body goes over a pipe (a memory copy) and the decoded tensors
come back the same way; that costs a few milliseconds, so only bodies above
``PROCESS_DECODE_BYTES`` take this path, smaller ones stay in a thread or inline.

Workers are started with ``forkserver`` (never ``fork``: the gateway has threads) on the
first large body, and a broken pool (a worker died) refuses that request with 503 and is
replaced for the next one. Submitting is done from a thread: on a fresh pool ``submit``
starts the forkserver and the workers, which blocked the event loop for hundreds of
milliseconds on the first large body (loop lag p99 294 ms in that round of
``bench/bench_loop_lag.py``, 28 ms afterwards).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final, TypeVar

import structlog

from gateway.errors import DependencyUnavailable, GatewayError

log = structlog.get_logger("gateway.decode_pool")

T = TypeVar("T")

PROCESS_DECODE_BYTES: Final = 2 * 1024 * 1024
WORKERS: Final = 2


def _run(fn: Callable[[], Any]) -> tuple[str, Any]:
    """In the worker: the result, or the refusal as plain data (exception classes with
    keyword-only arguments do not survive pickling as exceptions)."""
    try:
        return "ok", fn()
    except GatewayError as exc:
        return "refused", (type(exc), exc.detail, exc.reason, exc.retry_after_s)


class DecodePool:
    """A small process pool, created on first use, for CPU-bound parsing of large bodies."""

    def __init__(self, workers: int = WORKERS) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                                 mp_context=multiprocessing.get_context("forkserver"))
            return self._pool

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker; its :class:`GatewayError` is raised here as if local."""
        pool = self._executor()
        try:
            future = await self._submit(pool, fn)
            kind, value = await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self._discard(pool)
            log.error("decode_pool_broken")  # noqa: TRY400 - an outcome, not a gateway bug: no trace
            # SECURITY: fail closed; the body is not retried in-process (it may be what killed the worker).
            raise DependencyUnavailable("decoder unavailable", reason="decode_pool_unavailable") from exc
        if kind == "refused":
            cls, detail, reason, retry_after_s = value
            raise cls(detail, reason=reason, retry_after_s=retry_after_s)
        return value  # type: ignore[no-any-return]

    async def _submit(self, pool: ProcessPoolExecutor, fn: Callable[[], T]) -> Future[tuple[str, Any]]:
        """Submit off the loop (the first submits start processes, see the module docstring).

        Why the retry: ``pool`` may have been shut down between this request taking it and
        submitting to it, by a concurrent request whose worker died (:meth:`_discard`).
        ``submit`` then raises a plain ``RuntimeError`` ("cannot schedule new futures after
        shutdown"), which escaped as a 500 (seen while triaging a fuzz run). Not this body's doing: one
        retry on a fresh pool; a pool that still refuses is a broken pool (503, fail closed).
        """
        try:
            return await asyncio.to_thread(pool.submit, _run, fn)
        except BrokenProcessPool:
            raise
        except RuntimeError:
            self._discard(pool)
        try:
            return await asyncio.to_thread(self._executor().submit, _run, fn)
        except RuntimeError as exc:  # BrokenProcessPool included
            raise BrokenProcessPool("decode pool refused the job") from exc

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    async def aclose(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
