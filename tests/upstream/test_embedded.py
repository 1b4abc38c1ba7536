"""The embedded onnxruntime upstream against the real triton_repo and tiny generated models."""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway.errors import InputRejected, NotFound, UpstreamBadResponse, UpstreamTimeout, UpstreamUnavailable
from gateway.kserve import InferRequest, InferResponse, RequestedOutput, Tensor, TensorSpec
from gateway.upstream import embedded
from gateway.upstream.embedded import EmbeddedUpstream
from gateway.upstream.model_repo import ModelRepoError
from tests.support.liveness import HANG_S, eventually, no_hang

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_REPO = REPO_ROOT / "triton_repo"

FLOAT, INT64, STRING = TensorProto.FLOAT, TensorProto.INT64, TensorProto.STRING


# --------------------------------------------------------------------------- tiny models


def onnx_bytes(
    nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: Iterable[Any] = ()
) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def vi(name: str, elem: int, shape: list[Any] | None) -> Any:
    return helper.make_tensor_value_info(name, elem, shape)


def scale_model(k: float) -> bytes:
    """y = x * k, x and y FP32 [N, 2]: tells versions apart by their output."""
    const = numpy_helper.from_array(np.array(k, dtype=np.float32), "k")
    return onnx_bytes(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        [vi("x", FLOAT, ["N", 2])],
        [vi("y", FLOAT, ["N", 2])],
        [const],
    )


def slow_model(iterations: int) -> bytes:
    """y = x @ I, ``iterations`` times in a Loop (x, y FP32 [N, 256]): CPU time on demand."""
    eye = numpy_helper.from_array(np.eye(256, dtype=np.float32), "W")
    trip = numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trip")
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_in", "W"], ["x_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [vi("i", INT64, []), vi("cond_in", TensorProto.BOOL, []), vi("x_in", FLOAT, None)],
        [vi("cond_out", TensorProto.BOOL, []), vi("x_out", FLOAT, None)],
    )
    return onnx_bytes(
        [helper.make_node("Loop", ["trip", "", "x"], ["y"], body=body)],
        [vi("x", FLOAT, ["N", 256])],
        [vi("y", FLOAT, ["N", 256])],
        [eye, trip],
    )


def two_output_model() -> bytes:
    """x FP32 [N, 4] -> total FP32 [N, 1] (row sums), neg FP32 [N, 4]."""
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    return onnx_bytes(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1),
            helper.make_node("Neg", ["x"], ["neg"]),
        ],
        [vi("x", FLOAT, ["N", 4])],
        [vi("total", FLOAT, ["N", 1]), vi("neg", FLOAT, ["N", 4])],
        [axes],
    )


SCALE_CONFIG = """
platform: "onnxruntime_onnx"
max_batch_size: 8
input { name: "x" data_type: TYPE_FP32 dims: [ 2 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 2 ] }
"""

SLOW_CONFIG = """
platform: "onnxruntime_onnx"
max_batch_size: 64
input { name: "x" data_type: TYPE_FP32 dims: [ 256 ] }
output { name: "y" data_type: TYPE_FP32 dims: [ 256 ] }
"""


def add_model(root: Path, name: str, config: str, versions: dict[str, bytes]) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "config.pbtxt").write_text(config, encoding="utf-8")
    for version, model in versions.items():
        (directory / version).mkdir()
        (directory / version / "model.onnx").write_bytes(model)
    return root


@pytest.fixture
async def started() -> AsyncIterator[list[EmbeddedUpstream]]:
    """Collects upstreams a test starts and closes them all afterwards."""
    upstreams: list[EmbeddedUpstream] = []
    yield upstreams
    for upstream in upstreams:
        await upstream.close()


async def start(started: list[EmbeddedUpstream], repo: Path, **kwargs: Any) -> EmbeddedUpstream:
    upstream = EmbeddedUpstream(repo, **kwargs)
    started.append(upstream)
    await upstream.start()
    return upstream


@pytest.fixture
async def real(started: list[EmbeddedUpstream]) -> EmbeddedUpstream:
    return await start(started, TRITON_REPO)


class LogRecorder:
    """Stands in for a module's structlog logger (robust to cached logger configuration)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, level: str) -> Any:
        def record(event: str, **kw: Any) -> None:
            self.events.append((level, event, kw))

        return record

    def __getattr__(self, level: str) -> Any:
        return self._record(level)

    def text(self) -> str:
        return repr(self.events)


def fp32(name: str, data: Any) -> Tensor:
    array = np.asarray(data, dtype=np.float32)
    return Tensor(name, "FP32", array.shape, array)


def text(values: list[bytes], name: str = "text") -> Tensor:
    array = np.empty(len(values), dtype=np.object_)
    array[:] = values
    return Tensor(name, "BYTES", array.shape, array)


def digits_request(rows: Any, **kw: Any) -> InferRequest:
    return InferRequest(model="digits", version=kw.pop("version", ""), inputs=[fp32("pixels", rows)], **kw)


def direct_session(model: str, version: str = "1") -> Any:
    return ort.InferenceSession(
        str(TRITON_REPO / model / version / "model.onnx"), providers=["CPUExecutionProvider"]
    )


# --------------------------------------------------------------------------- real repository


async def test_metadata_and_health(real: EmbeddedUpstream) -> None:
    assert await real.server_live(timeout_s=1)
    assert await real.server_ready(timeout_s=1)
    server = await real.server_metadata(timeout_s=1)
    assert server.name == "infergate-embedded"
    assert server.version == importlib.metadata.version("infergate")
    assert server.extensions == ()
    digits = await real.model_metadata("digits", "", timeout_s=1)
    assert digits == await real.model_metadata("digits", "1", timeout_s=1)
    assert digits.versions == ("1", "2")  # 2 = the DP-SGD model
    assert digits.platform == "onnxruntime_onnx"
    assert digits.inputs == (TensorSpec("pixels", "FP32", (-1, 64)),)
    assert digits.outputs == (TensorSpec("probabilities", "FP32", (-1, 10)),)
    risk = await real.model_metadata("risk", "", timeout_s=1)
    assert risk.inputs[0].shape == (-1, 30) and risk.outputs[0].shape == (-1, 1)
    echo = await real.model_metadata("text_echo", "", timeout_s=1)
    assert [s.datatype for s in echo.inputs + echo.outputs] == ["BYTES", "BYTES"]
    assert await real.model_ready("digits", "", timeout_s=1)
    assert await real.model_ready("digits", "1", timeout_s=1)
    assert await real.model_ready("digits", "2", timeout_s=1)
    assert not await real.model_ready("digits", "3", timeout_s=1)
    assert not await real.model_ready("nope", "", timeout_s=1)


async def test_digits_matches_onnxruntime(real: EmbeddedUpstream) -> None:
    rows = np.random.default_rng(1).random((5, 64), dtype=np.float32) * 16
    response = await real.infer(digits_request(rows, id="req-7"), timeout_s=5)
    assert isinstance(response, InferResponse)
    # No version: the highest served one, as in Triton (the DP-SGD version 2).
    assert (response.model_name, response.model_version, response.id) == ("digits", "2", "req-7")
    [out] = response.outputs
    assert (out.name, out.datatype, out.shape) == ("probabilities", "FP32", (5, 10))
    assert out.data.dtype == np.float32 and out.data.shape == (5, 10)
    assert out.data.flags.writeable
    expected = direct_session("digits", "2").run(["probabilities"], {"pixels": rows})[0]
    np.testing.assert_allclose(out.data, expected, rtol=1e-6)
    np.testing.assert_allclose(out.data.sum(axis=1), 1.0, rtol=1e-5)


async def test_risk(real: EmbeddedUpstream) -> None:
    rows = np.random.default_rng(2).random((3, 30), dtype=np.float32)
    response = await real.infer(
        InferRequest("risk", "1", [fp32("features", rows)], [RequestedOutput("score")]), timeout_s=5
    )
    [out] = response.outputs
    assert (out.name, out.shape) == ("score", (3, 1))
    expected = direct_session("risk").run(["score"], {"features": rows})[0]
    np.testing.assert_allclose(out.data, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("sent", "returned"),
    [
        pytest.param([b"hello", "wörld ✓".encode()], [b"hello", "wörld ✓".encode()], id="utf8"),
        pytest.param([b"\xff\xfe\x80", b"\xc3("], [b"\xff\xfe\x80", b"\xc3("], id="not-utf8"),
        pytest.param([b"caf\xc3\xa9", b"\xe9t\xe9"], [b"caf\xc3\xa9", b"\xe9t\xe9"], id="mixed"),
        pytest.param([bytes(range(1, 256))], [bytes(range(1, 256))], id="every-byte-but-nul"),
        pytest.param(
            [b"a\x00b", b"\x00x", b"\xff\x00\xff"], [b"a", b"", b"\xff"], id="cut-at-nul-like-triton"
        ),
        pytest.param([b""], [b""], id="empty-string"),
        pytest.param([], [], id="empty-tensor"),
    ],
)
async def test_text_echo_bytes_round_trip(
    real: EmbeddedUpstream, sent: list[bytes], returned: list[bytes]
) -> None:
    response = await real.infer(InferRequest("text_echo", "", [text(sent)]), timeout_s=5)
    [out] = response.outputs
    assert (out.name, out.datatype, out.shape) == ("text", "BYTES", (len(sent),))
    assert out.data.dtype == np.object_
    assert all(type(v) is bytes for v in out.data)
    assert list(out.data) == returned


def test_onnxruntime_python_api_is_not_byte_transparent() -> None:
    """Why embedded.py converts: pins onnxruntime's behaviour, so an upgrade that changes it shows."""
    session = direct_session("text_echo")
    out = session.run(None, {"text": np.array([b"hi"], dtype=np.object_)})[0]
    assert list(out) == ["b'hi'"]  # bytes are str()-ed, silently
    with pytest.raises(UnicodeEncodeError):  # surrogateescape cannot carry raw bytes either
        session.run(None, {"text": np.array([b"\xff".decode("utf-8", "surrogateescape")], dtype=np.object_)})
    latin1 = session.run(None, {"text": np.array([b"\xff\x80".decode("latin-1")], dtype=np.object_)})[0]
    assert latin1[0].encode("latin-1") == b"\xff\x80"


async def test_unknown_model_and_version_look_the_same(real: EmbeddedUpstream) -> None:
    errors = []
    for model, version in [("nope", ""), ("digits", "3"), ("digits", "01"), ("text_echo", "999")]:
        with pytest.raises(NotFound) as info:
            await real.infer(InferRequest(model, version, [fp32("pixels", np.zeros((1, 64)))]), timeout_s=1)
        errors.append(info.value)
        with pytest.raises(NotFound):
            await real.model_metadata(model, version, timeout_s=1)
    assert len({(str(e), e.reason, e.detail) for e in errors}) == 1
    message = str(errors[0])
    for name in ("digits", "text_echo", "risk", "nope"):
        assert name not in message


@pytest.mark.parametrize(
    ("inputs", "outputs"),
    [
        pytest.param([fp32("pixel", np.zeros((1, 64)))], (), id="wrong-name"),
        pytest.param([], (), id="missing-input"),
        pytest.param([fp32("pixels", np.zeros((1, 64))), fp32("pixels", np.zeros((1, 64)))], (), id="twice"),
        pytest.param([Tensor("pixels", "FP64", (1, 64), np.zeros((1, 64)))], (), id="fp64"),
        pytest.param([Tensor("pixels", "FP32", (1, 64), np.zeros((1, 64)))], (), id="fp32-label-fp64-data"),
        pytest.param([fp32("pixels", np.zeros(64))], (), id="rank-1"),
        pytest.param([fp32("pixels", np.zeros((1, 1, 64)))], (), id="rank-3"),
        pytest.param([fp32("pixels", np.zeros((1, 63)))], (), id="63-pixels"),
        pytest.param([fp32("pixels", np.zeros((65, 64)))], (), id="batch-65"),
        pytest.param([fp32("pixels", np.zeros((0, 64)))], (), id="batch-0"),
        pytest.param([text([b"x"], "pixels")], (), id="bytes"),
        pytest.param([fp32("pixels", np.zeros((1, 64)))], ("label",), id="unknown-output"),
        pytest.param(
            [fp32("pixels", np.zeros((1, 64)))], ("probabilities", "probabilities"), id="output-twice"
        ),
    ],
)
async def test_bad_inputs_are_rejected(
    real: EmbeddedUpstream, inputs: list[Tensor], outputs: tuple[str, ...]
) -> None:
    request = InferRequest("digits", "", inputs, [RequestedOutput(n) for n in outputs])
    with pytest.raises(InputRejected) as info:
        await real.infer(request, timeout_s=5)
    assert info.value.http_status == 422


async def test_batch_of_64_is_accepted(real: EmbeddedUpstream) -> None:
    response = await real.infer(digits_request(np.zeros((64, 64))), timeout_s=5)
    assert response.outputs[0].shape == (64, 10)


async def test_concurrent_requests(real: EmbeddedUpstream) -> None:
    rng = np.random.default_rng(3)
    batches = [rng.random((int(rng.integers(1, 9)), 64), dtype=np.float32) * 16 for _ in range(50)]
    responses = await asyncio.gather(
        *(real.infer(digits_request(b, id=str(i)), timeout_s=30) for i, b in enumerate(batches))
    )
    session = direct_session("digits", "2")  # unversioned = the highest version
    for i, (batch, response) in enumerate(zip(batches, responses, strict=True)):
        assert response.id == str(i)
        np.testing.assert_allclose(
            response.outputs[0].data, session.run(None, {"pixels": batch})[0], rtol=1e-6
        )


# --------------------------------------------------------------------------- concurrency limits


async def test_event_loop_is_not_blocked(
    tmp_path: Path, started: list[EmbeddedUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 inferences of real CPU work all run in the pool's threads, never on the event
    loop's, and the loop runs other coroutines while a run is in progress.

    Checked by construction, not with a heartbeat's timing: the first run holds its worker
    until a coroutine on the loop has seen it start, which a run blocking the loop would
    make impossible (the test then fails at the hang bound instead of deadlocking).
    """
    repo = add_model(tmp_path, "slow", SLOW_CONFIG, {"1": slow_model(600)})
    upstream = await start(started, repo, workers=2)
    x = np.ones((32, 256), dtype=np.float32)
    loop_thread = threading.get_ident()
    ran_on: list[int] = []
    run_started = threading.Event()
    loop_ran = threading.Event()
    real_run = upstream._run

    def watched_run(*args: Any) -> Any:
        ran_on.append(threading.get_ident())
        if len(ran_on) == 1:
            run_started.set()
            if not loop_ran.wait(HANG_S):
                raise AssertionError("the event loop ran nothing while an inference was running")
        return real_run(*args)

    monkeypatch.setattr(upstream, "_run", watched_run)

    async def meanwhile_on_the_loop() -> None:
        await eventually(run_started.is_set, "the first inference starting")
        loop_ran.set()

    async with no_hang("50 inferences of ~10 ms CPU each on 2 workers"):
        other = asyncio.create_task(meanwhile_on_the_loop())
        responses = await asyncio.gather(
            *(upstream.infer(InferRequest("slow", "", [fp32("x", x)]), timeout_s=60) for _ in range(50))
        )
        await other
    assert all(r.outputs[0].shape == (32, 256) for r in responses)
    assert len(ran_on) == 50
    assert loop_thread not in ran_on  # every run in a worker thread
    assert len(set(ran_on)) <= 2  # the pool's two, no thread per request


async def test_timeout_frees_the_worker(tmp_path: Path, started: list[EmbeddedUpstream]) -> None:
    repo = add_model(tmp_path, "slow", SLOW_CONFIG, {"1": slow_model(10**8)})
    add_model(repo, "fast", SCALE_CONFIG, {"1": scale_model(2.0)})
    upstream = await start(started, repo, workers=1)
    # The slow run would take ~1,000 s: only the 0.2 s budget can end the wait.
    async with no_hang("a run past its 0.2 s budget", expected_s=0.2):
        with pytest.raises(UpstreamTimeout):
            await upstream.infer(InferRequest("slow", "", [fp32("x", np.ones((1, 256)))]), timeout_s=0.2)
    # One worker only: this runs only once the abandoned run has really stopped (else it
    # would time out after its own 5 s).
    async with no_hang("a run on the worker the timed-out run held"):
        response = await upstream.infer(InferRequest("fast", "", [fp32("x", [[1, 2]])]), timeout_s=5)
    np.testing.assert_array_equal(response.outputs[0].data, [[2, 4]])


async def test_queue_is_bounded(tmp_path: Path, started: list[EmbeddedUpstream]) -> None:
    repo = add_model(tmp_path, "slow", SLOW_CONFIG, {"1": slow_model(10**8)})
    upstream = await start(started, repo, workers=1, max_queue=2)
    request = InferRequest("slow", "", [fp32("x", np.ones((1, 256)))])
    pending = [asyncio.create_task(upstream.infer(request, timeout_s=30)) for _ in range(3)]
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamUnavailable) as info:  # 1 running + 2 queued: full
        await upstream.infer(request, timeout_s=30)
    assert info.value.reason == "upstream_overloaded"
    assert info.value.retry_after_s is not None
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    # Cancelled work releases its slots (queued jobs at once, the running one when
    # onnxruntime sees the terminate flag).
    async with no_hang("the cancelled runs releasing their slots"):
        while True:
            try:
                await upstream.infer(InferRequest("slow", "", [fp32("x", np.ones((1, 256)))]), timeout_s=0.05)
            except UpstreamTimeout:
                break
            except UpstreamUnavailable:
                await asyncio.sleep(0.05)


async def test_piled_up_timeouts_do_not_exhaust_slots(
    tmp_path: Path, started: list[EmbeddedUpstream]
) -> None:
    repo = add_model(tmp_path, "slow", SLOW_CONFIG, {"1": slow_model(10**8)})
    upstream = await start(started, repo, workers=1, max_queue=1)
    request = InferRequest("slow", "", [fp32("x", np.ones((1, 256)))])
    for _ in range(10):
        try:
            await upstream.infer(request, timeout_s=0.05)
        except UpstreamTimeout:
            pass
        except UpstreamUnavailable:
            await asyncio.sleep(0.05)  # the terminated run is still winding down
    with pytest.raises(UpstreamTimeout):
        await upstream.infer(request, timeout_s=0.2)


# --------------------------------------------------------------------------- versions, outputs


@pytest.mark.parametrize(
    ("policy", "served"),
    [
        ("", ("3",)),
        ("version_policy { latest { num_versions: 2 } }", ("2", "3")),
        ("version_policy { all { } }", ("1", "2", "3")),
        ("version_policy { specific { versions: [ 1, 3 ] } }", ("1", "3")),
    ],
)
async def test_versions(
    tmp_path: Path, started: list[EmbeddedUpstream], policy: str, served: tuple[str, ...]
) -> None:
    repo = add_model(
        tmp_path, "scale", SCALE_CONFIG + policy, {v: scale_model(float(v)) for v in ("1", "2", "3")}
    )
    upstream = await start(started, repo)
    assert (await upstream.model_metadata("scale", "", timeout_s=1)).versions == served
    for version in ("1", "2", "3"):
        request = InferRequest("scale", version, [fp32("x", [[1, 10]])])
        assert await upstream.model_ready("scale", version, timeout_s=1) is (version in served)
        if version in served:
            response = await upstream.infer(request, timeout_s=5)
            assert response.model_version == version
            np.testing.assert_array_equal(response.outputs[0].data, [[float(version), 10 * float(version)]])
        else:
            with pytest.raises(NotFound):
                await upstream.infer(request, timeout_s=5)
    latest = await upstream.infer(InferRequest("scale", "", [fp32("x", [[1, 1]])]), timeout_s=5)
    assert latest.model_version == served[-1]
    np.testing.assert_array_equal(latest.outputs[0].data, [[float(served[-1])] * 2])


async def test_requested_outputs_filter(tmp_path: Path, started: list[EmbeddedUpstream]) -> None:
    config = """
        platform: "onnxruntime_onnx"
        max_batch_size: 4
        input { name: "x" data_type: TYPE_FP32 dims: [ 4 ] }
        output { name: "total" data_type: TYPE_FP32 dims: [ 1 ] }
        output { name: "neg" data_type: TYPE_FP32 dims: [ 4 ] }
    """
    upstream = await start(started, add_model(tmp_path, "two", config, {"1": two_output_model()}))
    x = [[1, 2, 3, 4]]
    both = await upstream.infer(InferRequest("two", "", [fp32("x", x)]), timeout_s=5)
    assert [o.name for o in both.outputs] == ["total", "neg"]
    only = await upstream.infer(
        InferRequest("two", "", [fp32("x", x)], [RequestedOutput("neg")]), timeout_s=5
    )
    assert [o.name for o in only.outputs] == ["neg"]
    np.testing.assert_array_equal(only.outputs[0].data, [[-1, -2, -3, -4]])
    reordered = await upstream.infer(
        InferRequest("two", "", [fp32("x", x)], [RequestedOutput("neg"), RequestedOutput("total")]),
        timeout_s=5,
    )
    assert [o.name for o in reordered.outputs] == ["neg", "total"]
    with pytest.raises(InputRejected):
        await upstream.infer(InferRequest("two", "", [fp32("x", x)], [RequestedOutput("nope")]), timeout_s=5)


async def test_reshape(tmp_path: Path, started: list[EmbeddedUpstream]) -> None:
    """Triton's reshape: the client sees dims [2, 3], the model works on [6]."""
    config = """
        platform: "onnxruntime_onnx"
        max_batch_size: 4
        input { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 6 ] } }
        output { name: "y" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 6 ] } }
    """
    model = onnx_bytes(
        [helper.make_node("Neg", ["x"], ["y"])], [vi("x", FLOAT, ["N", 6])], [vi("y", FLOAT, ["N", 6])]
    )
    upstream = await start(started, add_model(tmp_path, "r", config, {"1": model}))
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    response = await upstream.infer(InferRequest("r", "", [fp32("x", x)]), timeout_s=5)
    assert response.outputs[0].shape == (2, 2, 3)
    np.testing.assert_array_equal(response.outputs[0].data, -x)


# --------------------------------------------------------------------------- onnxruntime errors


async def test_onnxruntime_invalid_argument_is_input_rejected(
    tmp_path: Path, started: list[EmbeddedUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config allows any length; the graph wants 3. onnxruntime's own check fires."""
    config = """
        platform: "onnxruntime_onnx"
        input { name: "x" data_type: TYPE_FP32 dims: [ -1 ] }
        output { name: "y" data_type: TYPE_FP32 dims: [ -1 ] }
    """
    model = onnx_bytes(
        [helper.make_node("Identity", ["x"], ["y"])], [vi("x", FLOAT, [3])], [vi("y", FLOAT, [3])]
    )
    upstream = await start(started, add_model(tmp_path, "fixed", config, {"1": model}))
    logs = LogRecorder()
    monkeypatch.setattr(embedded, "log", logs)
    with pytest.raises(InputRejected) as info:
        await upstream.infer(InferRequest("fixed", "", [fp32("x", [1, 2, 3, 4])]), timeout_s=5)
    assert "ONNXRuntime" not in str(info.value) and "dimensions" not in str(info.value)
    assert "INVALID_ARGUMENT" in logs.text()  # the raw text went to the log


async def test_onnxruntime_failure_is_bad_response(
    tmp_path: Path, started: list[EmbeddedUpstream], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node fails at run time (a Reshape that cannot hold the input): 502, text logged only."""
    config = """
        platform: "onnxruntime_onnx"
        input { name: "x" data_type: TYPE_FP32 dims: [ -1 ] }
        output { name: "y" data_type: TYPE_FP32 dims: [ 3 ] }
    """
    shape = numpy_helper.from_array(np.array([3], dtype=np.int64), "shape")
    model = onnx_bytes(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        [vi("x", FLOAT, ["N"])],
        [vi("y", FLOAT, [3])],
        [shape],
    )
    upstream = await start(started, add_model(tmp_path, "bad", config, {"1": model}))
    logs = LogRecorder()
    monkeypatch.setattr(embedded, "log", logs)
    with pytest.raises(UpstreamBadResponse) as info:
        await upstream.infer(InferRequest("bad", "", [fp32("x", [1, 2, 3, 4])]), timeout_s=5)
    assert str(info.value) == "bad response from the model server"
    assert "onnxruntime_src" in logs.text()  # an internal path: logs only
    ok = await upstream.infer(InferRequest("bad", "", [fp32("x", [1, 2, 3])]), timeout_s=5)
    assert ok.outputs[0].shape == (3,)


async def test_model_made_invalid_utf8_is_bad_response(
    tmp_path: Path, started: list[EmbeddedUpstream]
) -> None:
    config = """
        platform: "onnxruntime_onnx"
        input { name: "x" data_type: TYPE_FP32 dims: [ 1 ] }
        output { name: "s" data_type: TYPE_STRING dims: [ 1 ] }
    """
    const = helper.make_tensor("c", STRING, [1], [b"\xff\xfe"])  # type: ignore[list-item]  # stub says numbers
    model = onnx_bytes(
        [helper.make_node("Constant", [], ["s"], value=const)], [vi("x", FLOAT, [1])], [vi("s", STRING, [1])]
    )
    upstream = await start(started, add_model(tmp_path, "c", config, {"1": model}))
    with pytest.raises(UpstreamBadResponse):
        await upstream.infer(InferRequest("c", "", [fp32("x", [0])]), timeout_s=5)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SCALE_CONFIG.replace("TYPE_FP32 dims: [ 2 ] }\noutput", "TYPE_FP64 dims: [ 2 ] }\noutput"), "FP64"),
        (SCALE_CONFIG.replace('name: "x"', 'name: "z"'), "does not declare"),
        (SCALE_CONFIG.replace('name: "y"', 'name: "w"'), "not in the ONNX model"),
        (SCALE_CONFIG.replace("dims: [ 2 ] }\noutput", "dims: [ 3 ] }\noutput"), "do not match"),
        (SCALE_CONFIG.replace("dims: [ 2 ] }\noutput", "dims: [ 2, 1 ] }\noutput"), "rank"),
    ],
)
async def test_config_must_match_the_model(tmp_path: Path, config: str, message: str) -> None:
    repo = add_model(tmp_path, "scale", config, {"1": scale_model(1.0)})
    upstream = EmbeddedUpstream(repo)
    with pytest.raises(ModelRepoError, match=message):
        await upstream.start()
    await upstream.close()


async def test_fixed_batch_dim_with_batching_is_refused(tmp_path: Path) -> None:
    model = onnx_bytes(
        [helper.make_node("Identity", ["x"], ["y"])], [vi("x", FLOAT, [1, 2])], [vi("y", FLOAT, [1, 2])]
    )
    upstream = EmbeddedUpstream(add_model(tmp_path, "m", SCALE_CONFIG, {"1": model}))
    with pytest.raises(ModelRepoError, match="fixed batch dimension"):
        await upstream.start()


async def test_external_data_cannot_be_pulled_in(tmp_path: Path) -> None:
    """SECURITY: sessions are built from bytes, so a model cannot read files by relative path."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(2, dtype=np.float32).tobytes())
    weight = numpy_helper.from_array(np.zeros(2, dtype=np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../secret.bin"), ("offset", "0"), ("length", "8")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    model = onnx_bytes(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [vi("x", FLOAT, ["N", 2])],
        [vi("y", FLOAT, ["N", 2])],
        [weight],
    )
    upstream = EmbeddedUpstream(add_model(tmp_path / "repo", "ext", SCALE_CONFIG, {"1": model}))
    with pytest.raises(ModelRepoError, match="cannot load"):
        await upstream.start()


# --------------------------------------------------------------------------- lifecycle


async def test_lifecycle(tmp_path: Path) -> None:
    upstream = EmbeddedUpstream(add_model(tmp_path, "scale", SCALE_CONFIG, {"1": scale_model(1.0)}))
    request = InferRequest("scale", "", [fp32("x", [[1, 2]])])
    assert not await upstream.server_live(timeout_s=1)
    assert not await upstream.model_ready("scale", "", timeout_s=1)
    with pytest.raises(UpstreamUnavailable):
        await upstream.infer(request, timeout_s=1)
    await upstream.start()
    await upstream.start()  # idempotent
    assert await upstream.server_ready(timeout_s=1)
    assert (await upstream.infer(request, timeout_s=5)).outputs[0].shape == (1, 2)
    await upstream.close()
    await upstream.close()  # safe twice
    assert not await upstream.server_ready(timeout_s=1)
    for call in (upstream.infer(request, timeout_s=1), upstream.server_metadata(timeout_s=1)):
        with pytest.raises(UpstreamUnavailable):
            await call
    with pytest.raises(RuntimeError):
        await upstream.start()


async def test_close_stops_running_and_queued_inferences(tmp_path: Path) -> None:
    upstream = EmbeddedUpstream(add_model(tmp_path, "slow", SLOW_CONFIG, {"1": slow_model(10**8)}), workers=1)
    await upstream.start()
    request = InferRequest("slow", "", [fp32("x", np.ones((1, 256)))])
    running = asyncio.create_task(upstream.infer(request, timeout_s=30))
    await asyncio.sleep(0.1)
    queued = asyncio.create_task(upstream.infer(request, timeout_s=30))
    await asyncio.sleep(0.05)
    # The running inference would take ~1,000 s: only close()'s terminate flag can end it.
    async with no_hang("close() stopping a running and a queued inference"):
        await upstream.close()
        for task in (running, queued):
            # Not a CancelledError leaking into the caller's task: a GatewayError.
            with pytest.raises(UpstreamUnavailable):
                await task


def test_session_options() -> None:
    options = embedded.session_options()
    assert options.intra_op_num_threads == 1
    assert options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.optimized_model_filepath == ""
    assert not options.enable_profiling
