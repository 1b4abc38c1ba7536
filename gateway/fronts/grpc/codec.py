"""The KServe V2 gRPC codec: ``ModelInferRequest`` protos in, ``ModelInferResponse`` out.

The protobuf parser already did the syntax (types, framing, UTF-8 of strings); what is
left is the same validation the REST codec applies to JSON and binary tensors, with the
same limits, reason codes and status classes, so a client gets the same refusal through
either front:

- names, datatypes, shapes (``>= 0``, at most ``max_dims``), element caps, id rules;
- exactly one data source per input: either every input is in ``raw_input_contents``
  (one entry per input, in order, as tritonclient sends them) or each input uses the one
  typed ``contents`` field of its datatype;
- raw bytes must be exactly the size the shape needs; BYTES elements are 4-byte
  little-endian length prefixes whose lengths are checked before anything is sliced;
- NaN and infinity refused in FP16/FP32/FP64; INT8/INT16/UINT8/UINT16 values, which
  travel in 32-bit typed fields, range-checked; BOOL raw bytes must be 0 or 1;
- no parameters anywhere (request, input or output): every one Triton defines
  (``sequence_id``, ``priority``, ``timeout``, ``shared_memory_*``, ``classification``)
  changes what the upstream does in ways the gateway does not check;
- no unknown protobuf fields: a field from a newer proto the gateway cannot see might be
  honoured by a newer Triton.

The rule implementations shared with the REST codec (BYTES framing, counting, output
checks, name and id rules) live in :mod:`gateway.fronts.tensor_codec` and are used by both
rather than copied, so the two fronts cannot drift apart.

# SECURITY: error details name the field and the rule, never a client value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2

from gateway.errors import InputRejected, MalformedRequest, NotFound, PayloadTooLarge
from gateway.fronts.tensor_codec import (
    MAX_NAME_LENGTH,
    UNSAFE_TEXT,
    CodecLimits,
    InputSpec,
    all_finite,
    binary_tensor,
    check_count,
    checked_output,
    input_label,
    object_array,
    output_bytes,
    output_label,
    output_shape,
    parameter_label,
    valid_tensor_name,
)
from gateway.kserve import (
    CONTENTS_FIELD,
    DTYPES,
    FLOAT_TYPES,
    InferRequest,
    InferResponse,
    NDArray,
    RequestedOutput,
    Tensor,
)
from gateway.stages.model_exposure import UNKNOWN_MODEL

__all__ = [
    "CodecLimits",
    "check_model_ref",
    "decode_model_infer_request",
    "encode_model_infer_response",
]

# The REST front's path rules for a model name and version (gateway/fronts/http/routes.py),
# so a name reachable over one front is reachable over the other and nothing else is.
MODEL_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")
MODEL_VERSION: Final = re.compile(r"[0-9]{1,19}")

# Numpy dtype of each typed field, so values are read at the field's own width first and
# range-checked before narrowing (no silent wrap-around of 300 into an INT8).
_FIELD_DTYPE: Final[dict[str, np.dtype[Any]]] = {
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_NARROW_INTS: Final = frozenset({"INT8", "INT16", "UINT8", "UINT16"})
_PARAMETER_ORDER: Final = {name: rank for rank, name in enumerate(
    ("sequence_id", "sequence_start", "sequence_end", "priority", "timeout"))}


def check_model_ref(name: str, version: str) -> None:
    """Refuse a model name or version the REST front could not even route.

    Same answer as the REST front for the same name: 404 with the unknown-model text, so
    an odd name reveals nothing (and never reaches a log or the upstream).
    """
    if not MODEL_NAME.fullmatch(name):
        raise NotFound(UNKNOWN_MODEL, reason="model_name_invalid")
    if version and not MODEL_VERSION.fullmatch(version):
        raise NotFound(UNKNOWN_MODEL, reason="model_version_invalid")


# ---------------------------------------------------------------------------------------
# Request decoding
# ---------------------------------------------------------------------------------------


def decode_model_infer_request(request: Any, *, limits: CodecLimits) -> InferRequest:
    """Validate a ``ModelInferRequest`` and convert it to an :class:`InferRequest`.

    The model name and version are taken as they are: the front has checked them with
    :func:`check_model_ref` before authentication, exactly where the REST front routes.
    """
    _refuse_unknown_fields(request, "the request")
    request_id = _decode_id(request.id, limits)
    _refuse_parameters(request.parameters, "request ")
    inputs = request.inputs
    if not inputs:
        raise MalformedRequest("inputs must be a non-empty list", reason="request_invalid")
    if len(inputs) > limits.max_inputs:
        raise PayloadTooLarge(f"more than {limits.max_inputs} inputs")
    raw = request.raw_input_contents
    # SECURITY: Triton pairs raw_input_contents with inputs by position; a count that
    # differs would make the gateway and the upstream disagree on which bytes are whose.
    if raw and len(raw) != len(inputs):
        raise MalformedRequest("raw_input_contents must hold exactly one entry per input, or none",
                               reason="input_data_source")
    specs = _decode_input_specs(inputs, limits)
    outputs = _decode_outputs(request.outputs, limits)
    tensors: list[Tensor] = []
    for index, (spec, item) in enumerate(zip(specs, inputs, strict=True)):
        populated = [field.name for field, _ in item.contents.ListFields()]
        if raw:
            if populated:
                raise MalformedRequest(f"{spec.label}: give exactly one of contents or raw_input_contents",
                                       reason="input_data_source")
            data = _raw_tensor(spec, memoryview(raw[index]), limits)
        else:
            data = _typed_tensor(spec, item.contents, populated, limits)
        tensors.append(Tensor(name=spec.name, datatype=spec.datatype, shape=spec.shape, data=data))
    return InferRequest(model=str(request.model_name), version=str(request.model_version), inputs=tensors,
                        outputs=outputs, id=request_id)


def decode_model_infer_bytes(wire: bytes, *, limits: CodecLimits) -> InferRequest:
    """:func:`decode_model_infer_request` of a serialized message, for the decode worker
    process (fronts/decode_pool.py): it gets the bytes as they came off the wire, since a
    parsed message of tritonclient's generated classes cannot be pickled."""
    try:
        message = service_pb2.ModelInferRequest.FromString(wire)
    except DecodeError as exc:
        raise MalformedRequest("the message is not a valid protobuf request",
                               reason="request_invalid_protobuf") from exc
    return decode_model_infer_request(message, limits=limits)


def _refuse_unknown_fields(message: Any, where: str) -> None:
    # SECURITY: protobuf keeps fields it cannot name; refuse rather than drop them, so
    # nothing reaches the model that the gateway did not check (same rule as JSON keys).
    if len(unknown_fields.UnknownFieldSet(message)):
        raise MalformedRequest(f"{where} has fields this gateway does not accept",
                               reason="request_unknown_field")


def _decode_id(value: str, limits: CodecLimits) -> str | None:
    if not value:
        return None  # proto3: an empty id and no id are the same message
    # SECURITY: echoed in the response, logs and audit records: bounded, no control
    # characters (log/header injection), no separators (IN-17, IN-18).
    if len(value) > limits.max_id_length or UNSAFE_TEXT.search(value):
        raise MalformedRequest(f"id must be a string of at most {limits.max_id_length} characters "
                               "without control characters", reason="request_invalid_id")
    return value


def _refuse_parameters(params: Any, where: str, *, reason: str = "request_parameter") -> None:
    if not len(params):
        return
    # Map order is arbitrary: name the first in the order tritonclient writes them (as
    # the REST front, reading JSON in order, does), then the rest sorted, so the same
    # request always gets the same message.
    key = min(params, key=lambda k: (_PARAMETER_ORDER.get(k, len(_PARAMETER_ORDER)), k))
    # SECURITY: reserved Triton parameters would let a tenant steer scheduling
    # (priority, timeout), join another tenant's sequence (sequence_id) or make the
    # upstream read its own memory (shared_memory_*); none is forwarded (AUTHZ-12).
    raise MalformedRequest(f"{where}{parameter_label(key)} is not allowed (this front accepts no parameters)",
                           reason=reason)


def _decode_input_specs(inputs: Sequence[Any], limits: CodecLimits) -> list[InputSpec]:
    specs: list[InputSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(inputs):
        name = str(item.name)
        if not valid_tensor_name(name):
            raise MalformedRequest(f"inputs[{index}]: name must be 1 to {MAX_NAME_LENGTH} printable "
                                   "ASCII characters", reason="input_invalid_name")
        label = input_label(index, name)
        _refuse_unknown_fields(item, label)
        _refuse_unknown_fields(item.contents, label)
        if name in seen:
            raise MalformedRequest(f"{label}: duplicate input name", reason="input_duplicate")
        seen.add(name)
        shape = _decode_shape(label, item.shape, limits)
        datatype = str(item.datatype)
        if datatype not in DTYPES:
            raise MalformedRequest(f"{label}: datatype must be one of {', '.join(DTYPES)}",
                                   reason="input_invalid_datatype")
        _refuse_parameters(item.parameters, f"{label}: ", reason="input_parameter")
        specs.append(InputSpec(label=label, name=name, datatype=datatype, shape=shape,
                               count=math.prod(shape), data=None, binary_size=None))
    return specs


def _decode_shape(label: str, shape: Sequence[int], limits: CodecLimits) -> tuple[int, ...]:
    if len(shape) > limits.max_dims:
        raise MalformedRequest(f"{label}: shape has more than {limits.max_dims} dimensions",
                               reason="input_invalid_shape")
    dims = tuple(int(dim) for dim in shape)
    if any(dim < 0 for dim in dims):
        raise MalformedRequest(f"{label}: shape dimensions must be non-negative integers",
                               reason="input_invalid_shape")
    return dims


def _decode_outputs(outputs: Sequence[Any], limits: CodecLimits) -> list[RequestedOutput]:
    if len(outputs) > limits.max_inputs:
        raise PayloadTooLarge(f"more than {limits.max_inputs} requested outputs")
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(outputs):
        name = str(item.name)
        if not valid_tensor_name(name):
            raise MalformedRequest(f"outputs[{index}]: name must be 1 to {MAX_NAME_LENGTH} printable "
                                   "ASCII characters", reason="output_invalid_name")
        label = output_label(index, name)
        _refuse_unknown_fields(item, label)
        if name in seen:
            raise MalformedRequest(f"{label}: duplicate output name", reason="output_duplicate")
        seen.add(name)
        if "classification" in item.parameters:
            raise MalformedRequest(f"{label}: the classification extension is not supported",
                                   reason="output_parameter")
        _refuse_parameters(item.parameters, f"{label}: ", reason="output_parameter")
        result.append(RequestedOutput(name=name))
    return result


# ---------------------------------------------------------------------------------------
# Tensor data
# ---------------------------------------------------------------------------------------


def _raw_tensor(spec: InputSpec, raw: memoryview, limits: CodecLimits) -> NDArray:
    """One ``raw_input_contents`` entry: exactly the binary extension's rules."""
    return binary_tensor(spec, raw, limits, source="raw_input_contents")


def _typed_tensor(spec: InputSpec, contents: Any, populated: list[str], limits: CodecLimits) -> NDArray:
    """An input in the typed ``contents`` field of its datatype (and in no other field)."""
    datatype, label = spec.datatype, spec.label
    expected = CONTENTS_FIELD.get(datatype)
    if any(field != expected for field in populated):
        where = expected or "raw_input_contents"
        raise InputRejected(f"{label}: {datatype} data must be in {where}", reason="input_wrong_type")
    if not populated and spec.count:
        raise MalformedRequest(f"{label}: give exactly one of contents or raw_input_contents",
                               reason="input_data_source")
    values = getattr(contents, expected) if expected is not None else ()
    check_count(spec, len(values), limits, InputRejected)
    if expected is None or not len(values):
        return np.empty(spec.shape, dtype=DTYPES[datatype])
    if datatype == "BYTES":
        cap = limits.max_bytes_element
        for value in values:
            if len(value) > cap:
                raise PayloadTooLarge(f"{label}: BYTES element longer than {cap} bytes")
        return object_array([bytes(value) for value in values]).reshape(spec.shape)
    if datatype == "BOOL":
        return np.fromiter(values, dtype=np.bool_, count=len(values)).reshape(spec.shape)
    wide = np.fromiter(values, dtype=_FIELD_DTYPE[expected], count=len(values))
    if datatype in FLOAT_TYPES:
        if not all_finite(wide):
            raise InputRejected(f"{label}: NaN and infinity are not accepted", reason="input_non_finite")
        return wide.reshape(spec.shape)
    if datatype in _NARROW_INTS:
        info = np.iinfo(DTYPES[datatype])
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InputRejected(f"{label}: value out of range for {datatype}", reason="input_out_of_range")
    return wide.astype(DTYPES[datatype]).reshape(spec.shape)


# ---------------------------------------------------------------------------------------
# Response encoding
# ---------------------------------------------------------------------------------------


def encode_model_infer_response(resp: InferResponse) -> Any:
    """A ``ModelInferResponse`` with every output in ``raw_output_contents`` (as Triton does).

    The outputs are checked exactly as the REST encoder checks them (declared datatype,
    shape matching the data, no NaN/inf): a defect is an :class:`UpstreamBadResponse`.
    """
    message = service_pb2.ModelInferResponse(model_name=resp.model_name, model_version=resp.model_version,
                                              id=resp.id or "")
    for index, tensor in enumerate(resp.outputs):
        label = output_label(index, tensor.name)
        shape = output_shape(label, tensor.shape)
        array = checked_output(label, tensor, shape)
        message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        message.raw_output_contents.append(output_bytes(label, tensor.datatype, array))
    return message
