"""The ``drift:`` block of a model in ``gateway.yaml``: windows, sampling and thresholds.

A model's state is its most-drifted signal: any input feature or the output whose PSI or
KS reaches a level puts the model at that level. Defaults are calibrated on the digits
held-out split (``bench/bench_drift.py``): with a window of 500 and a verdict from 200
rows on, clean traffic stays ``ok`` while a brightness offset, noise or a one-class
stream reach ``critical`` well within one window.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictBool, StrictFloat, StrictInt, model_validator

from gateway.policy.model import StrictModel

Fraction = Annotated[StrictFloat | StrictInt, Field(gt=0, le=1)]
Psi = Annotated[StrictFloat | StrictInt, Field(gt=0, le=100)]


class DriftThresholds(StrictModel):
    """A feature (or the output) reaches this level when either statistic does."""

    psi: Psi = Field(description="Population stability index against the profile histogram.")
    ks: Fraction = Field(description="Kolmogorov-Smirnov distance, evaluated at the profile's bin edges.")


class DriftPolicy(StrictModel):
    """Data drift (inputs) and prediction drift (outputs) of one model against its training profile."""

    enabled: StrictBool = True
    sample_rate: Fraction = Field(1.0, description="Share of successful inferences copied to the monitor.")
    window: Annotated[StrictInt, Field(gt=0, le=100_000)] = Field(
        500, description="Rows kept per model (count window); memory is window x features x 4 bytes.",
    )
    window_s: Annotated[StrictFloat | StrictInt, Field(gt=0, le=30 * 86_400)] = Field(
        3600, description="Rows older than this leave the window (time window).",
    )
    min_samples: Annotated[StrictInt, Field(gt=0, le=100_000)] = Field(
        200, description="No verdict (state stays ok, reported as collecting) below this many rows.",
    )
    evaluate_every: Annotated[StrictInt, Field(gt=0, le=100_000)] = Field(
        50, description="New rows between two evaluations (also evaluated on a timer while rows age out).",
    )
    max_rows_per_request: Annotated[StrictInt, Field(gt=0, le=1024)] = Field(
        16, description="Rows of one batch copied to the monitor; a large batch cannot flood the window.",
    )
    top_k: Annotated[StrictInt, Field(gt=0, le=50)] = Field(
        5, description="Most-drifted input features exported as metrics (bounded label cardinality).",
    )
    # Above the textbook 0.1/0.25 PSI: the verdict is the most-drifted of all features over a
    # window of a few hundred rows, where sampling noise alone reaches PSI 0.28 (digits, 200 rows).
    warning: DriftThresholds = DriftThresholds(psi=0.3, ks=0.2)
    critical: DriftThresholds = DriftThresholds(psi=0.5, ks=0.3)

    @model_validator(mode="after")
    def _consistent(self) -> DriftPolicy:
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) cannot exceed window ({self.window})")
        if self.warning.psi > self.critical.psi or self.warning.ks > self.critical.ks:
            raise ValueError("warning thresholds must not be above the critical ones")
        return self
