"""Output hardening: release less of the model's answer than it computed.

Extraction and membership-inference attacks feed on confidence scores (Tramèr et al.
2016; Yeom et al. 2018); decision-based evasion needs only the label. Coarsening the
output therefore raises the cost of the first two and does nothing against the third
(see ``security/CATALOGUE.md`` §2.3: label-only still leaks the generalisation gap). The
options, applied per output row (the last axis is the class axis):

- ``top_k``: keep the ``k`` largest scores, zero the rest (or, when a kept score is not
  positive, as DP-noised scores can be, set them 1 below the smallest kept score, so the
  arg-max of the released row is still the top class);
- ``decimals``: round what is kept;
- ``label_only``: a one-hot row at the arg-max (for a single-score output, 0/1 at 0.5).

Shapes and datatypes are kept, so the response still matches the model's metadata and
existing clients keep working. Only floating-point outputs are touched.

:func:`strictest` combines several policies (a caller holding several roles with their own
output policy) into one that releases no more than any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gateway.kserve import FLOAT_TYPES, InferResponse, NDArray, Tensor

__all__ = ["OutputHardener", "strictest"]


@dataclass(frozen=True, slots=True)
class OutputHardener:
    """Immutable; :meth:`apply` returns a new response and never edits its argument."""

    outputs: frozenset[str] | None = None  # None: every floating-point output
    top_k: int | None = None
    decimals: int | None = None
    label_only: bool = False

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.decimals is not None and not 0 <= self.decimals <= 8:
            raise ValueError("decimals must be between 0 and 8")

    @property
    def active(self) -> bool:
        return self.label_only or self.top_k is not None or self.decimals is not None

    def apply(self, resp: InferResponse) -> InferResponse:
        if not self.active:
            return resp
        outputs: list[Tensor] = []
        for tensor in resp.outputs:
            if tensor.datatype in FLOAT_TYPES and (self.outputs is None or tensor.name in self.outputs) \
                    and tensor.data.ndim >= 1 and tensor.data.size:
                tensor = Tensor(tensor.name, tensor.datatype, tensor.shape, self.harden(tensor.data),
                                dict(tensor.parameters))
            outputs.append(tensor)
        return InferResponse(resp.model_name, resp.model_version, outputs, resp.id)

    def harden(self, data: NDArray) -> NDArray:
        """Harden an array whose last axis holds one row of scores."""
        dtype = data.dtype
        rows = np.asarray(data, dtype=np.float64).reshape(-1, data.shape[-1])
        if self.label_only:
            rows = _one_hot(rows)
        else:
            if self.top_k is not None and self.top_k < rows.shape[1]:
                # Stable sort on the negated scores: ties keep the lower class index.
                order = np.argsort(-rows, axis=1, kind="stable")
                keep = np.zeros_like(rows, dtype=np.bool_)
                np.put_along_axis(keep, order[:, : self.top_k], True, axis=1)
                kept_min = np.min(np.where(keep, rows, np.inf), axis=1, keepdims=True)
                rows = np.where(keep, rows, np.where(kept_min > 0.0, 0.0, kept_min - 1.0))
            if self.decimals is not None:
                rows = np.round(rows, self.decimals)
        out: NDArray = rows.reshape(data.shape).astype(dtype)
        return out


def _one_hot(rows: NDArray) -> NDArray:
    if rows.shape[1] == 1:
        # A single score (e.g. P(malignant)): the label is the side of 0.5.
        labels: NDArray = (rows >= 0.5).astype(np.float64)
        return labels
    hot = np.zeros_like(rows)
    hot[np.arange(rows.shape[0]), rows.argmax(axis=1)] = 1.0
    return hot


def strictest(hardeners: Sequence[OutputHardener]) -> OutputHardener:
    """One hardener releasing no more than any of ``hardeners``: label-only if any is,
    the smallest ``top_k`` and the fewest ``decimals``, over the union of their outputs.

    Why a union and not per-output rules: a caller with two restricted roles must not get
    the looser role's precision on an output only the stricter role names; coarsening an
    extra output is the safe error.
    """
    if not hardeners:
        raise ValueError("strictest() needs at least one hardener")
    if len(hardeners) == 1:
        return hardeners[0]
    outputs: frozenset[str] | None = frozenset()
    for h in hardeners:
        outputs = None if outputs is None or h.outputs is None else outputs | h.outputs
    top_ks = [h.top_k for h in hardeners if h.top_k is not None]
    decimals = [h.decimals for h in hardeners if h.decimals is not None]
    return OutputHardener(outputs=outputs, top_k=min(top_ks) if top_ks else None,
                          decimals=min(decimals) if decimals else None,
                          label_only=any(h.label_only for h in hardeners))
