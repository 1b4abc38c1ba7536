"""The one interface both upstreams implement.

Stages and fronts are written against :class:`Upstream` only, so every test of a stage
runs unchanged on the embedded backend, on Triton over gRPC, or on a fault-injecting fake.
Implementations convert their own failures into :mod:`gateway.errors` at this boundary:
``NotFound`` for an unknown model or version, ``InputRejected`` for a request the model
refused, ``UpstreamTimeout`` past the deadline, ``UpstreamUnavailable`` when it cannot be
reached, ``UpstreamBadResponse`` for an answer that does not make sense. Nothing else
escapes.
"""

from __future__ import annotations

from typing import Protocol

from gateway.kserve import InferRequest, InferResponse, ModelMetadata, ServerMetadata


class Upstream(Protocol):
    """An inference server speaking KServe V2 semantics.

    ``version`` is the model version string; ``""`` means the server's version policy
    (the latest loaded version). Every call that can block takes a timeout in seconds.
    """

    async def start(self) -> None:
        """Open connections / load models. Called once from the app lifecycle."""

    async def close(self) -> None:
        """Release everything; must be safe to call twice."""

    async def server_live(self, *, timeout_s: float) -> bool: ...

    async def server_ready(self, *, timeout_s: float) -> bool: ...

    async def server_metadata(self, *, timeout_s: float) -> ServerMetadata: ...

    async def model_ready(self, model: str, version: str, *, timeout_s: float) -> bool: ...

    async def model_metadata(self, model: str, version: str, *, timeout_s: float) -> ModelMetadata: ...

    async def infer(self, request: InferRequest, *, timeout_s: float) -> InferResponse: ...
