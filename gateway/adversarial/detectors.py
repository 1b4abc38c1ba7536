"""Detectors for adversarial and out-of-distribution inputs, in numpy only.

Per-request detectors take the request's feature matrix ``x`` (float64, one row per batch
item) and return a :class:`Score`: a number for the audit record and a metric, and whether
it crossed the threshold the policy chose. They are built once per policy revision from
the model's training profile and keep no state.

- :class:`RangeDetector`: values outside the input domain (or the training per-feature
  range), and all-constant rows. This is input *validation* (catalogue IN-20): an
  attacker who knows it stays inside, so it is no defence against evasion on its own.
- :class:`GridDetector`: values off the quantisation grid of the training data (digits
  pixels are integers 0..16). Perfect against naive gradient attacks, useless against one
  that snaps to the grid: again validation, not a defence.
- :class:`MahalanobisDetector`: distance from the training distribution with the profile's
  shrunk precision matrix; thresholds chosen for a stated training false-positive rate.
- :class:`FeatureSqueezer`: compares predictions on the input and on a bit-depth-reduced
  copy (Xu et al. 2018); needs a second inference, so the stage calls the upstream again.

The stateful :class:`QueryPatternDetector` watches query *streams* per tenant (and across
tenants) for the near-duplicate bursts that decision-based attacks such as HopSkipJump
and boundary-walking extraction produce (Chen, Carlini, Wagner 2019), in bounded memory.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, NamedTuple

import numpy as np
import numpy.typing as npt

from gateway.adversarial.profile import NumericProfile

__all__ = [
    "FeatureSqueezer",
    "GridDetector",
    "MahalanobisDetector",
    "QueryPatternDetector",
    "QueryVerdict",
    "RangeDetector",
    "Score",
]

FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]

# Scores go into audit records and metrics: finite, bounded, a few significant digits.
_SCORE_CAP: Final = 1e9


# The ufunc reductions themselves: ``ndarray.min()``/``max()``/``mean()`` go through a Python
# wrapper (numpy/_core/_methods.py) that costs a microsecond or two per call on these tiny
# arrays. Minimum and maximum are exact, so the result is the same; sums keep their order.
_MIN: Final = np.minimum.reduce
_MAX: Final = np.maximum.reduce
_ADD: Final = np.add.reduce
_ALL: Final = np.logical_and.reduce


def _finite(value: float) -> float:
    if value < _SCORE_CAP:  # False for NaN and +inf
        return value if value > -_SCORE_CAP else 0.0
    return _SCORE_CAP


class Score(NamedTuple):
    """One detector's verdict on one request: the worst row decides. (A NamedTuple: these are
    built on every request and a frozen dataclass costs a microsecond more.)"""

    detector: str
    score: float
    fired: bool


# --------------------------------------------------------------------------- range


@dataclass(frozen=True, slots=True)
class RangeDetector:
    """Per-feature bounds and all-constant rows.

    Score: how far the worst value lies outside its bounds, in units of that feature's
    width (0 when every value is inside); at least 1.0 for an all-constant row.
    """

    low: FloatArray = field(repr=False)
    high: FloatArray = field(repr=False)
    inv_width: FloatArray = field(repr=False)
    refuse_constant: bool = True
    # (low, high, 1/width) when every feature has the same bounds: two reductions per request.
    uniform: tuple[float, float, float] | None = None
    name: str = "range"  # "training_range" when built from the training min/max

    @classmethod
    def from_profile(cls, profile: NumericProfile, *, bounds: str = "domain", margin: float = 0.0,
                     refuse_constant: bool = True, name: str | None = None) -> RangeDetector:
        """``bounds="domain"``: the declared input domain (no false positives on valid data);
        ``"training"``: each feature's training min/max widened by ``margin`` widths."""
        d = profile.n_features
        dom_lo = -math.inf if profile.domain_min is None else profile.domain_min
        dom_hi = math.inf if profile.domain_max is None else profile.domain_max
        train_width = profile.feature_max - profile.feature_min
        domain_width = dom_hi - dom_lo
        fallback = domain_width if math.isfinite(domain_width) else 1.0
        width = np.where(train_width > 0, train_width, fallback)
        if bounds == "domain":
            if math.isfinite(domain_width):
                width = np.full(d, domain_width)
            low = np.full(d, dom_lo) - margin * width
            high = np.full(d, dom_hi) + margin * width
        elif bounds == "training":
            # A training range widened past the domain is still capped by the domain.
            low = np.maximum(profile.feature_min - margin * width, dom_lo)
            high = np.minimum(profile.feature_max + margin * width, dom_hi)
        else:
            raise ValueError(f"bounds must be 'domain' or 'training', not {bounds!r}")
        if refuse_constant and d < 2:
            raise ValueError("refuse_constant needs at least two features")
        inv_width = 1.0 / width
        uniform = None
        if np.all(low == low[0]) and np.all(high == high[0]) and np.all(inv_width == inv_width[0]):
            uniform = (float(low[0]), float(high[0]), float(inv_width[0]))
        return cls(low=_ro(low), high=_ro(high), inv_width=_ro(inv_width), refuse_constant=refuse_constant,
                   uniform=uniform, name=name or ("range" if bounds == "domain" else "training_range"))

    def score(self, x: FloatArray) -> Score:
        # SECURITY: bounds are checked on every row and every feature; one bad row in a
        # batch of 64 must not hide behind the others.
        if self.uniform is not None:
            # Same bounds everywhere: the row extremes decide, and they also tell constancy.
            if x.shape[0] == 1:
                lo, hi = float(_MIN(x, axis=None)), float(_MAX(x, axis=None))
                constant = lo == hi
            else:
                row_min, row_max = _MIN(x, axis=1), _MAX(x, axis=1)
                lo, hi = float(_MIN(row_min)), float(_MAX(row_max))
                constant = bool((row_min == row_max).any())
            low, high, inv_width = self.uniform
            excess = max(low - lo, hi - high) * inv_width
        else:
            excess = float(_MAX(np.maximum(self.low - x, x - self.high) * self.inv_width, axis=None))
            constant = self.refuse_constant and bool((_MAX(x, axis=1) == _MIN(x, axis=1)).any())
        if not excess <= 0.0:  # also true for NaN: never "inside" by accident
            value, fired = _finite(excess), True
        else:
            value, fired = 0.0, False
        if self.refuse_constant and constant:
            value, fired = max(value, 1.0), True
        return Score(self.name, value, fired)


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True, slots=True)
class GridDetector:
    """Values off the training data's quantisation grid ``origin + k * step``.

    Score: the largest distance to the grid, as a fraction of ``step`` (0 .. 0.5).
    """

    name: ClassVar[str] = "grid"
    origin: float
    step: float
    tolerance: float = 1e-3

    def score(self, x: FloatArray) -> Score:
        position = x if self.origin == 0.0 and self.step == 1.0 else (x - self.origin) / self.step
        value = float(_MAX(np.abs(position - np.rint(position)), axis=None))
        return Score(self.name, _finite(value), not value <= self.tolerance)


# --------------------------------------------------------------------------- mahalanobis


@dataclass(frozen=True, slots=True)
class MahalanobisDetector:
    """``sqrt((x - mean)^T P (x - mean))`` with the profile's shrunk precision ``P``.

    The threshold comes from the profile for a stated false-positive rate on the training
    split (held-out rates are higher: see the model card and ``security_tests/results``).
    """

    name: ClassVar[str] = "mahalanobis"
    mean: FloatArray = field(repr=False)
    precision: FloatArray = field(repr=False)
    threshold: float = math.inf

    @classmethod
    def from_profile(cls, profile: NumericProfile, *, fpr: float | None = None,
                     threshold: float | None = None) -> MahalanobisDetector:
        if fpr is not None and threshold is None:
            limit = profile.maha_threshold(fpr)
        elif threshold is not None and fpr is None:
            limit = float(threshold)
        else:
            raise ValueError("give exactly one of fpr or threshold")
        return cls(mean=profile.maha_mean, precision=profile.inv_cov, threshold=limit)

    def distances(self, x: FloatArray) -> FloatArray:
        diff = x - self.mean
        squared = ((diff @ self.precision) * diff).sum(axis=1)
        result: FloatArray = np.sqrt(np.maximum(squared, 0.0))
        return result

    def score(self, x: FloatArray) -> Score:
        if x.shape[0] == 1:  # the common single-row request: two dot products
            diff = x[0] - self.mean
            value = math.sqrt(max(float(diff @ self.precision @ diff), 0.0))
        else:
            value = float(_MAX(self.distances(x)))
        return Score(self.name, _finite(value), not value <= self.threshold)


# --------------------------------------------------------------------------- squeezing


@dataclass(frozen=True, slots=True)
class FeatureSqueezer:
    """Bit-depth reduction over ``[low, high]`` per feature, and the L1 output distance.

    ``squeeze`` maps each value to the nearest of ``2**bits`` levels; ``score`` compares
    the model's outputs (probability rows) on the input and on the squeezed copy.
    """

    name: ClassVar[str] = "squeezing"
    low: FloatArray = field(repr=False)
    high: FloatArray = field(repr=False)
    bits: int = 4
    threshold: float = math.inf

    @classmethod
    def from_profile(cls, profile: NumericProfile, *, bits: int, threshold: float) -> FeatureSqueezer:
        if not 1 <= bits <= 16:
            raise ValueError("bits must be between 1 and 16")
        low = np.full(profile.n_features, profile.domain_min) if profile.domain_min is not None \
            else np.asarray(profile.feature_min)
        high = np.full(profile.n_features, profile.domain_max) if profile.domain_max is not None \
            else np.asarray(profile.feature_max)
        high = np.where(high > low, high, low + 1.0)
        return cls(low=_ro(low), high=_ro(high), bits=bits, threshold=threshold)

    def squeeze(self, x: FloatArray) -> FloatArray:
        levels = float((1 << self.bits) - 1)
        unit = np.clip((x - self.low) / (self.high - self.low), 0.0, 1.0)
        squeezed: FloatArray = np.rint(unit * levels) / levels * (self.high - self.low) + self.low
        return squeezed

    def score(self, original: FloatArray, squeezed: FloatArray) -> Score:
        if original.shape != squeezed.shape:
            raise ValueError("outputs on the input and on the squeezed copy differ in shape")
        value = float(np.abs(original - squeezed).reshape(original.shape[0], -1).sum(axis=1).max())
        return Score(self.name, _finite(value), value > self.threshold)


# --------------------------------------------------------------------------- query pattern


class QueryVerdict(NamedTuple):
    """The query-pattern state of the caller after this request's queries were recorded."""

    score: float  # share of recent queries that had a near duplicate (0..1)
    fired: bool  # this request pushed the share over the threshold, or a cooldown is running
    retry_after_s: float  # remaining cooldown (0 when not fired)


@dataclass(slots=True)
class _History:
    """A ring of query sketches with cached squared norms and owner ids (bounded)."""

    sketches: Float32Array
    norms: Float32Array
    owners: npt.NDArray[np.int64]
    size: int = 0
    pos: int = 0

    @classmethod
    def empty(cls, capacity: int, dims: int) -> _History:
        return cls(np.zeros((capacity, dims), np.float32), np.zeros(capacity, np.float32),
                   np.zeros(capacity, np.int64))

    def add(self, sketches: Float32Array, norms: Float32Array, owner: int) -> None:
        capacity = self.sketches.shape[0]
        if sketches.shape[0] == 1:  # the common case, without index arrays
            self.sketches[self.pos] = sketches[0]
            self.norms[self.pos] = norms[0]
            self.owners[self.pos] = owner
            self.pos = (self.pos + 1) % capacity
            self.size = min(self.size + 1, capacity)
            return
        for start in range(0, sketches.shape[0], capacity):
            chunk = sketches[start:start + capacity]
            n = chunk.shape[0]
            idx = (self.pos + np.arange(n)) % capacity
            self.sketches[idx] = chunk
            self.norms[idx] = norms[start:start + n]
            self.owners[idx] = owner
            self.pos = (self.pos + n) % capacity
            self.size = min(self.size + n, capacity)

    def nbytes(self) -> int:
        return self.sketches.nbytes + self.norms.nbytes + self.owners.nbytes


@dataclass(slots=True)
class _FlagRing:
    """The last ``len(flags)`` suspicious/ordinary flags of one caller and how many are set."""

    flags: bytearray  # one 0/1 per query, a ring
    pos: int = 0
    size: int = 0
    count: int = 0  # ones currently in the ring

    def push(self, values: list[bool]) -> None:
        flags, capacity = self.flags, len(self.flags)
        if not capacity:
            return
        for value in values[-capacity:]:
            self.count += value - flags[self.pos]
            flags[self.pos] = value
            self.pos = (self.pos + 1) % capacity
        self.size = min(self.size + len(values), capacity)

    def clear(self) -> None:
        self.flags[:] = bytes(len(self.flags))
        self.pos = self.size = self.count = 0


@dataclass(slots=True)
class _Caller:
    """Per-tenant (or per-principal) state: own history, a window of near-duplicate flags
    (the share rule) and a longer ring of them (the count rule)."""

    history: _History
    recent: _FlagRing
    long: _FlagRing
    cooldown_until: float = 0.0

    def rate(self) -> float:
        """Share of flagged queries among the last ``window`` (fewer until the window fills)."""
        return self.recent.count / self.recent.size if self.recent.size else 0.0

    def nbytes(self) -> int:
        return self.history.nbytes() + len(self.recent.flags) + len(self.long.flags)


@dataclass(slots=True)
class QueryPatternDetector:
    """Near-duplicate query bursts per caller and across callers, in bounded memory.

    Each query row is standardised with the training profile and reduced to a
    ``sketch_dims``-dimensional Gaussian random projection (Johnson-Lindenstrauss: L2
    distances kept within a few tens of percent), stored in a ring buffer of the last
    ``history`` sketches per caller plus one global ring of ``global_history``. A query is
    *suspicious* when the mean distance to its ``neighbours`` nearest earlier queries of the
    same caller (or, with ``cross_tenant``, of other callers) is at most ``radius``: the
    k-NN statistic of Chen, Carlini and Wagner (2019), which separates far better than the
    single nearest neighbour (a benign stream has *some* close pairs, a HopSkipJump
    gradient estimate is a cloud of 100 queries around one point). The score is the
    suspicious share over the caller's last ``window`` queries; it fires at ``threshold``
    once ``min_queries`` were seen, and stays fired for ``cooldown_s``.

    The share alone is diluted: a searcher who interleaves ordinary queries (or pads each
    batch with ordinary rows) keeps it under ``threshold`` for ever, while each of its
    search queries is still suspicious (the ordinary ones are far away and never among its
    nearest neighbours). ``max_suspicious`` adds a count rule: it also fires once that many
    suspicious queries are among the caller's last ``suspicious_window``, whatever their
    share. Firing by count clears that ring, so after the cooldown the caller is served again
    and a search that goes on fires again after the next ``max_suspicious`` suspicious
    queries: at most that many search queries per cooldown, however diluted.

    Memory is fixed at construction: ``max_callers`` states (least recently used evicted)
    of ``history * (4 * sketch_dims + 16) + window + suspicious_window`` bytes (the last
    term only with ``max_suspicious``), plus the global ring.

    # SECURITY: the projection is seeded from ``secrets`` unless a seed is given (tests), so
    # an attacker cannot compute which perturbations collide in sketch space. Sketches are
    # lossy projections, kept in memory only, never logged.
    """

    name: ClassVar[str] = "query_pattern"
    center: FloatArray = field(repr=False)
    scale: FloatArray = field(repr=False)
    radius: float = 2.5
    neighbours: int = 20
    sketch_dims: int = 32
    history: int = 512
    global_history: int = 1024
    window: int = 100
    min_queries: int = 20
    threshold: float = 0.5
    cooldown_s: float = 60.0
    max_callers: int = 256
    cross_tenant: bool = True
    ignore_exact_repeats: bool = True
    max_suspicious: int | None = None
    suspicious_window: int = 1000
    seed: int | None = None
    clock: Callable[[], float] = time.monotonic
    _projection: FloatArray = field(init=False, repr=False)
    _offset: FloatArray = field(init=False, repr=False)
    _callers: OrderedDict[str, _Caller] = field(init=False, repr=False)
    _global: _History = field(init=False, repr=False)

    def __post_init__(self) -> None:
        d = self.center.shape[0]
        if self.scale.shape != (d,) or np.any(self.scale <= 0):
            raise ValueError("scale must be positive, one value per feature")
        for name, value in (("sketch_dims", self.sketch_dims), ("history", self.history),
                            ("global_history", self.global_history), ("window", self.window),
                            ("neighbours", self.neighbours),
                            ("max_callers", self.max_callers), ("suspicious_window", self.suspicious_window)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0 < self.threshold <= 1 or self.radius <= 0 or not 1 <= self.min_queries <= self.window:
            raise ValueError("need 0 < threshold <= 1, radius > 0 and 1 <= min_queries <= window")
        if self.max_suspicious is not None and not 1 <= self.max_suspicious <= self.suspicious_window:
            raise ValueError("need 1 <= max_suspicious <= suspicious_window")
        rng = np.random.default_rng(self.seed if self.seed is not None else secrets.randbits(128))
        gaussian = rng.standard_normal((d, self.sketch_dims)) / math.sqrt(self.sketch_dims)
        # Fold the standardisation into the projection: sketch = x @ P - offset.
        self._projection = _ro(gaussian / self.scale[:, None])
        self._offset = _ro(self.center @ self._projection)
        self._callers = OrderedDict()
        self._global = _History.empty(self.global_history, self.sketch_dims)

    @classmethod
    def from_profile(cls, profile: NumericProfile, *, radius: float, **options: object) -> QueryPatternDetector:
        """Standardise with the training mean and std (floored at 10% of the mean std, so a
        constant training pixel does not turn tiny changes into huge distances)."""
        std = np.asarray(profile.feature_std, dtype=np.float64)
        floor = max(0.1 * float(std.mean()), 1e-12)
        return cls(center=np.asarray(profile.feature_mean), scale=np.maximum(std, floor), radius=radius,
                   **options)  # type: ignore[arg-type]

    def sketch(self, x: FloatArray) -> Float32Array:
        """The stored form of each row (float32, ``sketch_dims`` values)."""
        result: Float32Array = (x @ self._projection - self._offset).astype(np.float32)
        return result

    def observe(self, caller: str, x: FloatArray) -> QueryVerdict:
        """Record the rows of one request for ``caller`` and return the caller's verdict.

        Synchronous and free of awaits, so concurrent requests of one event loop never
        interleave inside it.
        """
        now = self.clock()
        state = self._state(caller)
        owner = hash(caller)
        sketches = self.sketch(x)
        norms = _ADD(sketches * sketches, axis=1)
        flags = self._knn_mean(sketches, norms, state.history) <= self.radius
        if self.cross_tenant and self._global.size and not _ALL(flags):
            flags |= self._knn_mean(sketches, norms, self._global, exclude_owner=owner,
                                    within_batch=False) <= self.radius
        values = flags.tolist()
        state.recent.push(values)
        state.long.push(values)
        state.history.add(sketches, norms, owner)
        self._global.add(sketches, norms, owner)
        rate = state.rate()
        if state.recent.size >= self.min_queries and rate >= self.threshold:
            state.cooldown_until = now + self.cooldown_s
        if self.max_suspicious is not None and state.long.count >= self.max_suspicious:
            # SECURITY: the count rule; ordinary queries interleaved with a search (or rows
            # padded into its batches) dilute the share above but not this count.
            state.cooldown_until = now + self.cooldown_s
            state.long.clear()
        remaining = max(state.cooldown_until - now, 0.0)
        return QueryVerdict(score=rate, fired=remaining > 0.0, retry_after_s=remaining)

    def cooling_down(self, caller: str) -> float:
        """Seconds of cooldown left for ``caller`` (0 when none); does not record anything."""
        state = self._callers.get(caller)
        if state is None:
            return 0.0
        return max(state.cooldown_until - self.clock(), 0.0)

    def memory_bytes(self) -> int:
        """Bytes held in sketches and windows right now (arrays only)."""
        return self._global.nbytes() + sum(s.nbytes() for s in self._callers.values())

    def memory_bound_bytes(self) -> int:
        """The most :meth:`memory_bytes` can ever return with this configuration."""
        per_caller = _History.empty(self.history, self.sketch_dims).nbytes() + self.window + self._long_size()
        return self._global.nbytes() + self.max_callers * per_caller

    @property
    def callers(self) -> int:
        return len(self._callers)

    def _state(self, caller: str) -> _Caller:
        state = self._callers.get(caller)
        if state is None:
            if len(self._callers) >= self.max_callers:
                self._callers.popitem(last=False)
            state = _Caller(_History.empty(self.history, self.sketch_dims), _FlagRing(bytearray(self.window)),
                            _FlagRing(bytearray(self._long_size())))
            self._callers[caller] = state
        else:
            self._callers.move_to_end(caller)
        return state

    def _long_size(self) -> int:
        return self.suspicious_window if self.max_suspicious is not None else 0

    def _knn_mean(self, s: Float32Array, norms: Float32Array, hist: _History, *,
                  exclude_owner: int | None = None, within_batch: bool = True) -> Float32Array:
        """For each row: mean distance to its ``neighbours`` nearest earlier queries (stored,
        or earlier in the same batch); infinity while fewer earlier queries exist.

        float32 throughout (single-precision BLAS, no copies of the history): squared
        distances carry an absolute error of ~1e-5, far below the radius."""
        n = hist.size
        k = self.neighbours
        if s.shape[0] == 1 or not within_batch:
            # The common case (one row, or no pairs within the batch): a single block of
            # distances, masked in place, with no concatenation.
            if n < k:
                return np.full(s.shape[0], np.inf, dtype=np.float32)
            d2 = norms[:, None] + hist.norms[None, :n] - 2.0 * (s @ hist.sketches[:n].T)
            if exclude_owner is not None:
                d2[:, hist.owners[:n] == exclude_owner] = np.inf
        else:
            parts: list[Float32Array] = []
            if n:
                d2 = norms[:, None] + hist.norms[None, :n] - 2.0 * (s @ hist.sketches[:n].T)
                if exclude_owner is not None:
                    d2[:, hist.owners[:n] == exclude_owner] = np.inf
                parts.append(d2)
            d2b = norms[:, None] + norms[None, :] - 2.0 * (s @ s.T)
            d2b[~np.tri(s.shape[0], k=-1, dtype=np.bool_)] = np.inf
            parts.append(d2b)
            if sum(p.shape[1] for p in parts) < k:
                return np.full(s.shape[0], np.inf, dtype=np.float32)
            d2 = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if self.ignore_exact_repeats:
            # Retries and fixed probe inputs are not the signature of a search: closer than
            # a hundredth of the radius counts as the same point.
            d2[d2 <= (1e-2 * self.radius) ** 2] = np.inf
        nearest = np.partition(d2, k - 1, axis=1)[:, :k]
        np.maximum(nearest, 0.0, out=nearest)
        np.sqrt(nearest, out=nearest)
        # What ndarray.mean() computes (float32 sum in the same order, then one division),
        # without its Python wrapper.
        result: Float32Array = _ADD(nearest, axis=1) / k
        return result


def _ro(array: FloatArray) -> FloatArray:
    out = np.array(array, dtype=np.float64)
    out.setflags(write=False)
    return out
