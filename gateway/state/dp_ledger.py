"""The DP budget ledger on the shared-state layer, so every replica spends one budget.

``privacy.dp`` defines the ledger contract (reserve, commit, refund, usage of a budget
vector per key and period); this adapter backs it with :class:`SharedState`'s atomic
``reserve/commit/refund`` (a Lua script on Redis), so 200 concurrent requests on two
replicas can never spend more than the budget. Periods are the state layer's calendar
periods (epoch-aligned, the same UTC days as ``PeriodScheme``), timed by the store.

Only scalar budgets travel through the store: basic composition (Laplace). An RDP
(Gaussian) budget is a vector; with a shared store it is refused at policy load rather
than approximated.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from gateway.state.base import Reservation as StateReservation
from gateway.state.base import SharedState, StateKey, StateUnavailable
from privacy.dp.ledger import LedgerUnavailable, Period, Refused, Reservation

_KIND = "dp.budget"


class StateBudgetLedger:
    def __init__(self, state: SharedState) -> None:
        self.state = state
        # Reservations live for one request; the store holds the money, this only the handle.
        self._open: dict[str, StateReservation] = {}

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
        cost, capacity = self._scalar(amount), self._scalar(limit)
        try:
            decision = await self.state.reserve(self._key(key), cost, capacity=capacity,
                                                period_s=self._period_s(period))
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc
        if not decision.granted or decision.reservation is None:
            return Refused(retry_after_s=max(decision.reset_s, 1.0), used=(decision.spent,))
        token = secrets.token_hex(16)
        self._open[token] = decision.reservation
        return Reservation(key=key, period=period, amount=(cost,), token=token, used_after=(decision.spent,))

    async def commit(self, reservation: Reservation) -> None:
        held = self._open.pop(reservation.token, None)
        if held is None:
            return  # idempotent
        try:
            await self.state.commit(held)
        except StateUnavailable as exc:
            # Uncommitted stays spent in the store: under-use, never overspend.
            raise LedgerUnavailable(str(exc)) from exc

    async def refund(self, reservation: Reservation) -> None:
        held = self._open.pop(reservation.token, None)
        if held is None:
            return
        try:
            await self.state.refund(held)
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc

    async def usage(self, key: str, period: Period, size: int) -> tuple[float, ...]:
        if size != 1:
            raise LedgerUnavailable("a shared budget store holds scalar (basic composition) budgets only")
        probe = f"usage-{secrets.token_hex(8)}"
        try:
            # A zero-cost reservation reads the period's spend atomically; settling it changes nothing.
            decision = await self.state.reserve(self._key(key), 0.0, capacity=1e18,
                                                period_s=self._period_s(period), reservation_id=probe)
            if decision.reservation is not None:
                await self.state.refund(decision.reservation)
        except StateUnavailable as exc:
            raise LedgerUnavailable(str(exc)) from exc
        return (decision.spent,)
