"""Only models the policy names are reachable, and only in the versions it allows.

Runs after authentication so that an anonymous caller learns nothing about which models
exist; an unexposed model is answered exactly like one the upstream does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from gateway.context import RequestContext
from gateway.errors import NotFound
from gateway.policy.schema import ModelPolicy
from gateway.stages.base import Stage

UNKNOWN_MODEL = "unknown model or version"


@dataclass(frozen=True, slots=True)
class ModelExposure(Stage):
    name: ClassVar[str] = "model_exposure"
    models: Mapping[str, ModelPolicy]

    async def on_call(self, ctx: RequestContext) -> None:
        if ctx.model is None:
            return
        policy = self.models.get(ctx.model)
        # SECURITY: same status and body as the upstream's unknown model (non-enumeration).
        if policy is None:
            raise NotFound(UNKNOWN_MODEL, reason="model_not_exposed")
        if ctx.version and policy.versions is not None and ctx.version not in policy.versions:
            raise NotFound(UNKNOWN_MODEL, reason="model_version_not_exposed")

    def visible_versions(self, ctx: RequestContext) -> frozenset[str] | None:
        """The listed versions of ``ctx.model`` (None: not restricted here)."""
        policy = self.models.get(ctx.model or "")
        return frozenset(policy.versions) if policy is not None and policy.versions is not None else None
