"""The privacy-budget ledger without Redis: a file in the state directory, shared by workers.

Without Redis the gateway used :class:`~privacy.dp.ledger.InMemoryBudgetLedger`, whose
accounts die with the process: restarting the gateway (a crash loop, a deploy, an
attacker who can make it crash) granted every tenant a fresh full budget mid-period, and
with it k_max more answers to average; and ``--workers N`` gave each worker its own
budget (N times ε). :class:`FileBudgetLedger` keeps the accounts in
``<state_dir>/dp-ledger.json`` and does every change as one read-modify-write under an
exclusive ``flock`` on ``dp-ledger.lock``: exact across restarts and across the worker
processes of one host.

Rules (fail closed, as the Redis ledger's epoch marker):

- a reservation is on disk (write, fsync, rename) before ``reserve`` returns, so an
  answer is never released on a charge a crash could forget; if it cannot be written
  nothing is charged and :class:`LedgerUnavailable` is raised (503);
- open reservations are stored as spent: after a crash they stay counted until the
  period ends (under-use, never overspend); commit only forgets the token;
- a ledger file that cannot be read or parsed is never taken as "no spending": every
  call raises :class:`LedgerUnavailable` until an operator repairs or removes the file.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from gateway.files import write_private
from privacy.dp.ledger import (
    DAY_S,
    LEDGER_RELATIVE_TOLERANCE,
    Clock,
    LedgerMismatch,
    LedgerUnavailable,
    Period,
    Refused,
    Reservation,
    carried_spend,
)

log = structlog.get_logger("gateway.dp_ledger")

LEDGER_FILE: Final = "dp-ledger.json"
_FORMAT: Final = 1
T = TypeVar("T")
FloatArray = npt.NDArray[np.float64]
_Accounts = dict[tuple[str, str], tuple[Period, FloatArray]]


class _Corrupt(Exception):
    """The ledger file exists but cannot be trusted."""


class FileBudgetLedger:
    """:class:`~privacy.dp.ledger.BudgetLedger` on a file (see the module doc)."""

    def __init__(self, path: Path, clock: Clock = time.time, *, keep_s: float = 2 * DAY_S) -> None:
        self.path = path
        self.lock_path = path.with_name(path.stem + ".lock")
        self._clock = clock
        self._keep_s = keep_s
        self._mine: dict[str, tuple[str, str, FloatArray]] = {}  # this process's open reservations
        self._thread_lock = threading.Lock()

    # ------------------------------------------------------------------ BudgetLedger

    async def reserve(
        self, key: str, period: Period, amount: Sequence[float], limit: Sequence[float]
    ) -> Reservation | Refused:
        amount_v = np.array(amount, dtype=np.float64)
        limit_v = np.array(limit, dtype=np.float64)
        if amount_v.ndim != 1 or amount_v.shape != limit_v.shape or not amount_v.size or (amount_v < 0).any() \
                or not np.isfinite(amount_v).all() or not np.isfinite(limit_v).all():
            raise ValueError("amount and limit must be vectors of finite floats of one size, amount >= 0")
        now = self._clock()

        def change(accounts: _Accounts) -> Reservation | Refused:
            found = accounts.get((key, period.id))
            used = found[1] if found is not None else carried_spend(_others(accounts, key, period), period,
                                                                    amount_v.size)
            if used.size != amount_v.size:
                # SECURITY: fail closed rather than start a fresh (full) budget mid-period.
                raise LedgerMismatch("budget account holds a vector of another size")
            # SECURITY: check and add in one locked read-modify-write: no two requests, in
            # any worker, pass the check against the same headroom.
            if not bool((used + amount_v <= limit_v + LEDGER_RELATIVE_TOLERANCE * np.abs(limit_v)).any()):
                return Refused(retry_after_s=period.seconds_left(now), used=tuple(used.tolist()))
            accounts[(key, period.id)] = (period, used + amount_v)
            token = os.urandom(16).hex()
            return Reservation(key=key, period=period, amount=tuple(amount_v.tolist()), token=token,
                               used_after=tuple((used + amount_v).tolist()))

        try:
            result = await self._run(change, write=True)
        except OSError as exc:
            # SECURITY: a charge that is not durable is no charge: nothing held, refuse (503).
            log.warning("dp_ledger_write_failed", error=type(exc).__name__)
            raise LedgerUnavailable("privacy budget ledger could not be saved") from exc
        if isinstance(result, Reservation):
            with self._thread_lock:
                self._mine[result.token] = (key, period.id, amount_v)
        return result

    async def commit(self, reservation: Reservation) -> None:
        # Already on disk as spent: committing only forgets the token (no refund possible now).
        with self._thread_lock:
            self._mine.pop(reservation.token, None)

    async def refund(self, reservation: Reservation) -> None:
        with self._thread_lock:
            mine = self._mine.pop(reservation.token, None)
        if mine is None:
            return  # committed (or refunded) already: a released answer stays charged
        key, period_id, amount = mine

        def change(accounts: _Accounts) -> None:
            found = accounts.get((key, period_id))
            if found is not None and found[1].size == amount.size:
                accounts[(key, period_id)] = (found[0], np.maximum(found[1] - amount, 0.0))

        try:
            await self._run(change, write=True)
        except (OSError, LedgerUnavailable) as exc:
            # The refund is lost: the amount stays spent (under-use, never overspend).
            log.warning("dp_ledger_refund_not_saved", error=type(exc).__name__)

    async def usage(self, key: str, period: Period, size: int) -> tuple[float, ...]:
        def read(accounts: _Accounts) -> tuple[float, ...]:
            found = accounts.get((key, period.id))
            if found is None:
                return tuple(carried_spend(_others(accounts, key, period), period, size).tolist())
            if found[1].size != size:
                raise LedgerMismatch("budget account holds a vector of another size")
            return tuple(found[1].tolist())

        try:
            return await self._run(read, write=False)
        except OSError as exc:
            raise LedgerUnavailable("privacy budget ledger unreadable") from exc

    def open_reservations(self) -> int:
        """Reservations of this process neither committed nor refunded (tests, health checks)."""
        with self._thread_lock:
            return len(self._mine)

    # ------------------------------------------------------------------ the file

    async def _run(self, fn: Callable[[_Accounts], T], *, write: bool) -> T:
        return await asyncio.to_thread(self._locked, fn, write)

    def _locked(self, fn: Callable[[_Accounts], T], write: bool) -> T:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if write else fcntl.LOCK_SH)
            with self._thread_lock:
                try:
                    accounts = self._read()
                except _Corrupt as exc:
                    # SECURITY: an unreadable ledger is an unknown balance, never a full one (DP-08).
                    log.error("dp_ledger_unreadable", path=str(self.path), error=str(exc))  # noqa: TRY400
                    raise LedgerUnavailable(f"privacy budget ledger unreadable: {exc}") from None
                before = {k: id(v) for k, v in accounts.items()}
                result = fn(accounts)
                changed = accounts.keys() != before.keys() or any(id(v) != before[k] for k, v in accounts.items())
                if write and changed:
                    self._write(accounts)
                return result
        finally:
            os.close(fd)  # releases the flock

    def _read(self) -> _Accounts:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise _Corrupt(f"cannot read {self.path.name} ({type(exc).__name__})") from exc
        try:
            return _parse(raw)
        except (ValueError, TypeError, KeyError) as exc:
            raise _Corrupt(f"{self.path.name} is corrupt ({exc})") from exc

    def _write(self, accounts: _Accounts) -> None:
        now = self._clock()
        doc = {"format": _FORMAT, "accounts": [
            {"key": key, "period": {"id": period.id, "start_s": period.start_s, "end_s": period.end_s},
             "used": used.tolist()}
            for (key, _pid), (period, used) in accounts.items() if period.end_s + self._keep_s >= now]}
        write_private(self.path, json.dumps(doc, separators=(",", ":")).encode(), replace=True)


def _others(accounts: _Accounts, key: str, period: Period) -> list[tuple[Period, FloatArray]]:
    """The key's accounts of other periods (a new account carries their overlapping spend)."""
    return [found for (k, pid), found in accounts.items() if k == key and pid != period.id]


def _parse(raw: bytes) -> _Accounts:
    """The accounts of a ledger file; ValueError/TypeError/KeyError on anything unexpected."""
    doc = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT or not isinstance(doc.get("accounts"), list):
        raise ValueError("unknown format")
    out: _Accounts = {}
    for item in doc["accounts"]:
        key, period = item["key"], item["period"]
        used = np.array(item["used"], dtype=np.float64)
        start, end = float(period["start_s"]), float(period["end_s"])
        if not isinstance(key, str) or not isinstance(period["id"], str) or used.ndim != 1 or not used.size \
                or not np.isfinite(used).all() or (used < 0).any() or not (math.isfinite(start) and start < end):
            raise ValueError("invalid account")
        out[(key, period["id"])] = (Period(id=period["id"], start_s=start, end_s=end), used)
    return out
