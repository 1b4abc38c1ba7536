"""The drift reference of a model: its training profile's histograms, as count matrices.

The profile is first loaded by :func:`gateway.adversarial.profile.load_profile`, so a
drift reference is only ever built from a profile that passes the detectors' strict
checks; the histogram fields that loader does not keep (per-feature ``hist_edges`` and
``hist``, the output's class distribution or score histogram) are checked here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from gateway.adversarial.profile import PROFILE_FILENAME, ProfileError, load_profile
from gateway.drift.stats import FloatArray, histogram_matrix

__all__ = ["OutputReference", "Reference", "load_reference"]

MAX_BINS: Final = 256


@dataclass(frozen=True, slots=True)
class OutputReference:
    """Prediction drift: the argmax class (``class``) or the score itself (``score``)."""

    name: str  # the output tensor
    kind: Literal["class", "score"]
    edges: FloatArray
    counts: FloatArray  # shape (1, B + 2), open bins included

    @property
    def feature(self) -> str:
        return f"output:{self.kind}"


@dataclass(frozen=True, slots=True)
class Reference:
    model: str
    input: str  # the input tensor the profile describes
    n_train: int
    edges: tuple[FloatArray, ...]  # per feature
    counts: FloatArray  # (features, B + 2), open bins included
    output: OutputReference | None

    @property
    def n_features(self) -> int:
        return len(self.edges)

    def feature_name(self, index: int) -> str:
        return f"{self.input}[{index}]"


def load_reference(repo_dir: Path, model: str) -> Reference:
    """Read ``<repo_dir>/<model>/profile.json``; :class:`ProfileError` if it cannot serve drift."""
    path = repo_dir / model / PROFILE_FILENAME
    profile = load_profile(path, model=model)
    if profile.numeric is None:
        raise ProfileError(f"{path}: model {model!r} has no numeric features to monitor for drift")
    # The loader has validated size, encoding and structure; read the histograms it skips.
    doc = json.loads(path.read_text(encoding="utf-8"))
    edges: list[FloatArray] = []
    hists: list[list[float]] = []
    for position, feature in enumerate(doc["features"]):
        feature_edges, hist = _histogram(feature, "hist_edges", "hist", f"features[{position}]")
        edges.append(feature_edges)
        hists.append(hist)
    counts = histogram_matrix(hists)
    counts.setflags(write=False)
    return Reference(model=model, input=profile.input, n_train=profile.numeric.n_train, edges=tuple(edges),
                     counts=counts, output=_output(doc.get("output"), profile.numeric.n_train))


def _output(doc: Any, n_train: int) -> OutputReference | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    name = doc["name"]
    if "class_distribution" in doc:
        shares = _numbers(doc["class_distribution"], "output.class_distribution")
        if len(shares) < 2 or any(s < 0 for s in shares):
            raise ProfileError("output.class_distribution must hold two or more non-negative shares")
        edges = np.arange(len(shares) + 1, dtype=np.float64) - 0.5
        counts = [s * n_train for s in shares]
        return _frozen_output(name, "class", edges, counts)
    if "score_hist_edges" in doc:
        score_edges, hist = _histogram(doc, "score_hist_edges", "score_hist", "output")
        return _frozen_output(name, "score", score_edges, hist)
    return None


def _frozen_output(name: str, kind: Literal["class", "score"], edges: FloatArray,
                   counts: list[float]) -> OutputReference:
    matrix = histogram_matrix([counts])
    matrix.setflags(write=False)
    edges.setflags(write=False)
    return OutputReference(name=name, kind=kind, edges=edges, counts=matrix)


def _histogram(obj: Any, edges_key: str, hist_key: str, where: str) -> tuple[FloatArray, list[float]]:
    if not isinstance(obj, dict):
        raise ProfileError(f"{where} must be an object")
    edges = _numbers(obj.get(edges_key), f"{where}.{edges_key}")
    hist = _numbers(obj.get(hist_key), f"{where}.{hist_key}")
    if not 1 <= len(hist) <= MAX_BINS or len(edges) != len(hist) + 1:
        raise ProfileError(f"{where}: {edges_key} must have one more entry than {hist_key} (1..{MAX_BINS} bins)")
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ProfileError(f"{where}.{edges_key} must increase strictly")
    if any(c < 0 for c in hist) or sum(hist) <= 0:
        raise ProfileError(f"{where}.{hist_key} must be non-negative counts, not all zero")
    array = np.asarray(edges, dtype=np.float64)
    array.setflags(write=False)
    return array, hist


def _numbers(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ProfileError(f"{where} must be a list of finite numbers")
    return [float(v) for v in value]
