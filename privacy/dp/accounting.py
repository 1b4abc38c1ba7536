"""Privacy accounting: what one answered row costs, and what a tenant has spent.

Two accountants, one per noise mechanism, both reduced to *compact state*: a short
vector of floats per (tenant, model, period) that only ever grows by addition, so a
shared store (Redis + Lua, or the in-memory ledger) can check and add it atomically.

- **Laplace, basic composition** (Dwork & Roth, Thm 3.14): k releases that are each
  ε_i-DP are (Σ ε_i)-DP. The state is a 1-vector ``(ε_spent,)``; the limit is ``(E,)``.
- **Gaussian, Rényi DP** (Mironov 2017): a Gaussian release with L2 sensitivity Δ and
  noise σ is (α, α·ρ)-RDP at every order α > 1 with ρ = Δ²/(2σ²), and RDP adds up
  under composition. The state is the vector ``(rdp(α₁), …, rdp(α_m))`` over the fixed
  orders :data:`RDP_ORDERS`. It converts to (ε, δ)-DP with the conversion Opacus uses
  (Balle et al. 2020, Thm 21)::

      ε(δ) = min_α  rdp(α) + log((α−1)/α) − (log δ + log α)/(α − 1)

  so "ε(δ) ≤ E" is the same as "for **some** order α, rdp(α) ≤ E − c(α)" with
  ``c(α) = log((α−1)/α) − (log δ + log α)/(α−1)``. That is the limit vector the ledger
  gets: a request is admitted when, for at least one coordinate, the spent vector plus
  the request's vector stays within the limit. One rule serves both accountants (for
  a 1-vector "some coordinate" is "the coordinate").

Why not keep Opacus's ``RDPAccountant`` history: it is O(len(history)) per query and
importing opacus loads torch (seconds, hundreds of MB) into the gateway; the running
vector gives the identical ε in microseconds (``notes/PRIVACY.md`` §3). The tests check
this module against ``RDPAccountant`` on the same sequence of releases.

Pure math: no numpy needed on the hot path, no I/O, no gateway imports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from privacy.dp.ledger import LEDGER_RELATIVE_TOLERANCE

# Opacus's RDPAccountant.DEFAULT_ALPHAS (151 orders, up to 63), for comparisons.
OPACUS_DEFAULT_ORDERS: Final[tuple[float, ...]] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)]
)
# The orders the ledger keeps: α − 1 geometric, 16 per decade, from 0.056 to 1000 (69
# floats per account). At small per-query ρ the optimal order is large, which Opacus's
# grid (max 63) misses (σ = 20, one query: ε 0.182 vs 0.178, notes/PRIVACY.md §3); over
# ρ ∈ [1e-4, 20], δ ∈ {1e-5, 1e-7} this grid's ε is within 0.28% of a 20,000-order grid.
# Fewer orders keep reserve/convert cheap (each request adds and checks the vector).
RDP_ORDERS: Final[tuple[float, ...]] = tuple(1.0 + 10.0 ** (k / 16) for k in range(-20, 49))

Accounting = Literal["basic", "rdp"]


def rdp_conversion_offsets(delta: float, orders: Sequence[float] = RDP_ORDERS) -> tuple[float, ...]:
    """``c(α)`` of the RDP → (ε, δ) conversion, per order (Balle et al. 2020, Thm 21)."""
    return _offsets(delta, tuple(orders))


@lru_cache(maxsize=64)
def _offsets(delta: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    if not 0.0 < delta < 1.0:
        raise ValueError("delta must be in (0, 1)")
    return tuple(
        math.log((a - 1.0) / a) - (math.log(delta) + math.log(a)) / (a - 1.0) for a in orders
    )


def rdp_to_epsilon(
    rdp: Sequence[float], delta: float, orders: Sequence[float] = RDP_ORDERS
) -> tuple[float, float]:
    """(ε, optimal order) for an RDP vector: the same formula as Opacus's ``get_privacy_spent``."""
    if len(rdp) != len(orders):
        raise ValueError("rdp and orders must have the same length")
    offsets = rdp_conversion_offsets(delta, orders)
    best = min(range(len(orders)), key=lambda i: rdp[i] + offsets[i])
    return max(0.0, rdp[best] + offsets[best]), orders[best]


def gaussian_rho_for_epsilon(epsilon: float, delta: float, orders: Sequence[float] = RDP_ORDERS) -> float:
    """Largest ρ such that one Gaussian release (RDP α·ρ) is (ε, δ)-DP by the conversion above.

    Calibrating σ from (ε, δ) with the *same* conversion the accountant uses means a
    row charged at this ρ costs exactly the ε the policy states, no more.
    Closed form: ρ = max_α (ε − c(α)) / α.
    """
    if epsilon <= 0.0:
        raise ValueError("epsilon must be positive")
    offsets = rdp_conversion_offsets(delta, orders)
    rho = max((epsilon - c) / a for a, c in zip(orders, offsets, strict=True))
    if rho <= 0.0:
        raise ValueError(f"no Gaussian noise reaches epsilon={epsilon} at delta={delta} with these orders")
    return rho


@dataclass(frozen=True, slots=True)
class BasicCompositionAccountant:
    """Laplace rows under basic composition: state ``(ε_spent,)``, limit ``(E,)``."""

    epsilon_per_row: float  # Σ over the charged outputs of ε per row
    budget_epsilon: float
    kind: Literal["basic"] = "basic"

    def charge(self, rows: int) -> tuple[float, ...]:
        return (rows * self.epsilon_per_row,)

    def limit(self) -> tuple[float, ...]:
        return (self.budget_epsilon,)

    def zero(self) -> tuple[float, ...]:
        return (0.0,)

    def epsilon(self, spent: Sequence[float]) -> float:
        return float(spent[0])

    def request_epsilon(self, rows: int) -> float:
        """ε of one request on its own; additive, so audit Σ ε equals the ledger total."""
        return rows * self.epsilon_per_row

    def rows_remaining(self, spent: Sequence[float]) -> int:
        room = self.budget_epsilon * (1.0 + LEDGER_RELATIVE_TOLERANCE) - spent[0]
        return max(0, math.floor(room / self.epsilon_per_row))

    def max_rows(self) -> int:
        """Rows one request may have at most: what a whole, unspent period pays for."""
        return self.rows_remaining(self.zero())


@dataclass(frozen=True)
class RdpAccountant:
    """Gaussian rows under RDP: state = RDP at :data:`RDP_ORDERS`, limit ``E − c(α)``.

    ``rho_per_row`` is Σ over the charged outputs of each output's zCDP ρ (= RDP/α).
    Converted at the budget's δ, which is the δ the tenant's (E, δ) guarantee holds at.
    Not slotted: the per-order arrays and per-batch-size charges are computed once and
    cached on the instance (a request must not redo the logarithms of every order).
    """

    rho_per_row: float
    budget_epsilon: float
    budget_delta: float
    orders: tuple[float, ...] = RDP_ORDERS
    kind: Literal["rdp"] = "rdp"
    _charges: dict[int, tuple[float, ...]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _request_eps: dict[int, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    @cached_property
    def _orders_array(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.orders, dtype=np.float64)

    @cached_property
    def _offsets_array(self) -> npt.NDArray[np.float64]:
        return np.asarray(rdp_conversion_offsets(self.budget_delta, self.orders), dtype=np.float64)

    @cached_property
    def _limit(self) -> tuple[float, ...]:
        return tuple((self.budget_epsilon - self._offsets_array).tolist())

    def charge(self, rows: int) -> tuple[float, ...]:
        found = self._charges.get(rows)
        if found is None:
            found = tuple((self._orders_array * (rows * self.rho_per_row)).tolist())
            if len(self._charges) < 1024:
                self._charges[rows] = found
        return found

    def limit(self) -> tuple[float, ...]:
        return self._limit

    def zero(self) -> tuple[float, ...]:
        return tuple(0.0 for _ in self.orders)

    def epsilon(self, spent: Sequence[float]) -> float:
        eps = np.asarray(spent, dtype=np.float64) + self._offsets_array
        if not np.any(eps > self._offsets_array):
            return 0.0  # nothing spent
        return max(0.0, float(eps.min()))

    def request_epsilon(self, rows: int) -> float:
        """ε of this request alone at the budget's δ. RDP composes sub-additively, so a sum
        of these over-states the total; the ledger's vector is the authoritative figure."""
        if rows <= 0:
            return 0.0
        found = self._request_eps.get(rows)
        if found is None:
            found = self.epsilon(self.charge(rows))
            if len(self._request_eps) < 1024:
                self._request_eps[rows] = found
        return found

    def rows_remaining(self, spent: Sequence[float]) -> int:
        cap = np.asarray(self._limit, dtype=np.float64)
        room = cap + LEDGER_RELATIVE_TOLERANCE * np.abs(cap) - np.asarray(spent, dtype=np.float64)
        per_row = self._orders_array * self.rho_per_row
        return max(0, int(np.floor(np.max(room / per_row))))

    def max_rows(self) -> int:
        """Rows one request may have at most: what a whole, unspent period pays for."""
        return self._max_rows

    @cached_property
    def _max_rows(self) -> int:
        return self.rows_remaining(self.zero())


Accountant = BasicCompositionAccountant | RdpAccountant
