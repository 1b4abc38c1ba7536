"""ONNX export of a DP-trained module under the exact Triton contract of the model it replaces.

Why it is careful: Triton only finds a drifted contract (an input renamed, a static
batch axis, logits instead of probabilities) when it loads the model, and the
gateway's clients would see a different API.  So the exported graph

* takes the same raw input (``pixels`` [N, 64] / ``features`` [N, 30], FP32) with the
  standardisation inside the graph, and returns the same output (softmax
  ``probabilities`` [N, 10] / sigmoid ``score`` [N, 1]);
* is checked against ``config.pbtxt`` parsed with Triton's own protobuf schema;
* uses opset 17 and IR 8, like ``tools/build_models.py``, so older Triton
  onnxruntime backends load it;
* has every volatile field pinned (producer, doc strings, graph name), so the same
  weights give a byte-identical file.

The TorchScript-based exporter (``dynamo=False``) is used on purpose: it writes
opset 17 directly into one self-contained file in milliseconds and needs no extra
package, whereas the dynamo exporter needs ``onnxscript`` and writes weights to a
side file by default.  It warns that it is deprecated; that warning is silenced
here and torch is pinned (``torch==2.13.0``), where it works.
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from privacy.training.dpsgd import Recipe
from privacy.training.onnx_common import BATCH_DIM, pin_volatile_fields
from privacy.training.onnx_common import onnx_session as onnx_session  # re-exported: tests run graphs with it

if TYPE_CHECKING:
    import onnx
    import torch

OPSET: Final = 17
IR_VERSION: Final = 8
PRODUCER_NAME: Final = "infergate-train-dp"
#: Bump when the export recipe changes in a way that changes the bytes.
PRODUCER_VERSION: Final = "1"
#: float32 maths in torch and onnxruntime differ in the last bits only.
MAX_EXPORT_ERROR: Final = 1e-5


@functools.cache
def _head_class() -> Callable[[torch.nn.Module, bool], torch.nn.Module]:
    """Defined on first use so importing this module never imports torch."""
    import torch
    from torch import nn

    class ServingHead(nn.Module):
        """Logits -> what the contract promises: sigmoid score [N, 1] or softmax probabilities."""

        def __init__(self, net: nn.Module, binary: bool) -> None:
            super().__init__()
            self.net = net
            self.binary = binary

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            logits: torch.Tensor = self.net(x)
            if self.binary:
                return torch.sigmoid(logits)
            return torch.softmax(logits, dim=1)

    return ServingHead


def serving_module(recipe: Recipe, module: torch.nn.Module) -> torch.nn.Module:
    """The trained logits network wrapped with the contract's output activation (eval mode)."""
    head = _head_class()(module, recipe.n_classes == 2)
    head.eval()
    return head


def _pin_volatile_fields(model: onnx.ModelProto, graph_name: str, metadata: Mapping[str, str]) -> None:
    """Replace everything tool- or run-dependent with fixed values, as build_models.py does."""
    import onnx

    pin_volatile_fields(model, graph_name=graph_name, metadata=metadata, ir_version=IR_VERSION,
                        producer_name=PRODUCER_NAME, producer_version=PRODUCER_VERSION)
    for node in model.graph.node:
        node.doc_string = ""
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", OPSET))


def export_onnx(recipe: Recipe, module: torch.nn.Module, metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialised ONNX model (opset 17, dynamic batch axis ``N``), validated with the full checker."""
    import onnx
    import torch

    head = serving_module(recipe, module)
    example = torch.ones((2, recipe.n_features), dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="infergate-dp-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        _torch_export(recipe, head, example, path)
        exported = path.read_bytes()
    model = onnx.load_from_string(exported)
    _pin_volatile_fields(model, recipe.name, metadata or {})
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _torch_export(recipe: Recipe, head: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """The TorchScript exporter, with its deprecation warnings silenced (see the module docstring)."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            head,
            (example,),
            path,
            dynamo=False,
            export_params=True,
            do_constant_folding=True,
            opset_version=OPSET,
            input_names=[recipe.input_name],
            output_names=[recipe.output_name],
            dynamic_axes={recipe.input_name: {0: BATCH_DIM}, recipe.output_name: {0: BATCH_DIM}},
        )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run_onnx(onnx_bytes: bytes, input_name: str, x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """Run the exported graph in onnxruntime, the engine Triton's onnxruntime backend uses."""
    outputs = onnx_session(onnx_bytes).run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})
    return np.asarray(outputs[0], dtype=np.float32)


def torch_outputs(recipe: Recipe, module: torch.nn.Module, x: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    import torch

    with torch.no_grad():
        out = serving_module(recipe, module)(torch.tensor(np.asarray(x, dtype=np.float32)))
    return np.asarray(out.numpy(), dtype=np.float32)


def export_error(recipe: Recipe, module: torch.nn.Module, onnx_bytes: bytes, x: npt.NDArray[np.floating]) -> float:
    """Largest |torch - onnxruntime| output difference on ``x``."""
    got = run_onnx(onnx_bytes, recipe.input_name, x)
    want = torch_outputs(recipe, module, x)
    if got.shape != want.shape:
        raise RuntimeError(f"{recipe.name}: ONNX output shape {got.shape} != torch {want.shape}")
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def onnx_labels(recipe: Recipe, onnx_bytes: bytes, x: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
    """Labels as a client of the served model would derive them (argmax, or score >= 0.5)."""
    out = run_onnx(onnx_bytes, recipe.input_name, x)
    if recipe.n_classes == 2:
        return (out[:, 0] >= 0.5).astype(np.int64)
    return np.asarray(out.argmax(axis=1), dtype=np.int64)


# --------------------------------------------------------------------------- contract


_ONNX_TO_TRITON: Final = {1: "TYPE_FP32", 8: "TYPE_STRING", 11: "TYPE_FP64", 7: "TYPE_INT64"}


def _onnx_io(values: Any) -> list[tuple[str, str, list[int | str]]]:
    result: list[tuple[str, str, list[int | str]]] = []
    for v in values:
        tensor = v.type.tensor_type
        dims: list[int | str] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
        result.append((v.name, _ONNX_TO_TRITON.get(tensor.elem_type, f"onnx:{tensor.elem_type}"), dims))
    return result


def contract_mismatches(onnx_bytes: bytes, config_text: str) -> list[str]:
    """Differences between a graph's inputs/outputs and a Triton ``config.pbtxt`` (empty = match).

    With ``max_batch_size > 0`` Triton prepends a batch axis to the configured dims, so
    the graph must have ``[dynamic, *dims]``; the names, order and dtypes must be equal.
    """
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(config_text, model_config_pb2.ModelConfig())
    graph = onnx.load_from_string(onnx_bytes).graph
    problems: list[str] = []
    batched = int(config.max_batch_size) > 0
    for kind, declared, actual in (
        ("input", config.input, _onnx_io(graph.input)),
        ("output", config.output, _onnx_io(graph.output)),
    ):
        want = [
            (str(t.name), str(model_config_pb2.DataType.Name(t.data_type)), [int(d) for d in t.dims]) for t in declared
        ]
        if [w[0] for w in want] != [a[0] for a in actual]:
            problems.append(f"{kind} names: config {[w[0] for w in want]} vs onnx {[a[0] for a in actual]}")
            continue
        for (name, dtype, dims), (_, onnx_dtype, onnx_dims) in zip(want, actual, strict=True):
            if dtype != onnx_dtype:
                problems.append(f"{kind} {name}: dtype {dtype} vs onnx {onnx_dtype}")
            expected: list[int | str] = [BATCH_DIM, *dims] if batched else list(dims)
            if batched and (not onnx_dims or isinstance(onnx_dims[0], int)):
                problems.append(f"{kind} {name}: batch axis must be dynamic, onnx has {onnx_dims}")
            elif list(onnx_dims[1:] if batched else onnx_dims) != expected[1 if batched else 0 :]:
                problems.append(f"{kind} {name}: dims {expected} vs onnx {onnx_dims}")
    return problems
