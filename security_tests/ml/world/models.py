"""The attack world's models, trained and exported at fixture time (CATALOGUE §2.1).

Deterministic (fixed seeds, data only from scikit-learn's bundled sets and a seeded
Gaussian mixture): the same repository every run, no download. Exported with the shipped
models' own helpers (``tools/build_models.py``: skl2onnx without ZipMap, pinned opsets,
``config.pbtxt`` through Triton's protobuf schema, ``profile.json`` from the training split).

- ``tab_mlp`` / ``tab_dp``: the same deliberately overfit MLP (256 ReLU, no weight decay)
  on 1,000 points of a 10-class mixture in d = 20 (centres N(0, 1), noise σ = 1.6), so
  membership inference has signal. Two names, two policies: ``tab_dp`` carries the §0.3
  DP budget, ``tab_mlp`` the extraction/MIA defences.
- ``lr_bc``: logistic regression on ``load_breast_cancer`` (d = 30) returning
  probabilities, standardisation folded into the weights so the model is linear in the
  raw input — the equation-solving target.
- ``digits_clf``: the shipped ``digits`` model (version 1) and profile under another name.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

from privacy.training.scripts import load_script

ROOT = Path(__file__).resolve().parents[3]
SEED = 20260
N_FEATURES = 20
N_CLASSES = 10
NOISE_SIGMA = 1.6
N_MEMBERS = 1000

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def build_models_module() -> ModuleType:
    """``tools/build_models.py`` (not a package) loaded by path, as the DP tests do."""
    return load_script("build_models", ROOT / "tools" / "build_models.py")


@dataclass(frozen=True)
class TabData:
    """Members (the training set), non-members from the same distribution, attacker pool, test set."""

    centres: FloatArray
    x_members: FloatArray
    y_members: IntArray
    x_nonmembers: FloatArray
    y_nonmembers: IntArray
    x_pool: FloatArray  # the attacker's unlabeled in-distribution queries
    x_test: FloatArray  # fidelity / accuracy
    y_test: IntArray
    low: FloatArray  # feature box for uniform queries
    high: FloatArray


def tab_data() -> TabData:
    rng = np.random.default_rng(SEED)
    centres = rng.normal(0.0, 1.0, size=(N_CLASSES, N_FEATURES))

    def draw(n: int) -> tuple[FloatArray, IntArray]:
        y = rng.integers(0, N_CLASSES, size=n)
        return centres[y] + rng.normal(0.0, NOISE_SIGMA, size=(n, N_FEATURES)), y.astype(np.int64)

    xm, ym = draw(N_MEMBERS)
    xn, yn = draw(N_MEMBERS)
    xp, _ = draw(5000)
    xt, yt = draw(2000)
    low, high = xm.min(axis=0), xm.max(axis=0)
    return TabData(centres, xm, ym, xn, yn, xp, xt, yt, low, high)


@dataclass(frozen=True)
class BcData:
    x_train: FloatArray
    y_train: IntArray
    x_test: FloatArray
    y_test: IntArray
    weights: FloatArray  # the true linear model in raw input space (class-1 logit)
    bias: float


@dataclass(frozen=True)
class World:
    repo: Path
    tab: TabData
    bc: BcData
    digits: tuple[FloatArray, FloatArray, IntArray, IntArray]  # x_train, x_test, y_train, y_test
    metrics: dict[str, float]


def _write(repo: Path, name: str, onnx_bytes: bytes, config: str, profile: dict[str, Any]) -> None:
    bm = build_models_module()
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(onnx_bytes)
    (model_dir / "config.pbtxt").write_text(config, encoding="utf-8")
    (model_dir / "profile.json").write_text(bm.profile_json(profile), encoding="utf-8")


def _export(bm: ModuleType, estimator: Any, name: str, input_name: str, n_features: int, output: str,
            n_out: int) -> bytes:
    model = bm._to_onnx(estimator, input_name, n_features, name)
    labels = [o.name for o in model.graph.output if o.name != "probabilities"]
    for label in labels:
        bm._drop_output(model, label)
    if output != "probabilities":
        _rename_output(model, "probabilities", output)
    model = bm._finalise(model, name, {"infergate.dataset": name})
    return bytes(model.SerializeToString())


def _rename_output(model: Any, old: str, new: str) -> None:
    for node in model.graph.node:
        for names in (node.input, node.output):
            for i, value in enumerate(names):
                if value == old:
                    names[i] = new
    for out in model.graph.output:
        if out.name == old:
            out.name = new


def _config(bm: ModuleType, name: str, input_name: str, n_in: int, output: str, n_out: int) -> str:
    return str(bm._triton_config(name, bm.MAX_BATCH_SIZE, [(input_name, "TYPE_FP32", [n_in])],
                                 [(output, "TYPE_FP32", [n_out])]))


def _profile(bm: ModuleType, name: str, input_name: str, x_train: FloatArray, output: str) -> dict[str, Any]:
    return dict(bm._numeric_profile(name, input_name, x_train, {"min": None, "max": None, "integral": False},
                                    standardize=True, output={"name": output}))


def build_world(repo: Path) -> World:
    """Train, export and check every model into ``repo`` (a fresh Triton repository)."""
    from sklearn.datasets import load_breast_cancer  # type: ignore[import-untyped]
    from sklearn.exceptions import ConvergenceWarning  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]
    from sklearn.neural_network import MLPClassifier  # type: ignore[import-untyped]

    bm = build_models_module()
    repo.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, float] = {}

    tab = tab_data()
    # Full-batch Adam, 100 steps: train accuracy 1.00, test ≈ 0.73, raw MIA advantage ≈ 0.43 (≈ 1 s).
    mlp = MLPClassifier(hidden_layer_sizes=(256,), alpha=0.0, max_iter=100, tol=1e-9, n_iter_no_change=1000,
                        learning_rate_init=1e-2, batch_size=N_MEMBERS, random_state=SEED)
    with warnings.catch_warnings():  # overfitting on purpose: it never "converges"
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(tab.x_members.astype(np.float32), tab.y_members)
    metrics["tab_train_acc"] = float(mlp.score(tab.x_members, tab.y_members))
    metrics["tab_test_acc"] = float(mlp.score(tab.x_test, tab.y_test))
    tab_onnx = _export(bm, mlp, "tab", "x", N_FEATURES, "probs", N_CLASSES)
    for name in ("tab_dp", "tab_mlp"):
        _write(repo, name, tab_onnx, _config(bm, name, "x", N_FEATURES, "probs", N_CLASSES),
               _profile(bm, name, "x", tab.x_members, "probs"))

    data = load_breast_cancer()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data, data.target, test_size=0.25, random_state=SEED,
                                              stratify=data.target)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    lr = LogisticRegression(C=1.0, max_iter=5000, random_state=SEED).fit((x_tr - mean) / std, y_tr)
    # Fold the standardisation into the weights: one linear model on raw features.
    w = lr.coef_[0] / std
    b = float(lr.intercept_[0] - np.sum(lr.coef_[0] * mean / std))
    raw = LogisticRegression()
    raw.classes_ = np.array([0, 1])
    raw.coef_ = w[None, :]
    raw.intercept_ = np.array([b])
    metrics["lr_bc_test_acc"] = float(np.mean(raw.predict(x_te) == y_te))
    _write(repo, "lr_bc", _export(bm, raw, "lr_bc", "x", 30, "probabilities", 2),
           _config(bm, "lr_bc", "x", 30, "probabilities", 2), _profile(bm, "lr_bc", "x", x_tr, "probabilities"))

    # The same linear model under a DP policy whose output contract it breaks (DP-10).
    shutil.copytree(repo / "lr_bc", repo / "tab_bad")
    (repo / "tab_bad" / "config.pbtxt").write_text(_config(bm, "tab_bad", "x", 30, "probabilities", 2),
                                                   encoding="utf-8")

    digits_dir = repo / "digits_clf"
    shutil.copytree(ROOT / "triton_repo" / "digits" / "1", digits_dir / "1")
    config = (ROOT / "triton_repo" / "digits" / "config.pbtxt").read_text(encoding="utf-8")
    (digits_dir / "config.pbtxt").write_text(config.replace('name: "digits"', 'name: "digits_clf"'),
                                             encoding="utf-8")
    profile = json.loads((ROOT / "triton_repo" / "digits" / "profile.json").read_text())
    profile["model"] = "digits_clf"
    (digits_dir / "profile.json").write_text(json.dumps(profile), encoding="utf-8")

    bc = BcData(np.asarray(x_tr, np.float64), np.asarray(y_tr, np.int64), np.asarray(x_te, np.float64),
                np.asarray(y_te, np.int64), np.asarray(w, np.float64), b)
    return World(repo, tab, bc, bm.load_digits_split(), metrics)
