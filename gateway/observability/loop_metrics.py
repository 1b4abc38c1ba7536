"""Counters and histograms for the per-request hot path, cheap on the event-loop thread.

Why: a full-pipeline request makes ~25 counter increments and ~20 histogram observations
(one pair per stage hook, per limit, per detector). ``prometheus_client`` takes a lock and
walks three layers of calls for each (~0.6 µs per ``inc``, ~1.3 µs per ``observe``).
These subclasses keep the same names, label sets, buckets, ``_created`` series and
exposition (they reuse ``prometheus_client``'s ``labels()``, ``collect()`` and registry),
and store values in plain attributes instead: on the thread that created a child an
increment is one float add.

Thread safety: every other thread (audit writer, ``asyncio.to_thread`` work, onnx workers)
adds into a separate accumulator under a lock, so no count is lost whichever thread
calls; the two halves are summed at scrape time. A child is created by ``labels()`` (or
with the metric when it has no labels), in practice on the event loop. Only one live
thread can have the owner's ident (a later thread may inherit it once the owner is gone),
so the unlocked add is only ever made by one thread at a time.

Not supported (the gateway uses none of them): exemplars, multiprocess mode.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client import metrics as _pc_metrics
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

_get_ident = threading.get_ident


def _check_observable(metric: Counter | Histogram) -> None:
    """``prometheus_client``'s refusal to count on a labelled parent, on the slow path only."""
    if metric._labelnames and not metric._labelvalues:
        raise ValueError(f"{metric._type} metric is missing label values")


_NO_EXEMPLARS = "exemplars are not supported by loop metrics"


class _ValueView:
    """``child._value.get()`` as on a ``prometheus_client`` counter (tests and ``reset`` read it)."""

    __slots__ = ("_child",)

    def __init__(self, child: LoopCounter) -> None:
        self._child = child

    def get(self) -> float:
        return self._child._own + self._child._foreign

    def set(self, value: float) -> None:
        with self._child._lock:
            self._child._own = float(value)
            self._child._foreign = 0.0


class LoopCounter(Counter):
    """A ``Counter`` whose increments on its owner thread are a plain float add."""

    # A parent (labelled, no values) has no owner: its inc() takes the slow path and fails there.
    _owner: int = -1

    def _metric_init(self) -> None:
        self._created = time.time()
        self._owner = _get_ident()
        self._own = 0.0
        self._foreign = 0.0
        self._lock = threading.Lock()

    @property
    def _value(self) -> _ValueView:
        return _ValueView(self)

    def inc(self, amount: float = 1, exemplar: dict[str, str] | None = None) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        if exemplar:
            raise ValueError(_NO_EXEMPLARS)
        if _get_ident() == self._owner:
            self._own += amount
            return
        _check_observable(self)
        with self._lock:
            self._foreign += amount

    def reset(self) -> None:
        with self._lock:
            self._own = 0.0
            self._foreign = 0.0
        self._created = time.time()

    def _child_samples(self) -> Iterable[Sample]:
        sample = Sample("_total", {}, self._own + self._foreign, None, None)
        if _pc_metrics._use_created:
            return (sample, Sample("_created", {}, self._created, None, None))
        return (sample,)


class LoopHistogram(Histogram):
    """A ``Histogram`` whose observations on its owner thread are a bisect and two adds.

    Same buckets (``prometheus_client`` appends +Inf), same rule (the first bound with
    ``value <= bound``; a NaN lands in no bucket but in the sum), same samples.
    """

    _owner: int = -1

    def _metric_init(self) -> None:
        self._created = time.time()
        self._owner = _get_ident()
        self._bounds = tuple(self._upper_bounds)
        self._les = tuple(str(floatToGoString(b)) for b in self._bounds)  # type: ignore[no-untyped-call]
        self._counts = [0] * len(self._bounds)
        self._sum_own = 0.0
        self._foreign_counts = [0] * len(self._bounds)
        self._foreign_sum = 0.0
        self._lock = threading.Lock()

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        if exemplar:
            raise ValueError(_NO_EXEMPLARS)
        if _get_ident() == self._owner:
            self._sum_own += amount
            i = bisect_left(self._bounds, amount)
            if amount <= self._bounds[i]:  # False only for NaN (bisect puts it at 0)
                self._counts[i] += 1
            return
        _check_observable(self)
        i = bisect_left(self._bounds, amount)
        with self._lock:
            self._foreign_sum += amount
            if amount <= self._bounds[i]:
                self._foreign_counts[i] += 1

    def _child_samples(self) -> Iterable[Sample]:
        samples = []
        acc = 0.0
        for i, le in enumerate(self._les):
            acc += self._counts[i] + self._foreign_counts[i]
            samples.append(Sample("_bucket", {"le": le}, acc, None, None))
        samples.append(Sample("_count", {}, acc, None, None))
        if self._bounds[0] >= 0:
            samples.append(Sample("_sum", {}, self._sum_own + self._foreign_sum, None, None))
        if _pc_metrics._use_created:
            samples.append(Sample("_created", {}, self._created, None, None))
        return tuple(samples)
