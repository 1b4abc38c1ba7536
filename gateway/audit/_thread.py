"""The audit writer's own thread: callables run one at a time, in order, off the event loop.

Why not ``loop.run_in_executor`` on a one-worker ``ThreadPoolExecutor``: every call there
builds a ``concurrent.futures.Future``, chains it to an asyncio future through two
callbacks and takes several locks, which cost about as much CPU as chaining, MACing and
writing a small group-commit batch (issue 11). Here a call is one ``SimpleQueue.put``, and
its result comes back with one ``call_soon_threadsafe``. The contract the log relies on is
the executor's: one thread, FIFO, a call whose future was cancelled before it started
never runs, an exception reaches the awaiting side unchanged.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", asyncio.AbstractEventLoop]

# Threads still running. At interpreter exit they are told to stop once their queued calls
# are done (a batch being committed still reaches the disk), through the same hook
# ``concurrent.futures`` uses: a plain ``atexit`` handler would run only after the
# interpreter has already waited for these (non-daemon) threads, forever.
_running: set[WriterThread] = set()
_running_lock = threading.Lock()


def _stop_all() -> None:
    with _running_lock:
        threads = list(_running)
    for thread in threads:
        thread.shutdown()


_register_atexit: Callable[[Callable[[], None]], None] | None = getattr(threading, "_register_atexit", None)
if _register_atexit is not None:
    _register_atexit(_stop_all)


def _deliver(fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if fut.done():  # cancelled meanwhile: nobody waits for it
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class WriterThread:
    """A single lazily started thread executing submitted calls in submission order."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Queue ``fn(*args)``; the returned future (of the running loop) gets its outcome."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new calls after shutdown")
            if self._thread is None:
                # Without the exit hook, a daemon thread: never block the interpreter's exit.
                self._thread = threading.Thread(target=self._main, name=self._name,
                                                daemon=_register_atexit is None)
                with _running_lock:
                    _running.add(self)
                self._thread.start()
            self._queue.put((fn, args, fut, loop))
        return fut

    def shutdown(self) -> None:
        """Let the thread finish the calls already queued, then exit (does not wait)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)

    def _main(self) -> None:
        try:
            self._serve()
        finally:
            with _running_lock:
                _running.discard(self)

    def _serve(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            fn, args, fut, loop = call
            if fut.cancelled():  # as an executor does: a call given up before it began never runs
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side, as an executor does
                outcome: tuple[bool, Any] = (False, exc)
            else:
                outcome = (True, result)
            del fn, args
            if loop.is_closed():
                continue
            try:
                loop.call_soon_threadsafe(_deliver, fut, *outcome)
            except RuntimeError:  # the loop closed meanwhile: nobody is left to tell
                continue
