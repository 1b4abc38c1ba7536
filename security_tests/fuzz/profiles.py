"""Hypothesis profiles of the fuzz suite.

``ci`` (default): about 200 examples per property, no deadline (2 shared cores make
timings noisy; a hang is caught by pytest-timeout), no example database written into
the tree. ``deep``: for local runs, 20x the examples and a database under .cache/ so a
failure found once is replayed first next time::

    INFERGATE_FUZZ_PROFILE=deep .venv/bin/pytest -q -p no:cacheprovider security_tests/fuzz

The profiles are applied per test (:func:`fuzz_settings`), not loaded globally, so other
hypothesis users in the same pytest run keep their own settings.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis.database import DirectoryBasedExampleDatabase

ROOT = Path(__file__).resolve().parents[2]
PROFILE_ENV = "INFERGATE_FUZZ_PROFILE"
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("ci", max_examples=200, deadline=None, database=None, print_blob=True,
                          suppress_health_check=_SUPPRESS)
settings.register_profile("deep", max_examples=4000, deadline=None, print_blob=True, suppress_health_check=_SUPPRESS,
                          database=DirectoryBasedExampleDatabase(str(ROOT / ".cache" / "hypothesis")))


def profile_name() -> str:
    name = os.environ.get(PROFILE_ENV, "ci")
    if name not in ("ci", "deep"):
        raise ValueError(f"{PROFILE_ENV} must be ci or deep, not {name!r}")
    return name


def fuzz_settings(scale: float = 1.0, **over: Any) -> settings:
    """The active profile, with ``max_examples`` scaled for expensive targets."""
    base = settings.get_profile(profile_name())
    return settings(base, max_examples=max(10, int(base.max_examples * scale)), **over)
