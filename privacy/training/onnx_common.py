"""What every ONNX file the project builds shares, whoever trained it.

``tools/build_models.py`` (scikit-learn, version 1) and :mod:`privacy.training.export`
(DP-SGD, version 2) both promise byte-identical rebuilds and both check their graph in
onnxruntime, the engine Triton's onnxruntime backend uses. The fields a converter fills
with something volatile (its own name and version, a random graph name, doc strings) are
pinned here in one place, so the two builds cannot drift apart; the opset list stays with
each builder, because the scikit-learn graphs also need ``ai.onnx.ml``.

Imports onnx and onnxruntime inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import onnx

BATCH_DIM: Final = "N"
DOMAIN: Final = "ai.infergate"


def pin_volatile_fields(model: onnx.ModelProto, *, graph_name: str, metadata: Mapping[str, str], ir_version: int,
                        producer_name: str, producer_version: str) -> None:
    """Replace every tool- or run-dependent header field with a fixed value, write ``metadata``
    in sorted order, and name the dynamic batch dimension of every input and output ``N``
    (Triton and onnxruntime both report it as -1/'N')."""
    import onnx

    model.ir_version = ir_version
    model.producer_name = producer_name
    model.producer_version = producer_version
    model.domain = DOMAIN
    model.model_version = 1
    model.doc_string = ""
    model.graph.name = graph_name
    model.graph.doc_string = ""
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    for value_info in [*model.graph.input, *model.graph.output]:
        dims = value_info.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_param = BATCH_DIM


def onnx_session(onnx_bytes: bytes) -> Any:
    """A quiet CPU onnxruntime session, as the gateway's embedded backend runs the model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, sess_options=options, providers=["CPUExecutionProvider"])
