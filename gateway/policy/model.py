"""The base of every policy model: frozen, and unknown keys are errors.

``extra="forbid"`` makes a misspelt key an error instead of a silent default; ``frozen``
keeps a compiled revision immutable while requests are pinned to it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
