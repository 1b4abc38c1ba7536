"""An unmodified ``tritonclient.http`` client works through the gateway with a bearer token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.support.gateway_proc import GatewayProcess, start_gateway

from ..conftest import TRITON_REPO


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = start_gateway(tmp_path_factory.mktemp("gw"), backend=f"local:{TRITON_REPO}")
    yield gw
    assert gw.stop() == 0, gw.log_path.read_text()[-2000:]
    log = gw.log_path.read_text()
    assert "Traceback" not in log


@pytest.fixture(scope="module")
def bearer(gateway: GatewayProcess) -> str:
    return gateway.token()


@pytest.fixture
def headers(bearer: str) -> dict[str, str]:
    """A fresh dict per test: tritonclient.http writes Inference-Header-Content-Length into
    the caller's headers dict, so a reused dict carries a stale length into the next call."""
    return {"Authorization": f"Bearer {bearer}"}


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[httpclient.InferenceServerClient]:
    cli = httpclient.InferenceServerClient(gateway.url)
    yield cli
    cli.close()


def _digits(n: int = 2) -> np.ndarray:
    from tools.build_models import load_digits_split

    _, x_test, _, _ = load_digits_split()
    return np.asarray(x_test[:n], dtype=np.float32)


def test_server_and_model_ready(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits", headers=headers)
    assert client.is_model_ready("digits", "1", headers=headers)
    assert not client.is_model_ready("nope", headers=headers)
    assert not client.is_model_ready("digits")  # no token: refused


def test_metadata(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> None:
    meta = client.get_model_metadata("digits", headers=headers)
    assert meta["inputs"][0]["name"] == "pixels"
    server = client.get_server_metadata(headers=headers)
    assert server["name"] == "infergate"


@pytest.mark.parametrize("binary", [False, True])
def test_infer_digits(client: httpclient.InferenceServerClient, headers: dict[str, str], binary: bool) -> None:
    import onnxruntime as ort

    x = _digits(4)
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    result = client.infer("digits", [inp], outputs=[out], headers=headers, request_id="e2e")
    got = result.as_numpy("probabilities")
    sess = ort.InferenceSession(str(TRITON_REPO / "digits" / "1" / "model.onnx"))
    (want,) = sess.run(None, {"pixels": x})
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert result.get_response()["id"] == "e2e"


def test_infer_without_outputs_uses_binary_default(client: httpclient.InferenceServerClient,
                                                   headers: dict[str, str]) -> None:
    x = _digits(1)
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("digits", [inp], headers=headers)
    assert result.as_numpy("probabilities").shape == (1, 10)


@pytest.mark.parametrize("binary", [False, True])
def test_infer_text(client: httpclient.InferenceServerClient, headers: dict[str, str], binary: bool) -> None:
    data = np.array(["hello", "wörld"], dtype=np.object_)
    inp = httpclient.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(data, binary_data=binary)
    out_name = _text_output()
    result = client.infer("text_echo", [inp], outputs=[httpclient.InferRequestedOutput(out_name, binary_data=binary)],
                          headers=headers)
    got = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy(out_name)]
    assert got == ["hello", "wörld"]


def _text_output() -> str:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((TRITON_REPO / "text_echo" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return str(cfg.output[0].name)


def test_infer_without_token_is_refused(client: httpclient.InferenceServerClient) -> None:
    x = _digits(1)
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [inp])
    assert info.value.status() == "401"


def test_wrong_shape_is_a_clear_4xx(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> None:
    x = np.zeros((1, 63), dtype=np.float32)
    inp = httpclient.InferInput("pixels", [1, 63], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [inp], headers=headers)
    assert info.value.status() == "422"
    assert "dimension" in str(info.value.message())


def test_audit_trail_verifies_after_traffic(gateway: GatewayProcess, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gateway", "audit", "verify", str(gateway.audit_dir)],
                         capture_output=True, check=False)
    assert out.returncode == 0, out.stderr


def test_async_infer(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> None:
    x = _digits(2)
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    pending = client.async_infer("digits", [inp], headers=headers, request_id="async-1")
    result = pending.get_result()
    assert result.as_numpy("probabilities").shape == (2, 10)
    assert result.get_response()["id"] == "async-1"


def _refused_401(call: object) -> None:
    assert callable(call)
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == "401"


@pytest.mark.parametrize("binary", [False, True])
def test_every_call_refuses_a_bad_token(client: httpclient.InferenceServerClient, bearer: str, binary: bool) -> None:
    """Each tritonclient path that reaches a model or the server's metadata refuses a token
    whose signature was altered (is_model_ready answers False, as for any refusal)."""
    bad = {"Authorization": f"Bearer {bearer[:-4]}AAAA" if not bearer.endswith("AAAA") else f"Bearer {bearer[:-4]}BBBB"}
    x = _digits(1)
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    text = httpclient.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array(["hello"], dtype=np.object_), binary_data=binary)
    _refused_401(lambda: client.get_server_metadata(headers=dict(bad)))
    _refused_401(lambda: client.get_model_metadata("digits", headers=dict(bad)))
    _refused_401(lambda: client.get_model_metadata("digits", "1", headers=dict(bad)))
    _refused_401(lambda: client.infer("digits", [inp], outputs=[out], headers=dict(bad)))
    _refused_401(lambda: client.async_infer("digits", [inp], outputs=[out], headers=dict(bad)).get_result())
    _refused_401(lambda: client.infer("text_echo", [text], headers=dict(bad)))
    assert not client.is_model_ready("digits", headers=dict(bad))


def test_model_config_is_not_served(client: httpclient.InferenceServerClient, headers: dict[str, str]) -> None:
    """get_model_config is Triton's config extension: never proxied (CATALOGUE AUTHZ-05), so
    the client gets a plain 404; get_model_metadata carries the shapes and datatypes."""
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("digits", headers=headers)
    assert info.value.status() == "404"


def test_a_headers_dict_reused_after_a_binary_call(client: httpclient.InferenceServerClient, bearer: str) -> None:
    """Client code that keeps one headers dict: tritonclient.http leaves the binary call's
    Inference-Header-Content-Length in it, and the next, all-JSON, call sends it with a
    JSON body. A clear 400 naming the header (not "the body is not valid JSON"); calls
    without a body ignore it."""
    shared = {"Authorization": f"Bearer {bearer}"}
    x = _digits(1)
    binary = httpclient.InferInput("pixels", list(x.shape), "FP32")
    binary.set_data_from_numpy(x, binary_data=True)
    assert client.infer("digits", [binary], headers=shared).as_numpy("probabilities").shape == (1, 10)
    assert "Inference-Header-Content-Length" in shared  # the client library's doing
    as_json = httpclient.InferInput("pixels", list(x.shape), "FP32")
    as_json.set_data_from_numpy(x, binary_data=False)
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [as_json], headers=shared,
                     outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
    assert info.value.status() == "400"
    assert "as Inference-Header-Content-Length says" in str(info.value.message())
    assert client.is_model_ready("digits", headers=shared)
    assert client.get_model_metadata("digits", headers=shared)["name"] == "digits"
