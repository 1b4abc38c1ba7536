"""Feature flags in flagd's format, evaluated in process, and automatic canary rollback.

- :mod:`.provider`: the flagd flag-definition document (validated strictly), a JsonLogic
  subset with flagd's ``fractional`` bucketing, and an OpenFeature provider over one
  policy revision's flags.
- :mod:`.rollback`: per-variant sliding-window health and the sticky rollback it trips.

The pipeline stage that uses both is :mod:`gateway.stages.feature_flags`.
"""

from __future__ import annotations

from gateway.flags.provider import (
    CompiledFlag,
    FlagdFileProvider,
    FlagFileError,
    FlagSet,
    fractional_bucket,
    parse_flag_file,
)
from gateway.flags.rollback import (
    CallOutcome,
    MemoryRollbackStore,
    RollbackStore,
    RollbackTracker,
    RollbackTrip,
    Thresholds,
    WindowStats,
)

__all__ = [
    "CallOutcome",
    "CompiledFlag",
    "FlagFileError",
    "FlagSet",
    "FlagdFileProvider",
    "MemoryRollbackStore",
    "RollbackStore",
    "RollbackTracker",
    "RollbackTrip",
    "Thresholds",
    "WindowStats",
    "fractional_bucket",
    "parse_flag_file",
]
