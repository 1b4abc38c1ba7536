"""The MLServer stand-in behaves like Triton for what the gateway relies on.

Driven with the gateway's own client library (``tritonclient.grpc`` and ``.aio``), so a
failure here means the upstream is wrong, not the gateway. Tensor names come from
``config.pbtxt``; expected numbers come from onnxruntime run locally on the same files.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from tests.support.mlserver import MLServerProcess

# The first test also pays for the session fixture: a venv install on a fresh machine.
pytestmark = pytest.mark.timeout(300)

MODELS = ("digits", "text_echo", "risk")


def _config(repo: Path, model: str) -> Any:
    text = (repo / model / "config.pbtxt").read_text(encoding="utf-8")
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _kserve_type(data_type: int) -> str:
    name = str(model_config_pb2.DataType.Name(data_type)).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


# version_policy all for the models with a DP-SGD version 2; MLServer serves one model per version.
SERVED_VERSIONS = {"digits": ["1", "2"], "risk": ["1", "2"], "text_echo": ["1"]}


def _local(repo: Path, model: str, feeds: dict[str, np.ndarray], output: str, version: str | None = None) -> np.ndarray:
    """What onnxruntime itself computes from the same model file (default: the highest version,
    which is what a request without a version gets, as in Triton)."""
    version = version or SERVED_VERSIONS[model][-1]
    session = ort.InferenceSession(str(repo / model / version / "model.onnx"), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([output], feeds)[0])


def _status(exc: pytest.ExceptionInfo[InferenceServerException]) -> str | None:
    status = exc.value.status()
    return None if status is None else str(status)


@pytest.fixture(scope="module")
def client(mlserver: MLServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    c = grpcclient.InferenceServerClient(mlserver.grpc_url)
    try:
        yield c
    finally:
        c.close()


def _fp32_input(repo: Path, model: str, array: np.ndarray, datatype: str = "FP32") -> grpcclient.InferInput:
    name = _config(repo, model).input[0].name
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def test_server_live_and_ready(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in MODELS:
        assert client.is_model_ready(model)


@pytest.mark.parametrize("model", MODELS)
def test_metadata_matches_config(
    client: grpcclient.InferenceServerClient, triton_repo: Path, model: str
) -> None:
    config = _config(triton_repo, model)
    batch = [-1] if config.max_batch_size > 0 else []

    def expected(specs: Any) -> list[tuple[str, str, list[int]]]:
        return [(t.name, _kserve_type(t.data_type), batch + list(t.dims)) for t in specs]

    def served(tensors: Any) -> list[tuple[str, str, list[int]]]:
        return [(t.name, t.datatype, list(t.shape)) for t in tensors]

    metadata = client.get_model_metadata(model)
    assert metadata.name == model
    assert list(metadata.versions) == SERVED_VERSIONS[model]
    assert metadata.platform == "onnxruntime_onnx"
    assert served(metadata.inputs) == expected(config.input)
    assert served(metadata.outputs) == expected(config.output)


@pytest.mark.parametrize(("model", "width", "scale"), [("digits", 64, 16.0), ("risk", 30, 1.0)])
def test_fp32_infer_matches_local_onnxruntime(
    client: grpcclient.InferenceServerClient, triton_repo: Path, model: str, width: int, scale: float
) -> None:
    rows = {"digits": 2, "risk": 3}[model]
    x = (np.random.default_rng(7).random((rows, width)) * scale).astype(np.float32)
    config = _config(triton_repo, model)
    output = config.output[0].name

    result = client.infer(model, [_fp32_input(triton_repo, model, x)], request_id=f"req-{model}")

    want = _local(triton_repo, model, {config.input[0].name: x}, output)
    got = result.as_numpy(output)
    assert got is not None
    assert got.dtype == np.float32
    assert got.shape == want.shape == (rows, config.output[0].dims[0])
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.id == f"req-{model}"
    assert response.model_version == SERVED_VERSIONS[model][-1]  # no version: the highest, as in Triton


def test_text_echo_bytes_round_trip(client: grpcclient.InferenceServerClient, triton_repo: Path) -> None:
    config = _config(triton_repo, "text_echo")
    in_name, out_name = config.input[0].name, config.output[0].name
    values = [b"hello", "wörld".encode(), b"\x00\xffbin", b"\xff\xfe not utf-8 \x80"]
    tensor = grpcclient.InferInput(in_name, [len(values)], "BYTES")
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_))

    result = client.infer("text_echo", [tensor], outputs=[grpcclient.InferRequestedOutput(out_name)])

    got = result.as_numpy(out_name)
    assert got is not None
    assert got.shape == (len(values),)
    # Triton's onnxruntime backend passes strings as C strings: an element ends at its
    # first NUL (b"\x00\xffbin" -> b""); every other byte, UTF-8 or not, comes back as sent.
    assert list(got) == [b"hello", "wörld".encode(), b"", b"\xff\xfe not utf-8 \x80"]


@pytest.mark.parametrize(
    ("shape", "datatype"),
    [((2, 63), "FP32"), ((2, 64, 1), "FP32"), ((65, 64), "FP32"), ((2, 64), "FP64")],
    ids=["wrong-width", "wrong-rank", "batch-over-max", "fp64"],
)
def test_bad_tensor_is_invalid_argument(
    client: grpcclient.InferenceServerClient, triton_repo: Path, shape: tuple[int, ...], datatype: str
) -> None:
    x = np.zeros(shape, dtype=np.float64 if datatype == "FP64" else np.float32)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("digits", [_fp32_input(triton_repo, "digits", x, datatype)])
    assert _status(exc) == str(grpc.StatusCode.INVALID_ARGUMENT)


def test_unknown_model_is_not_found(client: grpcclient.InferenceServerClient, triton_repo: Path) -> None:
    x = np.zeros((1, 64), dtype=np.float32)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("no_such_model", [_fp32_input(triton_repo, "digits", x)])
    assert _status(exc) == str(grpc.StatusCode.NOT_FOUND)
    with pytest.raises(InferenceServerException) as exc:
        client.get_model_metadata("no_such_model")
    assert _status(exc) == str(grpc.StatusCode.NOT_FOUND)


def test_model_versions_are_honoured(client: grpcclient.InferenceServerClient, triton_repo: Path) -> None:
    x = (np.random.default_rng(3).random((2, 64)) * 16).astype(np.float32)
    outputs = {}
    for version in ("1", "2"):  # 2 = the DP-SGD model
        result = client.infer("digits", [_fp32_input(triton_repo, "digits", x)], model_version=version)
        assert result.get_response().model_version == version
        assert client.is_model_ready("digits", version)
        outputs[version] = result.as_numpy("probabilities")
        want = _local(triton_repo, "digits", {"pixels": x}, "probabilities", version)
        assert np.allclose(outputs[version], want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(outputs["1"], outputs["2"], atol=1e-3)
    with pytest.raises(InferenceServerException) as exc:
        client.infer("digits", [_fp32_input(triton_repo, "digits", x)], model_version="3")
    assert _status(exc) == str(grpc.StatusCode.NOT_FOUND)


def test_aio_concurrent_infers(mlserver: MLServerProcess, triton_repo: Path) -> None:
    config = _config(triton_repo, "digits")
    in_name, out_name = config.input[0].name, config.output[0].name
    batches = [(np.random.default_rng(i).random((1 + i % 4, 64)) * 16).astype(np.float32) for i in range(20)]

    async def run() -> list[np.ndarray]:
        client = grpcaio.InferenceServerClient(mlserver.grpc_url)
        try:

            async def one(i: int, x: np.ndarray) -> np.ndarray:
                tensor = grpcaio.InferInput(in_name, list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = await client.infer("digits", [tensor], request_id=str(i))
                assert result.get_response().id == str(i)
                out = result.as_numpy(out_name)
                assert out is not None
                return out

            return list(await asyncio.gather(*(one(i, x) for i, x in enumerate(batches))))
        finally:
            await client.close()

    results = asyncio.run(run())

    assert len(results) == 20
    for x, got in zip(batches, results, strict=True):
        want = _local(triton_repo, "digits", {in_name: x}, out_name)
        assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
