"""Model metadata, cached: the gateway validates every tensor against it itself.

Neither MLServer nor KServe checks tensors against declared metadata, and a real Triton
answers a bad tensor only after it crossed the network; so the gateway checks first and
needs the metadata at hand. Entries expire after the policy's ``metadata_cache_s``.
"""

from __future__ import annotations

import time

from gateway.errors import NotFound
from gateway.kserve import ModelMetadata
from gateway.stages.model_exposure import UNKNOWN_MODEL
from gateway.upstream.base import Upstream

_MAX_ENTRIES = 1024


class ModelCatalog:
    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._entries: dict[tuple[str, str], tuple[ModelMetadata, float]] = {}

    async def get(self, model: str, version: str, *, ttl_s: float, timeout_s: float) -> ModelMetadata:
        key = (model, version)
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            meta = await self.upstream.model_metadata(model, version, timeout_s=timeout_s)
        except NotFound as exc:
            # SECURITY: one message for every unknown model or version, whichever layer
            # found out, so responses do not tell exposed and unexposed names apart.
            raise NotFound(UNKNOWN_MODEL, reason="model_unknown") from exc
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = (meta, now + ttl_s)
        return meta

    def clear(self) -> None:
        self._entries.clear()
