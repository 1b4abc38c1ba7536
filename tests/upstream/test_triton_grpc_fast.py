"""The gRPC upstream's direct path is tritonclient's ``infer``, minus its per-call Python.

``TritonGrpcUpstream.infer`` builds the ``ModelInferRequest`` itself and decodes the reply's
raw contents itself (see the module docstring). These tests pin that nothing changed: the
request message is byte-identical to the one tritonclient builds from ``InferInput``s, the
same inputs are refused, and every datatype decodes to the same array ``as_numpy`` gave
(the old path), on constructed replies and on real MLServer replies.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc._utils as tgrpc_utils
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

from gateway.errors import InputRejected, UpstreamBadResponse
from gateway.kserve import DTYPES, InferRequest, ModelMetadata, NDArray, RequestedOutput, Tensor, TensorSpec
from gateway.upstream import triton_grpc
from gateway.upstream.model_repo import requested_outputs
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.conftest import DIGIT_ZERO
from tests.support.mlserver import MLServerProcess, start_mlserver

REPO_ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(11)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _bytes_array(values: list[bytes], shape: tuple[int, ...] | None = None) -> NDArray:
    array = np.empty(len(values), dtype=np.object_)
    array[:] = values
    return array.reshape(shape if shape is not None else (len(values),))


def _sample(datatype: str, shape: tuple[int, ...]) -> NDArray:
    """Values that exercise the datatype: extremes, NaN/inf, odd byte strings."""
    count = int(np.prod(shape))
    if datatype == "BYTES":
        pool = [b"", b"caf\xc3\xa9", b"\xff\xfe\x00", b"x" * 300, b"\x00\x00"]
        return _bytes_array([pool[i % len(pool)] for i in range(count)], shape)
    dtype = DTYPES[datatype]
    if datatype == "BOOL":
        flags: NDArray = (RNG.integers(0, 2, count) == 1).reshape(shape)
        return flags
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = RNG.integers(info.min, info.max, count, dtype=dtype, endpoint=True)
        values[:2] = (info.min, info.max)[: min(2, count)]
        return values.reshape(shape)
    values = RNG.standard_normal(count).astype(dtype)
    specials = np.array([np.nan, np.inf, -np.inf, -0.0], dtype=dtype)
    values[: min(4, count)] = specials[: min(4, count)]
    return values.reshape(shape)


ALL_TYPES = sorted(DTYPES)


# ---------------------------------------------------------------------- the old path, kept as a reference


def _old_message(request: InferRequest) -> Any:
    """What the previous code sent: InferInput + set_data_from_numpy, then tritonclient's builder."""
    inputs = []
    for tensor in request.inputs:
        infer_input = tgrpc.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
        infer_input.set_data_from_numpy(tensor.data)
        inputs.append(infer_input)
    outputs = [tgrpc.InferRequestedOutput(out.name) for out in request.outputs] or None
    return tgrpc_utils._get_inference_request(
        model_name=request.model, inputs=inputs, model_version=request.version, request_id=request.id or "",
        outputs=outputs, sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None,
        parameters=None,
    )


def _old_array(response: Any, name: str, datatype: str, shape: tuple[int, ...]) -> NDArray:
    """What the previous code returned for one raw output: as_numpy, dtype, writable copy, reshape."""
    decoded = tgrpc.InferResult(response).as_numpy(name)
    assert isinstance(decoded, np.ndarray)
    array: NDArray = decoded
    if datatype != "BYTES":
        array = array.astype(DTYPES[datatype], copy=False)
    array = array if array.flags.writeable else array.copy()
    return array.reshape(shape)


def _assert_same_array(new: NDArray, old: NDArray) -> None:
    assert new.dtype == old.dtype and new.shape == old.shape
    assert new.flags.writeable and new.flags.c_contiguous
    if new.dtype == np.object_:
        assert new.tolist() == old.tolist()
        assert all(type(v) is bytes for v in new.flat)
    else:
        assert new.tobytes() == old.tobytes()  # bit for bit: NaN payloads, -0.0


# ---------------------------------------------------------------------- requests


def _requests() -> list[InferRequest]:
    cases = [
        InferRequest("m", "", [Tensor(f"in_{dt.lower()}", dt, (2, 3), _sample(dt, (2, 3)))]) for dt in ALL_TYPES
    ]
    cases += [
        InferRequest("digits", "1", [Tensor("pixels", "FP32", (1, 64), np.asarray([DIGIT_ZERO], np.float32))],
                     outputs=[RequestedOutput("probabilities")], id="req-7", traceparent=TRACEPARENT),
        InferRequest("multi", "2", [Tensor("a", "INT64", (1,), np.array([5])),
                                    Tensor("t", "BYTES", (2, 1), _bytes_array([b"x", b""], (2, 1)))],
                     outputs=[RequestedOutput("z"), RequestedOutput("y", binary=True)], id=""),
        InferRequest("empty", "", [Tensor("t", "BYTES", (0,), _bytes_array([])),
                                   Tensor("f", "FP16", (0, 4), np.zeros((0, 4), np.float16))]),
        # An "S" array is BYTES to tritonclient too (numpy drops trailing NULs, for both).
        InferRequest("s", "", [Tensor("t", "BYTES", (2,), np.array([b"ab\x00", b"c"], dtype="S3"))]),
        # Non-contiguous arrays go out in row-major order.
        InferRequest("t", "", [Tensor("x", "INT32", (3, 2), np.arange(6, dtype=np.int32).reshape(2, 3).T)]),
    ]
    return cases


@pytest.mark.parametrize("request_", _requests(), ids=lambda r: f"{r.model}-{r.inputs[0].datatype}")
def test_request_message_is_byte_identical_to_tritonclients(request_: InferRequest) -> None:
    new = triton_grpc._infer_message(request_)
    old = _old_message(request_)
    assert new == old
    assert new.SerializeToString() == old.SerializeToString()


def _refused_by_tritonclient(tensor: Tensor) -> bool:
    try:
        tgrpc.InferInput(tensor.name, list(tensor.shape), tensor.datatype).set_data_from_numpy(tensor.data)
    except InferenceServerException:
        return True
    return False


MISMATCHED = [
    Tensor("x", "FP32", (1, 2), np.zeros((1, 2), np.float64)),  # dtype
    Tensor("x", "FP32", (2, 1), np.zeros((1, 2), np.float32)),  # shape
    Tensor("x", "FP32", (2,), np.zeros((1, 2), np.float32)),  # rank
    Tensor("x", "INT64", (2,), np.zeros(2, ">i8")),  # byte order
    Tensor("x", "BF16", (2,), np.zeros(2, np.float32)),  # no numpy dtype
    Tensor("x", "BYTES", (0,), np.zeros(0, np.float32)),  # empty, but not a bytes array
    Tensor("x", "UINT8", (2,), _bytes_array([b"a", b"b"])),
]


@pytest.mark.parametrize("tensor", MISMATCHED, ids=lambda t: f"{t.datatype}-{t.data.dtype}-{t.shape}")
def test_inputs_tritonclient_refuses_are_refused(tensor: Tensor) -> None:
    assert _refused_by_tritonclient(tensor)
    with pytest.raises(InputRejected) as info:
        triton_grpc._infer_message(InferRequest("m", "", [tensor]))
    assert info.value.reason == "input_datatype"


@pytest.mark.parametrize("values", [["text"], [b"ok", 3]], ids=["str", "int"])
def test_bytes_elements_that_are_not_bytes_are_refused(values: list[Any]) -> None:
    data = np.empty(len(values), dtype=np.object_)
    data[:] = values
    with pytest.raises(InputRejected, match="BYTES elements must be bytes"):
        triton_grpc._infer_message(InferRequest("m", "", [Tensor("t", "BYTES", data.shape, data)]))


# ---------------------------------------------------------------------- responses


def _response(outputs: list[tuple[str, str, NDArray]]) -> Any:
    response = service_pb2.ModelInferResponse(model_name="m", model_version="1", id="r")
    for name, datatype, array in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            response.raw_output_contents.append(serialize_byte_tensor(array).item() if array.size else b"")
        else:
            response.raw_output_contents.append(array.tobytes())
    return response


def _meta(outputs: list[tuple[str, str, NDArray]]) -> ModelMetadata:
    return ModelMetadata(
        name="m", versions=("1",), platform="p", inputs=(),
        outputs=tuple(TensorSpec(name, dt, tuple(-1 for _ in a.shape)) for name, dt, a in outputs),
    )


@pytest.mark.parametrize("shape", [(2, 3), (1,), (0, 5), ()], ids=str)
def test_every_datatype_decodes_as_as_numpy_did(shape: tuple[int, ...]) -> None:
    outputs = [(f"out_{dt.lower()}", dt, _sample(dt, shape)) for dt in ALL_TYPES]
    response = _response(outputs)
    request = InferRequest("m", "", [])
    metadata = _meta(outputs)
    tensors = triton_grpc._outputs(response, request, requested_outputs(metadata, request), metadata)
    assert [(t.name, t.datatype, t.shape) for t in tensors] == [(n, dt, shape) for n, dt, _ in outputs]
    for tensor, (name, datatype, sent) in zip(tensors, outputs, strict=True):
        _assert_same_array(tensor.data, _old_array(response, name, datatype, shape))
        _assert_same_array(tensor.data, sent.astype(DTYPES[datatype]))


def test_decoded_arrays_do_not_share_memory_with_the_reply() -> None:
    outputs = [("a", "FP32", np.arange(4, dtype=np.float32)), ("b", "FP32", np.arange(4, dtype=np.float32))]
    response = _response(outputs)
    request = InferRequest("m", "", [])
    tensors = triton_grpc._outputs(response, request, ["a", "b"], None)
    tensors[0].data[:] = -1  # stages write in place
    assert tensors[1].data.tolist() == [0, 1, 2, 3]
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "raw",
    [
        b"\x05\x00\x00\x00abc",  # element overruns the buffer
        b"\x01\x00\x00\x00a\x01\x00",  # truncated length prefix
        b"\x01\x00\x00\x00a",  # one element where the shape says two
        b"\x01\x00\x00\x00a\x01\x00\x00\x00b\x00\x00\x00\x00",  # three
    ],
)
def test_malformed_bytes_contents_are_a_bad_response(raw: bytes) -> None:
    response = service_pb2.ModelInferResponse(model_name="m")
    response.outputs.add(name="t", datatype="BYTES", shape=[2])
    response.raw_output_contents.append(raw)
    with pytest.raises(UpstreamBadResponse):
        triton_grpc._outputs(response, InferRequest("m", "", []), ["t"], None)


# ---------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def mlserver() -> Iterator[MLServerProcess]:
    server = start_mlserver(REPO_ROOT / "triton_repo", Path(tempfile.mkdtemp(prefix="fast-path-mlserver-")))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def upstream(mlserver: MLServerProcess) -> AsyncIterator[TritonGrpcUpstream]:
    client = TritonGrpcUpstream(mlserver.grpc_url)
    await client.start()
    yield client
    await client.close()


def _mlserver_requests() -> list[InferRequest]:
    rows = np.asarray([DIGIT_ZERO, DIGIT_ZERO[::-1]], np.float32)
    return [
        InferRequest("digits", "", [Tensor("pixels", "FP32", rows.shape, rows)], id="d1", traceparent=TRACEPARENT),
        InferRequest("digits", "1", [Tensor("pixels", "FP32", (1, 64), rows[:1])],
                     outputs=[RequestedOutput("probabilities")]),
        InferRequest("text_echo", "", [Tensor("text", "BYTES", (3,), _bytes_array([b"caf\xc3\xa9", b"", b"\xff" * 9]))],
                     id="t1"),
    ]


@pytest.mark.parametrize("request_", _mlserver_requests(), ids=lambda r: f"{r.model}-{r.version or 'default'}")
async def test_mlserver_reply_decodes_as_before(upstream: TritonGrpcUpstream, request_: InferRequest) -> None:
    """One real reply, decoded by the new path and by the old (as_numpy) path: same arrays."""
    client: Any = upstream._client
    response = await client.model_infer(triton_grpc._infer_message(request_), metadata=(), deadline_s=10.0)
    metadata = await upstream.model_metadata(request_.model, request_.version, timeout_s=10.0)
    expected = requested_outputs(metadata, request_)
    tensors = triton_grpc._outputs(response, request_, expected, metadata)
    assert [t.name for t in tensors] == expected
    for tensor in tensors:
        _assert_same_array(tensor.data, _old_array(response, tensor.name, tensor.datatype, tensor.shape))
    if request_.model == "text_echo":
        assert tensors[0].data.tolist() == request_.inputs[0].data.tolist()


@pytest.mark.parametrize("request_", _mlserver_requests(), ids=lambda r: f"{r.model}-{r.version or 'default'}")
async def test_infer_matches_tritonclient_infer(upstream: TritonGrpcUpstream, request_: InferRequest) -> None:
    """End to end: upstream.infer gives what tritonclient's own infer + as_numpy gives."""
    got = await upstream.infer(request_, timeout_s=10.0)
    client: Any = upstream._client
    inputs = []
    for tensor in request_.inputs:
        infer_input = tgrpc.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
        inputs.append(infer_input.set_data_from_numpy(tensor.data))
    outputs = [tgrpc.InferRequestedOutput(o.name) for o in request_.outputs] or None
    result = await client.infer(request_.model, inputs, model_version=request_.version, outputs=outputs,
                                request_id=request_.id or "")
    reference = result.get_response()
    assert got.id == request_.id and got.model_name == request_.model
    assert got.model_version == (reference.model_version or request_.version)
    assert [t.name for t in got.outputs] == [o.name for o in reference.outputs]
    for tensor in got.outputs:
        assert tensor.shape == tuple(next(o.shape for o in reference.outputs if o.name == tensor.name))
        _assert_same_array(tensor.data, _old_array(reference, tensor.name, tensor.datatype, tensor.shape))


async def test_grpc_errors_are_converted_as_tritonclient_does(upstream: TritonGrpcUpstream) -> None:
    """model_infer raises InferenceServerException with the status string, like client.infer."""
    client: Any = upstream._client
    message = triton_grpc._infer_message(
        InferRequest("no_such_model", "", [Tensor("x", "FP32", (1,), np.zeros(1, np.float32))])
    )
    with pytest.raises(InferenceServerException) as new:
        await client.model_infer(message, metadata=(), deadline_s=10.0)
    with pytest.raises(InferenceServerException) as old:
        await client.infer("no_such_model", [tgrpc.InferInput("x", [1], "FP32").set_data_from_numpy(
            np.zeros(1, np.float32))])
    assert new.value.status() == old.value.status() and new.value.status() is not None
    assert triton_grpc.status_code_name(new.value) == triton_grpc.status_code_name(old.value)
