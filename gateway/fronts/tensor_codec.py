"""Tensor rules shared by the REST and gRPC codecs: one implementation, so the two fronts
cannot drift apart.

Limits, name and id rules, error labels, element counting, the binary wire form (Triton's
binary extension and gRPC ``raw_input_contents`` are the same little-endian layout) and
the checks every upstream output passes before it reaches a client. Pure functions on
numpy arrays; nothing here knows JSON or protobuf.

# SECURITY: error details name the field and the rule, never a client value (data, ids,
# unknown keys): they may be PII or header-injection payloads, and errors reach logs,
# audit records and response bodies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import numpy as np

from gateway.errors import GatewayError, InputRejected, MalformedRequest, PayloadTooLarge, UpstreamBadResponse
from gateway.kserve import DTYPES, ELEMENT_SIZE, FLOAT_TYPES, NDArray, Tensor

__all__ = [
    "MAX_NAME_LENGTH",
    "UNSAFE_TEXT",
    "CodecLimits",
    "InputSpec",
    "all_finite",
    "binary_tensor",
    "check_count",
    "checked_output",
    "input_label",
    "object_array",
    "output_bytes",
    "output_label",
    "output_shape",
    "parameter_label",
    "valid_tensor_name",
]


@dataclass(frozen=True, slots=True)
class CodecLimits:
    """Per-request ceilings; the defaults are the security catalogue's test profile."""

    max_elements_per_tensor: int = 1_048_576
    max_dims: int = 8
    max_bytes_element: int = 64 * 1024
    max_inputs: int = 64  # also caps the number of requested outputs
    max_id_length: int = 128
    max_json_depth: int = 32
    max_number_digits: int = 100


MAX_NAME_LENGTH: Final = 256

# Parameter names Triton (or the KServe spec) gives a meaning to. These are ours to name in
# an error message; any other key is the client's text and is never echoed.
_KNOWN_PARAMETERS: Final = frozenset({
    "binary_data", "binary_data_output", "binary_data_size", "classification", "headers",
    "priority", "sequence_end", "sequence_id", "sequence_start", "shared_memory_byte_size",
    "shared_memory_offset", "shared_memory_region", "timeout", "triton_enable_empty_final_response",
})

# Control characters (C0, DEL, C1), line/paragraph separators and surrogates. A JSON
# decoder folds valid surrogate pairs into one code point, so any surrogate left in a
# decoded str is a lone one.
UNSAFE_TEXT: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# Names we are willing to quote back in an error message (input and output names are
# also model metadata, so quoting them helps the client; anything else gets an index).
# SECURITY: identifier-like only, and no run of 4+ digits, so a name cannot carry an
# e-mail address, a card or a social security number into logs and audit records.
_QUOTABLE_NAME: Final = re.compile(r"(?!.*[0-9]{4})[A-Za-z_][A-Za-z0-9_.\-]{0,63}")

_LE_DTYPES: Final = {name: dt.newbyteorder("<") for name, dt in DTYPES.items() if name != "BYTES"}


# ---------------------------------------------------------------------------------------
# Names and labels
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class InputSpec:
    """An input whose envelope passed validation; its data is converted afterwards."""

    label: str
    name: str
    datatype: str
    shape: tuple[int, ...]
    count: int
    data: Any
    binary_size: int | None


def input_label(index: int, name: object) -> str:
    if isinstance(name, str) and _QUOTABLE_NAME.fullmatch(name):
        return f"input '{name}'"
    return f"inputs[{index}]"


def output_label(index: int, name: object) -> str:
    if isinstance(name, str) and _QUOTABLE_NAME.fullmatch(name):
        return f"output '{name}'"
    return f"outputs[{index}]"


def parameter_label(key: str) -> str:
    # The fronts write "request " or "input 'x': " before it: a noun phrase without an article.
    return f"parameter '{key}'" if key in _KNOWN_PARAMETERS else "parameter with an unknown name"


def valid_tensor_name(name: object) -> TypeGuard[str]:
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME_LENGTH
            and name.isascii() and name.isprintable())


# ---------------------------------------------------------------------------------------
# Tensor data
# ---------------------------------------------------------------------------------------


def check_count(spec: InputSpec, provided: int, limits: CodecLimits, mismatch: type[GatewayError]) -> None:
    # SECURITY: the limit is checked on the elements actually sent, then the declared
    # shape is compared with them: nothing is ever sized from the declaration alone
    # (IN-04: [4611686018427387904, 4] is a mismatch, not an allocation).
    if provided > limits.max_elements_per_tensor:
        raise PayloadTooLarge(f"{spec.label}: more than {limits.max_elements_per_tensor} elements")
    if provided != spec.count:
        raise mismatch(f"{spec.label}: data has a different number of elements than the shape",
                       reason="input_wrong_shape")
    # SECURITY: an empty tensor ([0, 10**30]) matches zero elements, but numpy cannot even
    # describe it (ValueError from reshape/empty: a 500). Its other dimensions are held to
    # the element limit too (found by security_tests/fuzz).
    if not provided and math.prod(dim for dim in spec.shape if dim) > limits.max_elements_per_tensor:
        raise mismatch(f"{spec.label}: shape dimensions larger than the element limit",
                       reason="input_wrong_shape")


def object_array(values: list[bytes]) -> NDArray:
    array = np.empty(len(values), dtype=np.object_)
    array[:] = values
    return array


def binary_tensor(spec: InputSpec, raw: memoryview, limits: CodecLimits, *,
                  source: str = "binary_data_size") -> NDArray:
    """Little-endian elements or length-prefixed BYTES, for both fronts (``source`` names
    where the bytes came from in error messages)."""
    datatype, label = spec.datatype, spec.label
    if datatype == "BYTES":
        return object_array(_split_bytes(spec, raw, limits)).reshape(spec.shape)
    size = ELEMENT_SIZE[datatype]
    if len(raw) % size:
        raise MalformedRequest(f"{label}: {source} is not a multiple of the {datatype} element size",
                               reason="binary_size_mismatch")
    # SECURITY: counted on the bytes actually sent, then compared with the declared shape;
    # nothing is ever sized from the declaration alone (IN-04).
    check_count(spec, len(raw) // size, limits, MalformedRequest)
    if datatype == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        # A bool byte other than 0/1 is undefined for numpy and the backends.
        if octets.size and int(octets.max()) > 1:
            raise InputRejected(f"{label}: BOOL bytes must be 0 or 1", reason="input_wrong_type")
        return octets.astype(np.bool_).reshape(spec.shape)
    # '<' on the wire; astype copies into native order and frees us from the body buffer.
    array = np.frombuffer(raw, dtype=_LE_DTYPES[datatype]).astype(DTYPES[datatype])
    if datatype in FLOAT_TYPES and not all_finite(array):
        raise InputRejected(f"{label}: NaN and infinity are not accepted", reason="input_non_finite")
    return array.reshape(spec.shape)


def all_finite(array: NDArray) -> bool:
    """min/max propagate NaN and expose +-inf: two reductions, no temporary mask."""
    if not array.size:
        return True
    return math.isfinite(float(array.min())) and math.isfinite(float(array.max()))


def _split_bytes(spec: InputSpec, raw: memoryview, limits: CodecLimits) -> list[bytes]:
    """Split Triton's BYTES wire form: repeated (uint32 little-endian length, bytes)."""
    label, cap, most = spec.label, limits.max_bytes_element, limits.max_elements_per_tensor
    values: list[bytes] = []
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 4:
            raise MalformedRequest(f"{label}: truncated BYTES length prefix", reason="binary_bytes_framing")
        length = int.from_bytes(raw[pos:pos + 4], "little")
        pos += 4
        # SECURITY: the prefix is checked against the bytes present before anything is
        # sliced, so 0xFFFFFFFF allocates nothing (IN-14).
        if length > end - pos:
            raise MalformedRequest(f"{label}: BYTES length prefix points past the end of its data",
                                   reason="binary_bytes_framing")
        if length > cap:
            raise PayloadTooLarge(f"{label}: BYTES element longer than {cap} bytes")
        if len(values) >= most:
            raise PayloadTooLarge(f"{label}: more than {most} elements")
        values.append(bytes(raw[pos:pos + length]))
        pos += length
    check_count(spec, len(values), limits, MalformedRequest)
    return values


# ---------------------------------------------------------------------------------------
# Upstream outputs
# ---------------------------------------------------------------------------------------


def output_shape(label: str, shape: Sequence[object]) -> list[int]:
    """Plain non-negative ints (upstream adapters may hand over numpy integers)."""
    dims: list[int] = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
            raise UpstreamBadResponse(f"{label}: invalid shape", reason="upstream_bad_output")
        dims.append(int(dim))
    return dims


def checked_output(label: str, tensor: Tensor, shape: list[int]) -> NDArray:
    """The output array in its declared dtype, or a 502: the upstream is not trusted."""
    dtype = DTYPES.get(tensor.datatype)
    array = tensor.data
    if dtype is None or not isinstance(array, np.ndarray):
        raise UpstreamBadResponse(f"{label}: unknown datatype or no data", reason="upstream_bad_output")
    if array.size != math.prod(shape):
        raise UpstreamBadResponse(f"{label}: data does not match its shape", reason="upstream_bad_output")
    if array.dtype != dtype:
        # Widen losslessly (e.g. float32 labelled FP64) or narrow float to float (checked
        # for overflow below); never wrap integers.
        same_floats = array.dtype.kind == "f" and tensor.datatype in FLOAT_TYPES
        if not (np.can_cast(array.dtype, dtype, casting="safe") or same_floats):
            raise UpstreamBadResponse(f"{label}: data type does not match {tensor.datatype}",
                                      reason="upstream_bad_output")
        with np.errstate(over="ignore", invalid="ignore"):
            array = array.astype(dtype)
    array = array.reshape(-1)
    # SECURITY: NaN/inf never reach the client (or DP/PII code) as if they were values (AV-04).
    if tensor.datatype in FLOAT_TYPES and not all_finite(array):
        raise UpstreamBadResponse(f"{label}: non-finite values", reason="upstream_non_finite")
    return array


def output_bytes(label: str, datatype: str, array: NDArray) -> bytes:
    """The binary wire form of a checked output (REST binary extension, gRPC raw contents)."""
    if datatype != "BYTES":
        return array.astype(_LE_DTYPES[datatype], copy=False).tobytes()
    parts: list[bytes] = []
    for item in array.tolist():
        if isinstance(item, str):
            try:
                item = item.encode("utf-8")
            except UnicodeEncodeError:
                raise UpstreamBadResponse(f"{label}: BYTES element is not valid Unicode",
                                          reason="upstream_bad_output") from None
        if not isinstance(item, bytes) or len(item) > 0xFFFFFFFF:
            raise UpstreamBadResponse(f"{label}: BYTES element is not bytes", reason="upstream_bad_output")
        parts.append(len(item).to_bytes(4, "little"))
        parts.append(item)
    return b"".join(parts)
