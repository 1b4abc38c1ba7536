"""The stage contract.

A stage is built once per policy revision from frozen config and shared by every
request of that revision, so it keeps no per-request state. It may implement any of
three hooks; the pipeline calls only the hooks a stage overrides (looked up once, when
the revision's pipeline is built, so a hook must be defined on the class):

- ``on_call``: every authenticated surface (metadata, readiness, inference), before
  any body is read. Authentication and authorization live here.
- ``on_request``: inference requests, in pipeline order. Return the request to pass on
  (a new object when rewriting: shadow mode relies on the input staying untouched).
- ``on_response``: inference responses, in reverse pipeline order.
- ``on_complete``: once per call that passed admission, whatever its outcome, in reverse
  order, after the answer is decided: release what ``on_call``/``on_request`` took
  (concurrency slots, budget reservations), feed outcome statistics. It must not raise.

To refuse, raise a :class:`gateway.errors.GatewayError`.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from gateway.context import RequestContext
from gateway.errors import GatewayError
from gateway.kserve import InferRequest, InferResponse


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    SHADOW = "shadow"  # evaluate and record; never block, never rewrite


class Stage:
    """Base class with pass-through hooks; subclasses override what they need."""

    name: ClassVar[str] = "stage"

    async def on_call(self, ctx: RequestContext) -> None:
        return None

    async def on_request(self, ctx: RequestContext, req: InferRequest) -> InferRequest:
        return req

    async def on_response(self, ctx: RequestContext, resp: InferResponse) -> InferResponse:
        return resp

    async def on_complete(self, ctx: RequestContext, error: GatewayError | None) -> None:
        return None

    def overrides(self, hook: str) -> bool:
        """True when this stage's class implements ``hook`` itself."""
        return getattr(type(self), hook) is not getattr(Stage, hook)
