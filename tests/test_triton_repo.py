"""The committed Triton model repository is valid, honest about its models and reproducible.

Why these tests exist: the gateway, its input-sanity checks, adversarial detectors and drift
monitor all trust ``triton_repo/`` (the Triton contract in ``config.pbtxt``, the numbers in
``profile.json``, the accuracy in ``MODEL_CARD.md``).  A config that drifts from its ONNX
graph only fails inside Triton at load time, and a stale profile silently skews every
detector, so both are pinned here against the graphs and against a fresh build.

scikit-learn is imported (through ``tools/build_models.py``) only by the tests that need the
data splits, so collecting this module stays cheap.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

ROOT = Path(__file__).resolve().parent.parent
TRITON_REPO = ROOT / "triton_repo"
BUILD_SCRIPT = ROOT / "tools" / "build_models.py"

MODELS = ("digits", "text_echo", "risk")
NUMERIC_MODELS = ("digits", "risk")
MIN_ACCURACY = 0.93
# Version 2 of these is the DP-SGD model (tools/train_dp.py via tools/build_models.py).
DP_MODELS = ("digits", "risk")
DP_VERSION = "2"
# What the DP models must reach on the held-out split (measured: digits 0.9467 at ε 2.99,
# risk 0.9720 at ε 7.99); below this a rebuild is broken, not merely unlucky.
DP_MIN_ACCURACY = {"digits": 0.90, "risk": 0.93}
DP_TARGET_EPSILON = {"digits": 3.0, "risk": 8.0}
SERVED_VERSIONS = {"digits": ("1", "2"), "risk": ("1", "2"), "text_echo": ("1",)}

# The product contract, written out independently of the build script: if the script and
# the committed files drift together, this still catches it.
# model -> (max_batch_size, [(input, dtype, dims)], [(output, dtype, dims)])
CONTRACT: dict[str, tuple[int, list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]] = {
    "digits": (64, [("pixels", "TYPE_FP32", [64])], [("probabilities", "TYPE_FP32", [10])]),
    "text_echo": (0, [("text", "TYPE_STRING", [-1])], [("text", "TYPE_STRING", [-1])]),
    "risk": (64, [("features", "TYPE_FP32", [30])], [("score", "TYPE_FP32", [1])]),
}
N_FEATURES = {"digits": 64, "risk": 30}

TRITON_TO_ONNX = {"TYPE_FP32": onnx.TensorProto.FLOAT, "TYPE_STRING": onnx.TensorProto.STRING}

# Byte strings a BYTES endpoint must survive: invalid UTF-8, NUL, empty, every byte value.
AWKWARD_BYTES = [
    b"\xff\xfe\x80 not utf-8",
    b"a\x00b",
    b"",
    bytes(range(256)),
    "h\u00e9llo \u202eRTL \U0001f600 e\u0301".encode(),
    b"\xed\xa0\x80",  # an encoded UTF-16 surrogate: invalid UTF-8
    b"x" * 10_000,
]
UTF8_TEXTS = [
    "hello",
    "h\u00e9llo",
    "\U0001f600\U0001f3f3\ufe0f\u200d\U0001f308",
    "",
    "\ufeffBOM",
    "e\u0301",
    "\u05e9\u05dc",
]


# --------------------------------------------------------------------------- helpers


def _load_build_module() -> ModuleType:
    """``tools`` is not a package; load the script by path like benchmarks and attacks do."""
    name = "infergate_build_models"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILD_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_models() -> ModuleType:
    return _load_build_module()


def _config(model: str, repo: Path = TRITON_REPO) -> Any:
    config = model_config_pb2.ModelConfig()
    text_format.Parse((repo / model / "config.pbtxt").read_text(encoding="utf-8"), config)
    return config


def _onnx_path(model: str, repo: Path = TRITON_REPO, version: str = "1") -> Path:
    return repo / model / version / "model.onnx"


def _session(model: str, repo: Path = TRITON_REPO, version: str = "1") -> Any:
    return ort.InferenceSession(str(_onnx_path(model, repo, version)), providers=["CPUExecutionProvider"])


def _record(model: str, repo: Path = TRITON_REPO) -> Any:
    from privacy.training.cards import TrainingRecord

    return TrainingRecord.from_json((repo / model / DP_VERSION / "training.json").read_text(encoding="utf-8"))


def _profile(model: str, repo: Path = TRITON_REPO) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((repo / model / "profile.json").read_text(encoding="utf-8"))
    return data


def _onnx_dims(value_info: onnx.ValueInfoProto) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


def _io(config_ios: Any) -> list[tuple[str, str, list[int]]]:
    return [(io.name, model_config_pb2.DataType.Name(io.data_type), list(io.dims)) for io in config_ios]


def _mahalanobis(profile: dict[str, Any], x: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    maha = profile["mahalanobis"]
    diff = x.astype(np.float64) - np.asarray(maha["mean"], dtype=np.float64)
    quad = np.einsum("ij,jk,ik->i", diff, np.asarray(maha["inv_cov"], dtype=np.float64), diff)
    distances: npt.NDArray[np.float64] = np.sqrt(np.maximum(quad, 0.0))
    return distances


def _walk_numbers(a: Any, b: Any, path: str = "$") -> Iterator[tuple[str, float, float]]:
    """Pair up the numbers of two JSON documents, failing on any structural difference."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            yield from _walk_numbers(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _walk_numbers(x, y, f"{path}[{i}]")
    elif isinstance(a, bool) or a is None or isinstance(a, str):
        assert a == b, path
    else:
        yield path, float(a), float(b)


# --------------------------------------------------------------------------- layout & configs


def test_repository_layout() -> None:
    for model in MODELS:
        model_dir = TRITON_REPO / model
        files = sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file())
        dp_files = [f"{DP_VERSION}/model.onnx", f"{DP_VERSION}/training.json"] if model in DP_MODELS else []
        assert files == sorted(["1/model.onnx", *dp_files, "MODEL_CARD.md", "config.pbtxt", "profile.json"]), model
        for version in SERVED_VERSIONS[model]:
            size = _onnx_path(model, version=version).stat().st_size
            assert 100 < size < 500_000, f"{model}/{version}: model.onnx is {size} bytes"


@pytest.mark.parametrize("model", MODELS)
def test_config_parses_and_matches_onnx(model: str) -> None:
    config = _config(model)
    max_batch_size, inputs, outputs = CONTRACT[model]
    assert config.name == model
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == max_batch_size
    if model in DP_MODELS:
        # Triton's `version_policy: { all { } }`: version 1 and the DP-SGD version 2 are both served.
        assert config.version_policy.WhichOneof("policy_choice") == "all"
    else:
        assert config.version_policy.WhichOneof("policy_choice") == "latest"
        assert config.version_policy.latest.num_versions == 1
    assert _io(config.input) == inputs
    assert _io(config.output) == outputs
    for version in SERVED_VERSIONS[model]:
        _check_graph_matches_config(model, version, config)


def _check_graph_matches_config(model: str, version: str, config: Any) -> None:
    graph_model = onnx.load(str(_onnx_path(model, version=version)))
    onnx.checker.check_model(graph_model, full_check=True)
    # Triton images ship older onnxruntime builds than this venv: keep the format conservative.
    assert graph_model.ir_version <= 8
    assert {op.domain or "ai.onnx": op.version for op in graph_model.opset_import}["ai.onnx"] <= 17
    batch = [-1] if config.max_batch_size > 0 else []
    for config_ios, graph_ios in (
        (config.input, graph_model.graph.input),
        (config.output, graph_model.graph.output),
    ):
        assert [vi.name for vi in graph_ios] == [io.name for io in config_ios]
        for io, vi in zip(config_ios, graph_ios, strict=True):
            assert (
                vi.type.tensor_type.elem_type == TRITON_TO_ONNX[model_config_pb2.DataType.Name(io.data_type)]
            )
            assert _onnx_dims(vi) == batch + list(io.dims), io.name

    # What onnxruntime (and so Triton's onnxruntime backend) reports must agree as well.
    session = _session(model, version=version)
    assert [i.name for i in session.get_inputs()] == [io.name for io in config.input]
    assert [o.name for o in session.get_outputs()] == [io.name for io in config.output]


# --------------------------------------------------------------------------- inference


def test_digits_batch_of_three() -> None:
    x = np.random.default_rng(0).integers(0, 17, size=(3, 64)).astype(np.float32)
    outputs = _session("digits").run(None, {"pixels": x})
    assert len(outputs) == 1
    probs = outputs[0]
    assert probs.dtype == np.float32 and probs.shape == (3, 10)
    assert np.all(probs >= 0.0) and np.all(probs <= 1.0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_risk_batch_of_three() -> None:
    features = _profile("risk")["features"]
    rng = np.random.default_rng(0)
    x = np.array(
        [[max(f["mean"] + f["std"] * rng.normal(), 0.0) for f in features] for _ in range(3)],
        dtype=np.float32,
    )
    outputs = _session("risk").run(None, {"features": x})
    assert len(outputs) == 1
    score = outputs[0]
    assert score.dtype == np.float32 and score.shape == (3, 1)
    assert np.all(score >= 0.0) and np.all(score <= 1.0)


def test_text_echo_batch_of_three() -> None:
    x = np.array(["a", "\u00e9", "\U0001f600"], dtype=np.object_)
    outputs = _session("text_echo").run(None, {"text": x})
    assert len(outputs) == 1
    assert outputs[0].dtype == np.object_ and outputs[0].shape == (3,)
    assert list(outputs[0]) == list(x)


def test_text_echo_is_a_pure_pass_through() -> None:
    """No node can touch the data: the graph output *is* the graph input ``text``.

    That is what makes the model byte-transparent in Triton, whose onnxruntime backend
    hands BYTES to onnxruntime's C API (cut at the first NUL, see MODEL_CARD.md).
    """
    graph = onnx.load(str(_onnx_path("text_echo"))).graph
    assert len(graph.node) == 0 and len(graph.initializer) == 0
    assert [i.name for i in graph.input] == [o.name for o in graph.output] == ["text"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.STRING


def test_text_echo_round_trips_utf8_in_onnxruntime() -> None:
    x = np.array(UTF8_TEXTS, dtype=np.object_)
    (out,) = _session("text_echo").run(None, {"text": x})
    assert [s.encode("utf-8") for s in out] == [s.encode("utf-8") for s in UTF8_TEXTS]


def test_text_echo_round_trips_arbitrary_bytes() -> None:
    """Non-UTF-8 bytes: onnxruntime's Python API takes only ``str``, so check two ways.

    The ONNX reference evaluator runs the graph on an object array of ``bytes`` as-is; the
    onnxruntime run carries each byte as one Latin-1 code point (a lossless 1:1 map).
    """
    from onnx.reference import ReferenceEvaluator

    x = np.array(AWKWARD_BYTES, dtype=np.object_)
    (ref_out,) = ReferenceEvaluator(onnx.load(str(_onnx_path("text_echo")))).run(None, {"text": x})
    assert all(type(v) is bytes for v in ref_out)
    assert list(ref_out) == AWKWARD_BYTES

    latin1 = np.array([b.decode("latin-1") for b in AWKWARD_BYTES], dtype=np.object_)
    (ort_out,) = _session("text_echo").run(None, {"text": latin1})
    assert [s.encode("latin-1") for s in ort_out] == AWKWARD_BYTES


def test_digits_accuracy_on_held_out_split(build_models: ModuleType) -> None:
    _, x_test, _, y_test = build_models.load_digits_split()
    assert x_test.dtype == np.float32 and x_test.shape[1] == 64
    (probs,) = _session("digits").run(None, {"pixels": x_test})
    accuracy = float(np.mean(probs.argmax(axis=1) == y_test))
    assert accuracy >= MIN_ACCURACY
    card = (TRITON_REPO / "digits" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"{100 * accuracy:.2f}% via onnxruntime" in card


def test_risk_scores_and_accuracy_on_held_out_split(build_models: ModuleType) -> None:
    _, x_test, _, y_test = build_models.load_risk_split()
    assert x_test.dtype == np.float32 and x_test.shape[1] == 30
    (score,) = _session("risk").run(None, {"features": x_test})
    assert score.shape == (len(x_test), 1)
    assert np.all(score >= 0.0) and np.all(score <= 1.0)
    # y_test is 1 = malignant, and the score is P(malignant).
    accuracy = float(np.mean((score[:, 0] >= 0.5) == (y_test == 1)))
    assert accuracy >= MIN_ACCURACY
    card = (TRITON_REPO / "risk" / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert f"{100 * accuracy:.2f}% via onnxruntime" in card
    assert "P(malignant)" in card


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("model", NUMERIC_MODELS)
def test_profile_is_consistent(model: str) -> None:
    profile = _profile(model)
    config = _config(model)
    n_features = N_FEATURES[model]
    n_train = profile["n_train"]
    assert profile["model"] == model
    assert profile["input"] == config.input[0].name
    assert profile["output"]["name"] == config.output[0].name
    assert profile["shape"] == [-1, n_features]
    levels = profile["quantile_levels"]
    assert levels == sorted(levels) and all(0.0 < q < 1.0 for q in levels)

    features = profile["features"]
    assert len(features) == n_features
    for j, f in enumerate(features):
        assert f["index"] == j
        assert f["min"] <= f["mean"] <= f["max"] and f["std"] >= 0.0
        q = f["quantiles"]
        assert len(q) == len(levels) and q == sorted(q) and f["min"] <= q[0] and q[-1] <= f["max"]
        edges, hist = f["hist_edges"], f["hist"]
        assert len(edges) == len(hist) + 1 and all(b > a for a, b in zip(edges, edges[1:], strict=False))
        assert edges[0] <= f["min"] and f["max"] <= edges[-1]
        assert sum(hist) == n_train and min(hist) >= 0

    maha = profile["mahalanobis"]
    assert len(maha["mean"]) == n_features
    inv_cov = np.asarray(maha["inv_cov"], dtype=np.float64)
    assert inv_cov.shape == (n_features, n_features)
    np.testing.assert_array_equal(inv_cov, inv_cov.T)
    assert np.linalg.eigvalsh(inv_cov).min() > 0.0
    assert 0.0 < maha["threshold_fpr_0.01"] <= maha["threshold_fpr_0.001"]
    assert all(math.isfinite(v) for v in maha["train_distance_quantiles"])

    out = profile["output"]
    if model == "digits":
        for key in ("class_distribution", "label_distribution"):
            assert len(out[key]) == 10 and abs(sum(out[key]) - 1.0) < 1e-4
        assert sum(out["confidence_hist"]) == n_train
    else:
        assert out["positive_class"] == "malignant"
        assert out["score_hist_edges"][0] == 0.0 and out["score_hist_edges"][-1] == 1.0
        assert len(out["score_hist_edges"]) == len(out["score_hist"]) + 1
        assert sum(out["score_hist"]) == n_train


def test_text_echo_profile() -> None:
    profile = _profile("text_echo")
    assert profile["model"] == "text_echo" and profile["input"] == "text"
    assert profile["output"]["name"] == "text"
    assert profile["features"] == []


@pytest.mark.parametrize("model", NUMERIC_MODELS)
def test_profile_describes_the_training_split(model: str, build_models: ModuleType) -> None:
    """A consumer reading only profile.json must reproduce its own thresholds and ranges."""
    x_train = (build_models.load_digits_split if model == "digits" else build_models.load_risk_split)()[0]
    profile = _profile(model)
    assert profile["n_train"] == len(x_train)
    mins = np.array([f["min"] for f in profile["features"]])
    maxs = np.array([f["max"] for f in profile["features"]])
    assert np.all(x_train >= mins) and np.all(x_train <= maxs)
    distances = _mahalanobis(profile, x_train)
    maha = profile["mahalanobis"]
    assert math.isclose(float(np.quantile(distances, 0.99)), maha["threshold_fpr_0.01"], rel_tol=1e-5)
    assert math.isclose(float(np.quantile(distances, 0.999)), maha["threshold_fpr_0.001"], rel_tol=1e-5)
    # A percentile of n points can leave up to one extra point above it.
    assert float(np.mean(distances > maha["threshold_fpr_0.01"])) <= 0.01 + 1.0 / len(x_train)


# --------------------------------------------------------------------------- reproducibility


def test_committed_repo_matches_a_fresh_build(build_models: ModuleType, tmp_path: Path) -> None:
    """Two builds are byte-identical; the committed files equal a build (numerically, to allow BLAS noise)."""
    first, second = tmp_path / "a", tmp_path / "b"
    build_models.build_repo(first)
    build_models.build_repo(second)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), f"{rel} is not reproducible"

    for model in MODELS:
        fresh_config = (first / model / "config.pbtxt").read_text(encoding="utf-8")
        assert fresh_config == (TRITON_REPO / model / "config.pbtxt").read_text(encoding="utf-8")
        for path, fresh, committed in _walk_numbers(_profile(model, first), _profile(model)):
            assert math.isclose(fresh, committed, rel_tol=1e-4, abs_tol=1e-6), path

    x_digits = build_models.load_digits_split()[1]
    x_risk = build_models.load_risk_split()[1]
    feeds: dict[str, dict[str, Any]] = {
        "digits": {"pixels": x_digits},
        "risk": {"features": x_risk},
        "text_echo": {"text": np.array(UTF8_TEXTS, dtype=np.object_)},
    }
    for model, feed in feeds.items():
        fresh_out = _session(model, first).run(None, feed)
        committed_out = _session(model).run(None, feed)
        assert len(fresh_out) == len(committed_out) == 1
        if model == "text_echo":
            assert list(fresh_out[0]) == list(committed_out[0])
        else:
            # L-BFGS amplifies BLAS rounding: OpenBLAS picks its kernels by CPU (AVX2 vs
            # AVX-512) and splits sums by thread count (torch imported first changes it), and
            # the optimum it stops at moves by up to ~0.02 in probability (measured: 0.0202 on
            # digits, 1.3e-6 on risk, with OPENBLAS_CORETYPE=Haswell or one BLAS thread).
            # Same machine, same process: byte-identical (above); across machines: the same
            # class for every test row and probabilities within 0.05.
            assert (fresh_out[0].argmax(axis=1) == committed_out[0].argmax(axis=1)).all(), model
            np.testing.assert_allclose(fresh_out[0], committed_out[0], rtol=0.0, atol=0.05)


# --------------------------------------------------------------------------- version 2: DP-SGD


@pytest.mark.parametrize("model", DP_MODELS)
def test_dp_version_is_the_model_its_record_describes(model: str, build_models: ModuleType) -> None:
    """Version 2 is the recorded DP build: same bytes, ε within target, accuracy re-measured here."""
    from privacy.training.export import sha256

    record = _record(model)
    onnx_bytes = _onnx_path(model, version=DP_VERSION).read_bytes()
    assert record.onnx_sha256 == sha256(onnx_bytes) and record.onnx_bytes == len(onnx_bytes)
    assert record.model == model and record.accountant == "rdp" and record.delta == 1e-5
    assert record.target_epsilon == DP_TARGET_EPSILON[model]
    assert record.target_epsilon - 0.05 <= record.epsilon <= record.target_epsilon
    assert record.noise_multiplier > 1.0 and record.max_grad_norm > 0.0 and record.epochs == 100

    split = build_models.load_digits_split() if model == "digits" else build_models.load_risk_split()
    _, x_test, _, y_test = split
    feed = {"digits": "pixels", "risk": "features"}[model]
    (dp_out,) = _session(model, version=DP_VERSION).run(None, {feed: x_test})
    (v1_out,) = _session(model).run(None, {feed: x_test})
    if model == "digits":
        dp_acc = float(np.mean(dp_out.argmax(axis=1) == y_test))
        v1_acc = float(np.mean(v1_out.argmax(axis=1) == y_test))
        np.testing.assert_allclose(dp_out.sum(axis=1), 1.0, atol=1e-5)
    else:
        dp_acc = float(np.mean((dp_out[:, 0] >= 0.5) == (y_test == 1)))
        v1_acc = float(np.mean((v1_out[:, 0] >= 0.5) == (y_test == 1)))
    assert dp_acc >= DP_MIN_ACCURACY[model]
    assert dp_acc == pytest.approx(record.accuracy_dp, abs=1e-6)
    assert v1_acc == pytest.approx(record.accuracy_baseline, abs=1e-6)
    assert not np.allclose(dp_out, v1_out, atol=1e-3)  # really another model, not a copy of version 1


@pytest.mark.parametrize("model", DP_MODELS)
def test_model_card_has_the_dp_section(model: str) -> None:
    from privacy.training.cards import render_version_section

    record = _record(model)
    card = (TRITON_REPO / model / "MODEL_CARD.md").read_text(encoding="utf-8")
    first, sep, section = card.partition(f"## Version {DP_VERSION}: ")
    assert sep and first.startswith(f"# {model}\n")
    assert "`version_policy: all`" in first and f"`{model}-version`" in first
    # The section is rendered from the committed record, so no number in it is hand-copied.
    assert sep + section == render_version_section(record, DP_VERSION)
    for needle in (
        f"**{record.epsilon:.3f}** (target {record.target_epsilon:g})",
        "| δ | 1e-05 |",
        f"| noise multiplier (DP-SGD) | {record.noise_multiplier:.4f} |",
        f"| max grad norm (per-example clipping, flat) | {record.max_grad_norm:g} |",
        f"**{100 * record.accuracy_dp:.2f}%**",
        f"| {100 * record.accuracy_baseline:.2f}% |",
        f"Build date**: {record.build_date}",
        "make models",
        "`1234`, the public default",
    ):
        assert needle in section, needle


def test_dp_versions_rebuild_from_the_recorded_seed(build_models: ModuleType, tmp_path: Path) -> None:
    """`make models` retrains version 2 (full recipe, ~10 s): same ε, same outputs as committed.

    Needs the training extra (torch, opacus). Outputs are compared numerically (BLAS may
    differ in the last bits across machines); byte identity between two builds on one
    machine is checked by tests/training/test_dpsgd.py on short runs.
    """
    repo = tmp_path / "repo"
    build_models.build_repo(repo, dp=True)
    x = {"digits": build_models.load_digits_split()[1], "risk": build_models.load_risk_split()[1]}
    for model in DP_MODELS:
        fresh, committed = _record(model, repo), _record(model)
        assert fresh.epsilon == committed.epsilon and fresh.noise_multiplier == committed.noise_multiplier
        assert fresh.build_date == committed.build_date and fresh.command == committed.command
        feed = {"digits": "pixels", "risk": "features"}[model]
        (fresh_out,) = _session(model, repo, DP_VERSION).run(None, {feed: x[model]})
        (committed_out,) = _session(model, version=DP_VERSION).run(None, {feed: x[model]})
        np.testing.assert_allclose(fresh_out, committed_out, rtol=0.0, atol=1e-5)
        assert f"## Version {DP_VERSION}: {model}" in (repo / model / "MODEL_CARD.md").read_text(encoding="utf-8")
