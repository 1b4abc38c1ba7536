"""The gateway with its Triton-gRPC upstream, in front of a real MLServer, answers like the
gateway on the embedded backend: same outputs, same refusals, through unmodified tritonclient."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support.gateway_proc import ROOT, GatewayProcess, start_gateway
from tests.support.mlserver import MLServerProcess


@pytest.fixture(scope="module")
def gateways(mlserver: MLServerProcess, triton_repo: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, GatewayProcess]]:
    # Exact comparisons need exact answers: the shipped policy without output DP noise.
    policies = tmp_path_factory.mktemp("policies") / "policies"
    shutil.copytree(ROOT / "policies", policies)
    (policies / "privacy.yaml").write_text("models: {}\n")
    started = {
        "grpc": start_gateway(tmp_path_factory.mktemp("gw-grpc"), backend=f"grpc://{mlserver.grpc_url}",
                              policies=policies, extra=["--profiles", str(triton_repo)]),
        "local": start_gateway(tmp_path_factory.mktemp("gw-local"), backend=f"local:{triton_repo}",
                               policies=policies),
    }
    yield started
    for gw in started.values():
        assert gw.stop() == 0
        assert "Traceback" not in gw.log_path.read_text()


def _call(gw: GatewayProcess, model: str, inputs: list[httpclient.InferInput],
          outputs: list[httpclient.InferRequestedOutput], version: str = "") -> httpclient.InferResult:
    client = httpclient.InferenceServerClient(gw.url)
    try:
        return client.infer(model, inputs, model_version=version, outputs=outputs,
                            headers={"Authorization": f"Bearer {gw.token()}"})
    finally:
        client.close()


def _fp32(name: str, array: np.ndarray, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(array.shape), "FP32")
    inp.set_data_from_numpy(array.astype(np.float32), binary_data=binary)
    return inp


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize(("model", "input_name", "width", "output"),
                         [("digits", "pixels", 64, "probabilities"), ("risk", "features", 30, "score")])
def test_same_answers_on_both_upstreams(gateways: dict[str, GatewayProcess], binary: bool, model: str,
                                        input_name: str, width: int, output: str) -> None:
    rng = np.random.default_rng(7)
    # integer pixels: off-grid digits are refused by the adversarial grid check
    x = rng.integers(0, 17, size=(3, width)).astype(np.float64)
    results = {
        kind: _call(gw, model, [_fp32(input_name, x, binary)],
                    [httpclient.InferRequestedOutput(output, binary_data=binary)]).as_numpy(output)
        for kind, gw in gateways.items()
    }
    assert results["grpc"].shape == results["local"].shape
    np.testing.assert_allclose(results["grpc"], results["local"], rtol=1e-5, atol=1e-6)


def test_same_text_on_both_upstreams(gateways: dict[str, GatewayProcess]) -> None:
    answers = {}
    for kind, gw in gateways.items():
        inp = httpclient.InferInput("text", [3], "BYTES")
        inp.set_data_from_numpy(np.array([b"hello", "wörld".encode(), "ﬁve".encode()], dtype=np.object_),
                                binary_data=True)
        answers[kind] = list(_call(gw, "text_echo", [inp],
                                   [httpclient.InferRequestedOutput("text", binary_data=True)]).as_numpy("text"))
    # NFKC on the way in: the ligature reaches either model as "five"
    assert answers["grpc"] == answers["local"] == [b"hello", "wörld".encode(), b"five"]


def test_same_refusal_of_non_utf8_text(gateways: dict[str, GatewayProcess]) -> None:
    for gw in gateways.values():
        inp = httpclient.InferInput("text", [1], "BYTES")
        inp.set_data_from_numpy(np.array([b"\xffraw"], dtype=np.object_), binary_data=True)
        with pytest.raises(InferenceServerException) as info:
            _call(gw, "text_echo", [inp], [])
        assert info.value.status() == "422"


@pytest.mark.parametrize(
    ("model", "version", "shape", "status"),
    [
        ("digits", "", (1, 63), "422"),  # wrong shape: refused by the gateway, not the upstream
        ("digits", "3", (1, 64), "404"),  # absent version
        ("digits", "2", (1, 64), "404"),  # the canary's version, named without a canary assignment
        ("nope", "", (1, 64), "404"),  # unknown model
    ],
)
def test_same_refusals_on_both_upstreams(gateways: dict[str, GatewayProcess], model: str, version: str,
                                         shape: tuple[int, int], status: str) -> None:
    for gw in gateways.values():
        with pytest.raises(InferenceServerException) as info:
            _call(gw, model, [_fp32("pixels", np.zeros(shape), False)], [], version=version)
        assert info.value.status() == status


def test_metadata_matches(gateways: dict[str, GatewayProcess]) -> None:
    metas = {}
    for kind, gw in gateways.items():
        client = httpclient.InferenceServerClient(gw.url)
        try:
            metas[kind] = client.get_model_metadata("digits", headers={"Authorization": f"Bearer {gw.token()}"})
        finally:
            client.close()
    for key in ("name", "inputs", "outputs"):
        assert metas["grpc"][key] == metas["local"][key]
