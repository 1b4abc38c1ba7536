"""MLServer runtime that serves ONE version of a Triton ONNX model like Triton would.

Loaded by MLServer inside its own venv (``.venv-mlserver``), never by the test suite, so it
imports only mlserver, numpy, onnxruntime and the standard library (tritonclient is not a
declared dependency there). It does not read ``config.pbtxt``: the harness
(``tests/support/mlserver.py``) translates the Triton config into ``model-settings.json``:

- ``inputs`` / ``outputs``: declared tensors (name, KServe datatype, shape with ``-1``; the
  leading ``-1`` is the batch dimension when ``max_batch_size > 0``), also served as metadata;
- ``parameters.version``: the Triton version directory, so MLServer routes versions;
- ``parameters.extra``: ``onnx_path``, ``max_batch_size``, ``optional_inputs`` and
  ``input_reshape`` / ``output_reshape`` (Triton ``reshape``, without batch dimension).

Why it validates: MLServer does not check tensors against the declared metadata, while
Triton rejects a bad request before the model runs. Without these checks a wrong shape
would surface as ``INTERNAL`` with onnxruntime's text instead of Triton's
``INVALID_ARGUMENT``. ``InferenceError`` maps to ``INVALID_ARGUMENT`` on gRPC, 400 on REST.

Why outputs are built by hand: MLServer's ``NumpyCodec`` adds a batch dimension to 1-D
arrays; Triton returns the shape the model produced.

BYTES, as Triton's onnxruntime backend does it: that backend hands string elements to
onnxruntime as C strings (``FillStringTensor``), so each element is cut at its first NUL byte;
any other byte, valid UTF-8 or not, reaches the model unchanged. This runtime does the same
cut. onnxruntime's Python API, though, only accepts ``str`` elements (``bytes`` are
``str()``-ed to ``"b'...'"``) and decodes every output string as UTF-8. So when all BYTES
inputs of a request are valid UTF-8 they are passed as UTF-8 text, which feeds the model the
same bytes Triton would; otherwise the whole request uses Latin-1, a lossless 1:1 map of
bytes to code points, so that byte-preserving graphs (Identity, Concat, Gather...) return
arbitrary bytes exactly. Outputs are encoded back with the same codec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor, ResponseOutput

# KServe datatype -> numpy dtype used to build the onnxruntime feed.
_NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}

# onnxruntime type string -> KServe datatype, to refuse a config that does not match the model
# at load time (Triton refuses to load such a model too).
_ORT_TYPES: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _datatype(tensor: MetadataTensor) -> str:
    """The KServe datatype string of a declared tensor (a ``Datatype`` enum in pydantic)."""
    return str(getattr(tensor.datatype, "value", tensor.datatype))


def _shape_str(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _as_bytes(value: object) -> bytes:
    """gRPC gives BYTES elements as bytes; REST (JSON) gives str."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise InferenceError(f"BYTES element of type {type(value).__name__} is not bytes or a string")


def _is_utf8(values: Sequence[bytes]) -> bool:
    try:
        for v in values:
            v.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _flatten(data: Any) -> list[Any]:
    """Flatten nested JSON lists (REST); gRPC data is already flat."""
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        if isinstance(item, list):
            out.extend(_flatten(item))
        else:
            out.append(item)
    return out


class TritonOnnxModel(MLModel):
    """One version of one ONNX model from a Triton repository, with Triton's input checks."""

    async def load(self) -> bool:
        params = self.settings.parameters
        extra: dict[str, Any] = dict(params.extra or {}) if params is not None else {}
        try:
            onnx_path = str(extra["onnx_path"])
        except KeyError:
            raise ValueError(f"model {self.name}: parameters.extra.onnx_path is missing") from None
        self._max_batch_size = int(extra.get("max_batch_size", 0))
        self._optional_inputs = frozenset(str(n) for n in extra.get("optional_inputs", []))
        self._input_reshape: dict[str, list[int]] = {
            str(k): [int(d) for d in v] for k, v in dict(extra.get("input_reshape", {})).items()
        }
        # For outputs only the names matter: the client-facing shape is the declared one.
        self._reshaped_outputs = frozenset(str(k) for k in dict(extra.get("output_reshape", {})))
        self._declared_inputs = {t.name: t for t in self.settings.inputs}
        self._declared_outputs = {t.name: t for t in self.settings.outputs}
        if not self._declared_inputs or not self._declared_outputs:
            raise ValueError(f"model {self.name}: model-settings.json declares no inputs or outputs")

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self._check_against_model()
        return True

    def _check_against_model(self) -> None:
        """Refuse to load when config.pbtxt and the ONNX graph disagree (names or types)."""
        graph_inputs = {i.name: _ORT_TYPES.get(i.type, i.type) for i in self._session.get_inputs()}
        graph_outputs = {o.name: _ORT_TYPES.get(o.type, o.type) for o in self._session.get_outputs()}
        for kind, declared, graph in (
            ("input", self._declared_inputs, graph_inputs),
            ("output", self._declared_outputs, graph_outputs),
        ):
            for name, tensor in declared.items():
                if name not in graph:
                    raise ValueError(
                        f"model {self.name}: config {kind} '{name}' is not in the ONNX graph "
                        f"({sorted(graph)})"
                    )
                if graph[name] != _datatype(tensor):
                    raise ValueError(
                        f"model {self.name}: config {kind} '{name}' is {_datatype(tensor)} "
                        f"but the ONNX graph has {graph[name]}"
                    )
        undeclared = set(graph_inputs) - set(self._declared_inputs)
        if undeclared:
            raise ValueError(f"model {self.name}: ONNX inputs {sorted(undeclared)} missing from config")

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed, codec = self._decode_inputs(payload)
        output_names = self._requested_outputs(payload)
        try:
            results = self._session.run(output_names, feed)
        except Exception as exc:
            # Triton answers a failing execution with INTERNAL and onnxruntime's text; MLServer
            # maps any non-MLServer exception to INTERNAL with its message, so this matches.
            raise RuntimeError(f"onnx runtime error: {exc}") from exc
        outputs = [
            self._encode_output(name, np.asarray(value), codec)
            for name, value in zip(output_names, results, strict=True)
        ]
        return InferenceResponse(
            model_name=self.name, model_version=self.version, id=payload.id, outputs=outputs
        )

    def _decode_inputs(self, payload: InferenceRequest) -> tuple[dict[str, Any], str]:
        """Validate every input against the declared metadata and build the onnxruntime feed."""
        seen: set[str] = set()
        batch_sizes: set[int] = set()
        arrays: dict[str, Any] = {}
        byte_values: dict[str, list[bytes]] = {}
        shapes: dict[str, list[int]] = {}
        for request_input in payload.inputs:
            name = request_input.name
            declared = self._declared_inputs.get(name)
            if declared is None:
                raise InferenceError(f"unexpected inference input '{name}' for model '{self.name}'")
            if name in seen:
                raise InferenceError(f"input '{name}' appears more than once for model '{self.name}'")
            seen.add(name)
            datatype = str(getattr(request_input.datatype, "value", request_input.datatype))
            expected_type = _datatype(declared)
            if datatype != expected_type:
                raise InferenceError(
                    f"inference input '{name}' data-type is '{datatype}', but model '{self.name}' "
                    f"expects '{expected_type}'"
                )
            shape = shapes[name] = [int(d) for d in request_input.shape]
            self._check_shape(name, shape, list(declared.shape))
            if self._max_batch_size > 0:
                batch_sizes.add(shape[0])
            values = _flatten(request_input.data.root)
            count = int(np.prod(shape)) if shape else 1
            if len(values) != count:
                raise InferenceError(
                    f"input '{name}' for model '{self.name}' has {len(values)} elements, "
                    f"shape {_shape_str(shape)} needs {count}"
                )
            if expected_type == "BYTES":
                # Cut at the first NUL, as Triton's C-string hand-over to onnxruntime does.
                byte_values[name] = [_as_bytes(v).split(b"\x00", 1)[0] for v in values]
            else:
                try:
                    arrays[name] = np.asarray(values, dtype=_NUMPY_DTYPES[expected_type]).reshape(shape)
                except (TypeError, ValueError) as exc:
                    raise InferenceError(f"input '{name}' for model '{self.name}': {exc}") from None
        missing = sorted(set(self._declared_inputs) - seen - self._optional_inputs)
        if missing:
            raise InferenceError(f"model '{self.name}' expects input(s) {missing} which are missing")
        if len(batch_sizes) > 1:
            raise InferenceError(
                f"inputs for model '{self.name}' have different batch sizes {sorted(batch_sizes)}"
            )
        codec = "utf-8" if all(_is_utf8(v) for v in byte_values.values()) else "latin-1"
        for name, values in byte_values.items():
            arrays[name] = np.array([v.decode(codec) for v in values], dtype=np.object_).reshape(shapes[name])
        for name, dims in self._input_reshape.items():
            if name in arrays:
                batch = [arrays[name].shape[0]] if self._max_batch_size > 0 else []
                arrays[name] = arrays[name].reshape(batch + dims)
        return arrays, codec

    def _check_shape(self, name: str, shape: list[int], expected: list[int]) -> None:
        """Triton's rules: same rank, fixed dims equal, 1 <= batch <= max_batch_size."""
        ok = len(shape) == len(expected) and all(
            e == -1 or e == s for s, e in zip(shape, expected, strict=True)
        )
        if not ok or any(d < 0 for d in shape):
            raise InferenceError(
                f"unexpected shape for input '{name}' for model '{self.name}'. "
                f"Expected {_shape_str(expected)}, got {_shape_str(shape)}"
            )
        if self._max_batch_size > 0 and not 1 <= shape[0] <= self._max_batch_size:
            raise InferenceError(
                f"inference request batch-size must be <= {self._max_batch_size} for '{self.name}', "
                f"got {shape[0]}"
            )

    def _requested_outputs(self, payload: InferenceRequest) -> list[str]:
        if not payload.outputs:
            return list(self._declared_outputs)
        names = [o.name for o in payload.outputs]
        for name in names:
            if name not in self._declared_outputs:
                raise InferenceError(f"unexpected inference output '{name}' for model '{self.name}'")
        if len(set(names)) != len(names):
            raise InferenceError(f"an output is requested more than once for model '{self.name}'")
        return names

    def _encode_output(self, name: str, value: Any, codec: str) -> ResponseOutput:
        datatype = _datatype(self._declared_outputs[name])
        if name in self._reshaped_outputs:
            batch = [value.shape[0]] if self._max_batch_size > 0 else []
            value = value.reshape(batch + self._output_reshape_declared(name))
        shape = [int(d) for d in value.shape]
        if datatype == "BYTES":
            data: list[Any] = [_encode_str(v, codec) for v in value.ravel().tolist()]
        else:
            data = value.astype(_NUMPY_DTYPES[datatype], copy=False).ravel().tolist()
        return ResponseOutput(name=name, datatype=datatype, shape=shape, data=data)

    def _output_reshape_declared(self, name: str) -> list[int]:
        """Client-facing dims of a reshaped output (declared shape without the batch dim)."""
        dims = list(self._declared_outputs[name].shape)
        return dims[1:] if self._max_batch_size > 0 else dims


def _encode_str(value: object, codec: str) -> bytes:
    if isinstance(value, bytes):
        return value
    text = str(value)
    try:
        return text.encode(codec)
    except UnicodeEncodeError:  # a model-made character outside Latin-1
        return text.encode("utf-8")
