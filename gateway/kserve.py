"""Transport-neutral KServe V2 values: tensors, requests, responses, model metadata.

Fronts decode their wire format into these; stages and upstreams only ever see these.
Tensor data is always a numpy array of the datatype's dtype, already shaped, so a stage
never re-parses JSON or bytes. BYTES tensors are object arrays of ``bytes``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

# KServe V2 datatype -> numpy dtype. BF16 has no numpy dtype and is not served yet.
DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

# Little-endian element sizes for the binary tensor extension (BYTES is length-prefixed).
ELEMENT_SIZE: Final[dict[str, int]] = {
    name: dt.itemsize for name, dt in DTYPES.items() if name != "BYTES"
}

# The typed field of KServe V2 gRPC's InferTensorContents each datatype travels in;
# FP16 has none (raw bytes only).
CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

FLOAT_TYPES: Final[frozenset[str]] = frozenset({"FP16", "FP32", "FP64"})
INT_TYPES: Final[frozenset[str]] = frozenset(
    {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
)

NDArray = npt.NDArray[Any]


@dataclass(slots=True)
class Tensor:
    """One named tensor. ``data`` has ``DTYPES[datatype]`` and exactly ``shape``."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: NDArray
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RequestedOutput:
    """An output the client asked for; ``binary`` is None when the client did not say."""

    name: str
    binary: bool | None = None


@dataclass(slots=True)
class InferRequest:
    model: str
    version: str  # "" = the upstream's default version policy
    inputs: list[Tensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    # Only the request parameters the gateway itself understands survive decoding.
    binary_data_output: bool = False
    # W3C trace context propagated to the upstream (validated by the front), never client headers.
    traceparent: str | None = None


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    outputs: list[Tensor]
    id: str | None = None


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output; ``shape`` includes the batch dimension (-1 = any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0

    def to_json(self) -> dict[str, Any]:
        """The KServe V2 model metadata response body."""
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": self.platform,
            "inputs": [_spec_json(s) for s in self.inputs],
            "outputs": [_spec_json(s) for s in self.outputs],
        }

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "extensions": list(self.extensions)}


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def newest_version(versions: Iterable[str]) -> str:
    """The highest of some decimal version strings (Triton's default policy serves the newest)."""
    return max(versions, key=int)


def element_count(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count
