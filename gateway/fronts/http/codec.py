"""The KServe V2 REST codec: JSON tensors and Triton's binary tensor extension, both ways.

This is the first code that touches attacker bytes after the body reader, so it is
written as a validator, not a parser with checks bolted on: every field is allow-listed,
every number is range-checked before it becomes an array, and nothing is allocated from a
size the client merely declared (only from data it actually sent, which the body cap
already bounds). Pure functions, no aiohttp: the same code serves tests and fake
upstreams.

Status conventions: structure and syntax problems are 400 (:class:`MalformedRequest`),
a well-formed tensor whose values or element count do not fit its declaration is 422
(:class:`InputRejected`), a resource limit is 413 (:class:`PayloadTooLarge`).

# SECURITY: error details name the field and the rule, never a client value (data, ids,
# unknown keys): they may be PII or header-injection payloads, and errors reach logs,
# audit records and response bodies.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from gateway.errors import (
    GatewayError,
    InputRejected,
    MalformedRequest,
    PayloadTooLarge,
    UpstreamBadResponse,
)
from gateway.fronts.tensor_codec import (
    MAX_NAME_LENGTH,
    UNSAFE_TEXT,
    CodecLimits,
    InputSpec,
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
    DTYPES,
    FLOAT_TYPES,
    INT_TYPES,
    InferRequest,
    InferResponse,
    NDArray,
    RequestedOutput,
    Tensor,
)

__all__ = [
    "CodecLimits",
    "decode_infer_request",
    "decode_infer_response",
    "encode_infer_response",
]


_DEFAULT_LIMITS: Final = CodecLimits()

_TOP_KEYS: Final = frozenset({"id", "inputs", "outputs", "parameters"})
_INPUT_KEYS: Final = frozenset({"name", "shape", "datatype", "data", "parameters"})
_OUTPUT_KEYS: Final = frozenset({"name", "parameters"})

_UTF8_BOM: Final = b"\xef\xbb\xbf"
_HEADER_LENGTH: Final = re.compile(r"[0-9]{1,10}")
_BINARY_HINT: Final = " (binary tensor data needs the Inference-Header-Content-Length header)"

_NOT_BRACKETS: Final = bytes(c for c in range(256) if c not in b"[]{}")
_JSON_STRING: Final = re.compile(rb'"[^"]*"')
_DEPTH_STEP: Final = np.zeros(256, dtype=np.int8)
_DEPTH_STEP[list(b"[{")] = 1
_DEPTH_STEP[list(b"]}")] = -1
_DEPTH_CHUNK: Final = 1 << 20

# Magnitudes from which a float64 rounds to infinity when cast (max + half an ulp).
_FLOAT_BOUND: Final = {"FP16": 65520.0, "FP32": 2.0**128 - 2.0**103, "FP64": math.inf}
_NUMBER_TYPES: Final = frozenset({int, float})
_INT_TYPE: Final = frozenset({int})
_BOOL_TYPE: Final = frozenset({bool})
_STR_TYPE: Final = frozenset({str})


# ---------------------------------------------------------------------------------------
# JSON: strict loading
# ---------------------------------------------------------------------------------------


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Object hook that refuses duplicate keys.

    # SECURITY: with duplicates, Python keeps the last value and other parsers the first;
    # the gateway and the upstream must never see different requests (IN-02).
    """
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise MalformedRequest("duplicate key in a JSON object", reason="json_duplicate_key")
    return obj


def _reject_constant(_name: str) -> Any:
    # SECURITY: Python's json accepts NaN/Infinity by default; RFC 8259 does not (IN-06).
    raise MalformedRequest("NaN and Infinity are not JSON numbers", reason="json_non_finite")


def _int_parser(max_digits: int) -> Callable[[str], int]:
    """Refuse long integer literals before int() sees them.

    # SECURITY: str->int is quadratic below CPython's 4300-digit limit and a ValueError
    # above it; an 8 MiB body of 4000-digit integers would otherwise burn CPU (IN-08).
    """

    def parse(literal: str) -> int:
        if len(literal) - (literal[0] == "-") > max_digits:
            raise MalformedRequest(f"integer literal longer than {max_digits} digits",
                                   reason="json_number_too_long")
        return int(literal)

    return parse


@functools.lru_cache(maxsize=8)
def _decoder(max_digits: int) -> json.JSONDecoder:
    """One decoder per digit limit: building a JSONDecoder costs ~2 us a request."""
    return json.JSONDecoder(object_pairs_hook=_unique_object, parse_constant=_reject_constant,
                            parse_int=_int_parser(max_digits))


def _check_depth(raw: bytes, limit: int) -> None:
    """Refuse nesting deeper than ``limit`` before the recursive parser runs.

    Works on the raw UTF-8 bytes (multi-byte sequences never contain ASCII bytes): drop
    escaped backslashes and escaped quotes, so every remaining quote delimits a string;
    drop the strings; what is left of ``[]{}`` is the bracket structure, whose running
    sum is the depth. Up to the first syntax error this is exactly the structure the JSON
    parser would see, and the parser stops there. All steps are linear C-speed passes.

    # SECURITY: json.loads recurses per level; 100,000 ``[`` must not reach it (IN-03).
    """
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return  # fast path: cannot be deeper than the number of openers
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = _JSON_STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    if len(brackets) <= limit:
        return
    depth = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        steps = _DEPTH_STEP[np.frombuffer(brackets[start:start + _DEPTH_CHUNK], dtype=np.uint8)]
        running = np.cumsum(steps, dtype=np.int64) + depth
        if int(running.max()) > limit:
            raise MalformedRequest(f"JSON nested deeper than {limit} levels", reason="json_too_deep")
        depth = int(running[-1])


def _load_json(raw: bytes, limits: CodecLimits, *, hint: str = "", header_bytes: int | None = None) -> Any:
    # SECURITY: strict UTF-8 only. json.loads(bytes) would sniff UTF-16/32, and a BOM is
    # an interoperability trap (IN-15, RFC 8259 §8.1).
    if raw.startswith(_UTF8_BOM):
        raise MalformedRequest("the JSON body must not start with a byte order mark", reason="json_invalid")
    _check_depth(raw, limits.max_json_depth)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedRequest(f"the JSON body is not valid UTF-8{hint}", reason="json_invalid") from None
    try:
        # parse_float stays the C float(): literals that overflow become inf and are
        # refused where numbers are allowed at all (tensor data); it is 10x cheaper.
        return _decoder(limits.max_number_digits).decode(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":
            raise MalformedRequest(f"trailing bytes after the JSON value{hint}", reason="json_invalid") from None
        raise MalformedRequest(_not_json(header_bytes), reason="json_invalid") from None
    except (ValueError, RecursionError):
        raise MalformedRequest(_not_json(header_bytes), reason="json_invalid") from None


def _not_json(header_bytes: int | None) -> str:
    """Which bytes were not JSON. With Inference-Header-Content-Length only its first N
    bytes are: tritonclient.http writes that header into the caller's ``headers`` dict, so
    a dict reused from a binary request sends a stale length with a plain JSON body, whose
    JSON is valid and whose refusal must say why."""
    if header_bytes is None:
        return "the body is not valid JSON"
    return (f"the JSON header is not valid JSON (the body's first {header_bytes} bytes, "
            f"as Inference-Header-Content-Length says)")


# ---------------------------------------------------------------------------------------
# Request decoding
# ---------------------------------------------------------------------------------------


def _parse_header_length(value: str, body_length: int) -> int:
    # SECURITY: Triton parses this header with atoi(); we accept only plain decimal
    # digits so "+5", "-1", "0x10", " 5" cannot mean different things to us and to it.
    if not _HEADER_LENGTH.fullmatch(value):
        raise MalformedRequest("Inference-Header-Content-Length must be a decimal byte count",
                               reason="binary_header_length")
    length = int(value)
    if length > body_length:
        raise MalformedRequest("Inference-Header-Content-Length exceeds the body length",
                               reason="binary_header_length")
    return length


def decode_infer_request(model: str, version: str, body: bytes, *, header_length: str | None,
                         limits: CodecLimits) -> InferRequest:
    """Validate and decode a V2 ``/infer`` body (JSON, or JSON + binary section).

    ``header_length`` is the raw ``Inference-Header-Content-Length`` value. Everything
    the gateway does not understand is refused rather than dropped, because a dropped
    field is a field the gateway did not check but the upstream might honour.
    """
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        split = _parse_header_length(header_length, len(body))
        header, binary = body[:split], memoryview(body)[split:]
    doc = _load_json(bytes(header), limits, hint=_BINARY_HINT if header_length is None else "",
                     header_bytes=None if header_length is None else len(header))
    if type(doc) is not dict:
        raise MalformedRequest("the request must be a JSON object", reason="request_invalid")
    if not doc.keys() <= _TOP_KEYS:
        raise MalformedRequest("unknown top-level field (allowed: id, inputs, outputs, parameters)",
                               reason="request_unknown_field")

    request_id = _decode_id(doc, limits)
    binary_data_output = _decode_request_parameters(doc)
    specs = _decode_input_specs(doc, limits)
    outputs = _decode_outputs(doc, limits)

    # SECURITY: the declared binary sizes must tile the binary section exactly: no
    # smuggled trailing bytes, no input reading past the end (IN-12, IN-13).
    declared = sum(spec.binary_size for spec in specs if spec.binary_size is not None)
    if declared != len(binary):
        raise MalformedRequest("binary_data_size values must add up to the length of the binary data "
                               "after the JSON header", reason="binary_size_mismatch")

    tensors: list[Tensor] = []
    offset = 0
    for spec in specs:
        if spec.binary_size is None:
            data = _json_tensor(spec, limits)
        else:
            chunk = binary[offset:offset + spec.binary_size]
            offset += spec.binary_size
            data = binary_tensor(spec, chunk, limits)
        tensors.append(Tensor(name=spec.name, datatype=spec.datatype, shape=spec.shape, data=data))
    return InferRequest(model=model, version=version, inputs=tensors, outputs=outputs, id=request_id,
                        binary_data_output=binary_data_output)


def _decode_id(doc: dict[str, Any], limits: CodecLimits) -> str | None:
    if "id" not in doc:
        return None
    value = doc["id"]
    # SECURITY: the id is echoed in the response and lands in logs and audit records:
    # bounded, no CR/LF or other controls (header/log injection), no lone surrogates
    # (UnicodeEncodeError in every later encoder) (IN-17, IN-18).
    if type(value) is not str or len(value) > limits.max_id_length or UNSAFE_TEXT.search(value):
        raise MalformedRequest(f"id must be a string of at most {limits.max_id_length} characters "
                               "without control characters", reason="request_invalid_id")
    return value


def _decode_request_parameters(doc: dict[str, Any]) -> bool:
    params = doc.get("parameters", {})
    if type(params) is not dict:
        raise MalformedRequest("parameters must be a JSON object", reason="request_invalid")
    binary_data_output = False
    for key, value in params.items():
        if key != "binary_data_output":
            # SECURITY: reserved Triton parameters (sequence_id, priority, timeout, ...)
            # would let a tenant steer scheduling or join another tenant's sequence;
            # nothing but what the gateway itself understands is forwarded (AUTHZ-12).
            raise MalformedRequest(f"request {parameter_label(key)} is not allowed "
                                   "(only binary_data_output)", reason="request_parameter")
        if type(value) is not bool:
            raise MalformedRequest("request parameter 'binary_data_output' must be true or false",
                                   reason="request_parameter")
        binary_data_output = value
    return binary_data_output


def _decode_input_specs(doc: dict[str, Any], limits: CodecLimits) -> list[InputSpec]:
    inputs = doc.get("inputs")
    if type(inputs) is not list or not inputs:
        raise MalformedRequest("inputs must be a non-empty JSON array", reason="request_invalid")
    if len(inputs) > limits.max_inputs:
        raise PayloadTooLarge(f"more than {limits.max_inputs} inputs")
    specs: list[InputSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(inputs):
        if type(item) is not dict:
            raise MalformedRequest(f"inputs[{index}] must be a JSON object", reason="request_invalid")
        name = item.get("name")
        if not valid_tensor_name(name):
            raise MalformedRequest(f"inputs[{index}]: name must be 1 to {MAX_NAME_LENGTH} printable "
                                   "ASCII characters", reason="input_invalid_name")
        label = input_label(index, name)
        if not item.keys() <= _INPUT_KEYS:
            raise MalformedRequest(f"{label}: unknown field (allowed: name, shape, datatype, data, "
                                   "parameters)", reason="input_unknown_field")
        if name in seen:
            raise MalformedRequest(f"{label}: duplicate input name", reason="input_duplicate")
        seen.add(name)
        shape = _decode_shape(label, item.get("shape"), limits)
        datatype = item.get("datatype")
        if type(datatype) is not str or datatype not in DTYPES:
            raise MalformedRequest(f"{label}: datatype must be one of {', '.join(DTYPES)}",
                                   reason="input_invalid_datatype")
        binary_size = _decode_input_parameters(label, item.get("parameters", {}))
        if ("data" in item) == (binary_size is not None):
            raise MalformedRequest(f"{label}: give exactly one of data or parameters.binary_data_size",
                                   reason="input_data_source")
        specs.append(InputSpec(label=label, name=name, datatype=datatype, shape=shape,
                               count=math.prod(shape), data=item.get("data"), binary_size=binary_size))
    return specs


def _decode_shape(label: str, shape: object, limits: CodecLimits) -> tuple[int, ...]:
    if type(shape) is not list:
        raise MalformedRequest(f"{label}: shape must be a JSON array of integers",
                               reason="input_invalid_shape")
    if len(shape) > limits.max_dims:
        raise MalformedRequest(f"{label}: shape has more than {limits.max_dims} dimensions",
                               reason="input_invalid_shape")
    for dim in shape:
        # `type(...) is int` on purpose: bool is an int subclass, floats are not dims.
        if type(dim) is not int or dim < 0:
            raise MalformedRequest(f"{label}: shape dimensions must be non-negative integers",
                                   reason="input_invalid_shape")
    return tuple(shape)


def _decode_input_parameters(label: str, params: object) -> int | None:
    if type(params) is not dict:
        raise MalformedRequest(f"{label}: parameters must be a JSON object", reason="input_parameter")
    binary_size: int | None = None
    for key, value in params.items():
        if key != "binary_data_size":
            # SECURITY: shared_memory_* would make the upstream read its own memory.
            raise MalformedRequest(f"{label}: {parameter_label(key)} is not allowed "
                                   "(only binary_data_size)", reason="input_parameter")
        if type(value) is not int or value < 0:
            raise MalformedRequest(f"{label}: binary_data_size must be a non-negative integer",
                                   reason="input_parameter")
        binary_size = value
    return binary_size


def _decode_outputs(doc: dict[str, Any], limits: CodecLimits) -> list[RequestedOutput]:
    outputs = doc.get("outputs", [])
    if type(outputs) is not list:
        raise MalformedRequest("outputs must be a JSON array", reason="request_invalid")
    if len(outputs) > limits.max_inputs:
        raise PayloadTooLarge(f"more than {limits.max_inputs} requested outputs")
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(outputs):
        if type(item) is not dict:
            raise MalformedRequest(f"outputs[{index}] must be a JSON object", reason="request_invalid")
        name = item.get("name")
        if not valid_tensor_name(name):
            raise MalformedRequest(f"outputs[{index}]: name must be 1 to {MAX_NAME_LENGTH} printable "
                                   "ASCII characters", reason="output_invalid_name")
        label = output_label(index, name)
        if not item.keys() <= _OUTPUT_KEYS:
            raise MalformedRequest(f"{label}: unknown field (allowed: name, parameters)",
                                   reason="output_unknown_field")
        if name in seen:
            raise MalformedRequest(f"{label}: duplicate output name", reason="output_duplicate")
        seen.add(name)
        params = item.get("parameters", {})
        if type(params) is not dict:
            raise MalformedRequest(f"{label}: parameters must be a JSON object", reason="output_parameter")
        binary: bool | None = None
        for key, value in params.items():
            if key == "classification":
                raise MalformedRequest(f"{label}: the classification extension is not supported",
                                       reason="output_parameter")
            if key != "binary_data":
                raise MalformedRequest(f"{label}: {parameter_label(key)} is not allowed (only binary_data)",
                                       reason="output_parameter")
            if type(value) is not bool:
                raise MalformedRequest(f"{label}: binary_data must be true or false",
                                       reason="output_parameter")
            binary = value
        result.append(RequestedOutput(name=name, binary=binary))
    return result


# ---------------------------------------------------------------------------------------
# Tensor data
# ---------------------------------------------------------------------------------------


def _flatten_nested(label: str, data: list[Any], shape: tuple[int, ...]) -> list[Any]:
    """Flatten row-major nested lists that must mirror ``shape`` exactly.

    Level by level (iterative, no recursion); a length that disagrees with the shape
    stops the walk at once, so an absurd declared dimension costs nothing.
    """
    level: list[Any] = [data]
    for dim in shape:
        following: list[Any] = []
        for item in level:
            if type(item) is not list or len(item) != dim:
                raise InputRejected(f"{label}: nested data does not match the shape",
                                    reason="input_wrong_shape")
            following += item
        level = following
    return level


def _json_tensor(spec: InputSpec, limits: CodecLimits) -> NDArray:
    data = spec.data
    if type(data) is not list:
        raise MalformedRequest(f"{spec.label}: data must be a JSON array", reason="input_invalid_data")
    types = set(map(type, data))
    if list in types:
        data = _flatten_nested(spec.label, data, spec.shape)
        types = set(map(type, data))
        if list in types:
            raise InputRejected(f"{spec.label}: nested data does not match the shape",
                                reason="input_wrong_shape")
    check_count(spec, len(data), limits, InputRejected)
    array = _convert_json_values(spec, data, types, limits)
    return array.reshape(spec.shape)


def _convert_json_values(spec: InputSpec, data: list[Any], types: set[type], limits: CodecLimits) -> NDArray:
    """Typed conversion that never coerces: no bool as number, no string as number,
    no wrap-around, no silent overflow to infinity."""
    datatype, label = spec.datatype, spec.label
    if datatype in FLOAT_TYPES:
        if not types <= _NUMBER_TYPES:
            raise InputRejected(f"{label}: {datatype} data must be JSON numbers", reason="input_wrong_type")
        try:
            wide = np.array(data, dtype=np.float64)
        except OverflowError:  # an integer beyond float64 (only with max_number_digits > 308)
            raise MalformedRequest(f"{label}: number out of range", reason="json_number_out_of_range") from None
        if not wide.size:
            return wide.astype(DTYPES[datatype])
        # NaN literals are refused by the parser, so min/max see every non-finite value;
        # two reductions are cheaper than isfinite() masks on the hot path.
        low, high = float(wide.min()), float(wide.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            # The literal itself overflowed (1e400): a number JSON cannot carry for us.
            raise MalformedRequest(f"{label}: number out of range", reason="json_number_out_of_range")
        bound = _FLOAT_BOUND[datatype]
        if low <= -bound or high >= bound:
            raise InputRejected(f"{label}: value out of range for {datatype}", reason="input_out_of_range")
        return wide if datatype == "FP64" else wide.astype(DTYPES[datatype])
    if datatype in INT_TYPES:
        if not types <= _INT_TYPE:
            raise InputRejected(f"{label}: {datatype} data must be JSON integers", reason="input_wrong_type")
        try:
            return np.array(data, dtype=DTYPES[datatype])
        except OverflowError:
            raise InputRejected(f"{label}: value out of range for {datatype}",
                                reason="input_out_of_range") from None
    if datatype == "BOOL":
        if not types <= _BOOL_TYPE:
            raise InputRejected(f"{label}: BOOL data must be true or false", reason="input_wrong_type")
        return np.array(data, dtype=np.bool_)
    # BYTES
    if not types <= _STR_TYPE:
        raise InputRejected(f"{label}: BYTES data must be JSON strings", reason="input_wrong_type")
    cap = limits.max_bytes_element
    encoded: list[bytes] = []
    for text in data:
        try:
            value = text.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedRequest(f"{label}: BYTES element is not valid Unicode (lone surrogate)",
                                   reason="input_invalid_data") from None
        if len(value) > cap:
            raise PayloadTooLarge(f"{label}: BYTES element longer than {cap} bytes")
        encoded.append(value)
    return object_array(encoded)


# ---------------------------------------------------------------------------------------
# Response encoding
# ---------------------------------------------------------------------------------------


def encode_infer_response(resp: InferResponse, requested: list[RequestedOutput], *,
                          binary_default: bool) -> tuple[bytes, dict[str, str]]:
    """Encode a response the way the client asked for each output.

    An output is binary when its request said ``binary_data: true``, or said nothing and
    ``binary_default`` (the request's ``binary_data_output``) is set. Returns the body and
    the headers the front must set.
    """
    choice = {out.name: out.binary for out in requested}
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for index, tensor in enumerate(resp.outputs):
        label = output_label(index, tensor.name)
        shape = output_shape(label, tensor.shape)
        array = checked_output(label, tensor, shape)
        wanted = choice.get(tensor.name)
        binary = binary_default if wanted is None else wanted
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": shape}
        if binary:
            payload = output_bytes(label, tensor.datatype, array)
            entry["parameters"] = {"binary_data_size": len(payload)}
            chunks.append(payload)
        else:
            entry["data"] = _output_json(label, tensor.datatype, array)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id is not None:
        doc["id"] = resp.id
    doc["outputs"] = entries
    try:
        header = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError):
        raise UpstreamBadResponse("the response could not be encoded", reason="upstream_bad_output") from None
    if not chunks:
        return header, {"Content-Type": "application/json"}
    headers = {"Content-Type": "application/octet-stream",
               "Inference-Header-Content-Length": str(len(header))}
    return b"".join([header, *chunks]), headers


def _output_json(label: str, datatype: str, array: NDArray) -> list[Any]:
    if datatype != "BYTES":
        values: list[Any] = array.tolist()
        return values
    texts: list[str] = []
    for item in array.tolist():
        if isinstance(item, bytes):
            try:
                texts.append(item.decode("utf-8"))
            except UnicodeDecodeError:
                raise InputRejected(f"{label} is not valid UTF-8; request it with binary_data: true",
                                    reason="output_not_utf8") from None
        elif isinstance(item, str):
            texts.append(item)
        else:
            raise UpstreamBadResponse(f"{label}: BYTES element is not bytes", reason="upstream_bad_output")
    return texts


# ---------------------------------------------------------------------------------------
# Response decoding (tests, fake upstreams)
# ---------------------------------------------------------------------------------------


def decode_infer_response(body: bytes, header_length: int | None) -> InferResponse:
    """Decode a V2 infer response; any defect is an :class:`UpstreamBadResponse`.

    Less strict than the request decoder (extra fields are ignored) because its input
    comes from a server, but still bounded: depth, number and framing checks stay on.
    """
    try:
        return _decode_response(body, header_length)
    except UpstreamBadResponse:
        raise
    except (GatewayError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        detail = exc.detail if isinstance(exc, GatewayError) else "malformed inference response"
        raise UpstreamBadResponse(detail, reason="upstream_bad_response") from None


def _decode_response(body: bytes, header_length: int | None) -> InferResponse:
    limits = _DEFAULT_LIMITS
    if header_length is None:
        header, binary = body, memoryview(b"")
    else:
        if not 0 <= header_length <= len(body):
            raise ValueError("header length out of range")
        header, binary = body[:header_length], memoryview(body)[header_length:]
    doc = _load_json(bytes(header), limits)
    if type(doc) is not dict or type(doc.get("outputs", [])) is not list:
        raise ValueError("not a response object")
    outputs: list[Tensor] = []
    offset = 0
    for index, item in enumerate(doc.get("outputs", [])):
        name, datatype = item["name"], item["datatype"]
        if type(name) is not str or datatype not in DTYPES:
            raise ValueError("bad output")
        spec = InputSpec(label=output_label(index, name), name=name, datatype=datatype,
                         shape=_decode_shape(f"outputs[{index}]", item["shape"], limits),
                         count=0, data=item.get("data"), binary_size=None)
        spec.count = math.prod(spec.shape)
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0 or offset + size > len(binary):
                raise ValueError("bad binary_data_size")
            data = binary_tensor(spec, binary[offset:offset + size], limits)
            offset += size
        else:
            data = _json_tensor(spec, limits)
        outputs.append(Tensor(name=name, datatype=datatype, shape=spec.shape, data=data))
    if offset != len(binary):
        raise ValueError("binary section has unclaimed bytes")
    model_version = doc.get("model_version", "")
    response_id = doc.get("id")
    return InferResponse(
        model_name=str(doc.get("model_name", "")),
        model_version=str(model_version),
        outputs=outputs,
        id=response_id if isinstance(response_id, str) else None,
    )
