"""DP-SGD training, ONNX export and model cards (privacy/training, tools/train_dp.py).

Why these tests: a DP model is only as trustworthy as three claims nobody can see in
its weights: that the accountant's ε really is within the target (including the
private preprocessing), that the build is reproducible from its seed, and that the
exported graph is the trained network under the exact Triton contract of the model
it replaces.  Each is checked here on tiny runs (a few epochs; the whole module runs
in well under a minute on 2 cores).  Tests that train need the training extra (torch,
opacus), which `make test` installs; the import-hygiene tests need neither.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from privacy.training import RECIPES, TrainingRecord, dpsgd, find_noise_multiplier, render_card
from privacy.training import export as dp_export

ROOT = Path(__file__).resolve().parents[2]
TRITON_REPO = ROOT / "triton_repo"
BUILD_SCRIPT = ROOT / "tools" / "build_models.py"
TRAIN_SCRIPT = ROOT / "tools" / "train_dp.py"
MODELS = ("digits", "risk")
HEAVY = ("torch", "opacus")


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- import hygiene (no torch needed)


def test_privacy_import_stays_cheap() -> None:
    """`import privacy.training` (and its submodules) must not pull torch or opacus in."""
    code = (
        "import sys, privacy, privacy.training, privacy.training.dpsgd, privacy.training.export, "
        "privacy.training.cards; print(sorted(m for m in ('torch', 'opacus', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_gateway_never_imports_torch_or_opacus() -> None:
    """Not even lazily: a static scan of every import statement under gateway/."""
    offenders = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in HEAVY]
    assert offenders == []


# --------------------------------------------------------------------------- fixtures

TINY_EPOCHS = 3


@pytest.fixture(scope="module")
def torch() -> ModuleType:
    """The training extra (installed by `make test`); imported here, never by the gateway."""
    import opacus  # noqa: F401 - fail loudly if the extra is missing
    import torch as torch_module

    return torch_module


@pytest.fixture(scope="module")
def build_models() -> ModuleType:
    return _load("infergate_build_models", BUILD_SCRIPT)


@pytest.fixture(scope="module")
def train_dp(torch: ModuleType) -> ModuleType:
    return _load("infergate_train_dp", TRAIN_SCRIPT)


@pytest.fixture(scope="module")
def splits(build_models: ModuleType) -> dict[str, tuple[Any, Any, Any, Any]]:
    return {"digits": build_models.load_digits_split(), "risk": build_models.load_risk_split()}


@pytest.fixture(scope="module")
def runs(torch: ModuleType, splits: dict[str, tuple[Any, Any, Any, Any]]) -> dict[str, dpsgd.TrainResult]:
    return {
        name: dpsgd.train(RECIPES[name], splits[name][0], splits[name][2], epochs=TINY_EPOCHS, seed=11)
        for name in MODELS
    }


@pytest.fixture(scope="module")
def exported(runs: dict[str, dpsgd.TrainResult]) -> dict[str, bytes]:
    return {name: dp_export.export_onnx(RECIPES[name], runs[name].module, {"k": "v"}) for name in MODELS}


def _config(model: str) -> Any:
    return text_format.Parse(
        (TRITON_REPO / model / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig()
    )


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("model", MODELS)
def test_accountant_epsilon_within_target(model: str, runs: dict[str, dpsgd.TrainResult]) -> None:
    run = runs[model]
    target = RECIPES[model].default_epsilon
    assert target - 0.05 <= run.epsilon <= target
    assert run.noise_multiplier > 0.0 and run.delta == pytest.approx(1e-5)
    # A fresh RDP accountant over the recorded history (the oracle) agrees with the engine.
    assert dpsgd.rdp_epsilon(run.accountant_history, run.delta) == pytest.approx(run.epsilon, rel=1e-12)
    sgd_steps = sum(n for s, q, n in run.accountant_history if q < 1.0)
    assert sgd_steps == run.steps == TINY_EPOCHS * round(1 / run.sample_rate)


def test_private_preprocessing_is_charged_to_the_budget(runs: dict[str, dpsgd.TrainResult]) -> None:
    """risk's DP centre is one Gaussian release in the same history; digits uses no data for its scaling."""
    pre = RECIPES["risk"].preprocessing
    assert pre.is_private_estimate
    assert (pre.noise_multiplier, 1.0, 1) in runs["risk"].accountant_history
    assert all(q < 1.0 for _, q, _ in runs["digits"].accountant_history)
    run = runs["risk"]
    without = find_noise_multiplier(
        target_epsilon=run.target_epsilon, delta=run.delta, sample_rate=run.sample_rate, steps=run.steps
    )
    assert run.noise_multiplier > without  # the preprocessing release costs DP-SGD noise


def test_noise_search_is_opacus_get_noise_multiplier(torch: ModuleType) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    for eps, q, steps in ((3.0, 0.25, 40),):
        ours = find_noise_multiplier(target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps)
        theirs = get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=steps)
        assert ours == pytest.approx(theirs, rel=1e-12)
        assert dpsgd.rdp_epsilon([(ours, q, steps)], 1e-5) <= eps


def test_unreachable_budget_is_refused(torch: ModuleType) -> None:
    with pytest.raises(ValueError, match="preprocessing"):
        find_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=0.5, steps=10, prefix=[(0.5, 1.0, 1)])


def test_private_centre_is_the_clipped_mean_plus_bounded_noise(torch: ModuleType, splits: dict[str, Any]) -> None:
    recipe = RECIPES["risk"]
    x = splits["risk"][0]
    quiet = dataclasses.replace(recipe, preprocessing=dataclasses.replace(recipe.preprocessing, noise_multiplier=1e-9))
    centre, cost = dpsgd.private_centre(quiet, x, torch.Generator().manual_seed(0))
    pre = recipe.preprocessing
    exact = np.clip(dpsgd.transform_inputs(recipe, x), pre.clip_low, pre.clip_high).mean(axis=0)
    np.testing.assert_allclose(centre, exact, atol=1e-6)
    assert cost == [(1e-9, 1.0, 1)]


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_weights_and_bytes(
    torch: ModuleType, splits: dict[str, Any], runs: dict[str, dpsgd.TrainResult], exported: dict[str, bytes]
) -> None:
    x, _, y, _ = splits["digits"]
    again = dpsgd.train(RECIPES["digits"], x, y, epochs=TINY_EPOCHS, seed=11)
    first, second = runs["digits"].module.state_dict(), again.module.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert again.epsilon == runs["digits"].epsilon
    assert dp_export.export_onnx(RECIPES["digits"], again.module, {"k": "v"}) == exported["digits"]

    other = dpsgd.train(RECIPES["digits"], x, y, epochs=TINY_EPOCHS, seed=12)
    assert not torch.equal(other.module.state_dict()["body.0.weight"], first["body.0.weight"])


def test_training_restores_global_torch_state(torch: ModuleType, splits: dict[str, Any]) -> None:
    x, _, y, _ = splits["risk"]
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    dpsgd.train(RECIPES["risk"], x, y, epochs=TINY_EPOCHS, seed=3)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det
    assert torch.equal(torch.get_rng_state(), rng)


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("model", MODELS)
def test_onnx_matches_torch_and_the_output_contract(
    model: str, splits: dict[str, Any], runs: dict[str, dpsgd.TrainResult], exported: dict[str, bytes]
) -> None:
    recipe, onnx_bytes = RECIPES[model], exported[model]
    x_test = splits[model][1]
    assert dp_export.export_error(recipe, runs[model].module, onnx_bytes, x_test) <= dp_export.MAX_EXPORT_ERROR
    for batch in (x_test[:1], x_test[:64], x_test):
        out = dp_export.run_onnx(onnx_bytes, recipe.input_name, batch)
        assert out.shape == (len(batch), recipe.n_outputs)
        assert np.all(np.isfinite(out)) and np.all(out >= 0.0) and np.all(out <= 1.0)
        if model == "digits":
            np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    # Raw features in: the standardisation is inside the graph (log, centre, scale for risk).
    ops = {node.op_type for node in onnx.load_from_string(onnx_bytes).graph.node}
    assert {"Sub", "Div"} <= ops and ("Log" in ops) == (model == "risk")


@pytest.mark.parametrize("model", MODELS)
def test_onnx_io_matches_config_pbtxt(model: str, exported: dict[str, bytes]) -> None:
    config = _config(model)
    session = dp_export.onnx_session(exported[model])
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [a.name for a in actual]
        for t, a in zip(declared, actual, strict=True):
            assert model_config_pb2.DataType.Name(t.data_type) == "TYPE_FP32" and a.type == "tensor(float)"
            assert a.shape == [dp_export.BATCH_DIM, *[int(d) for d in t.dims]]
    assert dp_export.contract_mismatches(exported[model], (TRITON_REPO / model / "config.pbtxt").read_text()) == []


def test_contract_check_catches_a_renamed_output(exported: dict[str, bytes]) -> None:
    config = (TRITON_REPO / "digits" / "config.pbtxt").read_text().replace('"probabilities"', '"probs"')
    assert dp_export.contract_mismatches(exported["digits"], config)


def test_onnx_is_pinned_and_self_describing(exported: dict[str, bytes]) -> None:
    model = onnx.load_from_string(exported["risk"])
    assert model.ir_version == dp_export.IR_VERSION
    assert [(o.domain, o.version) for o in model.opset_import] == [("", dp_export.OPSET)]
    assert model.producer_name == dp_export.PRODUCER_NAME and model.graph.name == "risk"
    assert not model.doc_string and all(not n.doc_string for n in model.graph.node)
    assert {p.key: p.value for p in model.metadata_props} == {"k": "v"}


# --------------------------------------------------------------------------- the command and the card


def test_train_dp_command_writes_a_complete_model_dir(tmp_path: Path, train_dp: ModuleType) -> None:
    out = tmp_path / "dp"
    epochs = str(TINY_EPOCHS)  # same accounting questions as the `runs` fixture: memoised
    assert train_dp.main(["--out", str(out), "--epochs", epochs, "--min-accuracy", "0", "--date", "2030-01-02"]) == 0
    for model in MODELS:
        d = out / model
        assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == [
            "1/model.onnx",
            "MODEL_CARD.md",
            "config.pbtxt",
            "profile.json",
            "training.json",
        ]
        for copied in ("config.pbtxt", "profile.json"):
            assert (d / copied).read_bytes() == (TRITON_REPO / model / copied).read_bytes()
        record = TrainingRecord.from_json((d / "training.json").read_text(encoding="utf-8"))
        onnx_bytes = (d / "1" / "model.onnx").read_bytes()
        assert record.onnx_sha256 == dp_export.sha256(onnx_bytes) and record.onnx_bytes == len(onnx_bytes)
        assert record.epsilon <= record.target_epsilon == RECIPES[model].default_epsilon
        assert record.accountant == "rdp" and record.epochs == TINY_EPOCHS and record.secure_mode is False
        assert record.seed == 1234 and record.seed_is_public_default
        assert 0.0 <= record.accuracy_dp <= 1.0 and record.accuracy_baseline > 0.95
        card = (d / "MODEL_CARD.md").read_text(encoding="utf-8")
        assert card == render_card(record)
        metadata = {p.key: p.value for p in onnx.load_from_string(onnx_bytes).metadata_props}
        assert float(metadata["infergate.dp.epsilon"]) == pytest.approx(record.epsilon, rel=1e-5)


def test_card_states_the_numbers_and_the_limits(tmp_path: Path, train_dp: ModuleType) -> None:
    out = tmp_path / "dp"
    train_dp.main(["--out", str(out), "--models", "risk", "--epochs", str(TINY_EPOCHS), "--min-accuracy", "0"])
    record = TrainingRecord.from_json((out / "risk" / "training.json").read_text(encoding="utf-8"))
    card = (out / "risk" / "MODEL_CARD.md").read_text(encoding="utf-8")
    for needle in (
        f"**{record.epsilon:.3f}**",  # ε spent
        f"(target {record.target_epsilon:g})",
        "| δ | 1e-05 |",
        f"| noise multiplier (DP-SGD) | {record.noise_multiplier:.4f} |",
        f"| max grad norm (per-example clipping, flat) | {record.max_grad_norm:g} |",
        f"| epochs / optimizer steps | {record.epochs} / {record.steps} |",
        f"rate q = {record.sample_rate:.4f}",
        f"**{100 * record.accuracy_dp:.2f}%**",
        f"| {100 * record.accuracy_baseline:.2f}% |",
        "load_breast_cancer",
        "What this ε protects",
        "What it does not protect",
        "profile.json",
        "`secure_mode` is off",
        "nominal only",
        "Build date**: undated",
    ):
        assert needle in card, needle


def test_secret_seed_is_not_written(tmp_path: Path, train_dp: ModuleType) -> None:
    seed_file = tmp_path / "seed"
    seed_file.write_text("987654321987\n")
    out = tmp_path / "dp"
    args = ["--out", str(out), "--models", "risk", "--epochs", str(TINY_EPOCHS), "--min-accuracy", "0"]
    train_dp.main([*args, "--seed-file", str(seed_file)])
    written = b"".join(p.read_bytes() for p in (out / "risk").rglob("*") if p.is_file())
    assert b"987654321987" not in written
    assert json.loads((out / "risk" / "training.json").read_text())["seed"] is None


def test_refuses_to_overwrite_the_baseline(train_dp: ModuleType) -> None:
    with pytest.raises(SystemExit):
        train_dp.main(["--out", str(TRITON_REPO), "--epochs", "1"])
