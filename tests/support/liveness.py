"""Hang checks: bounds that assert the absence of a hang, never speed.

The handbook: speed and memory targets are measured by the bench/ scripts, which print
numbers; tests never assert that something is fast. Some properties are about time all
the same: the gateway must answer, fail or give up rather than hang (a dead Redis is
refused, a hung upstream times out, a closed pool stops its runs, a slowloris is cut off).
A test proves such a property with a bound far above the expected time -- ``HANG_FACTOR``
times it, never under ``MIN_HANG_S`` -- so that only a hang crosses it (waiting for
something that never comes, or for a far longer timeout than the one configured), and a
slow, busy machine does not.

Where the mechanism can be checked instead (the deadline value that travelled with a call,
the error kind or reason, a counter, a fake clock), tests check it and keep these bounds
only as a net under it; this module is the one place where tests read a clock to judge an
outcome, so a reviewer can audit every such bound here and at its call sites.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Final

HANG_FACTOR: Final = 10.0
"""A hang bound is this many times the expected duration (the deadline, the cooldown...)."""

MIN_HANG_S: Final = 1.0
"""And never under this: scheduling noise alone reaches tens of milliseconds on a busy host."""

HANG_S: Final = 10.0
"""The bound for "answers at all" when no expected duration is meaningful (expected ~0)."""


def hang_bound(expected_s: float | None = None) -> float:
    """The hang bound for an outcome expected after about ``expected_s`` (None: ``HANG_S``)."""
    if expected_s is None:
        return HANG_S
    return max(HANG_FACTOR * expected_s, MIN_HANG_S)


class Stopwatch:
    """Seconds since the block started; frozen when it ends."""

    __slots__ = ("_ended", "_started")

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._ended: float | None = None

    def stop(self) -> None:
        self._ended = time.monotonic()

    @property
    def seconds(self) -> float:
        return (self._ended if self._ended is not None else time.monotonic()) - self._started


def _hung(what: str, watch: Stopwatch, bound_s: float) -> AssertionError:
    return AssertionError(
        f"HANG: {what} had no outcome after {watch.seconds:.2f} s (hang bound {bound_s:g} s; "
        "this checks that it ends at all, not how fast)"
    )


@contextlib.asynccontextmanager
async def no_hang(what: str, *, expected_s: float | None = None) -> AsyncIterator[Stopwatch]:
    """Fail the test if the block has no outcome within ``hang_bound(expected_s)``.

    The block is cancelled at the bound, so a real hang fails the test there instead of
    blocking the suite. An exception raised by the block itself passes through unchanged.
    """
    bound_s = hang_bound(expected_s)
    watch = Stopwatch()
    scope = asyncio.timeout(bound_s)
    try:
        async with scope:
            yield watch
    except TimeoutError:
        watch.stop()
        if scope.expired():
            raise _hung(what, watch, bound_s) from None
        raise
    finally:
        watch.stop()


@contextlib.contextmanager
def no_hang_sync(what: str, *, expected_s: float | None = None) -> Iterator[Stopwatch]:
    """Blocking code: fail the test if the block took longer than the hang bound.

    It cannot interrupt the block; use it around calls that carry their own timeout.
    """
    bound_s = hang_bound(expected_s)
    watch = Stopwatch()
    try:
        yield watch
    finally:
        watch.stop()
    if watch.seconds >= bound_s:
        raise _hung(what, watch, bound_s)


async def eventually(condition: Callable[[], object], what: str, *, expected_s: float | None = None,
                     poll_s: float = 0.01) -> None:
    """Poll ``condition`` until it holds; fail the test at the hang bound.

    For state another thread or process changes, which offers no event to wait on.
    """
    async with no_hang(what, expected_s=expected_s):
        while True:
            if condition():
                return
            await asyncio.sleep(poll_s)
