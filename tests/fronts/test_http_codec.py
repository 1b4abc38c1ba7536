"""The KServe V2 REST codec: every refusal rule, both wire forms, and tritonclient interop.

Refusals are table-driven: one row per attack or rule (catalogue §1.4 IDs in comments).
Every refusal is also checked for echoing client values (canaries below), because error
details reach response bodies, logs and audit records.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from typing import Any, Final

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from gateway.errors import (
    GatewayError,
    InputRejected,
    MalformedRequest,
    PayloadTooLarge,
    UpstreamBadResponse,
)
from gateway.fronts.http import codec
from gateway.fronts.http.codec import (
    CodecLimits,
    decode_infer_request,
    decode_infer_response,
    encode_infer_response,
)
from gateway.kserve import DTYPES, InferRequest, InferResponse, RequestedOutput, Tensor

LIMITS = CodecLimits()

# Values that must never appear in an error message.
CANARIES = ("john.doe@example.com", "078-05-1120", "4111111111111111", "Set-Cookie", "evil", "\r", "\n")


def _input(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP: Any = object()


def _req(*inputs: dict[str, Any], **top: Any) -> bytes:
    doc: dict[str, Any] = {"inputs": list(inputs) or [_input()]}
    doc.update(top)
    return json.dumps(doc).encode()


def _bin(header: dict[str, Any], *chunks: bytes) -> tuple[bytes, str]:
    """A binary-extension body and its Inference-Header-Content-Length value."""
    head = json.dumps(header).encode()
    return head + b"".join(chunks), str(len(head))


def _bin_input(name: str, shape: list[int], datatype: str, size: int) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


def _decode(body: bytes, header_length: str | None = None, limits: CodecLimits = LIMITS) -> InferRequest:
    return decode_infer_request("m", "1", body, header_length=header_length, limits=limits)


def _nested(depth: int) -> bytes:
    head = b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":'
    return head + b"[" * depth + b"1" + b"]" * depth + b"}]}"


F32_NAN, F32_INF, F32_NINF = (struct.pack("<I", v) for v in (0x7FC00000, 0x7F800000, 0xFF800000))

# (body, Inference-Header-Content-Length, expected error, substring of the message)
REFUSALS: list[tuple[bytes, str | None, type[GatewayError], str]] = [
    # --- JSON syntax -------------------------------------------------------------------
    # IN-01 truncated JSON
    (b'{"inputs":[{"name":"x"', None, MalformedRequest, "not valid JSON"),
    # empty body
    (b"", None, MalformedRequest, "not valid JSON"),
    # IN-02 duplicate top-level key
    (b'{"inputs":[],"inputs":[]}', None, MalformedRequest, "duplicate key"),
    # IN-02 duplicate key inside an input
    (b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4],"name":"y"}]}', None,
     MalformedRequest, "duplicate key"),
    # duplicate key deep inside parameters
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4,'
     b'"binary_data_size":0}}]}', None, MalformedRequest, "duplicate key"),
    # IN-03 data nested 100,000 levels deep
    (_nested(100_000), None, MalformedRequest, "deeper than 32"),
    # depth 33: one past the limit
    (b"[" * 33 + b"]" * 33, None, MalformedRequest, "deeper than 32"),
    # an escaped quote inside a string must not flip the scanner's idea of what is a string
    (b'{"id":"\\"' + b"[" * 40 + b'"}' + b"[" * 40, None, MalformedRequest, "deeper than 32"),
    # an escaped backslash before a closing quote must not hide the brackets after it
    (b'{"id":"\\\\",' + b'"x":' + b"[" * 40, None, MalformedRequest, "deeper than 32"),
    # IN-06 NaN / Infinity / -Infinity literals
    (_req(_input(data=[1, 2, 3, float("nan")])), None, MalformedRequest, "NaN"),
    (_req(_input(data=[1, 2, 3, float("inf")])), None, MalformedRequest, "NaN"),
    (_req(_input(data=[1, 2, 3, float("-inf")])), None, MalformedRequest, "NaN"),
    # NaN outside tensor data is refused by the parser too
    (b'{"id":NaN,"inputs":[]}', None, MalformedRequest, "NaN"),
    # IN-08 float literal overflowing to infinity
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP64","data":[1e400]}]}', None,
     MalformedRequest, "out of range"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[-1e400]}]}', None,
     MalformedRequest, "out of range"),
    # IN-08 integer literals of 101, 5,000 and 100,000 digits
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[' + b"9" * 101 + b"]}]}", None,
     MalformedRequest, "100 digits"),
    (b'{"inputs":[{"name":"x","shape":[1],"datatype":"INT64","data":[-' + b"9" * 5000 + b"]}]}", None,
     MalformedRequest, "100 digits"),
    (b'{"inputs":[{"name":"x","shape":[' + b"1" * 100_000 + b'],"datatype":"FP32","data":[1]}]}', None,
     MalformedRequest, "100 digits"),
    # IN-15 UTF-8 byte order mark
    (b"\xef\xbb\xbf" + _req(), None, MalformedRequest, "byte order mark"),
    # IN-15 UTF-16 with and without BOM
    (b"\xff\xfe" + _req().decode().encode("utf-16-le"), None, MalformedRequest, "UTF-8"),
    (_req().decode().encode("utf-16-le"), None, MalformedRequest, "not valid JSON"),
    # invalid UTF-8 (an encoded surrogate) inside a string
    (b'{"id":"\xed\xa0\x80","inputs":[]}', None, MalformedRequest, "UTF-8"),
    # raw control character inside a JSON string
    (b'{"id":"a\x01b","inputs":[]}', None, MalformedRequest, "not valid JSON"),
    # top level is not an object
    (b"[]", None, MalformedRequest, "JSON object"),
    (b'"inputs"', None, MalformedRequest, "JSON object"),
    # binary data without the Inference-Header-Content-Length header (IN-12)
    (_req() + b"\x00\x00\x80\x3f", None, MalformedRequest, "Inference-Header-Content-Length"),
    # --- top level and request parameters --------------------------------------------
    # IN-16 unknown top-level field (name not echoed)
    (_req(evil={"x": 1}), None, MalformedRequest, "unknown top-level field"),
    # model_name is a response field, not a request field
    (_req(model_name="m"), None, MalformedRequest, "unknown top-level field"),
    # IN-17 id of 1 MB
    (_req(id="a" * 1_000_000), None, MalformedRequest, "id must be"),
    # id one character over the limit
    (_req(id="a" * 129), None, MalformedRequest, "id must be"),
    # IN-17 CR/LF header injection through the id
    (_req(id="a\r\nSet-Cookie: x=1"), None, MalformedRequest, "id must be"),
    # IN-18 lone surrogate in the id
    (b'{"id":"\\ud800","inputs":[]}', None, MalformedRequest, "id must be"),
    # other control characters: NUL, DEL, C1 NEL, U+2028
    (_req(id="a\x00b"), None, MalformedRequest, "id must be"),
    (_req(id="a\x7fb"), None, MalformedRequest, "id must be"),
    (_req(id="a\x85b"), None, MalformedRequest, "id must be"),
    (_req(id="a\u2028b"), None, MalformedRequest, "id must be"),
    # id of the wrong type
    (_req(id=12345), None, MalformedRequest, "id must be"),
    (_req(id=None), None, MalformedRequest, "id must be"),
    # AUTHZ-12 reserved Triton request parameters are refused and named
    (_req(parameters={"sequence_id": 42}), None, MalformedRequest, "'sequence_id' is not allowed"),
    (_req(parameters={"sequence_start": True}), None, MalformedRequest, "'sequence_start'"),
    (_req(parameters={"sequence_end": True}), None, MalformedRequest, "'sequence_end'"),
    (_req(parameters={"priority": 1}), None, MalformedRequest, "'priority'"),
    (_req(parameters={"timeout": 1}), None, MalformedRequest, "'timeout'"),
    (_req(parameters={"headers": {"x": "y"}}), None, MalformedRequest, "'headers'"),
    (_req(parameters={"triton_enable_empty_final_response": True}), None, MalformedRequest,
     "'triton_enable_empty_final_response'"),
    # AUTHZ-02 tenant smuggled as a parameter: unknown, not echoed
    (_req(parameters={"tenant": "beta"}), None, MalformedRequest, "parameter with an unknown name"),
    # binary_data_output must be a real boolean
    (_req(parameters={"binary_data_output": 1}), None, MalformedRequest, "true or false"),
    (_req(parameters={"binary_data_output": "true"}), None, MalformedRequest, "true or false"),
    # parameters must be an object
    (_req(parameters=[]), None, MalformedRequest, "parameters must be"),
    # --- inputs ------------------------------------------------------------------------
    # inputs missing, empty, wrong type
    (b'{"outputs":[]}', None, MalformedRequest, "inputs must be"),
    (b'{"inputs":[]}', None, MalformedRequest, "inputs must be"),
    (b'{"inputs":{"name":"x"}}', None, MalformedRequest, "inputs must be"),
    # too many inputs
    (_req(*[_input(name=f"x{i}") for i in range(65)]), None, PayloadTooLarge, "more than 64 inputs"),
    # input not an object
    (b'{"inputs":["x"]}', None, MalformedRequest, "inputs[0] must be"),
    # IN-16 unknown field inside an input
    (_req(_input(evil=1)), None, MalformedRequest, "unknown field"),
    # name missing, empty, too long, control char, non-ASCII (IN-19 style homoglyph)
    (_req(_input(name=_DROP)), None, MalformedRequest, "name must be"),
    (_req(_input(name="")), None, MalformedRequest, "name must be"),
    (_req(_input(name="x" * 257)), None, MalformedRequest, "name must be"),
    (_req(_input(name="x\r\nSet-Cookie: a=1")), None, MalformedRequest, "name must be"),
    (_req(_input(name="\u0440\u0430b")), None, MalformedRequest, "name must be"),
    (_req(_input(name=7)), None, MalformedRequest, "name must be"),
    # duplicate input names
    (_req(_input(), _input()), None, MalformedRequest, "duplicate input name"),
    # --- shapes (IN-04) ------------------------------------------------------------------
    # 2**31 dimension with 4 elements: a mismatch, no allocation
    (_req(_input(shape=[1, 2147483648])), None, InputRejected, "number of elements"),
    # product overflows int64: still exact with Python ints
    (_req(_input(shape=[4611686018427387904, 4])), None, InputRejected, "number of elements"),
    # same, nested data: the walk stops at the first level
    (_req(_input(shape=[4611686018427387904, 4], data=[[1, 2, 3, 4]])), None, InputRejected, "nested data"),
    # negative dimension
    (_req(_input(shape=[-1, 4])), None, MalformedRequest, "non-negative integers"),
    # zero elements declared, four sent
    (_req(_input(shape=[0])), None, InputRejected, "number of elements"),
    # 64 dimensions of 1, and 9 (one over the limit)
    (_req(_input(shape=[1] * 64, data=[1.0])), None, MalformedRequest, "more than 8 dimensions"),
    (_req(_input(shape=[1] * 9, data=[1.0])), None, MalformedRequest, "more than 8 dimensions"),
    # float, string, bool, null dimensions
    (_req(_input(shape=[1.5, 4])), None, MalformedRequest, "non-negative integers"),
    (_req(_input(shape=["1", 4])), None, MalformedRequest, "non-negative integers"),
    (_req(_input(shape=[True, 4])), None, MalformedRequest, "non-negative integers"),
    (_req(_input(shape=[None, 4])), None, MalformedRequest, "non-negative integers"),
    # shape missing or not a list
    (_req(_input(shape=_DROP)), None, MalformedRequest, "shape must be"),
    (_req(_input(shape=4)), None, MalformedRequest, "shape must be"),
    # --- datatypes (IN-07) ---------------------------------------------------------------
    # case-sensitive names, unknown types, BF16 (not served), wrong JSON type, missing
    (_req(_input(datatype="fp32")), None, MalformedRequest, "datatype must be"),
    (_req(_input(datatype="FP8")), None, MalformedRequest, "datatype must be"),
    (_req(_input(datatype="BF16")), None, MalformedRequest, "datatype must be"),
    (_req(_input(datatype=32)), None, MalformedRequest, "datatype must be"),
    (_req(_input(datatype=_DROP)), None, MalformedRequest, "datatype must be"),
    # --- data source ----------------------------------------------------------------------
    # neither data nor binary_data_size
    (_req(_input(data=_DROP)), None, MalformedRequest, "exactly one of"),
    # both data and binary_data_size
    (_bin({"inputs": [_input(parameters={"binary_data_size": 16})]}, b"\x00" * 16)[0],
     _bin({"inputs": [_input(parameters={"binary_data_size": 16})]}, b"\x00" * 16)[1],
     MalformedRequest, "exactly one of"),
    # input parameters: shared memory and unknown keys are refused
    (_req(_input(parameters={"shared_memory_region": "r"})), None, MalformedRequest,
     "'shared_memory_region' is not allowed"),
    (_req(_input(parameters={"evil": 1})), None, MalformedRequest, "parameter with an unknown name"),
    (_req(_input(parameters=[1])), None, MalformedRequest, "parameters must be"),
    # binary_data_size of the wrong type or sign
    (_req(_input(data=_DROP, parameters={"binary_data_size": -1})), None, MalformedRequest, "non-negative"),
    (_req(_input(data=_DROP, parameters={"binary_data_size": True})), None, MalformedRequest, "non-negative"),
    (_req(_input(data=_DROP, parameters={"binary_data_size": "16"})), None, MalformedRequest, "non-negative"),
    (_req(_input(data=_DROP, parameters={"binary_data_size": 16.0})), None, MalformedRequest, "non-negative"),
    # --- JSON tensor data (IN-05) --------------------------------------------------------
    # [2,2] with 3 values
    (_req(_input(shape=[2, 2], data=[1, 2, 3])), None, InputRejected, "number of elements"),
    # data not an array
    (_req(_input(shape=[1], data=1.0)), None, MalformedRequest, "data must be a JSON array"),
    (_req(_input(shape=[1], data={"a": 1})), None, MalformedRequest, "data must be a JSON array"),
    # FP32 with a string, a bool, a null
    (_req(_input(data=[1, 2, 3, "4"])), None, InputRejected, "must be JSON numbers"),
    (_req(_input(data=[1, 2, 3, True])), None, InputRejected, "must be JSON numbers"),
    (_req(_input(data=[1, 2, 3, None])), None, InputRejected, "must be JSON numbers"),
    (_req(_input(data=[1, 2, 3, {}])), None, InputRejected, "must be JSON numbers"),
    # FP32 / FP16 overflow after the cast
    (_req(_input(shape=[1], data=[1e39])), None, InputRejected, "out of range for FP32"),
    (_req(_input(shape=[1], datatype="FP16", data=[70000.0])), None, InputRejected, "out of range for FP16"),
    (_req(_input(shape=[1], datatype="FP16", data=[-65520])), None, InputRejected, "out of range for FP16"),
    # integer range: INT8 300, UINT8 -1, INT64 2**63, UINT64 2**64, UINT64 -1
    (_req(_input(shape=[1], datatype="INT8", data=[300])), None, InputRejected, "out of range for INT8"),
    (_req(_input(shape=[1], datatype="UINT8", data=[-1])), None, InputRejected, "out of range for UINT8"),
    (_req(_input(shape=[1], datatype="INT64", data=[2**63])), None, InputRejected, "out of range"),
    (_req(_input(shape=[1], datatype="UINT64", data=[2**64])), None, InputRejected, "out of range"),
    (_req(_input(shape=[1], datatype="UINT64", data=[-1])), None, InputRejected, "out of range"),
    (_req(_input(shape=[1], datatype="INT16", data=[99 ** 40])), None, InputRejected, "out of range"),
    # integers never come from floats, bools or strings
    (_req(_input(shape=[1], datatype="INT32", data=[1.0])), None, InputRejected, "must be JSON integers"),
    (_req(_input(shape=[1], datatype="INT32", data=[True])), None, InputRejected, "must be JSON integers"),
    (_req(_input(shape=[1], datatype="INT32", data=["1"])), None, InputRejected, "must be JSON integers"),
    # BOOL: only true/false
    (_req(_input(shape=[1], datatype="BOOL", data=[2])), None, InputRejected, "true or false"),
    (_req(_input(shape=[1], datatype="BOOL", data=[0])), None, InputRejected, "true or false"),
    (_req(_input(shape=[1], datatype="BOOL", data=["true"])), None, InputRejected, "true or false"),
    # BYTES: only strings
    (_req(_input(shape=[1], datatype="BYTES", data=[1])), None, InputRejected, "JSON strings"),
    (_req(_input(shape=[1], datatype="BYTES", data=[None])), None, InputRejected, "JSON strings"),
    # IN-18 lone surrogate in a BYTES string
    (b'{"inputs":[{"name":"t","shape":[1],"datatype":"BYTES","data":["\\ud800"]}]}', None,
     MalformedRequest, "lone surrogate"),
    # IN-09 BYTES element of 64 KiB + 1
    (_req(_input(shape=[1], datatype="BYTES", data=["a" * (64 * 1024 + 1)])), None, PayloadTooLarge,
     "longer than 65536 bytes"),
    # multi-byte UTF-8 counts in bytes, not characters
    (_req(_input(shape=[1], datatype="BYTES", data=["\u00e9" * (32 * 1024 + 1)])), None, PayloadTooLarge,
     "longer than 65536 bytes"),
    # IN-09 1,048,577 empty strings
    (_req(_input(shape=[1_048_577], datatype="BYTES", data=[""] * 1_048_577)), None, PayloadTooLarge,
     "more than 1048576 elements"),
    # too many numbers, with a shape that agrees
    (_req(_input(shape=[1_048_577], datatype="UINT8", data=[0] * 1_048_577)), None, PayloadTooLarge,
     "more than 1048576 elements"),
    # nested vs flat mixing, ragged rows, nesting deeper than the shape
    (_req(_input(shape=[2, 2], data=[[1, 2], 3])), None, InputRejected, "nested data"),
    (_req(_input(shape=[3], data=[[1, 2], 3, 4])), None, InputRejected, "nested data"),
    (_req(_input(shape=[2, 2], data=[[1, 2], [3]])), None, InputRejected, "nested data"),
    (_req(_input(shape=[2, 2], data=[[1, 2, 3, 4]])), None, InputRejected, "nested data"),
    (_req(_input(shape=[1, 1], data=[[[1]]])), None, InputRejected, "nested data"),
    (_req(_input(shape=[], data=[[1]])), None, InputRejected, "nested data"),
    # PII in an input name or an over-long id is never echoed
    (_req(_input(name="078-05-1120", shape=[2])), None, InputRejected, "inputs[0]"),
    (_req(id="john.doe@example.com" + "x" * 200), None, MalformedRequest, "id must be"),
    # the PII in data is never echoed, whatever is wrong with it
    (_req(_input(shape=[1], data=["john.doe@example.com"])), None, InputRejected, "must be JSON numbers"),
    # --- outputs -------------------------------------------------------------------------
    (_req(outputs={"name": "y"}), None, MalformedRequest, "outputs must be"),
    (_req(outputs=["y"]), None, MalformedRequest, "outputs[0] must be"),
    (_req(outputs=[{"name": "y", "parameters": {"classification": 3}}]), None, MalformedRequest,
     "not supported"),
    # IN-16 outputs[].parameters.foo
    (_req(outputs=[{"name": "y", "parameters": {"foo": 1}}]), None, MalformedRequest, "parameter with an unknown name"),
    (_req(outputs=[{"name": "y", "parameters": {"shared_memory_region": "r"}}]), None, MalformedRequest,
     "'shared_memory_region' is not allowed"),
    (_req(outputs=[{"name": "y", "parameters": {"binary_data": "yes"}}]), None, MalformedRequest,
     "true or false"),
    (_req(outputs=[{"name": "y", "parameters": []}]), None, MalformedRequest, "parameters must be"),
    (_req(outputs=[{"name": "y", "evil": 1}]), None, MalformedRequest, "unknown field"),
    (_req(outputs=[{"name": "y"}, {"name": "y"}]), None, MalformedRequest, "duplicate output name"),
    (_req(outputs=[{"name": ""}]), None, MalformedRequest, "name must be"),
    (_req(outputs=[{"name": f"y{i}"} for i in range(65)]), None, PayloadTooLarge, "requested outputs"),
    # --- binary extension framing (IN-12) --------------------------------------------------
    # header length larger than the body, negative, hex, signed, spaced, empty, 11 digits
    (*_bin({"inputs": [_bin_input("x", [1], "FP32", 4)]}, b"\0" * 4)[:1], "99999", MalformedRequest,
     "exceeds the body length"),
    (_req(), "-1", MalformedRequest, "decimal byte count"),
    (_req(), "abc", MalformedRequest, "decimal byte count"),
    (_req(), "0x10", MalformedRequest, "decimal byte count"),
    (_req(), "+5", MalformedRequest, "decimal byte count"),
    (_req(), " 5", MalformedRequest, "decimal byte count"),
    (_req(), "", MalformedRequest, "decimal byte count"),
    (_req(), "12345678901", MalformedRequest, "decimal byte count"),
    (_req(), "\uff15", MalformedRequest, "decimal byte count"),
    # header length 0 or cutting the JSON short
    (_req(), "0", MalformedRequest, "not valid JSON"),
    (_req(), "10", MalformedRequest, "not valid JSON"),
    # --- binary sizes (IN-13) ------------------------------------------------------------
    # sizes summing to less / more than the binary section
    (*_bin({"inputs": [_bin_input("x", [1], "FP32", 4)]}, b"\0" * 8), MalformedRequest, "add up"),
    (*_bin({"inputs": [_bin_input("x", [2], "FP32", 8)]}, b"\0" * 4), MalformedRequest, "add up"),
    # a binary_data_size of 2**63-1
    (*_bin({"inputs": [_bin_input("x", [1], "FP32", 9223372036854775807)]}, b"\0" * 4), MalformedRequest,
     "add up"),
    # two inputs whose sizes add up only with each other's bytes swapped still must match their shapes
    (*_bin({"inputs": [_bin_input("a", [1], "FP32", 8), _bin_input("b", [3], "FP32", 4)]}, b"\0" * 12),
     MalformedRequest, "number of elements"),
    # size not a multiple of the element size
    (*_bin({"inputs": [_bin_input("x", [1], "FP32", 3)]}, b"\0" * 3), MalformedRequest, "multiple"),
    # size that disagrees with the shape
    (*_bin({"inputs": [_bin_input("x", [4], "FP32", 12)]}, b"\0" * 12), MalformedRequest,
     "number of elements"),
    # IN-04 absurd shape, binary data
    (*_bin({"inputs": [_bin_input("x", [4611686018427387904, 4], "FP32", 16)]}, b"\0" * 16),
     MalformedRequest, "number of elements"),
    # too many binary elements with an agreeing shape
    (*_bin({"inputs": [_bin_input("x", [1_048_577], "UINT8", 1_048_577)]}, b"\0" * 1_048_577),
     PayloadTooLarge, "more than 1048576 elements"),
    # --- binary BYTES (IN-14) ------------------------------------------------------------
    # a 0xFFFFFFFF length prefix followed by 4 bytes
    (*_bin({"inputs": [_bin_input("t", [1], "BYTES", 8)]}, b"\xff\xff\xff\xff", b"abcd"), MalformedRequest,
     "past the end"),
    # a length prefix one past the end
    (*_bin({"inputs": [_bin_input("t", [1], "BYTES", 7)]}, struct.pack("<I", 4), b"abc"), MalformedRequest,
     "past the end"),
    # a truncated length prefix
    (*_bin({"inputs": [_bin_input("t", [2], "BYTES", 6)]}, struct.pack("<I", 0), b"\0\0"), MalformedRequest,
     "truncated"),
    # more / fewer elements than the shape
    (*_bin({"inputs": [_bin_input("t", [1], "BYTES", 8)]}, struct.pack("<II", 0, 0)), MalformedRequest,
     "number of elements"),
    (*_bin({"inputs": [_bin_input("t", [3], "BYTES", 8)]}, struct.pack("<II", 0, 0)), MalformedRequest,
     "number of elements"),
    # a BYTES element of 64 KiB + 1
    (*_bin({"inputs": [_bin_input("t", [1], "BYTES", 4 + 65537)]}, struct.pack("<I", 65537), b"a" * 65537),
     PayloadTooLarge, "longer than 65536"),
    # 1,048,577 empty BYTES elements
    (*_bin({"inputs": [_bin_input("t", [1_048_577], "BYTES", 4 * 1_048_577)]}, b"\0" * (4 * 1_048_577)),
     PayloadTooLarge, "more than 1048576 elements"),
    # --- binary values (IN-06) -----------------------------------------------------------
    # FP32 NaN, +inf, -inf
    (*_bin({"inputs": [_bin_input("x", [1], "FP32", 4)]}, F32_NAN), InputRejected, "NaN and infinity"),
    (*_bin({"inputs": [_bin_input("x", [1], "FP32", 4)]}, F32_INF), InputRejected, "NaN and infinity"),
    (*_bin({"inputs": [_bin_input("x", [1], "FP32", 4)]}, F32_NINF), InputRejected, "NaN and infinity"),
    # FP16 NaN and FP64 inf
    (*_bin({"inputs": [_bin_input("x", [1], "FP16", 2)]}, b"\x00\x7e"), InputRejected, "NaN and infinity"),
    (*_bin({"inputs": [_bin_input("x", [1], "FP64", 8)]}, np.array([np.inf], "<f8").tobytes()),
     InputRejected, "NaN and infinity"),
    # a NaN among finite values
    (*_bin({"inputs": [_bin_input("x", [3], "FP32", 12)]}, np.array([1, 2], "<f4").tobytes(), F32_NAN),
     InputRejected, "NaN and infinity"),
    # BOOL bytes other than 0/1
    (*_bin({"inputs": [_bin_input("b", [2], "BOOL", 2)]}, b"\x01\x02"), InputRejected, "0 or 1"),
]


@pytest.mark.parametrize(("body", "header_length", "error", "needle"), REFUSALS,
                         ids=[f"{i}-{row[3]}" for i, row in enumerate(REFUSALS)])
def test_refusals(body: bytes, header_length: str | None, error: type[GatewayError], needle: str) -> None:
    with pytest.raises(GatewayError) as info:
        _decode(body, header_length)
    assert type(info.value) is error, info.value
    message = info.value.client_message()
    assert needle in message
    for canary in CANARIES:
        assert canary not in message


def test_errors_name_the_input() -> None:
    """Details say which input broke which rule (the client needs it; it is not data)."""
    with pytest.raises(InputRejected, match="input 'pixels'"):
        _decode(_req(_input(name="pixels", shape=[1, 64], data=[0.0] * 10)))
    # A name unfit to quote (it could carry PII) is referred to by position instead.
    for name in ("john.doe@example.com", "078-05-1120", "card_4111111111111111", "a" * 65):
        with pytest.raises(InputRejected, match=r"inputs\[0\]") as info:
            _decode(_req(_input(name=name, shape=[1, 64], data=[0.0] * 10)))
        assert name not in info.value.client_message()


# --- accepted requests -----------------------------------------------------------------


ACCEPTED: list[tuple[bytes, str | None, str, Any]] = [
    # ints and floats mixed in a float tensor
    (_req(_input(data=[1, 2.5, 3, 4])), None, "FP32", np.array([[1, 2.5, 3, 4]], np.float32)),
    # nested rows, row-major
    (_req(_input(shape=[2, 2], data=[[1, 2], [3, 4]])), None, "FP32", np.array([[1, 2], [3, 4]], np.float32)),
    # nested with a zero-length dimension
    (_req(_input(shape=[2, 0], data=[[], []])), None, "FP32", np.zeros((2, 0), np.float32)),
    # integer extremes
    (_req(_input(shape=[2], datatype="INT8", data=[-128, 127])), None, "INT8",
     np.array([-128, 127], np.int8)),
    (_req(_input(shape=[2], datatype="UINT64", data=[0, 2**64 - 1])), None, "UINT64",
     np.array([0, 2**64 - 1], np.uint64)),
    (_req(_input(shape=[2], datatype="INT64", data=[-(2**63), 2**63 - 1])), None, "INT64",
     np.array([-(2**63), 2**63 - 1], np.int64)),
    # 100-digit integers are fine for the parser (then too big for FP16? no: FP64 holds them)
    (_req(_input(shape=[1], datatype="FP64", data=[10**99])), None, "FP64", np.array([1e99])),
    # float maxima that stay finite after the cast
    (_req(_input(shape=[2], datatype="FP16", data=[65504.0, -65519.0])), None, "FP16",
     np.array([65504, -65504], np.float16)),
    (_req(_input(shape=[1], data=[3.4028234663852886e38])), None, "FP32",
     np.array([3.4028235e38], np.float32)),
    # booleans
    (_req(_input(shape=[2], datatype="BOOL", data=[True, False])), None, "BOOL", np.array([True, False])),
    # BYTES as UTF-8, including empty strings and an escaped surrogate pair (one code point)
    (b'{"inputs":[{"name":"t","shape":[3],"datatype":"BYTES",'
     b'"data":["a","\\u00e9","\\ud83d\\ude00"]}]}', None, "BYTES",
     np.array([b"a", "\u00e9".encode(), "\U0001f600".encode()], dtype=object)),
    # BYTES element of exactly 64 KiB
    (_req(_input(shape=[1], datatype="BYTES", data=["a" * 65536])), None, "BYTES",
     np.array([b"a" * 65536], dtype=object)),
    # brackets and escaped quotes inside strings do not count as nesting
    (_req(_input(shape=[2], datatype="BYTES", data=["[" * 100, '\\"' + "{" * 100])), None, "BYTES",
     np.array([b"[" * 100, b'\\"' + b"{" * 100], dtype=object)),
    # scalar tensor, zero-element tensor
    (_req(_input(shape=[], data=[5])), None, "FP32", np.array(5, np.float32)),
    (_req(_input(shape=[0], data=[])), None, "FP32", np.zeros(0, np.float32)),
    # exactly the element limit
    (_req(_input(shape=[1_048_576], datatype="UINT8", data=[1] * 1_048_576)), None, "UINT8",
     np.ones(1_048_576, np.uint8)),
    # binary FP32, little-endian
    (*_bin({"inputs": [_bin_input("x", [2], "FP32", 8)]}, np.array([1.5, -2], "<f4").tobytes()), "FP32",
     np.array([1.5, -2], np.float32)),
    # binary BYTES with an empty element and non-UTF-8 bytes
    (*_bin({"inputs": [_bin_input("t", [2], "BYTES", 11)]}, struct.pack("<I", 0), struct.pack("<I", 3),
           b"\xff\x00a"), "BYTES", np.array([b"", b"\xff\x00a"], dtype=object)),
    # binary zero-element tensor
    (*_bin({"inputs": [_bin_input("x", [0, 3], "FP32", 0)]}), "FP32", np.zeros((0, 3), np.float32)),
    # binary header length equal to the body length (no binary input at all)
    (_req(), str(len(_req())), "FP32", np.array([[1, 2, 3, 4]], np.float32)),
    # trailing whitespace after the JSON value is JSON
    (_req() + b" \n", None, "FP32", np.array([[1, 2, 3, 4]], np.float32)),
]


@pytest.mark.parametrize(("body", "header_length", "datatype", "expected"), ACCEPTED,
                         ids=[f"{i}-{row[2]}" for i, row in enumerate(ACCEPTED)])
def test_accepted(body: bytes, header_length: str | None, datatype: str, expected: Any) -> None:
    req = _decode(body, header_length)
    (tensor,) = req.inputs
    assert tensor.datatype == datatype
    assert tensor.data.dtype == DTYPES[datatype]
    assert tensor.shape == expected.shape
    assert tensor.data.shape == expected.shape
    np.testing.assert_array_equal(tensor.data, expected)
    assert tensor.data.dtype.isnative
    assert tensor.data.flags.writeable  # a copy, not a view into the request body


def test_request_fields() -> None:
    body = _req(id="req-\u00fc1", parameters={"binary_data_output": True},
                outputs=[{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}])
    req = _decode(body)
    assert (req.model, req.version, req.id, req.binary_data_output) == ("m", "1", "req-\u00fc1", True)
    assert req.outputs == [RequestedOutput("a", False), RequestedOutput("b", None)]
    assert req.inputs[0].parameters == {}  # binary_data_size and friends are never forwarded
    bare = _decode(_req())
    assert (bare.id, bare.binary_data_output, bare.outputs) == (None, False, [])


def test_json_and_binary_inputs_mixed_in_order() -> None:
    header = {"inputs": [_bin_input("a", [2], "INT32", 8), _input(name="b", shape=[1], data=[7.0]),
                         _bin_input("c", [1], "BYTES", 6)]}
    body, length = _bin(header, np.array([1, -1], "<i4").tobytes(), struct.pack("<I", 2), b"hi")
    a, b, c = _decode(body, length).inputs
    np.testing.assert_array_equal(a.data, [1, -1])
    np.testing.assert_array_equal(b.data, [7.0])
    assert c.data.tolist() == [b"hi"]


@pytest.mark.parametrize(
    ("depth", "limit", "ok"),
    [
        (5, 5, True),  # {"inputs":[{"data":[[1]]}]} is five levels deep: at the limit
        (5, 4, False),  # one level too many
    ],
)
def test_depth_limit_boundary(depth: int, limit: int, ok: bool) -> None:
    body = _req(_input(shape=[1, 1], data=[[1.0]]))
    assert body.count(b"[") + body.count(b"{") > limit  # exercises the full scan, not the fast path
    limits = CodecLimits(max_json_depth=limit)
    if ok:
        assert _decode(body, limits=limits).inputs[0].data.shape == (1, 1)
    else:
        with pytest.raises(MalformedRequest, match="deeper"):
            _decode(body, limits=limits)


HOSTILE_JSON: Final = {
    "IN-03-100k-deep": _nested(100_000),
    "4MB-of-openers": b"[" * 4_000_000,
    "IN-08-100k-digits": b'{"inputs":[{"name":"x","shape":[' + b"1" * 100_000 + b"]}]}",
    # quadratic-regex bait: millions of escaped quotes in an unterminated string
    "escaped-quotes-unterminated": b'{"id":"' + b'\\"' * 2_000_000 + b"[" * 100,
}
"""Bodies whose refusal must stay cheap; bench/bench_hostile.py prints what each costs."""


@pytest.mark.parametrize(
    ("name", "reason", "parsed"),
    [
        ("IN-03-100k-deep", "json_too_deep", False),
        ("4MB-of-openers", "json_too_deep", False),
        ("IN-08-100k-digits", "json_number_too_long", True),
        ("escaped-quotes-unterminated", "json_too_deep", False),
    ],
)
def test_hostile_json_is_refused_before_the_costly_step(name: str, reason: str, parsed: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused by the linear pre-checks, not by the costly step they guard: the recursive
    JSON parser never sees a deep body (IN-03), ``int()`` never sees an over-long literal
    (IN-08, quadratic in CPython). Checked by watching those steps, not by timing the
    refusal (its cost is printed by bench/bench_hostile.py)."""
    parser_runs: list[int] = []
    int_literals: list[int] = []
    real_decoder = codec._decoder

    def watched_decoder(max_digits: int) -> json.JSONDecoder:
        parser_runs.append(max_digits)
        return real_decoder(max_digits)

    def watched_int(value: Any, *args: Any) -> int:
        if isinstance(value, str):
            int_literals.append(len(value))
        return int(value, *args)

    monkeypatch.setattr(codec, "_decoder", watched_decoder)
    monkeypatch.setattr(codec, "int", watched_int, raising=False)  # shadows the builtin in the codec only
    with pytest.raises(MalformedRequest) as info:
        _decode(HOSTILE_JSON[name])
    assert info.value.reason == reason
    assert bool(parser_runs) is parsed
    assert all(n <= LIMITS.max_number_digits for n in int_literals), max(int_literals)


@pytest.mark.parametrize(
    ("body", "header_length"),
    [
        pytest.param(_req(_input(shape=[4611686018427387904, 4])), None, id="IN-04-json-flat"),
        pytest.param(_req(_input(shape=[2147483648, 2147483648, 2147483648], data=[[[1]]])), None,
                     id="IN-04-json-nested"),
        pytest.param(*_bin({"inputs": [_bin_input("t", [1], "BYTES", 8)]}, b"\xff\xff\xff\xff", b"abcd"),
                     id="IN-14-length-prefix"),
        pytest.param(*_bin({"inputs": [_bin_input("x", [4611686018427387904], "FP64", 8)]}, b"\0" * 8),
                     id="IN-04-binary"),
    ],
)
def test_declared_sizes_allocate_nothing(body: bytes, header_length: str | None) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(GatewayError):
            _decode(body, header_length)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


# --- round trips and tritonclient interop ---------------------------------------------------


def _sample(datatype: str) -> np.ndarray:
    """A 2x3 tensor of ``datatype`` with its extremes."""
    if datatype == "BYTES":
        return np.array([[b"", b"a", "\u00e9".encode()], [b"x" * 300, b"\x00", b"z"]], dtype=object)
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    dtype = DTYPES[datatype]
    if dtype.kind == "f":
        info = np.finfo(dtype)
        return np.array([[info.min, -1.5, 0.0], [info.tiny, 2.25, info.max]], dtype=dtype)
    iinfo = np.iinfo(dtype)
    return np.array([[iinfo.min, 0, 1], [iinfo.max, iinfo.max - 1, iinfo.min + 1]], dtype=dtype)


ALL_TYPES = list(DTYPES)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_tritonclient_request_decodes(datatype: str, binary: bool) -> None:
    """A body built by tritonclient.http's own request builder decodes to the same tensor."""
    value = _sample(datatype)
    inp = httpclient.InferInput("in0", list(value.shape), datatype)
    inp.set_data_from_numpy(value, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("out0", binary_data=binary)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [inp], outputs=outputs, request_id="rid-1")
    header_length = None if json_size is None else str(json_size)
    assert (header_length is not None) == binary
    req = _decode(body, header_length)
    (tensor,) = req.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("in0", datatype, value.shape)
    assert tensor.data.dtype == DTYPES[datatype]
    np.testing.assert_array_equal(tensor.data, value)
    assert req.outputs == [RequestedOutput("out0", binary)]
    assert req.id == "rid-1"


def test_tritonclient_default_outputs_and_mixed_inputs() -> None:
    """No outputs requested: tritonclient sets binary_data_output, which we honour."""
    a = httpclient.InferInput("a", [2], "FP32")
    a.set_data_from_numpy(np.array([1, 2], np.float32), binary_data=True)
    b = httpclient.InferInput("b", [1], "BYTES")
    b.set_data_from_numpy(np.array(["hello"], dtype=object), binary_data=False)
    c = httpclient.InferInput("c", [2], "BYTES")
    c.set_data_from_numpy(np.array([b"\xff", b"ok"], dtype=object), binary_data=True)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([a, b, c])
    req = _decode(body, str(json_size))
    assert req.binary_data_output is True
    assert [t.data.tolist() for t in req.inputs] == [[1.0, 2.0], [b"hello"], [b"\xff", b"ok"]]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sequence_id": 7, "sequence_start": True},  # AUTHZ-12 via tritonclient's own arguments
        {"priority": 1},
        {"timeout": 100},
        {"parameters": {"tenant": "beta"}},  # custom parameters
    ],
)
def test_tritonclient_reserved_parameters_are_refused(kwargs: dict[str, Any]) -> None:
    inp = httpclient.InferInput("x", [1], "FP32")
    inp.set_data_from_numpy(np.array([1], np.float32), binary_data=False)
    body, _ = httpclient.InferenceServerClient.generate_request_body([inp], **kwargs)
    with pytest.raises(MalformedRequest, match="parameter"):
        _decode(body)


def _response(*tensors: Tensor, rid: str | None = "rid-1") -> InferResponse:
    return InferResponse(model_name="m", model_version="1", outputs=list(tensors), id=rid)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("datatype", ALL_TYPES)
def test_response_round_trip_and_tritonclient_parses_it(datatype: str, binary: bool) -> None:
    value = _sample(datatype)
    resp = _response(Tensor("out0", datatype, value.shape, value))
    body, headers = encode_infer_response(resp, [RequestedOutput("out0", binary)], binary_default=not binary)
    length = headers.get("Inference-Header-Content-Length")
    assert (length is not None) == binary
    assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")

    # Our own decoder is the inverse.
    back = decode_infer_response(body, None if length is None else int(length))
    assert (back.model_name, back.model_version, back.id) == ("m", "1", "rid-1")
    assert back.outputs[0].data.dtype == DTYPES[datatype]
    np.testing.assert_array_equal(back.outputs[0].data, value)

    # And so is tritonclient's.
    result = httpclient.InferenceServerClient.parse_response_body(
        body, header_length=None if length is None else int(length))
    got = result.as_numpy("out0")
    if datatype == "BYTES" and not binary:
        # tritonclient returns JSON BYTES as str; compare as UTF-8.
        got = np.array([s.encode() for s in got.ravel()], dtype=object).reshape(got.shape)
    np.testing.assert_array_equal(got, value)
    assert result.get_response()["id"] == "rid-1"


def test_response_mixed_binary_and_json_with_tritonclient() -> None:
    text = np.array([b"caf\xc3\xa9", b"\xff\xfe"], dtype=object)
    probs = np.array([[0.25, 0.75]], np.float32)
    resp = _response(Tensor("probs", "FP32", (1, 2), probs), Tensor("raw", "BYTES", (2,), text),
                     Tensor("label", "INT64", (1,), np.array([1])), rid=None)
    requested = [RequestedOutput("probs", False), RequestedOutput("raw", True), RequestedOutput("label")]
    body, headers = encode_infer_response(resp, requested, binary_default=True)
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:length])
    assert "id" not in header
    assert [("data" in o, o.get("parameters")) for o in header["outputs"]] == [
        (True, None), (False, {"binary_data_size": 4 + 5 + 4 + 2}), (False, {"binary_data_size": 8})]
    assert b", " not in body[:length] and b": " not in body[:length]  # compact JSON
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("probs"), probs)
    assert result.as_numpy("raw").tolist() == [b"caf\xc3\xa9", b"\xff\xfe"]
    assert result.as_numpy("label").tolist() == [1]
    assert deserialize_bytes_tensor(body[length:length + 15]).tolist() == text.tolist()
    assert serialize_byte_tensor(text).item() == body[length:length + 15]


@pytest.mark.parametrize(
    ("requested", "binary_default", "expect_binary"),
    [
        ([], False, False),  # nothing said: JSON
        ([], True, True),  # binary_data_output: binary
        ([RequestedOutput("y")], True, True),  # output without binary_data: the default
        ([RequestedOutput("y", False)], True, False),  # explicit JSON beats the default
        ([RequestedOutput("y", True)], False, True),  # explicit binary beats the default
        ([RequestedOutput("other", False)], True, True),  # another output's choice does not apply
    ],
)
def test_binary_choice(requested: list[RequestedOutput], binary_default: bool, expect_binary: bool) -> None:
    resp = _response(Tensor("y", "FP32", (1,), np.array([1.0], np.float32)))
    body, headers = encode_infer_response(resp, requested, binary_default=binary_default)
    assert ("Inference-Header-Content-Length" in headers) == expect_binary
    if not expect_binary:
        assert json.loads(body)["outputs"][0]["data"] == [1.0]


RESPONSE_REFUSALS: list[tuple[Tensor, bool, type[GatewayError], str]] = [
    # non-UTF-8 BYTES requested as JSON: the client must ask for binary
    (Tensor("t", "BYTES", (1,), np.array([b"\xff"], dtype=object)), False, InputRejected, "binary_data"),
    # AV-04 NaN / inf from the upstream, JSON and binary
    (Tensor("y", "FP32", (2,), np.array([1, np.nan], np.float32)), False, UpstreamBadResponse, "non-finite"),
    (Tensor("y", "FP64", (1,), np.array([np.inf])), True, UpstreamBadResponse, "non-finite"),
    (Tensor("y", "FP16", (1,), np.array([np.inf], np.float16)), False, UpstreamBadResponse, "non-finite"),
    # a float64 array too large for the FP32 it claims to be
    (Tensor("y", "FP32", (1,), np.array([1e300])), False, UpstreamBadResponse, "non-finite"),
    # AV-04 wrong shape
    (Tensor("y", "FP32", (3,), np.array([1, 2], np.float32)), False, UpstreamBadResponse, "shape"),
    (Tensor("y", "FP32", (-1,), np.array([1], np.float32)), False, UpstreamBadResponse, "shape"),
    # unknown datatype, data that is not an array, an integer that would wrap
    (Tensor("y", "BF16", (1,), np.array([1], np.float32)), False, UpstreamBadResponse, "datatype"),
    (Tensor("y", "FP32", (1,), [1.0]), False, UpstreamBadResponse, "datatype"),  # type: ignore[arg-type]
    (Tensor("y", "INT8", (1,), np.array([300])), False, UpstreamBadResponse, "data type"),
    # BYTES elements that are not bytes
    (Tensor("t", "BYTES", (1,), np.array([3], dtype=object)), True, UpstreamBadResponse, "not bytes"),
    (Tensor("t", "BYTES", (1,), np.array([3], dtype=object)), False, UpstreamBadResponse, "not bytes"),
]


@pytest.mark.parametrize(("tensor", "binary", "error", "needle"), RESPONSE_REFUSALS)
def test_response_refusals(tensor: Tensor, binary: bool, error: type[GatewayError], needle: str) -> None:
    with pytest.raises(GatewayError) as info:
        encode_infer_response(_response(tensor), [RequestedOutput(tensor.name, binary)], binary_default=False)
    assert type(info.value) is error
    assert needle in info.value.client_message()


def test_response_tolerates_numpy_shapes_and_lossless_widening() -> None:
    data = np.array([1, 2], np.int8)
    resp = _response(Tensor("y", "INT32", (np.int64(2),), data))  # type: ignore[arg-type]
    body, _ = encode_infer_response(resp, [], binary_default=False)
    assert json.loads(body)["outputs"][0] == {"name": "y", "datatype": "INT32", "shape": [2], "data": [1, 2]}


def test_response_id_with_unicode_is_utf8_json() -> None:
    body, headers = encode_infer_response(_response(rid="r\u00e9"), [], binary_default=False)
    assert headers == {"Content-Type": "application/json"}
    assert json.loads(body.decode("utf-8")) == {"model_name": "m", "model_version": "1", "id": "r\u00e9",
                                                 "outputs": []}


_BIN_HEADER = b'{"outputs":[{"name":"y","datatype":"FP32","shape":[1],"parameters":{"binary_data_size":8}}]}'


@pytest.mark.parametrize(
    ("body", "header_length"),
    [
        pytest.param(b"{", None, id="not-json"),
        pytest.param(b"[]", None, id="not-an-object"),
        pytest.param(b'{"outputs":[{"name":"y","datatype":"FP32","shape":[1],"data":[1]}]}', 999,
                     id="header-past-the-end"),
        pytest.param(_BIN_HEADER + b"\0\0\0\0", len(_BIN_HEADER), id="binary-size-past-the-end"),
        pytest.param(b'{"outputs":[]}' + b"\0", 14, id="unclaimed-binary-bytes"),
        pytest.param(b'{"outputs":[{"name":"y","datatype":"FP32","shape":[1],"data":[NaN]}]}', None,
                     id="nan"),
        pytest.param(b'{"outputs":[{"name":"y","datatype":"FP32","shape":[2],"data":[1]}]}', None,
                     id="wrong-shape"),
        pytest.param(b'{"outputs":[{"name":"y","datatype":"FP32","shape":[1],"parameters":[]}]}', None,
                     id="junk-parameters"),
        pytest.param(b'{"outputs":[7]}', None, id="junk-output"),
    ],
)
def test_decode_response_refusals(body: bytes, header_length: int | None) -> None:
    with pytest.raises(UpstreamBadResponse):
        decode_infer_response(body, header_length)


def test_limits_are_configurable() -> None:
    limits = CodecLimits(max_elements_per_tensor=3, max_dims=1, max_bytes_element=2, max_inputs=1,
                         max_id_length=2, max_number_digits=2)
    with pytest.raises(PayloadTooLarge):
        _decode(_req(_input(shape=[4])), limits=limits)
    with pytest.raises(MalformedRequest, match="dimensions"):
        _decode(_req(_input(shape=[1, 3], data=[1, 2, 3])), limits=limits)
    with pytest.raises(PayloadTooLarge):
        _decode(_req(_input(shape=[1], datatype="BYTES", data=["abc"])), limits=limits)
    with pytest.raises(PayloadTooLarge):
        _decode(_req(_input(shape=[1], data=[1]), _input(name="y", shape=[1], data=[1])), limits=limits)
    with pytest.raises(MalformedRequest, match="id"):
        _decode(_req(_input(shape=[1], data=[1]), id="abc"), limits=limits)
    with pytest.raises(MalformedRequest, match="2 digits"):
        _decode(_req(_input(shape=[1], data=[100])), limits=limits)
    assert _decode(_req(_input(shape=[1], data=[99]), id="ab"), limits=limits).id == "ab"


@pytest.mark.parametrize(("body", "wording"), [
    (_req(parameters={"foo": 1}),
     "malformed request: request parameter with an unknown name is not allowed (only binary_data_output)"),
    (_req(_input(parameters={"foo": 1})),
     "malformed request: input 'x': parameter with an unknown name is not allowed"),
])
def test_an_unknown_parameter_is_refused_in_plain_words(body: bytes, wording: str) -> None:
    """tritonclient.http's ``parameters={"foo": 1}``: the name is not echoed, and the
    sentence reads as one (it used to say "request an unknown parameter is not allowed")."""
    with pytest.raises(MalformedRequest) as info:
        _decode(body)
    assert info.value.client_message().startswith(wording)


def test_a_stale_header_length_on_a_json_body_is_named() -> None:
    """tritonclient.http writes Inference-Header-Content-Length into the caller's headers
    dict; reused for a plain JSON request it cuts valid JSON short. Refused (the upstream
    would split the body at that length too), saying which bytes were read as JSON."""
    body = _req()
    with pytest.raises(MalformedRequest) as info:
        _decode(body, header_length="10")
    assert info.value.reason == "json_invalid"
    assert info.value.client_message() == (
        "malformed request: the JSON header is not valid JSON (the body's first 10 bytes, "
        "as Inference-Header-Content-Length says)")
    with pytest.raises(MalformedRequest) as plain:
        _decode(body[:10])
    assert plain.value.client_message() == "malformed request: the body is not valid JSON"
