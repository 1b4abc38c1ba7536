"""Tensor codecs under fuzz: only GatewayErrors escape, limits hold, valid tensors round-trip.

Both fronts (REST JSON + binary extension, gRPC protobuf) and the response direction.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from gateway.errors import GatewayError
from gateway.fronts.grpc.codec import decode_model_infer_request, encode_model_infer_response
from gateway.fronts.http.codec import decode_infer_request, decode_infer_response, encode_infer_response
from gateway.kserve import CONTENTS_FIELD, DTYPES, InferRequest, InferResponse, RequestedOutput, Tensor
from security_tests.fuzz import targets
from security_tests.fuzz.corpus_examples import with_corpus
from security_tests.fuzz.profiles import fuzz_settings
from security_tests.fuzz.strategies import (
    JSON,
    NAMES,
    binary_values,
    encode_request,
    json_values,
    near_valid_documents,
    tensors,
)

LIMITS = targets.LIMITS
HEADER_VALUES = st.one_of(st.none(), st.from_regex(r"[0-9]{1,4}", fullmatch=True),
                          st.text(max_size=12).map(lambda s: s.encode("utf-8", "replace")))


def _assert_same(decoded: Tensor, name: str, datatype: str, array: np.ndarray[Any, Any]) -> None:
    assert decoded.name == name and decoded.datatype == datatype
    assert decoded.shape == array.shape and decoded.data.shape == array.shape
    assert decoded.data.dtype == DTYPES[datatype]
    if datatype == "BYTES":
        assert decoded.data.reshape(-1).tolist() == array.reshape(-1).tolist()
    else:
        assert np.array_equal(decoded.data, array.astype(DTYPES[datatype]))


def _unique(items: list[tuple[str, str, np.ndarray[Any, Any]]]) -> bool:
    return len({name for name, _d, _a in items}) == len(items)


# --- REST: arbitrary input -------------------------------------------------------------


@fuzz_settings()
@given(data=st.binary(max_size=2048))
@with_corpus("http_infer")
def test_http_decoder_arbitrary_bytes(data: bytes) -> None:
    """Raw bytes (with or without an HL: header line): accepted within limits or a GatewayError."""
    targets.http_infer(data)


@fuzz_settings()
@given(doc=st.one_of(JSON, near_valid_documents()), header=HEADER_VALUES, tail=st.binary(max_size=64))
def test_http_decoder_structured_documents(doc: Any, header: bytes | str | None, tail: bytes) -> None:
    """JSON documents shaped like requests, with an optional binary section and header."""
    body = json.dumps(doc).encode()
    if header is None:
        targets.http_infer(body + (tail if tail.startswith(b" ") else b""))
        return
    value = str(len(body)).encode() if isinstance(header, str) else header
    targets.http_infer(targets.frame(b"HL", value.replace(b"\n", b""), body + tail))


@fuzz_settings()
@given(items=st.lists(tensors(), min_size=1, max_size=4), flags=st.lists(st.booleans(), min_size=4, max_size=4),
       nested=st.booleans(), cut=st.integers(0, 2**16), flip=st.integers(0, 255))
def test_http_decoder_corrupted_valid_bodies(items: list[tuple[str, str, np.ndarray[Any, Any]]],
                                             flags: list[bool], nested: bool, cut: int, flip: int) -> None:
    """A valid body with one byte changed or cut short is still only ever refused cleanly."""
    body, header = encode_request(items, flags[:len(items)], nested)
    position = cut % (len(body) + 1)
    for mutated in (body[:position], body[:position] + bytes([flip]) + body[position + 1:]):
        targets.http_infer(targets.frame(b"HL", None if header is None else header.encode(), mutated))


# --- REST: round trip ------------------------------------------------------------------


@fuzz_settings()
@given(items=st.lists(tensors(), min_size=1, max_size=4), flags=st.lists(st.booleans(), min_size=4, max_size=4),
       nested=st.booleans())
def test_http_request_round_trip(items: list[tuple[str, str, np.ndarray[Any, Any]]], flags: list[bool],
                                 nested: bool) -> None:
    """encode (JSON flat/nested or binary, per input) -> decode gives back the same tensors."""
    assume(_unique(items))
    body, header = encode_request(items, flags[:len(items)], nested)
    req = decode_infer_request("m", "", body, header_length=header, limits=LIMITS)
    targets.check_limits(req)
    assert len(req.inputs) == len(items)
    for decoded, (name, datatype, array) in zip(req.inputs, items, strict=True):
        _assert_same(decoded, name, datatype, array)


@fuzz_settings()
@given(items=st.lists(tensors(), min_size=0, max_size=4), flags=st.lists(st.one_of(st.none(), st.booleans()),
                                                                         min_size=4, max_size=4),
       binary_default=st.booleans(), rid=st.one_of(st.none(), NAMES))
def test_http_response_round_trip(items: list[tuple[str, str, np.ndarray[Any, Any]]],
                                  flags: list[bool | None], binary_default: bool, rid: str | None) -> None:
    """encode_infer_response -> decode_infer_response gives back the same outputs."""
    assume(_unique(items))
    outputs = [Tensor(name=n, datatype=d, shape=a.shape, data=a) for n, d, a in items]
    requested = [RequestedOutput(name=n, binary=f) for (n, _d, _a), f in zip(items, flags, strict=False)]
    body, headers = encode_infer_response(InferResponse("m", "1", outputs, id=rid), requested,
                                          binary_default=binary_default)
    length = headers.get("Inference-Header-Content-Length")
    resp = decode_infer_response(body, None if length is None else int(length))
    assert resp.model_name == "m" and resp.model_version == "1" and resp.id == rid
    for decoded, (name, datatype, array) in zip(resp.outputs, items, strict=True):
        _assert_same(decoded, name, datatype, array)


@fuzz_settings()
@given(body=st.binary(max_size=512), length=st.one_of(st.none(), st.integers(-4, 600)))
def test_response_decoder_only_raises_bad_upstream(body: bytes, length: int | None) -> None:
    """What an upstream sends is decoded or refused as 502, nothing else."""
    try:
        decode_infer_response(body, length)
    except GatewayError as exc:
        assert exc.http_status == 502


# --- gRPC ------------------------------------------------------------------------------


@fuzz_settings()
@given(data=st.binary(max_size=1024))
@with_corpus("grpc_infer")
def test_grpc_decoder_arbitrary_bytes(data: bytes) -> None:
    targets.grpc_infer(data)


def _typed_fill(contents: Any, datatype: str, values: list[Any]) -> None:
    field = CONTENTS_FIELD.get(datatype)
    if field is not None:
        getattr(contents, field).extend(values)


@st.composite
def grpc_messages(draw: st.DrawFn) -> Any:
    """Structured ModelInferRequests, including wrong fields, sizes and parameters."""
    message = service_pb2.ModelInferRequest(model_name="m", id=draw(st.text(max_size=8)))
    use_raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        datatype = draw(st.sampled_from([*DTYPES, "BF16", ""]))
        item = message.inputs.add(name=draw(st.one_of(NAMES, st.text(max_size=4))), datatype=datatype,
                                  shape=draw(st.lists(st.integers(-1, 2**62), max_size=4)))
        if use_raw:
            message.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            field = draw(st.sampled_from([*sorted(set(CONTENTS_FIELD.values())), None]))
            if field == "bytes_contents":
                item.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=8), max_size=6)))
            elif field == "bool_contents":
                item.contents.bool_contents.extend(draw(st.lists(st.booleans(), max_size=6)))
            elif field in ("fp32_contents", "fp64_contents"):
                getattr(item.contents, field).extend(draw(st.lists(st.floats(width=32), max_size=6)))
            elif field is not None:
                bits = 64 if "64" in field else 32
                low = 0 if field.startswith("uint") else -(2 ** (bits - 1))
                high = 2**bits - 1 if field.startswith("uint") else 2 ** (bits - 1) - 1
                getattr(item.contents, field).extend(draw(st.lists(st.integers(low, high), max_size=6)))
        if draw(st.integers(0, 9)) == 0:
            item.parameters[draw(st.sampled_from(["binary_data_size", "x"]))].int64_param = 1
    for _ in range(draw(st.integers(0, 2))):
        message.outputs.add(name=draw(NAMES))
    if draw(st.integers(0, 9)) == 0:
        message.parameters[draw(st.sampled_from(["sequence_id", "priority", "y"]))].bool_param = True
    return message


@fuzz_settings()
@given(message=grpc_messages())
def test_grpc_decoder_structured_messages(message: Any) -> None:
    targets.grpc_infer(message.SerializeToString())


@fuzz_settings()
@given(items=st.lists(tensors(), min_size=1, max_size=4), raw=st.booleans())
def test_grpc_request_round_trip(items: list[tuple[str, str, np.ndarray[Any, Any]]], raw: bool) -> None:
    """raw_input_contents (tritonclient's form) or typed contents -> the same tensors."""
    assume(_unique(items))
    if not raw:
        assume(all(d != "FP16" for _n, d, _a in items))  # FP16 has no typed field
    message = service_pb2.ModelInferRequest(model_name="m")
    for name, datatype, array in items:
        item = message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if raw:
            message.raw_input_contents.append(binary_values(array, datatype))
        elif datatype == "BYTES":
            item.contents.bytes_contents.extend(array.reshape(-1).tolist())
        else:
            _typed_fill(item.contents, datatype, array.reshape(-1).tolist())
    parsed = service_pb2.ModelInferRequest.FromString(message.SerializeToString())
    req: InferRequest = decode_model_infer_request(parsed, limits=LIMITS)
    for decoded, (name, datatype, array) in zip(req.inputs, items, strict=True):
        _assert_same(decoded, name, datatype, array)


@fuzz_settings()
@given(items=st.lists(tensors(), min_size=0, max_size=4))
def test_grpc_response_round_trip(items: list[tuple[str, str, np.ndarray[Any, Any]]]) -> None:
    """encode_model_infer_response's raw outputs decode back with the binary rules."""
    outputs = [Tensor(name=n, datatype=d, shape=a.shape, data=a) for n, d, a in items]
    message = encode_model_infer_response(InferResponse("m", "1", outputs))
    assert len(message.raw_output_contents) == len(items)
    for raw, (_name, datatype, array) in zip(message.raw_output_contents, items, strict=True):
        assert raw == binary_values(array, datatype)
        assert json_values(array, datatype, nested=False) is not None
