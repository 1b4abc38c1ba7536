"""The single-process privacy-budget ledger, kept on disk so a restart does not refill budgets.

Without Redis the gateway used :class:`~privacy.dp.ledger.InMemoryBudgetLedger`, whose
accounts die with the process: restarting the gateway (a crash loop, a deploy, an
attacker who can make it crash) granted every tenant a fresh full budget mid-period,
and with it k_max more answers to average. :class:`FileBudgetLedger` is the same ledger
with its accounts written to ``<state_dir>/dp-ledger.json`` after every reservation
and refund, and read back at start.

Rules (fail closed, as the Redis ledger's epoch marker):

- a reservation is on disk (write, fsync, rename) before ``reserve`` returns, so an
  answer is never released on a charge a crash could forget; if it cannot be written
  the reservation is undone and :class:`LedgerUnavailable` raised (503);
- open reservations are saved as spent: after a crash they stay counted until the
  period ends (under-use, never overspend);
- a ledger file that cannot be read or parsed is never taken as "no spending": every
  call raises :class:`LedgerUnavailable` until an operator repairs or removes the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import structlog

from privacy.dp.ledger import (
    DAY_S,
    Clock,
    InMemoryBudgetLedger,
    LedgerUnavailable,
    Period,
    Refused,
    Reservation,
    _Account,
)

log = structlog.get_logger("gateway.dp_ledger")

LEDGER_FILE: Final = "dp-ledger.json"
_FORMAT: Final = 1


class FileBudgetLedger(InMemoryBudgetLedger):
    """:class:`InMemoryBudgetLedger` whose accounts survive a restart (see the module doc)."""

    def __init__(self, path: Path, clock: Clock = time.time, *, keep_s: float = 2 * DAY_S) -> None:
        super().__init__(clock, keep_s=keep_s)
        self.path = path
        self._broken: str | None = None
        self._write_lock: asyncio.Lock | None = None
        self._load()

    # ------------------------------------------------------------------ BudgetLedger

    async def reserve(
        self, key: str, period: Period, amount: Sequence[float], limit: Sequence[float]
    ) -> Reservation | Refused:
        self._check()
        result = await super().reserve(key, period, amount, limit)
        if isinstance(result, Reservation):
            try:
                await self._persist()
            except OSError as exc:
                # SECURITY: a charge that is not durable is no charge: undo it and refuse.
                await super().refund(result)
                log.warning("dp_ledger_write_failed", error=type(exc).__name__)
                raise LedgerUnavailable("privacy budget ledger could not be saved") from exc
        return result

    async def commit(self, reservation: Reservation) -> None:
        # The reservation is already on disk as spent; committing only forgets its token.
        await super().commit(reservation)

    async def refund(self, reservation: Reservation) -> None:
        await super().refund(reservation)
        try:
            await self._persist()
        except OSError as exc:
            # The refund is lost on a restart: the amount stays spent (under-use, never overspend).
            log.warning("dp_ledger_refund_not_saved", error=type(exc).__name__)

    async def usage(self, key: str, period: Period, size: int) -> tuple[float, ...]:
        self._check()
        return await super().usage(key, period, size)

    # ------------------------------------------------------------------ persistence

    def _check(self) -> None:
        if self._broken is not None:
            raise LedgerUnavailable(f"privacy budget ledger unreadable: {self._broken}")

    def _load(self) -> None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            self._fail(f"cannot read {self.path.name} ({type(exc).__name__})")
            return
        try:
            accounts = _parse(raw)
        except (ValueError, TypeError, KeyError) as exc:
            self._fail(f"{self.path.name} is corrupt ({exc})")
            return
        now = self._clock()
        with self._lock:
            for (key, period_id), account in accounts.items():
                if account.period.end_s + self._keep_s >= now:
                    self._accounts[(key, period_id)] = account

    def _fail(self, why: str) -> None:
        # SECURITY: an unreadable ledger is an unknown balance, never a full one (DP-08).
        self._broken = why
        log.error("dp_ledger_unreadable", path=str(self.path), error=why)

    async def _persist(self) -> None:
        if self._write_lock is None:
            self._write_lock = asyncio.Lock()
        async with self._write_lock:
            await asyncio.to_thread(self._write)

    def _write(self) -> None:
        with self._lock:
            doc = {"format": _FORMAT, "accounts": [
                {"key": key, "period": {"id": a.period.id, "start_s": a.period.start_s, "end_s": a.period.end_s},
                 "used": a.used.tolist()}
                for (key, _pid), a in self._accounts.items()]}
        data = json.dumps(doc, separators=(",", ":")).encode()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):
                os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _parse(raw: bytes) -> dict[tuple[str, str], _Account]:
    """The accounts of a ledger file; ValueError/TypeError/KeyError on anything unexpected."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("accounts"), list):
        raise ValueError("unknown format")
    out: dict[tuple[str, str], _Account] = {}
    for item in doc["accounts"]:
        key, period = item["key"], item["period"]
        used = np.array(item["used"], dtype=np.float64)
        start, end = float(period["start_s"]), float(period["end_s"])
        if not isinstance(key, str) or not isinstance(period["id"], str) or used.ndim != 1 or not used.size \
                or not np.isfinite(used).all() or (used < 0).any() or not (math.isfinite(start) and start < end):
            raise ValueError("invalid account")
        out[(key, period["id"])] = _Account(period=Period(id=period["id"], start_s=start, end_s=end), used=used)
    return out
