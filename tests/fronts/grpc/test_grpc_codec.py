"""The gRPC codec: every refusal rule of the REST codec, on ``ModelInferRequest`` protos.

Table-driven: one row per rule (catalogue IDs where the REST codec tests have them). A
parity table sends the same defect through the REST codec's binary form and checks the
same error class and reason come back. Every refusal is also checked for echoing client
values (canaries), since error details reach response bodies, logs and audit records.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import serialize_byte_tensor

from gateway.errors import GatewayError, InputRejected, MalformedRequest, NotFound, PayloadTooLarge, UpstreamBadResponse
from gateway.fronts.grpc.codec import (
    MODEL_NAME,
    MODEL_VERSION,
    CodecLimits,
    check_model_ref,
    decode_model_infer_request,
    encode_model_infer_response,
)
from gateway.fronts.http import routes
from gateway.fronts.http.codec import decode_infer_request
from gateway.kserve import DTYPES, InferResponse, Tensor

LIMITS = CodecLimits()
CANARIES = ("john.doe@example.com", "078-05-1120", "4111111111111111", "Set-Cookie", "evil", "\r", "\n")

Mutate = Callable[[Any], None]


def request(*, datatype: str = "FP32", shape: tuple[int, ...] = (1, 4), raw: bytes | None = None,
            name: str = "x") -> Any:
    """A valid request: one input in raw_input_contents (as tritonclient sends it)."""
    message = service_pb2.ModelInferRequest(model_name="digits")
    tensor = message.inputs.add(name=name, datatype=datatype)
    tensor.shape.extend(shape)
    if raw is None:
        raw = np.zeros(shape, dtype=DTYPES[datatype]).astype(DTYPES[datatype].newbyteorder("<")).tobytes()
    message.raw_input_contents.append(raw)
    return message


def typed(datatype: str, field: str, values: list[Any], shape: tuple[int, ...] | None = None) -> Any:
    """A request with one input in a typed contents field."""
    message = service_pb2.ModelInferRequest(model_name="m")
    tensor = message.inputs.add(name="x", datatype=datatype)
    tensor.shape.extend(shape if shape is not None else (len(values),))
    getattr(tensor.contents, field).extend(values)
    return message


def with_unknown_field(message: Any) -> bytes:
    """Serialized ``message`` plus field 99 (varint), which no Triton proto defines."""
    return bytes(message.SerializeToString()) + b"\x98\x06\x01"


def decode(message: Any, limits: CodecLimits = LIMITS) -> Any:
    return decode_model_infer_request(message, limits=limits)


# ---------------------------------------------------------------------------------------
# Accepted
# ---------------------------------------------------------------------------------------


class TestAccepted:
    def test_what_tritonclient_sends_round_trips(self) -> None:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        words = np.array([b"hello", "wörld".encode(), b"\x00\xff"], dtype=np.object_)
        inputs = [grpcclient.InferInput("x", [2, 4], "FP32"), grpcclient.InferInput("w", [3], "BYTES")]
        inputs[0].set_data_from_numpy(x)
        inputs[1].set_data_from_numpy(words)
        outputs = [grpcclient.InferRequestedOutput("y")]
        message = _get_inference_request("digits", inputs, "1", "req-1", outputs, 0, False, False, 0, None, None)
        req = decode(message)
        assert (req.model, req.version, req.id) == ("digits", "1", "req-1")
        np.testing.assert_array_equal(req.inputs[0].data, x)
        assert req.inputs[0].data.dtype == np.float32 and req.inputs[0].shape == (2, 4)
        assert list(req.inputs[1].data) == list(words)
        assert [o.name for o in req.outputs] == ["y"]

    @pytest.mark.parametrize(("datatype", "field", "values"), [
        ("BOOL", "bool_contents", [True, False]),
        ("INT8", "int_contents", [-128, 127]),
        ("INT16", "int_contents", [-32768, 32767]),
        ("INT32", "int_contents", [-(2**31), 2**31 - 1]),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1]),
        ("UINT8", "uint_contents", [0, 255]),
        ("UINT16", "uint_contents", [0, 65535]),
        ("UINT32", "uint_contents", [0, 2**32 - 1]),
        ("UINT64", "uint64_contents", [0, 2**64 - 1]),
        ("FP32", "fp32_contents", [1.5, -2.25]),
        ("FP64", "fp64_contents", [1e300, -1e-300]),
        ("BYTES", "bytes_contents", [b"a", b""]),
    ])
    def test_typed_contents(self, datatype: str, field: str, values: list[Any]) -> None:
        (tensor,) = decode(typed(datatype, field, values)).inputs
        assert tensor.data.dtype == DTYPES[datatype]
        assert tensor.data.tolist() == values

    @pytest.mark.parametrize("datatype", [d for d in DTYPES if d != "BYTES"])
    def test_raw_every_datatype(self, datatype: str) -> None:
        array = np.ones((2, 3), dtype=DTYPES[datatype])
        raw = array.astype(DTYPES[datatype].newbyteorder("<")).tobytes()
        (tensor,) = decode(request(datatype=datatype, shape=(2, 3), raw=raw)).inputs
        assert tensor.data.dtype == DTYPES[datatype]
        np.testing.assert_array_equal(tensor.data, array)

    def test_zero_elements_need_no_data(self) -> None:
        message = service_pb2.ModelInferRequest(model_name="m")
        message.inputs.add(name="x", datatype="FP16", shape=[0, 4])
        (tensor,) = decode(message).inputs
        assert tensor.data.shape == (0, 4)

    def test_empty_id_is_no_id(self) -> None:
        assert decode(request()).id is None


# ---------------------------------------------------------------------------------------
# Refused
# ---------------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Mutate:
    def mutate(message: Any) -> None:
        target = message
        *parents, last = path.split(".")
        for part in parents:
            target = target.inputs[0] if part == "input" else getattr(target, part)
        setattr(target, last, value)

    return mutate


def _add_input(message: Any, name: str = "y", raw: bool = True) -> None:
    message.inputs.add(name=name, datatype="FP32", shape=[1])
    if raw:
        message.raw_input_contents.append(b"\x00" * 4)


def _replace_raw(raw: bytes) -> Mutate:
    def mutate(message: Any) -> None:
        message.raw_input_contents[0] = raw

    return mutate


def _shape(*dims: int) -> Mutate:
    def mutate(message: Any) -> None:
        del message.inputs[0].shape[:]
        message.inputs[0].shape.extend(dims)

    return mutate


def _param(where: str, key: str) -> Mutate:
    def mutate(message: Any) -> None:
        if where == "request":
            message.parameters[key].int64_param = 5
        elif where == "input":
            message.inputs[0].parameters[key].string_param = "region"
        else:
            message.outputs.add(name="y").parameters[key].int64_param = 1

    return mutate


def _bytes_raw(raw: bytes, shape: tuple[int, ...] = (1,)) -> Any:
    return request(datatype="BYTES", shape=shape, raw=raw)


def _f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


# name -> (request, error class, reason); the request is a proto or a mutation of request().
REFUSALS: dict[str, tuple[Any, type[GatewayError], str]] = {
    # structure
    "no_inputs": (lambda m: m.ClearField("inputs") or m.ClearField("raw_input_contents"), MalformedRequest,
                  "request_invalid"),
    "too_many_inputs": (lambda m: [_add_input(m, f"i{n}") for n in range(64)], PayloadTooLarge, "input_too_large"),
    "empty_input_name": (_set("input.name", ""), MalformedRequest, "input_invalid_name"),
    "control_in_input_name": (_set("input.name", "a\r\nSet-Cookie: evil"), MalformedRequest, "input_invalid_name"),
    "non_ascii_input_name": (_set("input.name", "prénom"), MalformedRequest, "input_invalid_name"),
    "long_input_name": (_set("input.name", "x" * 257), MalformedRequest, "input_invalid_name"),
    "duplicate_input": (lambda m: _add_input(m, "x"), MalformedRequest, "input_duplicate"),
    "unknown_datatype": (_set("input.datatype", "FP8"), MalformedRequest, "input_invalid_datatype"),
    "bf16_not_served": (_set("input.datatype", "BF16"), MalformedRequest, "input_invalid_datatype"),
    "lowercase_datatype": (_set("input.datatype", "fp32"), MalformedRequest, "input_invalid_datatype"),
    "negative_dim": (_shape(-1, 4), MalformedRequest, "input_invalid_shape"),
    "too_many_dims": (_shape(*[1] * 9), MalformedRequest, "input_invalid_shape"),
    # data source: exactly one per input
    "raw_for_some_inputs_only": (lambda m: _add_input(m, raw=False), MalformedRequest, "input_data_source"),
    "raw_and_contents": (lambda m: m.inputs[0].contents.fp32_contents.extend([0.0] * 4), MalformedRequest,
                         "input_data_source"),
    "no_data": (typed("FP32", "fp32_contents", [], shape=(1, 4)), MalformedRequest, "input_data_source"),
    # raw sizes (IN-04, IN-12, IN-13)
    "raw_not_element_multiple": (_replace_raw(b"\x00" * 15), MalformedRequest, "binary_size_mismatch"),
    "raw_short": (_replace_raw(b"\x00" * 12), MalformedRequest, "input_wrong_shape"),
    "raw_long": (_replace_raw(b"\x00" * 20), MalformedRequest, "input_wrong_shape"),
    "huge_declared_shape": (_shape(2**62, 4), MalformedRequest, "input_wrong_shape"),
    "raw_too_many_elements": (lambda m: (_shape(2**20 + 1)(m), _replace_raw(b"\x00" * 4 * (2**20 + 1))(m)),
                              PayloadTooLarge, "input_too_large"),
    # values
    "nan_fp32_raw": (_replace_raw(_f32(0, 0, math.nan, 0)), InputRejected, "input_non_finite"),
    "inf_fp32_raw": (_replace_raw(_f32(0, -math.inf, 0, 0)), InputRejected, "input_non_finite"),
    "inf_fp16_raw": (request(datatype="FP16", shape=(1,), raw=np.array([np.inf], "<f2").tobytes()), InputRejected,
                     "input_non_finite"),
    "nan_fp64_raw": (request(datatype="FP64", shape=(1,), raw=np.array([np.nan], "<f8").tobytes()), InputRejected,
                     "input_non_finite"),
    "nan_fp32_typed": (typed("FP32", "fp32_contents", [1.0, math.nan]), InputRejected, "input_non_finite"),
    "inf_fp64_typed": (typed("FP64", "fp64_contents", [math.inf]), InputRejected, "input_non_finite"),
    "int8_too_big": (typed("INT8", "int_contents", [0, 128]), InputRejected, "input_out_of_range"),
    "int8_too_small": (typed("INT8", "int_contents", [-129]), InputRejected, "input_out_of_range"),
    "int16_too_small": (typed("INT16", "int_contents", [-40000]), InputRejected, "input_out_of_range"),
    "uint8_too_big": (typed("UINT8", "uint_contents", [256]), InputRejected, "input_out_of_range"),
    "uint16_too_big": (typed("UINT16", "uint_contents", [70000]), InputRejected, "input_out_of_range"),
    "bool_raw_not_0_or_1": (request(datatype="BOOL", shape=(2,), raw=b"\x01\x02"), InputRejected,
                            "input_wrong_type"),
    # typed contents: the datatype's field only
    "fp32_in_int_contents": (typed("FP32", "int_contents", [1]), InputRejected, "input_wrong_type"),
    "int64_in_int_contents": (typed("INT64", "int_contents", [1]), InputRejected, "input_wrong_type"),
    "fp16_has_no_typed_field": (typed("FP16", "fp32_contents", [1.0]), InputRejected, "input_wrong_type"),
    "two_typed_fields": (lambda m: None, None, ""),  # filled below
    "typed_count_mismatch": (typed("FP32", "fp32_contents", [1.0, 2.0], shape=(3,)), InputRejected,
                             "input_wrong_shape"),
    "typed_too_many_elements": (typed("INT32", "int_contents", [0] * (2**20 + 1)), PayloadTooLarge,
                                "input_too_large"),
    "typed_bytes_element_too_long": (typed("BYTES", "bytes_contents", [b"x" * 65537]), PayloadTooLarge,
                                     "input_too_large"),
    # BYTES framing (IN-14)
    "bytes_truncated_prefix": (_bytes_raw(b"\x01\x00"), MalformedRequest, "binary_bytes_framing"),
    "bytes_prefix_past_end": (_bytes_raw(b"\xff\xff\xff\xff" + b"abc"), MalformedRequest, "binary_bytes_framing"),
    "bytes_element_too_long": (_bytes_raw(struct.pack("<I", 65537) + b"x" * 65537), PayloadTooLarge,
                               "input_too_large"),
    "bytes_count_mismatch": (_bytes_raw(struct.pack("<I", 1) + b"a", shape=(2,)), MalformedRequest,
                             "input_wrong_shape"),
    # parameters: none anywhere (AUTHZ-12)
    "sequence_id": (_param("request", "sequence_id"), MalformedRequest, "request_parameter"),
    "priority": (_param("request", "priority"), MalformedRequest, "request_parameter"),
    "timeout": (_param("request", "timeout"), MalformedRequest, "request_parameter"),
    "binary_data_output": (_param("request", "binary_data_output"), MalformedRequest, "request_parameter"),
    "unknown_request_parameter": (_param("request", "evil john.doe@example.com"), MalformedRequest,
                                  "request_parameter"),
    "shared_memory_region": (_param("input", "shared_memory_region"), MalformedRequest, "input_parameter"),
    "binary_data_size": (_param("input", "binary_data_size"), MalformedRequest, "input_parameter"),
    "classification": (_param("output", "classification"), MalformedRequest, "output_parameter"),
    "output_binary_data": (_param("output", "binary_data"), MalformedRequest, "output_parameter"),
    # id (IN-17, IN-18)
    "long_id": (_set("id", "x" * 129), MalformedRequest, "request_invalid_id"),
    "crlf_in_id": (_set("id", "a\r\nSet-Cookie: evil"), MalformedRequest, "request_invalid_id"),
    "nul_in_id": (_set("id", "a\x00b"), MalformedRequest, "request_invalid_id"),
    "line_separator_in_id": (_set("id", "a\u2028b"), MalformedRequest, "request_invalid_id"),
    "c1_control_in_id": (_set("id", "a\x85b"), MalformedRequest, "request_invalid_id"),
    # requested outputs
    "output_bad_name": (lambda m: m.outputs.add(name="y\nevil"), MalformedRequest, "output_invalid_name"),
    "output_duplicate": (lambda m: [m.outputs.add(name="y") for _ in range(2)], MalformedRequest,
                         "output_duplicate"),
    "too_many_outputs": (lambda m: [m.outputs.add(name=f"o{n}") for n in range(65)], PayloadTooLarge,
                         "input_too_large"),
}
_two_fields = typed("INT32", "int_contents", [1])
_two_fields.inputs[0].contents.int64_contents.append(1)
REFUSALS["two_typed_fields"] = (_two_fields, InputRejected, "input_wrong_type")


def _build(spec: Any) -> Any:
    if callable(spec):
        message = request()
        spec(message)
        return message
    return spec


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case: str) -> None:
    spec, error, reason = REFUSALS[case]
    with pytest.raises(error) as info:
        decode(_build(spec))
    assert info.value.reason == reason
    message = info.value.client_message()
    for canary in CANARIES:
        assert canary not in message, f"{case}: echoes {canary!r}"


@pytest.mark.parametrize(("where", "build"), [
    ("request", lambda: service_pb2.ModelInferRequest.FromString(with_unknown_field(request()))),
    ("input", lambda: _nested_unknown("inputs")),
    ("output", lambda: _nested_unknown("outputs")),
    ("contents", lambda: _nested_unknown("contents")),
])
def test_unknown_fields_are_refused(where: str, build: Callable[[], Any]) -> None:
    with pytest.raises(MalformedRequest) as info:
        decode(build())
    assert info.value.reason == "request_unknown_field"


def _nested_unknown(where: str) -> Any:
    message = request()
    if where == "inputs":
        tensor = service_pb2.ModelInferRequest.InferInputTensor.FromString(with_unknown_field(message.inputs[0]))
        message.inputs[0].CopyFrom(tensor)
    elif where == "outputs":
        out = service_pb2.ModelInferRequest.InferRequestedOutputTensor(name="y")
        message.outputs.append(service_pb2.ModelInferRequest.InferRequestedOutputTensor.FromString(
            with_unknown_field(out)))
    else:
        message.ClearField("raw_input_contents")
        contents = service_pb2.InferTensorContents(fp32_contents=[0.0] * 4)
        message.inputs[0].contents.CopyFrom(service_pb2.InferTensorContents.FromString(with_unknown_field(contents)))
    return message


def test_limits_come_from_policy() -> None:
    tight = CodecLimits(max_elements_per_tensor=3, max_dims=1, max_inputs=1)
    with pytest.raises(PayloadTooLarge):
        decode(request(shape=(4,)), tight)
    with pytest.raises(MalformedRequest):
        decode(request(shape=(1, 1)), tight)


def test_parameter_message_is_deterministic() -> None:
    """Map order is arbitrary; the message names sequence_id first, as the REST front does."""
    inputs = [grpcclient.InferInput("x", [1], "FP32")]
    inputs[0].set_data_from_numpy(np.zeros(1, np.float32))
    message = _get_inference_request("m", inputs, "", "", None, 5, True, False, 3, 100, None)
    with pytest.raises(MalformedRequest, match="parameter 'sequence_id' is not allowed"):
        decode(message)


# ---------------------------------------------------------------------------------------
# Parity with the REST codec: the same defect, the same class and reason
# ---------------------------------------------------------------------------------------


def _http_binary(datatype: str, shape: list[int], raw: bytes, **extra: Any) -> Any:
    header = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape,
                          "parameters": {"binary_data_size": len(raw)}}], **extra}
    head = json.dumps(header).encode()
    return decode_infer_request("m", "", head + raw, header_length=str(len(head)), limits=LIMITS)


PARITY: list[tuple[str, str, list[int], bytes]] = [
    ("nan", "FP32", [2], _f32(1, math.nan)),
    ("inf_fp16", "FP16", [1], np.array([np.inf], "<f2").tobytes()),
    ("short", "FP32", [1, 4], b"\x00" * 12),
    ("not_multiple", "INT32", [1], b"\x00" * 3),
    ("huge_shape", "FP32", [2**62, 4], b"\x00" * 16),
    ("bool_2", "BOOL", [1], b"\x02"),
    ("bytes_truncated", "BYTES", [1], b"\x01\x00"),
    ("bytes_past_end", "BYTES", [1], b"\xff\xff\xff\xff"),
    ("bytes_too_long", "BYTES", [1], struct.pack("<I", 65537) + b"x" * 65537),
    ("negative_dim", "FP32", [-1], b""),
    ("too_many_dims", "FP32", [1] * 9, b"\x00" * 4),
    ("bad_datatype", "FP8", [1], b"\x00"),
    ("too_many_elements", "UINT8", [2**20 + 1], b"\x00" * (2**20 + 1)),
]


def _outcome(fn: Callable[[], Any]) -> tuple[type[GatewayError], str] | None:
    try:
        fn()
    except GatewayError as exc:
        return type(exc), exc.reason
    return None


@pytest.mark.parametrize(("case", "datatype", "shape", "raw"), PARITY, ids=[p[0] for p in PARITY])
def test_same_refusal_as_rest_binary(case: str, datatype: str, shape: list[int], raw: bytes) -> None:
    message = service_pb2.ModelInferRequest(model_name="m")
    message.inputs.add(name="x", datatype=datatype, shape=shape)
    message.raw_input_contents.append(raw)
    grpc_outcome = _outcome(lambda: decode(message))
    assert grpc_outcome is not None
    assert grpc_outcome == _outcome(lambda: _http_binary(datatype, shape, raw))


@pytest.mark.parametrize(("case", "request_id"), [("long", "x" * 129), ("crlf", "a\r\nb"), ("ok", "a-b.c:1")])
def test_same_id_rules_as_rest(case: str, request_id: str) -> None:
    message = request(shape=(1,))
    message.id = request_id
    assert _outcome(lambda: decode(message)) == _outcome(lambda: _http_binary("FP32", [1], b"\x00" * 4,
                                                                             id=request_id))


# ---------------------------------------------------------------------------------------
# Model names and versions: the REST router's rules
# ---------------------------------------------------------------------------------------


def test_name_rules_are_the_routers() -> None:
    assert MODEL_NAME.pattern == routes._NAME.pattern
    assert MODEL_VERSION.pattern == routes._VERSION.pattern


@pytest.mark.parametrize("name", ["", "../risk", "a/b", "a b", "x" * 129, "digits\n", "ümlaut", ".hidden", "-x"])
def test_invalid_model_names(name: str) -> None:
    with pytest.raises(NotFound) as info:
        check_model_ref(name, "")
    assert info.value.reason == "model_name_invalid"
    assert name not in info.value.client_message() or not name


@pytest.mark.parametrize("version", ["1a", "-1", "0x1", " 1", "1" * 20])
def test_invalid_versions(version: str) -> None:
    with pytest.raises(NotFound) as info:
        check_model_ref("digits", version)
    assert info.value.reason == "model_version_invalid"


def test_valid_model_refs() -> None:
    check_model_ref("digits", "")
    check_model_ref("text_echo.v2-b", "12")


# ---------------------------------------------------------------------------------------
# Responses: raw_output_contents, checked like the REST encoder's
# ---------------------------------------------------------------------------------------


def test_response_round_trips_through_tritonclient() -> None:
    probs = np.array([[0.25, 0.75]], dtype=np.float32)
    words = np.array([b"A", "Ü".encode(), b""], dtype=np.object_)
    resp = InferResponse(model_name="m", model_version="1", id="r-1", outputs=[
        Tensor("p", "FP32", (1, 2), probs), Tensor("w", "BYTES", (3,), words)])
    message = encode_model_infer_response(resp)
    assert (message.model_name, message.model_version, message.id) == ("m", "1", "r-1")
    result = grpcclient.InferResult(service_pb2.ModelInferResponse.FromString(message.SerializeToString()))
    np.testing.assert_array_equal(result.as_numpy("p"), probs)
    assert list(result.as_numpy("w")) == list(words)
    assert bytes(message.raw_output_contents[1]) == bytes(serialize_byte_tensor(words).item())


@pytest.mark.parametrize(("tensor", "reason"), [
    (Tensor("p", "FP32", (2,), np.array([1.0, np.nan], np.float32)), "upstream_non_finite"),
    (Tensor("p", "FP32", (3,), np.zeros(2, np.float32)), "upstream_bad_output"),
    (Tensor("p", "INT8", (1,), np.array([1000], np.int64)), "upstream_bad_output"),
    (Tensor("p", "BF16", (1,), np.zeros(1, np.float32)), "upstream_bad_output"),
    (Tensor("p", "FP32", (-1,), np.zeros(1, np.float32)), "upstream_bad_output"),
])
def test_bad_upstream_outputs_are_refused(tensor: Tensor, reason: str) -> None:
    with pytest.raises(UpstreamBadResponse) as info:
        encode_model_infer_response(InferResponse(model_name="m", model_version="1", outputs=[tensor]))
    assert info.value.reason == reason


@pytest.mark.parametrize(("where", "wording"), [
    ("request", "malformed request: request parameter with an unknown name is not allowed"),
    ("input", "malformed request: input 'x': parameter with an unknown name is not allowed"),
])
def test_an_unknown_parameter_is_refused_in_plain_words(where: str, wording: str) -> None:
    """tritonclient's ``parameters={"foo": 1}``: the name is not echoed, and the sentence
    reads as one (it used to say "request an unknown parameter is not allowed")."""
    with pytest.raises(MalformedRequest) as info:
        decode(_build(_param(where, "foo")))
    assert info.value.client_message().startswith(wording)
