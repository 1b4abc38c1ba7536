"""Rebuild the differentially private ``digits`` and ``risk`` models (DP-SGD, Opacus, RDP accountant).

Usage::

    python tools/train_dp.py --out build/dp_models [--models digits,risk]
        [--epsilon-digits 3 --epsilon-risk 8] [--delta 1e-5]
        [--seed 1234 | --seed-file FILE] [--date YYYY-MM-DD]

For each model this writes a Triton-ready directory ``OUT/<model>/``:
``1/model.onnx`` (raw inputs in, same contract as the served model),
``config.pbtxt`` and ``profile.json`` (byte copies from the baseline repository:
the same training split, so the profile stays valid), ``MODEL_CARD.md`` and
``training.json`` (the numbers the card is rendered from).

Why one command: a DP claim nobody can re-derive is not a claim.  The build is
seeded and deterministic, and no wall time, host or output path is written, so
two runs with the same seed and library versions give byte-identical files.
The flip side is that a public seed lets anyone regenerate the noise: use
``--seed-file`` with a secret random seed for anything released (the card says
which was used).  It never writes into the baseline repository (``triton_repo/``)
itself: ``tools/build_models.py`` (``make models``) calls :func:`build_model` and
:func:`install_version` to add the DP models to ``triton_repo/`` as **version 2** next
to the non-private version 1, with the card appended as a version-2 section.

Needs the training extra: ``pip install torch==2.13.0 opacus==1.6.0`` (CPU build).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Final

import numpy as np

REPO_ROOT: Final = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: make `privacy` importable
    sys.path.insert(0, str(REPO_ROOT))

from privacy.training import dpsgd, export  # noqa: E402
from privacy.training.cards import (  # noqa: E402
    UNDATED,
    TrainingRecord,
    render_card,
    render_version_section,
)
from privacy.training.scripts import load_script  # noqa: E402

BUILD_SCRIPT: Final = REPO_ROOT / "tools" / "build_models.py"
DEFAULT_OUT: Final = REPO_ROOT / "build" / "dp_models"
DEFAULT_BASELINE: Final = REPO_ROOT / "triton_repo"
MODELS: Final = ("digits", "risk")
#: A full run below this test accuracy is a failed build, not a model to serve.
DEFAULT_MIN_ACCURACY: Final = 0.90


def load_build_models() -> ModuleType:
    """``tools/build_models.py`` by path (tools/ is not a package); shared name with the tests."""
    return load_script("infergate_build_models", BUILD_SCRIPT)


@dataclass(frozen=True)
class Built:
    """One model's files, in memory until everything has been checked."""

    name: str
    onnx_bytes: bytes
    config: bytes
    profile: bytes
    card: str
    record: TrainingRecord
    wall_seconds: float


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import opacus  # type: ignore[import-untyped]
    import sklearn  # type: ignore[import-untyped]
    import torch

    return {
        "torch": str(torch.__version__),
        "opacus": str(opacus.__version__),
        "onnx": str(onnx.__version__),
        "onnxruntime": str(onnxruntime.__version__),
        "numpy": str(np.__version__),
        "scikit-learn": str(sklearn.__version__),
        "python": platform.python_version(),
    }


def _display_path(path: Path) -> str:
    """Repository-relative when possible, so the card does not depend on where the checkout lives."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name


def _command(args: argparse.Namespace, seed_public: bool) -> str:
    """The command line that rebuilds these files, minus ``--out`` (which must not affect the bytes)."""
    parts = ["python tools/train_dp.py", f"--models {','.join(args.models)}"]
    parts += [f"--epsilon-{m} {getattr(args, f'epsilon_{m}'):g}" for m in args.models]
    parts.append(f"--delta {args.delta:g}")
    parts.append(f"--seed {args.seed}" if seed_public else "--seed-file SECRET")
    if args.epochs is not None:
        parts.append(f"--epochs {args.epochs}")
    if args.date != UNDATED:
        parts.append(f"--date {args.date}")
    return " ".join(parts)


def build_model(
    name: str,
    *,
    args: argparse.Namespace,
    seed: int,
    seed_public: bool,
    versions: dict[str, str],
) -> Built:
    """Train, export, verify (contract, parity, accuracy) and render one model; writes nothing."""
    bm = load_build_models()
    recipe = dpsgd.RECIPES[name]
    baseline_dir: Path = args.baseline / name
    config = (baseline_dir / "config.pbtxt").read_bytes()
    profile = (baseline_dir / "profile.json").read_bytes()
    baseline_onnx = (baseline_dir / "1" / "model.onnx").read_bytes()

    x_train, x_test, y_train, y_test = bm.load_digits_split() if name == "digits" else bm.load_risk_split()
    target = float(getattr(args, f"epsilon_{name}"))
    result = dpsgd.train(
        recipe, x_train, y_train, target_epsilon=target, delta=args.delta, seed=seed, epochs=args.epochs
    )

    metadata = {
        "infergate.dp.mechanism": "DP-SGD (Opacus, Poisson sampling, flat clipping)",
        "infergate.dp.accountant": dpsgd.ACCOUNTANT,
        "infergate.dp.epsilon": f"{result.epsilon:.6g}",
        "infergate.dp.delta": f"{result.delta:g}",
        "infergate.dp.noise_multiplier": f"{result.noise_multiplier:.6g}",
        "infergate.dp.max_grad_norm": f"{recipe.max_grad_norm:g}",
        "infergate.dataset": recipe.dataset,
        "infergate.trainer": f"torch {versions['torch']}, opacus {versions['opacus']}",
    }
    onnx_bytes = export.export_onnx(recipe, result.module, metadata)
    problems = export.contract_mismatches(onnx_bytes, config.decode("utf-8"))
    if problems:
        raise RuntimeError(f"{name}: exported graph does not match config.pbtxt: {problems}")
    max_error = export.export_error(recipe, result.module, onnx_bytes, x_test)
    if max_error > export.MAX_EXPORT_ERROR:
        raise RuntimeError(f"{name}: ONNX differs from torch by {max_error:.3g}")

    acc_onnx = float(np.mean(export.onnx_labels(recipe, onnx_bytes, x_test) == y_test))
    acc_torch = dpsgd.accuracy(recipe, result.module, x_test, y_test)
    acc_baseline = float(np.mean(export.onnx_labels(recipe, baseline_onnx, x_test) == y_test))
    if acc_onnx < args.min_accuracy:
        raise RuntimeError(f"{name}: DP test accuracy {acc_onnx:.4f} below --min-accuracy {args.min_accuracy}")

    record = TrainingRecord(
        model=name,
        dataset=recipe.dataset,
        n_train=len(x_train),
        n_test=len(x_test),
        split=(
            f"stratified split, test_size={bm.TEST_SIZE}, random_state={bm.SEED} "
            f"(`tools/build_models.py:load_{name}_split()`, the split of the non-private model)"
        ),
        architecture=recipe.describe_architecture(),
        preprocessing=recipe.preprocessing.describe()
        + f"; centre used: [{', '.join(f'{c:.4g}' for c in result.centre[:4])}, ...]",
        preprocessing_noise_multiplier=(
            recipe.preprocessing.noise_multiplier if recipe.preprocessing.is_private_estimate else None
        ),
        target_epsilon=target,
        epsilon=round(result.epsilon, 6),
        delta=result.delta,
        accountant=dpsgd.ACCOUNTANT,
        noise_multiplier=round(result.noise_multiplier, 6),
        max_grad_norm=recipe.max_grad_norm,
        epochs=result.epochs,
        steps=result.steps,
        sample_rate=round(result.sample_rate, 6),
        expected_batch_size=result.expected_batch_size,
        optimizer="SGD (Opacus DPOptimizer)",
        learning_rate=recipe.learning_rate,
        momentum=recipe.momentum,
        secure_mode=False,
        seed=seed if seed_public else None,
        seed_is_public_default=seed_public and seed == dpsgd.DEFAULT_SEED,
        accuracy_dp=round(acc_onnx, 6),
        accuracy_dp_torch=round(acc_torch, 6),
        accuracy_baseline=round(acc_baseline, 6),
        baseline=f"`{_display_path(baseline_dir)}` (served non-private model, same split, onnxruntime)",
        export_max_abs_error=float(f"{max_error:.3g}"),
        input_name=recipe.input_name,
        input_shape=[-1, recipe.n_features],
        output_name=recipe.output_name,
        output_shape=[-1, recipe.n_outputs],
        output_meaning=recipe.output_meaning,
        onnx_sha256=export.sha256(onnx_bytes),
        onnx_bytes=len(onnx_bytes),
        onnx_opset=export.OPSET,
        build_date=args.date,
        command=_command(args, seed_public),
        versions=versions,
    )
    return Built(name, onnx_bytes, config, profile, render_card(record), record, result.wall_seconds)


def write_model(out: Path, built: Built) -> None:
    """Replace the model directory wholesale so stale versions or files cannot survive a rebuild."""
    model_dir = out / built.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(built.onnx_bytes)
    (model_dir / "config.pbtxt").write_bytes(built.config)
    (model_dir / "profile.json").write_bytes(built.profile)
    (model_dir / "MODEL_CARD.md").write_text(built.card, encoding="utf-8")
    (model_dir / "training.json").write_text(built.record.to_json(), encoding="utf-8")


#: What the version-2 section of a served model card names as its baseline; fixed text, so
#: the card does not depend on where the repository was built.
SERVED_BASELINE: Final = "version 1 of this model (`1/model.onnx`, non-private, same split, onnxruntime)"


def toolchain_versions() -> dict[str, str]:
    """The library versions recorded in every card (imports torch and opacus)."""
    return _versions()


def install_version(repo: Path, built: Built, version: str, command: str) -> TrainingRecord:
    """Add ``built`` to a served repository as ``<model>/<version>/`` next to the non-private model.

    Why a separate step from :func:`write_model`: in ``triton_repo/`` the DP model is an
    additional version of the served model (same ``config.pbtxt`` and ``profile.json``),
    not a replacement, and its card becomes a section of the model's existing card.  The
    record is re-stamped with repository-independent wording (baseline, rebuild command)
    so that building into any directory gives the same bytes.
    """
    record = dataclasses.replace(built.record, baseline=SERVED_BASELINE, command=command)
    model_dir = repo / built.name
    version_dir = model_dir / version
    if version_dir.exists():
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    (version_dir / "model.onnx").write_bytes(built.onnx_bytes)
    (version_dir / "training.json").write_text(record.to_json(), encoding="utf-8")
    card = model_dir / "MODEL_CARD.md"
    card.write_text(
        card.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + render_version_section(record, version),
        encoding="utf-8",
    )
    return record


def _read_seed_file(path: Path) -> int:
    text = path.read_text(encoding="utf-8").strip()
    try:
        seed = int(text, 0)
    except ValueError as exc:
        raise SystemExit(f"{path}: expected one integer seed") from exc
    if seed < 0:
        raise SystemExit(f"{path}: the seed must be non-negative")
    return seed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model repository (not triton_repo)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of digits,risk")
    parser.add_argument("--epsilon-digits", type=float, default=dpsgd.RECIPES["digits"].default_epsilon)
    parser.add_argument("--epsilon-risk", type=float, default=dpsgd.RECIPES["risk"].default_epsilon)
    parser.add_argument("--delta", type=float, default=dpsgd.DEFAULT_DELTA)
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=dpsgd.DEFAULT_SEED, help="public seed (development, CI)")
    seeds.add_argument("--seed-file", type=Path, help="file holding a secret integer seed (releases)")
    parser.add_argument("--date", default=UNDATED, help="build date written into the card (default: undated)")
    parser.add_argument("--epochs", type=int, default=None, help="override every recipe's epochs (smoke tests)")
    parser.add_argument("--min-accuracy", type=float, default=DEFAULT_MIN_ACCURACY)
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help="non-private model repository")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in str(args.models).split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        parser.error(f"--models must be a non-empty subset of {','.join(MODELS)} (got {unknown or 'nothing'})")
    if not 0.0 < args.delta < 1.0:
        parser.error("--delta must be in (0, 1)")
    if args.out.resolve() == args.baseline.resolve():
        parser.error("refusing to overwrite the baseline repository; write elsewhere and swap deliberately")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.seed_file is not None:
        seed, seed_public = _read_seed_file(args.seed_file), False
    else:
        seed, seed_public = int(args.seed), True
    versions = _versions()
    started = time.perf_counter()
    built = [
        build_model(name, args=args, seed=seed, seed_public=seed_public, versions=versions) for name in args.models
    ]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for model in built:
        write_model(out, model)
        r = model.record
        print(
            f"{r.model}: {out / r.model} eps={r.epsilon:.3f} (target {r.target_epsilon:g}, delta {r.delta:g}) "
            f"sigma={r.noise_multiplier:.3f} clip={r.max_grad_norm:g} epochs={r.epochs} "
            f"acc_dp={r.accuracy_dp:.4f} acc_baseline={r.accuracy_baseline:.4f} "
            f"train={model.wall_seconds:.1f}s sha256={r.onnx_sha256[:16]}"
        )
    print(f"total {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
