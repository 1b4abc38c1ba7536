"""Shared state for rate limits, DP budgets and feature flags (see :mod:`gateway.state.base`).

:func:`open_state` picks the backend from the process settings: no URL (or ``memory://``)
keeps state in this process; a ``redis://``, ``rediss://``, ``unix://``,
``redis+sentinel://`` or ``redis+cluster://`` URL shares it through Redis.
"""

from __future__ import annotations

from typing import Any

from gateway.state.base import (
    BudgetDecision,
    ConcurrencyCheck,
    Document,
    DocumentConflict,
    Lease,
    LimitCheck,
    LimitDecision,
    QuotaCheck,
    RateCheck,
    Reservation,
    SharedState,
    StateKey,
    StateObserver,
    StateUnavailable,
)
from gateway.state.memory import MemoryState

__all__ = [
    "BudgetDecision",
    "ConcurrencyCheck",
    "Document",
    "DocumentConflict",
    "Lease",
    "LimitCheck",
    "LimitDecision",
    "MemoryState",
    "QuotaCheck",
    "RateCheck",
    "Reservation",
    "SharedState",
    "StateKey",
    "StateObserver",
    "StateUnavailable",
    "open_state",
]


def open_state(url: str | None, *, observer: StateObserver | None = None, **options: Any) -> SharedState:
    """The store for ``url``; ``options`` go to :meth:`RedisState.from_url` (``op_timeout_s``, ...).

    No I/O happens here: a Redis that is down at start-up makes requests fail (closed or
    open, per policy) until it is back, rather than stopping the gateway from starting.
    """
    if url is None or url == "memory://":
        return MemoryState()
    from gateway.state.redis import RedisState

    return RedisState.from_url(url, observer=observer, **options)
