"""The DP budget ledger on the shared-state layer, so every replica spends one budget.

``privacy.dp`` defines the ledger contract (reserve, commit, refund, usage of a budget
vector per key and period); this adapter backs it with :class:`SharedState`'s atomic
``reserve/commit/refund`` (a Lua script on Redis), so 200 concurrent requests on two
replicas can never spend more than the budget. Periods are the state layer's calendar
periods (epoch-aligned, the same UTC days as ``PeriodScheme``), timed by the store.

Scalar budgets (basic composition, Laplace) use the store's generic budget operations.
Vector budgets (RDP, Gaussian: the RDP curve at fixed orders) use the vector scripts of
:mod:`gateway.state.dp_vector` on the same account key, so one (tenant, model) account is
one Redis hash whatever the mechanism, and the check-and-add is one atomic script too.
On a store without scripts (the in-process :class:`MemoryState`) vectors are kept by an
:class:`InMemoryBudgetLedger` in this process, which is what that store shares anyway.

Epoch marker (catalogue DP-08): the first use writes a random marker document to the
store and remembers it; every later reserve/usage first checks that the marker is still
there and the same. ``FLUSHALL``, a Redis restart without persistence or a failover to an
empty replica lose the marker with the budgets, and the ledger then raises
:class:`LedgerUnavailable` (503) instead of granting a fresh full budget. Re-arming needs
a restart of the gateway (an operator decision).

One account lost or rolled back (the marker survives): ``DEL``/``UNLINK`` of one budget
key, an ``EXPIRE`` put on it, its eviction under a ``maxmemory-policy`` other than
``noeviction`` (budget keys carry a TTL, so ``volatile-*`` policies evict them too), a
restart from an older RDB/AOF snapshot, a failover to a lagging replica. Each account
hash keeps ``q``, a counter of its reservations this period that the reserve script
increments in the same atomic step and nothing ever lowers (refunds by other replicas
legitimately lower the spend, so a lower spend proves nothing; a lower counter does).
Every reply carries the store's period index and ``q``; this process remembers the
highest pair it saw per account, and judges each reply against the pair it had seen
*before that call was sent* (replies on a pool of connections arrive in any order). A
granted reservation whose ``q`` is not above it, a reply with a lower ``q`` in the same
period, or a period *before* it (a server clock gone back, which would otherwise open that
day's budget again) means budget state was lost: the ledger latches
:class:`LedgerUnavailable` for every account (503, logged ``dp_budget_state_lost``) until
a restart, like the marker. The reservation that revealed
it stays spent (under-use, never overspend).

A policy edit of ``period_s``: the hash records the period length (``l``); an account
written under another length whose period overlaps the current one keeps its spend and
counter (``account_standing`` in the scripts), and the loss check above compares only
counters of one period length. Limit: one hash holds one period, so after a *longer*
period is configured only the last shorter period's spend is carried, not earlier ones.

Eviction: on arming (and every ``POLICY_RECHECK_S`` after) the ledger reads the server's
``maxmemory-policy``; any policy but ``noeviction`` can silently drop budget keys, so DP
calls are refused (503, ``dp_eviction_policy_unsafe``). Where ``CONFIG`` is forbidden
(managed Redis) the policy is unknown: a warning is logged (``dp_eviction_policy_unknown``)
and the counter above is the only guard; operators must set ``noeviction`` themselves.

Which clock decides the period: the Redis server's ``TIME`` inside the scripts, never the
gateway's clock, so a gateway skewed by an hour neither opens the next period early nor
keeps the old one late (the gateway clock only labels the period in notes).

Limits (what no single process can know): the marker check is one round trip before the
reserve script, not inside it, so a loss between the two is caught only by the counter,
for accounts this process has already seen; a gateway *started* after a loss (or one that
never touched the account before it was rolled back) cannot tell it from a new
deployment or a fresh account; a rollback that also rolled back everything every running
replica saw is invisible. Persistence (AOF ``everysec`` or better) and ``noeviction`` are
therefore deployment requirements of a shared DP ledger, not options.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Final

import structlog

from gateway.state.base import DocumentConflict, SharedState, StateKey, StateUnavailable
from gateway.state.base import Reservation as StateReservation
from gateway.state.dp_vector import RedisVectorBudgets, ScriptRunner, VectorHold
from privacy.dp.ledger import (
    InMemoryBudgetLedger,
    LedgerMismatch,
    LedgerUnavailable,
    Period,
    Refused,
    Reservation,
)

log = structlog.get_logger("gateway.state.dp_ledger")

_KIND = "dp.budget"
_EPOCH_KEY = StateKey("dp:epoch", "dp.epoch", ("epoch",))
#: How often the server's eviction policy is read again (an operator can change it live).
POLICY_RECHECK_S: Final = 60.0
SAFE_EVICTION_POLICY: Final = "noeviction"


class StateBudgetLedger:
    def __init__(self, state: SharedState) -> None:
        self.state = state
        # Reservations live for one request; the store holds the money, this only the handle.
        self._open: dict[str, StateReservation] = {}
        self._open_vectors: dict[str, VectorHold] = {}
        self._vectors = RedisVectorBudgets(state) if isinstance(state, ScriptRunner) else None
        self._local_vectors = InMemoryBudgetLedger(time.time) if self._vectors is None else None
        self._epoch: bytes | None = None
        # account -> (period length, store period index, highest reservation counter seen): see
        # the docstring.
        self._seen: dict[str, tuple[int, int, int]] = {}
        self._lost: str | None = None
        self._policy_checked_at: float | None = None

    def _witness(self, key: str, floor: tuple[int, int, int] | None, period_s: int, period: int | None, seq: int,
                 *, granted_new: bool) -> None:
        """Compare the store's counter for ``key`` with what this process had seen before the
        call was sent (``floor``, from :meth:`_floor`).

        # SECURITY: a counter below one seen before the call (or a granted reservation that
        # did not raise it, or a period before the one seen) means the account was deleted,
        # evicted, expired or rolled back: its spend is unknown, so nothing is granted any
        # more. Only what was seen *before* the call counts: concurrent calls on a pool of
        # connections are answered in any order, and a reply with a lower counter than one
        # read meanwhile is an earlier script, not a loss (Redis ran the scripts one by one).
        """
        if period is None or period < 0:
            return  # a store without counters (process memory): nothing to compare
        if floor is not None and floor[0] == period_s:
            # Period indexes of two lengths do not compare: after a policy edit of period_s the
            # store carries the spend over (RESERVE_LUA, account_standing); the next call of
            # the same length has a floor again.
            _, floor_period, floor_seq = floor
            if period < floor_period or (period == floor_period and (seq < floor_seq or
                                                                     (granted_new and seq <= floor_seq))):
                self._lost = "budget state lost or rolled back: account counter went back, failing closed"
                log.error("dp_budget_state_lost", account=key, period=period, seen_period=floor_period,
                          seq=seq, seen_seq=floor_seq)
                raise LedgerUnavailable(self._lost)
        last = self._seen.get(key)
        if last is None or last[0] != period_s or (period, seq) > last[1:]:
            self._seen[key] = (period_s, period, seq)

    def _floor(self, key: str) -> tuple[int, int, int] | None:
        """The highest (period, counter) seen for ``key`` so far: taken before a call is sent."""
        return self._seen.get(key)

    async def _check_policy(self) -> None:
        """Refuse a server that may evict budget keys (see the module docstring)."""
        read = getattr(self.state, "eviction_policy", None)
        now = time.monotonic()
        if read is None or (self._policy_checked_at is not None and now - self._policy_checked_at < POLICY_RECHECK_S):
            return
        try:
            policy = await read()
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc
        if policy is None:
            if self._policy_checked_at is None:
                log.warning("dp_eviction_policy_unknown",
                            hint="CONFIG GET maxmemory-policy refused; budgets need 'noeviction'")
        elif policy != SAFE_EVICTION_POLICY:
            # SECURITY: an evicted budget key is a fresh budget; refuse rather than over-grant.
            log.error("dp_eviction_policy_unsafe", policy=policy, required=SAFE_EVICTION_POLICY)
            raise LedgerUnavailable(f"redis maxmemory-policy {policy!r} can evict budget keys; "
                                    f"the DP ledger needs {SAFE_EVICTION_POLICY!r}")
        self._policy_checked_at = now

    async def _check_epoch(self) -> None:
        """Fail closed when the store lost the budgets (see the module docstring)."""
        if self._lost is not None:
            raise LedgerUnavailable(self._lost)
        await self._check_policy()
        try:
            doc = await self.state.get_document(_EPOCH_KEY)
            if self._epoch is None:
                if doc is None:
                    marker = secrets.token_hex(16).encode()
                    try:
                        await self.state.put_document(_EPOCH_KEY, marker, expected_version=None)
                    except DocumentConflict:
                        doc = await self.state.get_document(_EPOCH_KEY)
                    else:
                        self._epoch = marker
                        return
                if doc is None:
                    raise LedgerUnavailable("budget epoch marker vanished while being created")
                self._epoch = doc.value
                return
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc
        if doc is None or doc.value != self._epoch:
            # SECURITY: the budgets were lost with the marker; never grant a fresh budget.
            raise LedgerUnavailable("budget epoch marker missing or changed: budget state lost, failing closed")

    @staticmethod
    def _key(key: str) -> StateKey:
        # The account (tenant, model) is the hash tag: one slot per account on a cluster.
        return StateKey(f"dp:{key}", _KIND, (key,))

    @staticmethod
    def _period_s(period: Period) -> int:
        return int(round(period.end_s - period.start_s))

    @staticmethod
    def _scalar(values: Sequence[float]) -> float:
        if len(values) != 1:
            raise LedgerUnavailable("a shared budget store holds scalar (basic composition) budgets only")
        return float(values[0])

    async def reserve(self, key: str, period: Period, amount: Sequence[float],
                      limit: Sequence[float]) -> Reservation | Refused:
        if len(amount) != len(limit) or not amount:
            raise ValueError("amount and limit must be non-empty vectors of the same size")
        await self._check_epoch()
        if len(amount) > 1:
            return await self._reserve_vector(key, period, amount, limit)
        cost, capacity = self._scalar(amount), self._scalar(limit)
        floor = self._floor(key)
        try:
            decision = await self.state.reserve(self._key(key), cost, capacity=capacity,
                                                period_s=self._period_s(period))
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc
        self._witness(key, floor, self._period_s(period), decision.period, decision.seq,
                      granted_new=decision.granted)
        if not decision.granted or decision.reservation is None:
            return Refused(retry_after_s=max(decision.reset_s, 1.0), used=(decision.spent,))
        token = secrets.token_hex(16)
        self._open[token] = decision.reservation
        return Reservation(key=key, period=period, amount=(cost,), token=token, used_after=(decision.spent,))

    async def _reserve_vector(self, key: str, period: Period, amount: Sequence[float],
                              limit: Sequence[float]) -> Reservation | Refused:
        if self._local_vectors is not None:
            return await self._local_vectors.reserve(key, period, amount, limit)
        assert self._vectors is not None  # noqa: S101 - one of the two is always set
        if any(not a >= 0.0 or a == float("inf") for a in amount):
            raise ValueError("budget amounts must be finite and >= 0")
        floor = self._floor(key)
        try:
            decision = await self._vectors.reserve(self._key(key), amount, limit, self._period_s(period))
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc
        self._witness(key, floor, self._period_s(period), decision.period, decision.seq,
                      granted_new=decision.status == 1)
        if decision.status < 0:
            # SECURITY: fail closed rather than start a fresh budget under another accounting.
            raise LedgerMismatch("budget account holds another kind of budget this period")
        if decision.hold is None:
            return Refused(retry_after_s=max(decision.reset_s, 1.0), used=decision.used)
        token = secrets.token_hex(16)
        self._open_vectors[token] = decision.hold
        return Reservation(key=key, period=period, amount=tuple(float(a) for a in amount), token=token,
                           used_after=decision.used)

    async def _settle_vector(self, reservation: Reservation, *, refund: bool) -> bool:
        """True when the reservation was a vector one (handled here, whatever the outcome)."""
        if self._local_vectors is not None and len(reservation.amount) > 1:
            await (self._local_vectors.refund if refund else self._local_vectors.commit)(reservation)
            return True
        hold = self._open_vectors.pop(reservation.token, None)
        if hold is None:
            return len(reservation.amount) > 1  # idempotent
        assert self._vectors is not None  # noqa: S101 - holds exist only with the Redis store
        try:
            await (self._vectors.refund if refund else self._vectors.commit)(hold)
        except StateUnavailable as exc:
            # Unsettled stays spent in the store until the period ends: under-use, never overspend.
            raise LedgerUnavailable(str(exc)) from exc
        return True

    async def commit(self, reservation: Reservation) -> None:
        if await self._settle_vector(reservation, refund=False):
            return
        held = self._open.pop(reservation.token, None)
        if held is None:
            return  # idempotent
        try:
            await self.state.commit(held)
        except StateUnavailable as exc:
            # Uncommitted stays spent in the store: under-use, never overspend.
            raise LedgerUnavailable(str(exc)) from exc

    async def refund(self, reservation: Reservation) -> None:
        if await self._settle_vector(reservation, refund=True):
            return
        held = self._open.pop(reservation.token, None)
        if held is None:
            return
        try:
            await self.state.refund(held)
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc

    async def usage(self, key: str, period: Period, size: int) -> tuple[float, ...]:
        await self._check_epoch()
        if size > 1:
            if self._local_vectors is not None:
                return await self._local_vectors.usage(key, period, size)
            assert self._vectors is not None  # noqa: S101 - one of the two is always set
            floor = self._floor(key)
            try:
                status, used, store_period, seq = await self._vectors.usage(self._key(key), size,
                                                                            self._period_s(period))
            except StateUnavailable as exc:
                raise LedgerUnavailable(str(exc)) from exc
            self._witness(key, floor, self._period_s(period), store_period, seq, granted_new=False)
            if status < 0:
                raise LedgerMismatch("budget account holds another kind of budget this period")
            return used
        if size != 1:
            raise LedgerUnavailable("a budget vector needs at least one coordinate")
        probe = f"usage-{secrets.token_hex(8)}"
        floor = self._floor(key)
        try:
            # A zero-cost reservation reads the period's spend atomically; settling it changes nothing.
            decision = await self.state.reserve(self._key(key), 0.0, capacity=1e18,
                                                period_s=self._period_s(period), reservation_id=probe)
            self._witness(key, floor, self._period_s(period), decision.period, decision.seq,
                      granted_new=decision.granted)
            if decision.reservation is not None:
                await self.state.refund(decision.reservation)
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc
        return (decision.spent,)
