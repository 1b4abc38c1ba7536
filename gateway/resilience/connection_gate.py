"""How many client connections one gateway process holds open: a cap, total and per address.

Why: every open socket costs a file descriptor, a protocol object and a parser. With no cap,
10,000 idle connections (or one client opening them) exhaust the process's descriptors and
then nobody, including health probes, gets in. ``max_in_flight`` bounds requests, not the
connections that may never send one. Beyond the cap a new connection is refused at once,
before anything of it is read; those already open (and their requests in flight) are left
alone, and idle ones go when the keep-alive timeout reaps them.

The gate only counts and decides; the HTTP front (``fronts/http/connection_cap.py``) asks it
when a connection is made and tells it when one is lost.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import structlog

log = structlog.get_logger("gateway.connections")

REFUSED_TOTAL: Final = "max_connections"
REFUSED_PER_ADDRESS: Final = "max_connections_per_ip"
# A flood is logged as one line per interval with a count, not one line per socket.
LOG_INTERVAL_S: Final = 1.0


class ConnectionLimits(Protocol):
    """The policy fields the gate reads (``gateway.yaml`` ``limits``), re-read per connection."""

    @property
    def max_connections(self) -> int: ...

    @property
    def max_connections_per_ip(self) -> int | None: ...


class ConnectionMetrics(Protocol):
    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...

    def connection_refused(self, reason: str) -> None: ...


@dataclass(slots=True)
class ConnectionGate:
    """Open connections of one process, in total and per client address."""

    limits: Callable[[], ConnectionLimits]
    metrics: ConnectionMetrics
    clock: Callable[[], float] = time.monotonic
    open_total: int = 0
    by_address: dict[str, int] = field(default_factory=dict)
    _unlogged: dict[str, int] = field(default_factory=dict)
    _last_log: float = float("-inf")

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address``; or the reason it is refused (not counted)."""
        limits = self.limits()
        reason: str | None = None
        if self.open_total >= limits.max_connections:
            reason = REFUSED_TOTAL
        elif limits.max_connections_per_ip is not None and \
                self.by_address.get(address, 0) >= limits.max_connections_per_ip:
            reason = REFUSED_PER_ADDRESS
        if reason is not None:
            self.metrics.connection_refused(reason)
            self._log_refusal(reason, limits)
            return reason
        self.open_total += 1
        self.by_address[address] = self.by_address.get(address, 0) + 1
        self.metrics.connection_opened()
        return None

    def release(self, address: str) -> None:
        """A connection admitted by :meth:`admit` is gone."""
        self.open_total = max(0, self.open_total - 1)
        left = self.by_address.get(address, 0) - 1
        if left > 0:
            self.by_address[address] = left
        else:
            # Addresses with nothing open are forgotten: the table is bounded by open sockets.
            self.by_address.pop(address, None)
        self.metrics.connection_closed()

    def _log_refusal(self, reason: str, limits: ConnectionLimits) -> None:
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = self.clock()
        if now - self._last_log < LOG_INTERVAL_S:
            return
        self._last_log = now
        counts, self._unlogged = self._unlogged, {}
        # The client address is not logged: a flood from many addresses would be many
        # distinct lines' worth of data; the count and the cap are what an operator acts on.
        log.warning("connections_refused", refused=counts, open=self.open_total,
                    max_connections=limits.max_connections, max_connections_per_ip=limits.max_connections_per_ip)
