"""Output hardening: each mode releases exactly what it promises, shapes and dtypes kept."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.adversarial.hardening import OutputHardener
from gateway.kserve import InferResponse, Tensor
from gateway.stages.sanitize import object_array

PROBS = np.array([[0.05, 0.6, 0.25, 0.1], [0.4, 0.1, 0.1, 0.4]], dtype=np.float32)

CASES = [
    # (case, hardener, expected rows); rounding is numpy's, on the float32 values (0.05f > 0.05)
    ("off", OutputHardener(), PROBS),
    ("top-1", OutputHardener(top_k=1), [[0, 0.6, 0, 0], [0.4, 0, 0, 0]]),  # tie: lower index kept
    ("top-2", OutputHardener(top_k=2), [[0, 0.6, 0.25, 0], [0.4, 0, 0, 0.4]]),
    ("top-k wider than the row", OutputHardener(top_k=10), PROBS),
    ("rounding to 1 decimal", OutputHardener(decimals=1), [[0.1, 0.6, 0.2, 0.1], [0.4, 0.1, 0.1, 0.4]]),
    ("top-2 then rounding", OutputHardener(top_k=2, decimals=0), [[0, 1, 0, 0], [0, 0, 0, 0]]),
    ("label only", OutputHardener(label_only=True), [[0, 1, 0, 0], [1, 0, 0, 0]]),
    ("label only wins over the rest", OutputHardener(label_only=True, top_k=3, decimals=2),
     [[0, 1, 0, 0], [1, 0, 0, 0]]),
]


@pytest.mark.parametrize(("hardener", "expected"), [pytest.param(h, e, id=c) for c, h, e in CASES])
def test_hardening_modes(hardener: OutputHardener, expected: object) -> None:
    resp = InferResponse("digits", "1", [Tensor("probabilities", "FP32", (2, 4), PROBS.copy())], id="r1")
    out = hardener.apply(resp)
    tensor = out.outputs[0]
    np.testing.assert_allclose(tensor.data, np.asarray(expected, dtype=np.float32), atol=1e-6)
    assert tensor.data.dtype == np.float32 and tensor.shape == (2, 4)
    assert out.id == "r1" and out.model_name == "digits"
    np.testing.assert_array_equal(resp.outputs[0].data, PROBS)  # the original is untouched


def test_single_score_label_is_the_side_of_one_half() -> None:
    score = np.array([[0.2], [0.5], [0.93]], dtype=np.float32)
    out = OutputHardener(label_only=True).apply(InferResponse("risk", "1", [Tensor("score", "FP32", (3, 1), score)]))
    assert out.outputs[0].data.ravel().tolist() == [0.0, 1.0, 1.0]


def test_only_named_floating_point_outputs_are_touched() -> None:
    text = object_array([b"keep"])
    resp = InferResponse("m", "1", [
        Tensor("probabilities", "FP32", (1, 4), PROBS[:1].copy()),
        Tensor("logits", "FP64", (1, 4), PROBS[:1].astype(np.float64)),
        Tensor("text", "BYTES", (1,), text),
        Tensor("count", "INT32", (1,), np.array([7], dtype=np.int32)),
    ])
    out = OutputHardener(outputs=frozenset({"probabilities"}), label_only=True).apply(resp)
    assert out.outputs[0].data.tolist() == [[0, 1, 0, 0]]
    np.testing.assert_array_equal(out.outputs[1].data, resp.outputs[1].data)
    assert out.outputs[2].data is text and out.outputs[3].data.tolist() == [7]
    every = OutputHardener(label_only=True).apply(resp)
    assert every.outputs[1].data.tolist() == [[0, 1, 0, 0]]


@pytest.mark.parametrize("kwargs", [{"top_k": 0}, {"decimals": -1}, {"decimals": 9}])
def test_invalid_settings(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        OutputHardener(**kwargs)  # type: ignore[arg-type]


def test_strictest_combines_to_no_more_than_any() -> None:
    from gateway.adversarial.hardening import strictest

    combined = strictest([OutputHardener(outputs=frozenset({"a"}), top_k=3, decimals=4),
                          OutputHardener(outputs=frozenset({"b"}), top_k=1),
                          OutputHardener(outputs=frozenset({"a"}), decimals=2)])
    assert combined == OutputHardener(outputs=frozenset({"a", "b"}), top_k=1, decimals=2, label_only=False)
    assert strictest([OutputHardener(), OutputHardener(outputs=frozenset({"a"}), label_only=True)]) == \
        OutputHardener(outputs=None, label_only=True)
    only = OutputHardener(decimals=1)
    assert strictest([only]) is only
    with pytest.raises(ValueError, match="at least one"):
        strictest([])


def test_top_k_keeps_the_arg_max_when_noised_scores_are_negative() -> None:
    """DP noise runs before hardening: a row can be all negative. Zeroing the withheld
    scores would then make a withheld class the arg-max (a wrong label)."""
    noisy = np.array([[-0.7, -0.2, -1.5, -0.9], [0.3, -0.4, 0.9, -2.0], [-0.1, 0.0, -3.0, -0.5]], dtype=np.float32)
    out = OutputHardener(top_k=1).harden(noisy)
    assert out.argmax(axis=1).tolist() == noisy.argmax(axis=1).tolist()
    assert out.tolist() == [[pytest.approx(-1.2), pytest.approx(-0.2), pytest.approx(-1.2), pytest.approx(-1.2)],
                            [0.0, 0.0, pytest.approx(0.9), 0.0],
                            [-1.0, 0.0, -1.0, -1.0]]
    two = OutputHardener(top_k=2).harden(noisy)
    assert two[0].tolist() == [pytest.approx(-0.7), pytest.approx(-0.2), pytest.approx(-1.7), pytest.approx(-1.7)]
