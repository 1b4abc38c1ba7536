"""A per-model cap on inference calls in flight in this process (``models.<name>.max_in_flight``).

Why: ``limits.max_in_flight`` is one pool for every model. When one model's upstream slows
down (a latency spike of seconds), its callers pile up until they hold every slot, and
then calls to healthy models are shed too. A cap per model sheds the slow model's excess
at once (503 + Retry-After, reason ``model_load_shed``) and leaves the rest of the pool to
the others. There is no queue: a call either gets a slot or is refused, so nothing waits
unboundedly.

Process-local on purpose: it protects this process's memory and loop; tenant fairness
across replicas is ``limits.yaml`` (``kind: concurrency``, 429).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from gateway.errors import DependencyUnavailable

REASON = "model_load_shed"


class ModelBusy(DependencyUnavailable):
    default_reason = REASON


@dataclass(slots=True)
class ModelSlots:
    """Calls in flight per model name (only models with a cap are counted)."""

    held: dict[str, int] = field(default_factory=dict)
    on_shed: Callable[[], None] | None = None

    @contextmanager
    def hold(self, model: str, cap: int | None) -> Iterator[None]:
        """One slot of ``model`` for the duration of the block; :class:`ModelBusy` if none is free."""
        if cap is None:
            yield
            return
        in_use = self.held.get(model, 0)
        if in_use >= cap:
            if self.on_shed is not None:
                self.on_shed()
            # SECURITY: shed instead of queueing behind a slow model (bounded work, API4:2023).
            raise ModelBusy("model busy", reason=REASON, retry_after_s=1)
        self.held[model] = in_use + 1
        try:
            yield
        finally:
            left = self.held.get(model, 1) - 1
            if left > 0:
                self.held[model] = left
            else:
                self.held.pop(model, None)
