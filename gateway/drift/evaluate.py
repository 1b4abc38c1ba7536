"""One drift verdict: a window of rows against a model's reference, under its policy.

A pure function of copies (no monitor state), so the monitor runs it in a worker thread
and the CLI runs it on a file of samples; both print the same report.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.drift.policy import DriftPolicy
from gateway.drift.reference import Reference
from gateway.drift.stats import FloatArray, bin_counts, ks_binned, proportions, psi

__all__ = ["DriftReport", "DriftState", "FeatureDrift", "compute_report"]


class DriftState(enum.IntEnum):
    """The value of ``gateway_drift_state{model}``."""

    OK = 0
    WARNING = 1
    CRITICAL = 2


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    feature: str
    psi: float
    ks: float | None  # None for the predicted class: its categories have no order
    state: DriftState
    edges: tuple[float, ...]
    reference: tuple[float, ...]  # shares: below the first edge, each bin, above the last edge
    window: tuple[float, ...]

    def summary(self) -> dict[str, Any]:
        return {"feature": self.feature, "psi": round(self.psi, 6),
                "ks": None if self.ks is None else round(self.ks, 6), "state": self.state.name.lower()}

    def to_json(self) -> dict[str, Any]:
        return {**self.summary(), "histogram": {
            "edges": list(self.edges), "reference": [round(v, 6) for v in self.reference],
            "window": [round(v, 6) for v in self.window]}}


@dataclass(frozen=True, slots=True)
class DriftReport:
    model: str
    state: DriftState
    collecting: bool  # too few rows for any verdict yet
    samples: int
    output_samples: int
    evaluated_at: float  # wall clock, seconds
    features: tuple[FeatureDrift, ...]  # every input feature, most drifted first
    output: FeatureDrift | None
    policy: DriftPolicy

    @property
    def status(self) -> str:
        return "collecting" if self.collecting else self.state.name.lower()

    def top(self, k: int) -> tuple[FeatureDrift, ...]:
        return self.features[:k]

    def to_json(self, *, top_k: int | None = None, dropped: int = 0) -> dict[str, Any]:
        p = self.policy
        over = {level.name.lower(): sum(f.state >= level for f in self.features)
                for level in (DriftState.WARNING, DriftState.CRITICAL)}
        return {
            "model": self.model,
            "status": self.status,
            "state": int(self.state),
            "evaluated_at": dt.datetime.fromtimestamp(self.evaluated_at, dt.UTC).isoformat(timespec="seconds"),
            "samples": {"inputs": self.samples, "outputs": self.output_samples},
            "dropped": dropped,
            "policy": {"window": p.window, "window_s": p.window_s, "min_samples": p.min_samples,
                       "sample_rate": p.sample_rate,
                       "warning": {"psi": p.warning.psi, "ks": p.warning.ks},
                       "critical": {"psi": p.critical.psi, "ks": p.critical.ks}},
            "features_monitored": len(self.features),
            "features_over": over,
            "output": None if self.output is None else self.output.to_json(),
            "top_features": [f.to_json() for f in self.top(top_k if top_k is not None else p.top_k)],
        }


def classify(policy: DriftPolicy, psi_value: float, ks_value: float | None) -> DriftState:
    ks_value = 0.0 if ks_value is None else ks_value
    if psi_value >= policy.critical.psi or ks_value >= policy.critical.ks:
        return DriftState.CRITICAL
    if psi_value >= policy.warning.psi or ks_value >= policy.warning.ks:
        return DriftState.WARNING
    return DriftState.OK


def compute_report(reference: Reference, policy: DriftPolicy, inputs: npt.NDArray[np.floating],
                   outputs: npt.NDArray[np.floating], evaluated_at: float) -> DriftReport:
    """``inputs`` (rows x features) and ``outputs`` (rows: class index or score) of one window."""
    features: list[FeatureDrift] = []
    if inputs.shape[0] >= policy.min_samples:
        window = bin_counts(inputs, reference.edges, reference.counts.shape[1])
        features = _features(policy, reference.counts, window, reference.edges,
                             [reference.feature_name(j) for j in range(reference.n_features)], with_ks=True)
        features.sort(key=lambda f: (f.state, f.psi, f.ks or 0.0), reverse=True)
    output: FeatureDrift | None = None
    out_ref = reference.output
    if out_ref is not None and outputs.shape[0] >= policy.min_samples:
        window = bin_counts(outputs.reshape(-1, 1), (out_ref.edges,), out_ref.counts.shape[1])
        output = _features(policy, out_ref.counts, window, (out_ref.edges,), [out_ref.feature],
                           with_ks=out_ref.kind == "score")[0]
    judged = [*features, *([output] if output is not None else [])]
    return DriftReport(
        model=reference.model, state=max((f.state for f in judged), default=DriftState.OK),
        collecting=not judged, samples=int(inputs.shape[0]), output_samples=int(outputs.shape[0]),
        evaluated_at=evaluated_at, features=tuple(features), output=output, policy=policy,
    )


def _features(policy: DriftPolicy, reference: FloatArray, window: FloatArray, edges: tuple[FloatArray, ...],
              names: list[str], *, with_ks: bool) -> list[FeatureDrift]:
    psis = psi(reference, window)
    kss = ks_binned(reference, window)
    ref_shares, win_shares = proportions(reference), proportions(window)
    out = []
    for j, name in enumerate(names):
        bins = len(edges[j]) + 1  # the profile's bins and the two open ones; the rest is padding
        ks_value = float(kss[j]) if with_ks else None
        out.append(FeatureDrift(
            feature=name, psi=float(psis[j]), ks=ks_value, state=classify(policy, float(psis[j]), ks_value),
            edges=tuple(float(e) for e in edges[j]),
            reference=tuple(float(v) for v in ref_shares[j, :bins]),
            window=tuple(float(v) for v in win_shares[j, :bins]),
        ))
    return out
