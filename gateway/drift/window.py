"""A bounded sliding window of rows: the newest ``capacity`` rows no older than ``max_age_s``.

A ring buffer of preallocated arrays, so memory is fixed at construction
(``capacity x width x 4`` bytes plus a timestamp per row) however much traffic arrives:
a new row overwrites the oldest one. Timestamps come from a monotonic clock supplied
by the caller and never decrease, so ageing out is a prefix cut.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class SlidingWindow:
    """Not thread-safe: owned by the monitor's single consumer task."""

    def __init__(self, capacity: int, width: int, max_age_s: float) -> None:
        if capacity <= 0 or width <= 0 or max_age_s <= 0:
            raise ValueError("capacity, width and max_age_s must be positive")
        self.capacity = capacity
        self.width = width
        self.max_age_s = max_age_s
        self._rows = np.zeros((capacity, width), dtype=np.float32)
        self._at = np.zeros(capacity, dtype=np.float64)
        self._start = 0
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def extend(self, rows: npt.NDArray[np.floating], now: float | npt.NDArray[np.float64]) -> None:
        """Append rows (oldest first); beyond ``capacity`` the oldest rows are overwritten.

        ``now`` is one timestamp for every row, or one per row (non-decreasing): the
        consumer appends many queued samples in one call."""
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise ValueError(f"rows must have shape (n, {self.width})")
        if not isinstance(now, float | int) and now.shape != (rows.shape[0],):
            raise ValueError("give one timestamp, or one per row")
        rows = rows[-self.capacity:]
        n = rows.shape[0]
        if n == 0:
            return
        positions = (self._start + self._count + np.arange(n)) % self.capacity
        self._rows[positions] = rows
        self._at[positions] = now if isinstance(now, float | int) else now[-n:]
        overflow = max(0, self._count + n - self.capacity)
        self._start = (self._start + overflow) % self.capacity
        self._count = min(self.capacity, self._count + n)

    def evict(self, now: float) -> int:
        """Drop rows older than ``max_age_s``; return how many left."""
        if self._count == 0:
            return 0
        order = self._order()
        stale = int(np.searchsorted(self._at[order], now - self.max_age_s, side="left"))
        self._start = (self._start + stale) % self.capacity
        self._count -= stale
        return stale

    def oldest_at(self) -> float | None:
        """Timestamp of the oldest row, None when empty."""
        return float(self._at[self._start]) if self._count else None

    def values(self) -> npt.NDArray[np.float32]:
        """A copy of the rows, oldest first (safe to hand to another thread)."""
        copied: npt.NDArray[np.float32] = self._rows[self._order()].copy()
        return copied

    def resized(self, capacity: int, max_age_s: float) -> SlidingWindow:
        """A new window with the newest rows of this one (a policy changed the window)."""
        other = SlidingWindow(capacity, self.width, max_age_s)
        order = self._order()[-capacity:]
        other._rows[: order.size] = self._rows[order]
        other._at[: order.size] = self._at[order]
        other._count = int(order.size)
        return other

    def _order(self) -> npt.NDArray[np.intp]:
        return (self._start + np.arange(self._count)) % self.capacity
