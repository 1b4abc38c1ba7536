"""The two upstreams agree: TritonGrpcUpstream (to MLServer) and EmbeddedUpstream, same repo.

Stages and fronts are tested on one upstream and trusted on the other, which is only sound if
both give the same outputs, metadata and error classes for the same requests. Tensor names
and shapes come from the repository's metadata, never from this file. The gRPC upstream runs
twice: with its own pre-validation (the default) and without, so MLServer's own rejections
are compared as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import GatewayError, InputRejected, NotFound
from gateway.kserve import DTYPES, InferRequest, InferResponse, ModelMetadata, RequestedOutput, Tensor
from gateway.upstream.embedded import EmbeddedUpstream
from gateway.upstream.triton_grpc import TritonGrpcUpstream
from tests.support.mlserver import MLServerProcess

# The first test also pays for the session fixture: a venv install on a fresh machine.
pytestmark = pytest.mark.timeout(300)

REPO_ROOT = Path(__file__).resolve().parents[2]
TRITON_REPO = REPO_ROOT / "triton_repo"
MODELS = ("digits", "text_echo", "risk")
TIMEOUT_S = 10.0

Pair = tuple[TritonGrpcUpstream, EmbeddedUpstream]


@pytest.fixture(params=["validated", "raw"])
async def pair(request: pytest.FixtureRequest, mlserver: MLServerProcess) -> AsyncIterator[Pair]:
    remote = TritonGrpcUpstream(mlserver.grpc_url, validate=request.param == "validated")
    local = EmbeddedUpstream(TRITON_REPO)
    await remote.start()
    await local.start()
    try:
        yield remote, local
    finally:
        await remote.close()
        await local.close()


def make_input(spec_name: str, datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> Tensor:
    """A valid tensor for a declared input: -1 dims become 3 (batch) or 4 (others)."""
    concrete = tuple((3 if i == 0 else 4) if d == -1 else d for i, d in enumerate(shape))
    if datatype == "BYTES":
        pool = [b"hello", "wörld ✓".encode(), b"", b"tab\tand space", b"UPPER lower 123"]
        data = np.empty(concrete, dtype=np.object_)
        for index in np.ndindex(concrete):
            data[index] = pool[int(rng.integers(len(pool)))]
    elif datatype in ("FP16", "FP32", "FP64"):
        data = (rng.random(concrete) * 16).astype(DTYPES[datatype])
    else:
        data = rng.integers(0, 10, concrete).astype(DTYPES[datatype])
    return Tensor(spec_name, datatype, concrete, data)


def valid_request(meta: ModelMetadata, seed: int, **kw: object) -> InferRequest:
    rng = np.random.default_rng(seed)
    inputs = [make_input(s.name, s.datatype, s.shape, rng) for s in meta.inputs]
    return InferRequest(model=meta.name, version="", inputs=inputs, id=f"{meta.name}-{seed}", **kw)  # type: ignore[arg-type]


def assert_same_response(remote: InferResponse, local: InferResponse) -> None:
    assert remote.model_name == local.model_name
    assert remote.model_version == local.model_version
    assert remote.id == local.id
    assert [o.name for o in remote.outputs] == [o.name for o in local.outputs]
    for r, e in zip(remote.outputs, local.outputs, strict=True):
        assert (r.datatype, r.shape) == (e.datatype, e.shape), r.name
        assert r.data.dtype == e.data.dtype, r.name
        if r.datatype == "BYTES":
            assert all(type(v) is bytes for v in r.data.flat)
            assert list(r.data.flat) == list(e.data.flat), r.name
        else:
            np.testing.assert_allclose(r.data, e.data, rtol=1e-5, atol=1e-6, err_msg=r.name)


async def both(pair: Pair, request: InferRequest) -> tuple[InferResponse, InferResponse]:
    remote, local = pair
    return (
        await remote.infer(request, timeout_s=TIMEOUT_S),
        await local.infer(request, timeout_s=TIMEOUT_S),
    )


async def error_classes(pair: Pair, request: InferRequest) -> tuple[type[BaseException], type[BaseException]]:
    found: list[type[BaseException]] = []
    for upstream in pair:
        with pytest.raises(GatewayError) as info:
            await upstream.infer(request, timeout_s=TIMEOUT_S)
        found.append(type(info.value))
    return found[0], found[1]


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("model", MODELS)
async def test_same_metadata(pair: Pair, model: str) -> None:
    remote, local = pair
    r = await remote.model_metadata(model, "", timeout_s=TIMEOUT_S)
    e = await local.model_metadata(model, "", timeout_s=TIMEOUT_S)
    assert (r.name, r.versions, r.platform) == (e.name, e.versions, e.platform)
    assert r.inputs == e.inputs
    assert r.outputs == e.outputs
    assert r == await remote.model_metadata(model, e.versions[-1], timeout_s=TIMEOUT_S)


async def test_same_readiness(pair: Pair) -> None:
    for model, version, ready in [
        ("digits", "", True),
        ("digits", "1", True),
        ("digits", "2", True),  # the DP-SGD version
        ("digits", "3", False),
        ("nope", "", False),
    ]:
        for upstream in pair:
            assert await upstream.model_ready(model, version, timeout_s=TIMEOUT_S) is ready, (
                upstream,
                model,
                version,
            )
    for upstream in pair:
        assert await upstream.server_live(timeout_s=TIMEOUT_S)
        assert await upstream.server_ready(timeout_s=TIMEOUT_S)


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("model", MODELS)
async def test_same_outputs(pair: Pair, model: str) -> None:
    meta = await pair[1].model_metadata(model, "", timeout_s=TIMEOUT_S)
    for seed in range(3):
        remote, local = await both(pair, valid_request(meta, seed))
        assert_same_response(remote, local)
    # An explicit version and explicitly requested outputs change nothing.
    request = valid_request(meta, 7, outputs=[RequestedOutput(s.name) for s in meta.outputs])
    request.version = meta.versions[-1]
    remote, local = await both(pair, request)
    assert_same_response(remote, local)


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([b"\xff\xfe\x80", b"\xc3("], id="not-utf8"),
        pytest.param([b"caf\xc3\xa9", b"\xe9t\xe9"], id="mixed"),
        pytest.param([b"a\x00b", b"\x00", b"\xff\x00\xff"], id="nul"),
        pytest.param([bytes(range(1, 256))], id="every-byte"),
    ],
)
async def test_same_bytes_handling(pair: Pair, values: list[bytes]) -> None:
    meta = await pair[1].model_metadata("text_echo", "", timeout_s=TIMEOUT_S)
    [spec] = meta.inputs
    data = np.empty(len(values), dtype=np.object_)
    data[:] = values
    request = InferRequest("text_echo", "", [Tensor(spec.name, "BYTES", data.shape, data)])
    remote, local = await both(pair, request)
    assert_same_response(remote, local)


async def test_same_outputs_under_concurrency(pair: Pair) -> None:
    meta = await pair[1].model_metadata("digits", "", timeout_s=TIMEOUT_S)
    requests = [valid_request(meta, seed) for seed in range(50)]
    remote = await asyncio.gather(*(pair[0].infer(r, timeout_s=TIMEOUT_S) for r in requests))
    local = await asyncio.gather(*(pair[1].infer(r, timeout_s=TIMEOUT_S) for r in requests))
    for r, e in zip(remote, local, strict=True):
        assert_same_response(r, e)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("model", MODELS)
async def test_same_not_found(pair: Pair, model: str) -> None:
    meta = await pair[1].model_metadata(model, "", timeout_s=TIMEOUT_S)
    unknown_model = valid_request(meta, 0)
    unknown_model.model = "no_such_model"
    assert await error_classes(pair, unknown_model) == (NotFound, NotFound)
    unknown_version = valid_request(meta, 0)
    unknown_version.version = "3"  # digits and risk serve 1 and 2 (DP-SGD), text_echo 1
    assert await error_classes(pair, unknown_version) == (NotFound, NotFound)
    for upstream in pair:
        with pytest.raises(NotFound):
            await upstream.model_metadata(model, "3", timeout_s=TIMEOUT_S)


def _reshaped(tensor: Tensor, shape: tuple[int, ...]) -> Tensor:
    data = np.resize(tensor.data, shape)
    return Tensor(tensor.name, tensor.datatype, shape, data)


# Every (model, fault) pair that applies: text_echo has a variable last dimension and no
# batching, so those two faults do not exist for it (listed, not skipped).
FAULTS = [(m, f) for m in MODELS for f in ("extra-dim", "rank", "batch-too-big", "dtype")
          if not (m == "text_echo" and f in {"extra-dim", "batch-too-big"})]


@pytest.mark.parametrize(("model", "fault"), FAULTS)
async def test_same_input_rejection(pair: Pair, model: str, fault: str) -> None:
    meta = await pair[1].model_metadata(model, "", timeout_s=TIMEOUT_S)
    request = valid_request(meta, 0)
    first = request.inputs[0]
    if fault == "extra-dim":  # one element too many in the last dimension
        request.inputs[0] = _reshaped(first, (*first.shape[:-1], first.shape[-1] + 1))
        assert meta.inputs[0].shape[-1] != -1, "FAULTS lists only models with a fixed last dimension"
    elif fault == "rank":
        request.inputs[0] = _reshaped(first, (*first.shape, 1))
    elif fault == "batch-too-big":
        assert meta.max_batch_size > 0, "FAULTS lists only batching models"
        request.inputs[0] = _reshaped(first, (meta.max_batch_size + 1, *first.shape[1:]))
    else:
        if first.datatype == "BYTES":
            data = np.zeros(first.shape, dtype=np.float32)
            request.inputs[0] = Tensor(first.name, "FP32", first.shape, data)
        else:
            request.inputs[0] = Tensor(first.name, "FP64", first.shape, first.data.astype(np.float64))
    assert await error_classes(pair, request) == (InputRejected, InputRejected)


@pytest.mark.parametrize("model", MODELS)
async def test_same_rejection_of_unknown_names(pair: Pair, model: str) -> None:
    meta = await pair[1].model_metadata(model, "", timeout_s=TIMEOUT_S)
    wrong_input = valid_request(meta, 0)
    first = wrong_input.inputs[0]
    wrong_input.inputs[0] = Tensor(first.name + "_typo", first.datatype, first.shape, first.data)
    assert await error_classes(pair, wrong_input) == (InputRejected, InputRejected)
    wrong_output = valid_request(meta, 0, outputs=[RequestedOutput("no_such_output")])
    assert await error_classes(pair, wrong_output) == (InputRejected, InputRejected)
