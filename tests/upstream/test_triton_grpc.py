"""TritonGrpcUpstream against the scriptable fake: mapping of every failure, and what goes out."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc  # type: ignore[import-untyped, unused-ignore]
import grpc.aio  # type: ignore[import-untyped, unused-ignore]
import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc_aio
from tritonclient.utils import InferenceServerException

from gateway.errors import (
    GatewayError,
    InputRejected,
    NotFound,
    UpstreamBadResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.kserve import InferRequest, ModelMetadata, RequestedOutput, Tensor, TensorSpec
from gateway.upstream import triton_grpc
from gateway.upstream.triton_grpc import TritonGrpcUpstream, status_code_name, upstream_error
from tests.support.fake_triton import (
    CANARY,
    EXTRA_OUTPUT,
    FakeTriton,
    bad_size,
    echo,
    error,
    extra_output,
    hang,
    nan_out,
    ok,
    slow,
    wrong_datatype,
    wrong_shape,
)
from tests.support.liveness import eventually, no_hang

# What a deadline gains on the wire: the grpc-timeout header is rounded up, and the server
# reads it against its own (cached) clock. Far below any difference the tests look for.
WIRE_SLACK_S = 0.01

DIGITS = ModelMetadata(
    name="digits",
    versions=("1",),
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("pixels", "FP32", (-1, 64)),),
    outputs=(TensorSpec("probabilities", "FP32", (-1, 10)),),
    max_batch_size=64,
)
TEXT = ModelMetadata(
    name="text_echo",
    versions=("1",),
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("text", "BYTES", (-1,)),),
    outputs=(TensorSpec("text", "BYTES", (-1,)),),
)
MULTI = ModelMetadata(
    name="multi",
    versions=("1", "2"),
    platform="onnxruntime_onnx",
    inputs=(TensorSpec("x", "FP32", (-1, 4)),),
    outputs=(TensorSpec("total", "FP32", (-1, 1)), TensorSpec("label", "INT64", (-1,))),
    max_batch_size=8,
)

# gRPC metadata keys gRPC itself may add; anything else reaching the upstream is a leak.
ALLOWED_METADATA = {"user-agent"}


class LogRecorder:
    """Stands in for the module's structlog logger (robust to cached logger configuration)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        def record(event: str, **kw: Any) -> None:
            self.events.append((level, event, kw))

        return record

    def text(self) -> str:
        return repr(self.events)


@pytest.fixture
async def fake() -> AsyncIterator[FakeTriton]:
    server = FakeTriton([DIGITS, TEXT, MULTI])
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def upstream(fake: FakeTriton) -> AsyncIterator[TritonGrpcUpstream]:
    client = TritonGrpcUpstream(fake.url)
    await client.start()
    yield client
    await client.close()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> LogRecorder:
    recorder = LogRecorder()
    monkeypatch.setattr(triton_grpc, "log", recorder)
    return recorder


def pixels(rows: int = 2) -> Tensor:
    data = np.arange(rows * 64, dtype=np.float32).reshape(rows, 64)
    return Tensor("pixels", "FP32", data.shape, data)


def text(values: list[bytes]) -> Tensor:
    data = np.empty(len(values), dtype=np.object_)
    data[:] = values
    return Tensor("text", "BYTES", data.shape, data)


def digits(**kw: Any) -> InferRequest:
    return InferRequest("digits", kw.pop("version", ""), [pixels()], **kw)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------- the status we branch on


async def test_tritonclient_status_is_the_enum_string(fake: FakeTriton) -> None:
    """What tritonclient 2.73.0 gives us to branch on: ``str(grpc.StatusCode.X)``."""
    client = tgrpc_aio.InferenceServerClient(fake.url)
    try:
        with pytest.raises(InferenceServerException) as info:
            await client.get_model_metadata("nope")
    finally:
        await client.close()
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert status_code_name(info.value) == "NOT_FOUND"


def test_status_code_name_sources() -> None:
    assert status_code_name(InferenceServerException("x", status="StatusCode.UNAVAILABLE")) == "UNAVAILABLE"
    assert status_code_name(InferenceServerException("raised by the library")) is None
    assert status_code_name(InferenceServerException("x", status="StatusCode.BOGUS")) is None
    rpc = grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "d"
    )
    assert status_code_name(rpc) == "DEADLINE_EXCEEDED"
    assert status_code_name(TimeoutError()) == "DEADLINE_EXCEEDED"
    assert status_code_name(ConnectionResetError()) == "UNAVAILABLE"
    assert status_code_name(ValueError("x")) is None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), CANARY),
            NotFound,
        ),
        (
            grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), CANARY
            ),
            UpstreamUnavailable,
        ),
        (TimeoutError(), UpstreamTimeout),
        (InferenceServerException(CANARY), UpstreamBadResponse),
        (RuntimeError(CANARY), UpstreamBadResponse),
    ],
)
def test_escaped_exceptions_are_mapped(exc: BaseException, expected: type[GatewayError]) -> None:
    mapped = upstream_error(exc, operation="test")
    assert type(mapped) is expected
    assert CANARY not in str(mapped)


# --------------------------------------------------------------------------- happy paths


async def test_health_and_metadata(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    assert await upstream.server_live(timeout_s=2)
    assert await upstream.server_ready(timeout_s=2)
    server = await upstream.server_metadata(timeout_s=2)
    assert (server.name, server.version, server.extensions) == ("fake-triton", "0.0.0-fake", ())
    meta = await upstream.model_metadata("multi", "", timeout_s=2)
    assert (meta.name, meta.versions, meta.platform) == ("multi", ("1", "2"), "onnxruntime_onnx")
    assert (meta.inputs, meta.outputs) == (MULTI.inputs, MULTI.outputs)
    assert await upstream.model_ready("digits", "", timeout_s=2)
    assert await upstream.model_ready("digits", "1", timeout_s=2)
    assert not await upstream.model_ready("digits", "2", timeout_s=2)
    assert not await upstream.model_ready("nope", "", timeout_s=2)


async def test_infer_ok(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    response = await upstream.infer(digits(id="req-1"), timeout_s=2)
    assert (response.model_name, response.model_version, response.id) == ("digits", "1", "req-1")
    [out] = response.outputs
    assert (out.name, out.datatype, out.shape) == ("probabilities", "FP32", (2, 10))
    assert out.data.dtype == np.float32 and out.data.shape == (2, 10)
    assert out.data.flags.writeable  # stages may write in place
    np.testing.assert_array_equal(out.data, np.zeros((2, 10), np.float32))


async def test_infer_with_a_callable(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    fake.set(ok(lambda inputs: {"probabilities": np.tile(inputs["pixels"][:, :10], 1)}))
    response = await upstream.infer(digits(), timeout_s=2)
    np.testing.assert_array_equal(response.outputs[0].data, pixels().data[:, :10])


async def test_bytes_round_trip_including_non_utf8(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    fake.set(echo())
    values = [b"hello", "wörld".encode(), b"\x00\xffbin", b"", bytes(range(256))]
    response = await upstream.infer(InferRequest("text_echo", "", [text(values)]), timeout_s=2)
    [out] = response.outputs
    assert (out.datatype, out.shape) == ("BYTES", (5,))
    assert list(out.data) == values
    assert all(type(v) is bytes for v in out.data)


async def test_requested_outputs(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    x = Tensor("x", "FP32", (1, 4), np.ones((1, 4), np.float32))
    all_out = await upstream.infer(InferRequest("multi", "2", [x]), timeout_s=2)
    assert [o.name for o in all_out.outputs] == ["total", "label"]
    assert all_out.model_version == "2"
    assert all_out.outputs[1].data.dtype == np.int64
    one = await upstream.infer(InferRequest("multi", "", [x], [RequestedOutput("label")]), timeout_s=2)
    assert [o.name for o in one.outputs] == ["label"]
    assert [o.name for o in fake.requests[-1].outputs] == ["label"]
    with pytest.raises(InputRejected):
        await upstream.infer(InferRequest("multi", "", [x], [RequestedOutput("nope")]), timeout_s=2)


async def test_nan_passes_through(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    """NaN/inf are values, not protocol errors: a response stage decides what to do with them."""
    fake.set(nan_out())
    out = (await upstream.infer(digits(), timeout_s=2)).outputs[0]
    assert np.isinf(out.data.flat[0]) and np.isnan(out.data.flat[1:]).all()


# --------------------------------------------------------------------------- what goes out


async def test_nothing_forbidden_reaches_the_upstream(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    fake.set(echo(), model="text_echo")
    await upstream.infer(InferRequest("text_echo", "", [text([b"a", b"b"])], id="r-9"), timeout_s=2)
    await upstream.infer(digits(outputs=[RequestedOutput("probabilities")]), timeout_s=2)
    await upstream.model_ready("digits", "", timeout_s=2)
    await upstream.server_live(timeout_s=2)
    for call in fake.calls:
        keys = {key for key, _ in call.metadata}
        assert keys <= ALLOWED_METADATA, (call.rpc, keys)
    assert len(fake.requests) == 2
    for request in fake.requests:
        assert len(request.parameters) == 0
        assert all(len(t.parameters) == 0 for t in request.inputs)
        assert all(len(o.parameters) == 0 for o in request.outputs)
    text_request, digits_request = fake.requests
    assert text_request.id == "r-9" and digits_request.id == ""
    assert text_request.model_version == "" and list(text_request.inputs[0].shape) == [2]
    assert text_request.raw_input_contents[0] == b"\x01\x00\x00\x00a\x01\x00\x00\x00b"
    assert digits_request.raw_input_contents[0] == pixels().data.tobytes()


async def test_non_bytes_elements_are_refused_not_stringified(
    upstream: TritonGrpcUpstream, fake: FakeTriton
) -> None:
    bad = Tensor("text", "BYTES", (1,), np.array(["a str"], dtype=np.object_))
    upstream_unchecked = TritonGrpcUpstream(fake.url, validate=False)
    await upstream_unchecked.start()
    try:
        for client in (upstream, upstream_unchecked):
            with pytest.raises(InputRejected):
                await client.infer(InferRequest("text_echo", "", [bad]), timeout_s=2)
    finally:
        await upstream_unchecked.close()
    assert fake.counts["ModelInfer"] == 0


# --------------------------------------------------------------------------- validation, metadata cache


@pytest.mark.parametrize(
    "tensor",
    [
        Tensor("pixels", "FP64", (1, 64), np.zeros((1, 64))),
        Tensor("pixels", "FP32", (1, 63), np.zeros((1, 63), np.float32)),
        Tensor("pixels", "FP32", (64,), np.zeros(64, np.float32)),
        Tensor("pixel", "FP32", (1, 64), np.zeros((1, 64), np.float32)),
    ],
)
async def test_bad_input_rejected_before_sending(
    upstream: TritonGrpcUpstream, fake: FakeTriton, tensor: Tensor
) -> None:
    with pytest.raises(InputRejected):
        await upstream.infer(InferRequest("digits", "", [tensor]), timeout_s=2)
    assert fake.counts["ModelInfer"] == 0


async def test_metadata_is_cached(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    for _ in range(3):
        await upstream.infer(digits(), timeout_s=2)
    assert fake.counts["ModelMetadata"] == 1
    assert fake.counts["ModelInfer"] == 3


async def test_metadata_cache_is_bounded(fake: FakeTriton) -> None:
    client = TritonGrpcUpstream(fake.url, metadata_cache_size=2)
    await client.start()
    try:
        for version in ("", "1", "", "1"):
            await client.infer(digits(version=version), timeout_s=2)
        await client.infer(InferRequest("text_echo", "", [text([b"x"])]), timeout_s=2)
        await client.infer(digits(version=""), timeout_s=2)  # evicted: fetched again
    finally:
        await client.close()
    assert fake.counts["ModelMetadata"] == 4


async def test_without_validation_requests_go_straight_out(fake: FakeTriton) -> None:
    client = TritonGrpcUpstream(fake.url, validate=False)
    await client.start()
    try:
        response = await client.infer(digits(), timeout_s=2)
    finally:
        await client.close()
    assert response.outputs[0].shape == (2, 10)
    assert fake.counts["ModelMetadata"] == 0


# --------------------------------------------------------------------------- error mapping

ERROR_MAPPING = [
    (grpc.StatusCode.NOT_FOUND, NotFound),
    (grpc.StatusCode.INVALID_ARGUMENT, InputRejected),
    (grpc.StatusCode.OUT_OF_RANGE, InputRejected),
    (grpc.StatusCode.FAILED_PRECONDITION, InputRejected),
    (grpc.StatusCode.DEADLINE_EXCEEDED, UpstreamTimeout),
    (grpc.StatusCode.UNAVAILABLE, UpstreamUnavailable),
    (grpc.StatusCode.CANCELLED, UpstreamUnavailable),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, UpstreamUnavailable),
    (grpc.StatusCode.UNIMPLEMENTED, UpstreamBadResponse),
    (grpc.StatusCode.INTERNAL, UpstreamBadResponse),
    (grpc.StatusCode.UNKNOWN, UpstreamBadResponse),
    (grpc.StatusCode.DATA_LOSS, UpstreamBadResponse),
    (grpc.StatusCode.ABORTED, UpstreamBadResponse),
    (grpc.StatusCode.ALREADY_EXISTS, UpstreamBadResponse),
    (grpc.StatusCode.PERMISSION_DENIED, UpstreamBadResponse),
    (grpc.StatusCode.UNAUTHENTICATED, UpstreamBadResponse),
]


@pytest.mark.parametrize(("code", "expected"), ERROR_MAPPING, ids=[c.name for c, _ in ERROR_MAPPING])
async def test_infer_error_mapping(
    upstream: TritonGrpcUpstream, fake: FakeTriton, logs: LogRecorder, code: Any, expected: type[GatewayError]
) -> None:
    fake.set(error(code))
    with pytest.raises(GatewayError) as info:
        await upstream.infer(digits(), timeout_s=2)
    assert type(info.value) is expected
    # SECURITY: the upstream's text reaches the log, never the client.
    assert CANARY not in str(info.value)
    assert CANARY not in (info.value.detail or "")
    assert CANARY not in info.value.client_message()
    assert CANARY in logs.text()
    assert code.name in logs.text()


@pytest.mark.parametrize("rpc", ["ServerLive", "ServerReady", "ServerMetadata", "ModelMetadata"])
@pytest.mark.parametrize(
    ("code", "expected"),
    [(grpc.StatusCode.UNAVAILABLE, UpstreamUnavailable), (grpc.StatusCode.INTERNAL, UpstreamBadResponse)],
)
async def test_other_rpcs_use_the_same_mapping(
    upstream: TritonGrpcUpstream, fake: FakeTriton, rpc: str, code: Any, expected: type[GatewayError]
) -> None:
    fake.set(error(code), rpc=rpc)
    call: Callable[[], Awaitable[object]] = {
        "ServerLive": lambda: upstream.server_live(timeout_s=2),
        "ServerReady": lambda: upstream.server_ready(timeout_s=2),
        "ServerMetadata": lambda: upstream.server_metadata(timeout_s=2),
        "ModelMetadata": lambda: upstream.model_metadata("digits", "", timeout_s=2),
    }[rpc]
    with pytest.raises(expected) as info:
        await call()
    assert CANARY not in str(info.value)


async def test_unknown_model_and_version(upstream: TritonGrpcUpstream) -> None:
    for model, version in [("nope", ""), ("digits", "2")]:
        with pytest.raises(NotFound) as info:
            await upstream.infer(InferRequest(model, version, [pixels()]), timeout_s=2)
        assert CANARY not in str(info.value)
        assert "digits" not in str(info.value) and "nope" not in str(info.value)


@pytest.mark.parametrize(
    ("code", "ready"),
    [(grpc.StatusCode.UNKNOWN, False), (grpc.StatusCode.NOT_FOUND, False)],
)
async def test_model_ready_unknown_model_is_false(
    upstream: TritonGrpcUpstream, fake: FakeTriton, code: Any, ready: bool
) -> None:
    """MLServer answers is_model_ready(unknown) with UNKNOWN, Triton with NOT_FOUND."""
    fake.set(error(code, "Unexpected <class 'mlserver.errors.ModelNotFound'>"), rpc="ModelReady")
    assert await upstream.model_ready("nope", "", timeout_s=2) is ready


async def test_model_ready_other_errors_still_raise(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    fake.set(error(grpc.StatusCode.INTERNAL), rpc="ModelReady")
    with pytest.raises(UpstreamBadResponse):
        await upstream.model_ready("digits", "", timeout_s=2)
    fake.set(hang(), rpc="ModelReady")
    with pytest.raises(UpstreamTimeout):
        await upstream.model_ready("digits", "", timeout_s=0.2)


# --------------------------------------------------------------------------- deadlines, outages


async def test_hang_times_out_within_the_deadline(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    """The caller's budget travels as the gRPC deadline, and ends the call on both sides."""
    await upstream.infer(digits(), timeout_s=2)  # warm: channel connected, metadata cached
    fake.set(hang())
    async with no_hang("a hung ModelInfer with a 0.3 s budget", expected_s=0.3) as watch:
        with pytest.raises(UpstreamTimeout):
            await upstream.infer(digits(), timeout_s=0.3)
    call = fake.calls[-1]
    assert call.rpc == "ModelInfer"
    assert call.deadline_s is not None and 0 < call.deadline_s <= 0.3 + WIRE_SLACK_S  # the budget
    # Not a speed check: a deadline can only fire late, never early; this one waited its budget.
    assert watch.seconds >= 0.25
    # The deadline travelled with the call: the server side was cancelled too.
    await eventually(lambda: fake.cancelled["ModelInfer"], "the server seeing the cancellation")
    assert fake.cancelled["ModelInfer"] == 1


async def test_deadline_covers_metadata_and_infer(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    """One budget for the request: the infer call gets what the metadata call left of it."""
    fake.set(slow(0.3), rpc="ModelMetadata")
    fake.set(hang())
    async with no_hang("metadata then a hung ModelInfer, 0.6 s budget", expected_s=0.6):
        with pytest.raises(UpstreamTimeout):
            await upstream.infer(digits(), timeout_s=0.6)
    deadlines = {c.rpc: c.deadline_s for c in fake.calls}
    assert list(deadlines) == ["ModelMetadata", "ModelInfer"]
    metadata_deadline, infer_deadline = deadlines["ModelMetadata"], deadlines["ModelInfer"]
    assert metadata_deadline is not None and 0 < metadata_deadline <= 0.6 + WIRE_SLACK_S
    # The metadata call slept 0.3 s of the 0.6: a fresh budget per call would send ~0.6 here.
    assert infer_deadline is not None and infer_deadline <= 0.6 - 0.3 + WIRE_SLACK_S


async def test_slow_but_in_time(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    fake.set(slow(0.05))
    assert (await upstream.infer(digits(), timeout_s=2)).outputs[0].shape == (2, 10)


async def test_hung_health_check_times_out(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    fake.set(hang(), rpc="ServerLive")
    async with no_hang("a hung ServerLive with a 0.2 s budget", expected_s=0.2):
        with pytest.raises(UpstreamTimeout):
            await upstream.server_live(timeout_s=0.2)
    call = fake.calls[-1]
    assert call.rpc == "ServerLive" and call.deadline_s is not None and 0 < call.deadline_s <= 0.2 + WIRE_SLACK_S


async def test_server_goes_down(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    await upstream.infer(digits(), timeout_s=2)
    await fake.stop()
    with pytest.raises(UpstreamUnavailable):
        await upstream.infer(digits(), timeout_s=2)
    with pytest.raises(UpstreamUnavailable):
        await upstream.server_live(timeout_s=2)


async def test_nothing_listening() -> None:
    client = TritonGrpcUpstream(f"127.0.0.1:{free_port()}")
    await client.start()
    try:
        # Unavailable, not UpstreamTimeout: refused at once rather than waiting the budget out.
        async with no_hang("two calls with nothing listening"):
            with pytest.raises(UpstreamUnavailable):
                await client.infer(digits(), timeout_s=2)
            with pytest.raises(UpstreamUnavailable):
                await client.server_ready(timeout_s=2)
    finally:
        await client.close()


async def test_lifecycle(fake: FakeTriton) -> None:
    client = TritonGrpcUpstream(fake.url)
    with pytest.raises(UpstreamUnavailable):
        await client.infer(digits(), timeout_s=2)
    await client.start()
    await client.start()  # idempotent: still one channel
    assert await client.server_live(timeout_s=2)
    await client.close()
    await client.close()
    with pytest.raises(UpstreamUnavailable):
        await client.server_live(timeout_s=2)


# --------------------------------------------------------------------------- response sanity


@pytest.mark.parametrize(
    "behaviour", [wrong_shape(), bad_size(), extra_output()], ids=["wrong_shape", "bad_size", "extra_output"]
)
async def test_malformed_responses_are_bad_responses(
    upstream: TritonGrpcUpstream, fake: FakeTriton, behaviour: Any
) -> None:
    fake.set(behaviour)
    with pytest.raises(UpstreamBadResponse):
        await upstream.infer(digits(), timeout_s=2)


@pytest.mark.parametrize(
    "behaviour",
    [bad_size(), extra_output(), wrong_datatype()],
    ids=["bad_size", "extra_output", "wrong_datatype"],
)
async def test_malformed_bytes_responses(
    upstream: TritonGrpcUpstream, fake: FakeTriton, behaviour: Any
) -> None:
    """BYTES: a truncated length-prefixed buffer, an extra output, a numeric label."""
    fake.set(behaviour)
    with pytest.raises(UpstreamBadResponse):
        await upstream.infer(InferRequest("text_echo", "", [text([b"x", b"y"])]), timeout_s=2)


async def test_output_not_requested_is_a_bad_response(fake: FakeTriton) -> None:
    """Even without metadata (validate=False) an output nobody asked for is refused."""
    client = TritonGrpcUpstream(fake.url, validate=False)
    await client.start()
    try:
        fake.set(extra_output())
        with pytest.raises(UpstreamBadResponse):
            await client.infer(digits(outputs=[RequestedOutput("probabilities")]), timeout_s=2)
        fake.set(ok())
        response = await client.infer(digits(outputs=[RequestedOutput("probabilities")]), timeout_s=2)
        assert [o.name for o in response.outputs] == ["probabilities"]
    finally:
        await client.close()
    assert EXTRA_OUTPUT not in [o.name for o in response.outputs]


async def test_declared_datatype_is_enforced(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    """INT32 where FP32 is declared: same size, consistent data, still not what was declared."""
    fake.set(wrong_datatype())
    with pytest.raises(UpstreamBadResponse):
        await upstream.infer(digits(), timeout_s=2)


async def test_any_shape_fits_a_variable_dim(upstream: TritonGrpcUpstream, fake: FakeTriton) -> None:
    fake.set(ok(lambda inputs: {"text": np.array([b"a", b"b", b"c"], dtype=np.object_)}), model="text_echo")
    response = await upstream.infer(InferRequest("text_echo", "", [text([b"x"])]), timeout_s=2)
    assert response.outputs[0].shape == (3,)


# -- AV-05: an upstream that was down comes back without a gateway restart ---------------


async def test_reconnect_backoff_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC's default reconnect backoff grows to 120 s: after 30 s of upstream downtime the
    gateway stayed unready ~16 s after the upstream came back. The channel caps it."""
    seen: dict[str, Any] = {}

    class Recording(triton_grpc._InferenceClient):  # type: ignore[misc, name-defined]
        def __init__(self, url: str, **kwargs: Any) -> None:
            seen.update(dict(kwargs["channel_args"]))
            super().__init__(url, **kwargs)

    monkeypatch.setattr(triton_grpc, "_InferenceClient", Recording)
    client = TritonGrpcUpstream("127.0.0.1:1")
    await client.start()
    try:
        assert seen["grpc.max_reconnect_backoff_ms"] == triton_grpc.RECONNECT_BACKOFF_MAX_MS <= 1_000
        assert seen["grpc.initial_reconnect_backoff_ms"] <= seen["grpc.max_reconnect_backoff_ms"]
        # Left at gRPC's default: it is also the minimum connect timeout (a slow TLS upstream).
        assert "grpc.min_reconnect_backoff_ms" not in seen
    finally:
        await client.close()


async def test_upstream_down_then_up_then_down_again() -> None:
    """Not ready while nothing listens; ready once the upstream is up (same channel, no
    restart); not ready again when it goes away."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = TritonGrpcUpstream(f"127.0.0.1:{port}")
    await client.start()
    fake = FakeTriton([DIGITS])
    try:
        for _ in range(5):  # several failed attempts: the backoff has grown
            with pytest.raises(UpstreamUnavailable):
                await client.server_ready(timeout_s=1.0)
        await fake.start(port)
        backoff_s = triton_grpc.RECONNECT_BACKOFF_MAX_MS / 1000 * 1.2  # with gRPC's jitter
        async with no_hang("ready after the upstream came up", expected_s=backoff_s):
            while True:
                try:
                    if await client.server_ready(timeout_s=1.0):
                        break
                except UpstreamUnavailable:
                    pass
                await asyncio.sleep(0.05)
        await fake.stop()
        with pytest.raises(UpstreamUnavailable):
            await client.server_ready(timeout_s=1.0)
    finally:
        await fake.stop()
        await client.close()
