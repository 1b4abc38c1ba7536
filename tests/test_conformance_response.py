"""check_response: the upstream's answer is checked against the request before any response stage."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.conformance import check_response
from gateway.errors import UpstreamBadResponse
from gateway.kserve import InferRequest, InferResponse, ModelMetadata, Tensor, TensorSpec

META = ModelMetadata("m", ("1",), "onnxruntime_onnx", (TensorSpec("x", "FP32", (-1, 4)),),
                     (TensorSpec("probs", "FP32", (-1, 3)),), max_batch_size=8)


def request(rows: int) -> InferRequest:
    return InferRequest(model="m", version="", inputs=[Tensor("x", "FP32", (rows, 4), np.zeros((rows, 4), np.float32))])


def answer(data: np.ndarray) -> InferResponse:
    return InferResponse(model_name="m", model_version="1",
                         outputs=[Tensor("probs", "FP32", tuple(data.shape), data)])


def test_a_well_formed_answer_passes() -> None:
    check_response(answer(np.full((2, 3), 0.5, np.float32)), request(2), META)


@pytest.mark.parametrize("rows", [0, 1, 3, 64])
def test_another_batch_size_than_asked_is_refused(rows: int) -> None:
    with pytest.raises(UpstreamBadResponse) as exc:
        check_response(answer(np.zeros((rows, 3), np.float32)), request(2), META)
    assert exc.value.reason == "upstream_wrong_batch"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad: float) -> None:
    data = np.full((1, 3), 0.5, np.float32)
    data[0, 1] = bad
    with pytest.raises(UpstreamBadResponse) as exc:
        check_response(answer(data), request(1), META)
    assert exc.value.reason == "upstream_non_finite"


def test_unknown_batching_checks_values_only() -> None:
    """An upstream that does not say it batches (max_batch_size 0) keeps its leading dimension."""
    meta = ModelMetadata("m", ("1",), "x", META.inputs, META.outputs, max_batch_size=0)
    check_response(answer(np.zeros((5, 3), np.float32)), request(2), meta)


def test_upstream_text_keeps_shapes_and_drops_values() -> None:
    from gateway.observability.logging import UPSTREAM_TEXT_MAX, upstream_text

    text = upstream_text("input x: expected shape [1,20] got [1,19]; probs=0.8123 -1e-05 .5 3E2 1234567")
    assert text == "input x: expected shape [1,20] got [1,19]; probs=<num> <num> <num> <num> <num>"
    assert len(upstream_text("9" * 10_000 + "a" * 10_000)) <= UPSTREAM_TEXT_MAX
