"""Drift monitoring tests: the real digits split and model, the shipped drift policy."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from gateway.drift.policy import DriftPolicy
from gateway.policy.loader import load_policy_dir
from tests.adversarial import load_build_module

ROOT = Path(__file__).resolve().parent.parent.parent
TRITON_REPO = ROOT / "triton_repo"
POLICIES = ROOT / "policies"

Rows = npt.NDArray[np.float32]


@functools.cache
def digits_test_split() -> tuple[Rows, npt.NDArray[np.int64]]:
    """The held-out digits rows (never in the profile) and their labels."""
    _, x_test, _, y_test = load_build_module().load_digits_split()
    return np.asarray(x_test, dtype=np.float32), np.asarray(y_test, dtype=np.int64)


@functools.cache
def _digits_session() -> ort.InferenceSession:
    return ort.InferenceSession(str(TRITON_REPO / "digits" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def digits_classes(x: Rows) -> Rows:
    """The predicted class of each row, from the real model (what the monitor derives from the output)."""
    session = _digits_session()
    probabilities = np.asarray(session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0])
    classes: Rows = np.argmax(probabilities, axis=1).astype(np.float32)
    return classes


def shipped_digits_policy() -> DriftPolicy:
    policy = load_policy_dir(POLICIES).gateway.models["digits"].drift
    assert policy is not None
    return policy
