"""Detection rate and false-positive rate of the gateway's adversarial detectors on ``digits``.

What it does (catalogue §2.2 recipes 1-2, EV-01/EV-02), all on CPU, seeded:

1. Loads the exact train/test split of ``triton_repo/digits`` (``tools/build_models.py``)
   and the served ONNX model (the *victim*, run with onnxruntime).
2. Trains a small torch surrogate (MLP 64-64-10) on the training split and crafts, with
   ART, FGSM and PGD (L∞, ε ∈ {1, 2, 4} on the 0..16 pixel scale) on test images; the
   examples are then sent to the victim (transfer). An *adaptive* PGD variant (ε = 4,
   rounded to the integer pixel grid and clipped to each pixel's training range) shows
   what the validation-style detectors miss when the attacker knows them.
3. Runs ART's HopSkipJump (L2, decision-based) as a black box against the victim,
   recording every query row.
4. Scores every detector of ``gateway/adversarial`` exactly as the gateway builds them
   from ``profile.json`` on: the clean test split (false-positive rate), and each attack
   set (detection rate among the examples that fool the victim, and among all). Feature
   squeezing thresholds are calibrated here on the *training* split (99th percentile).
5. Replays each HopSkipJump query stream, and benign streams (shuffled clean traffic),
   through the query-pattern detector with the shipped configuration: queries until it
   fires, and how often it fires on clean traffic.

Writes ``security_tests/results/detectors.json`` and prints markdown tables.

    .venv/bin/python -m security_tests.ml.detector_eval [--samples 300] [--hsj 20] [--seed 0]

Needs the ``security`` extra: ``pip install torch==2.13.0 adversarial-robustness-toolbox``
(CPU build of torch; never torchvision). Runs in well under a minute on 2 cores (torch and ART imports included).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml

from gateway.adversarial.detectors import (
    FeatureSqueezer,
    GridDetector,
    MahalanobisDetector,
    QueryPatternDetector,
    RangeDetector,
)
from gateway.adversarial.profile import NumericProfile, load_profile
from gateway.stages.adversarial import InputsPolicy, QueryPatternCheck, build_adversarial_stage
from privacy.training.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
REPO = ROOT / "triton_repo"
DEFAULT_OUT = ROOT / "security_tests" / "results" / "detectors.json"
F = npt.NDArray[np.float64]
EPSILONS = (1.0, 2.0, 4.0)  # pixel units on the 0..16 scale (catalogue: 1, 2, 4)
SQUEEZE_BITS = (1, 3, 4)


def _build_module() -> ModuleType:
    return load_script("infergate_build_models", ROOT / "tools" / "build_models.py")


class Victim:
    """The served digits model in onnxruntime; counts rows and can log every query."""

    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(REPO / "digits" / "1" / "model.onnx"), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.log: list[npt.NDArray[np.float32]] | None = None

    def __call__(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        rows = np.asarray(x, dtype=np.float32).reshape(-1, 64)
        if self.log is not None:
            self.log.append(rows.copy())
        out: npt.NDArray[np.float32] = self.session.run(None, {"pixels": rows})[0]
        return out


@dataclass
class Detector:
    """A per-request detector as the gateway builds it, scored row by row."""

    name: str
    describe: str
    fires: Callable[[F], npt.NDArray[np.bool_]]
    threshold: float | None = None


def per_row(score: Callable[[F], Any]) -> Callable[[F], npt.NDArray[np.bool_]]:
    def run(x: F) -> npt.NDArray[np.bool_]:
        return np.array([score(row[None, :]).fired for row in x], dtype=np.bool_)
    return run


def build_detectors(profile: NumericProfile, victim: Victim, x_train: F) -> tuple[list[Detector], dict[str, Any]]:
    detectors = [
        Detector("range(domain)", "pixels outside 0..16 or an all-constant row (shipped, block)",
                 per_row(RangeDetector.from_profile(profile, bounds="domain").score)),
        Detector("range(training)", "pixels outside each pixel's training min/max",
                 per_row(RangeDetector.from_profile(profile, bounds="training").score)),
        Detector("grid", "pixels off the integer grid (shipped, block)",
                 per_row(GridDetector(origin=0.0, step=1.0).score)),
    ]
    for fpr in (0.01, 0.001):
        maha = MahalanobisDetector.from_profile(profile, fpr=fpr)

        def beyond(x: F, m: MahalanobisDetector = maha) -> npt.NDArray[np.bool_]:
            return np.asarray(m.distances(x) > m.threshold, dtype=np.bool_)

        detectors.append(Detector(f"mahalanobis(fpr={fpr})", f"profile threshold {maha.threshold}", beyond,
                                  maha.threshold))
    calibration: dict[str, Any] = {}
    train_probs = victim(x_train).astype(np.float64)
    for bits in SQUEEZE_BITS:
        probe = FeatureSqueezer.from_profile(profile, bits=bits, threshold=1.0)
        train_l1 = np.abs(train_probs - victim(probe.squeeze(x_train))).sum(axis=1)
        threshold = float(np.quantile(train_l1, 0.99))
        squeezer = FeatureSqueezer.from_profile(profile, bits=bits, threshold=threshold)
        calibration[f"squeezing({bits}-bit)"] = {"threshold": threshold, "train_fpr": 0.01,
                                                 "calibrated_on": "training split, 99th percentile"}

        def fires(x: F, s: FeatureSqueezer = squeezer) -> npt.NDArray[np.bool_]:
            l1 = np.abs(victim(x).astype(np.float64) - victim(s.squeeze(x))).sum(axis=1)
            return np.asarray(l1 > s.threshold, dtype=np.bool_)

        detectors.append(Detector(f"squeezing({bits}-bit)", "L1 between outputs on x and squeezed x, "
                                  "threshold = training p99 (one more upstream call)", fires, threshold))
    return detectors, calibration


def train_surrogate(x_train: F, y_train: npt.NDArray[np.int64], seed: int) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)
    torch.set_num_threads(1)

    class Surrogate(nn.Module):
        """MLP on pixels/16 (so ART works on the raw 0..16 scale the gateway sees)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.net(x / 16.0)
            return out

    model = Surrogate()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt = torch.tensor(x_train, dtype=torch.float32)
    yt = torch.tensor(y_train, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(60):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 128):
            batch = order[start:start + 128]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    return model


def craft_transfer(model: Any, x: F, eps_list: tuple[float, ...], profile: NumericProfile,
                   seed: int) -> dict[str, F]:
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent  # type: ignore[import-untyped]
    from art.estimators.classification import PyTorchClassifier  # type: ignore[import-untyped]
    from torch import nn

    np.random.seed(seed)  # ART draws from numpy's global generator
    clf = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(64,), nb_classes=10,
                            clip_values=(0.0, 16.0))
    xf = x.astype(np.float32)
    sets: dict[str, F] = {}
    for eps in eps_list:
        sets[f"fgsm(eps={eps:g})"] = FastGradientMethod(clf, norm=np.inf, eps=eps).generate(xf).astype(np.float64)
        pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=eps / 10, max_iter=40, verbose=False)
        sets[f"pgd(eps={eps:g})"] = pgd.generate(xf).astype(np.float64)
    # Adaptive: knows the range and grid checks, so it stays inside both.
    adaptive = sets[f"pgd(eps={max(eps_list):g})"]
    adaptive = np.clip(np.rint(adaptive), profile.feature_min, profile.feature_max)
    sets[f"pgd-adaptive(eps={max(eps_list):g}, on grid, in training range)"] = adaptive
    return sets


def run_hsj(victim: Victim, x: F, seed: int, max_iter: int) -> tuple[F, list[F]]:
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    np.random.seed(seed)
    clf = BlackBoxClassifier(victim, input_shape=(64,), nb_classes=10, clip_values=(0.0, 16.0))
    advs: list[F] = []
    streams: list[F] = []
    for row in x:
        victim.log = []
        attack = HopSkipJump(clf, targeted=False, norm=2, max_iter=max_iter, max_eval=1000, init_eval=100,
                             verbose=False)
        advs.append(attack.generate(row[None, :].astype(np.float32)).astype(np.float64)[0])
        streams.append(np.vstack(victim.log).astype(np.float64))
        victim.log = None
    return np.asarray(advs), streams


def query_detector(profile: NumericProfile, check: QueryPatternCheck, seed: int) -> QueryPatternDetector:
    return QueryPatternDetector.from_profile(
        profile, radius=float(check.radius), neighbours=check.neighbours, sketch_dims=check.sketch_dims,
        history=check.history, global_history=check.global_history, window=check.window,
        min_queries=check.min_queries, threshold=float(check.threshold), cooldown_s=float(check.cooldown_s),
        max_callers=check.max_callers, cross_tenant=check.cross_tenant,
        ignore_exact_repeats=check.ignore_exact_repeats, max_suspicious=check.max_suspicious,
        suspicious_window=check.suspicious_window, seed=seed, clock=lambda: 0.0)


def first_fire(detector: QueryPatternDetector, stream: F, caller: str = "attacker", limit: int = 1500) -> int | None:
    for index in range(min(len(stream), limit)):
        if detector.observe(caller, stream[index:index + 1]).fired:
            return index + 1
    return None


def _rate(flags: npt.NDArray[np.bool_]) -> float | None:
    return float(flags.mean()) if flags.size else None


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    bm = _build_module()
    x_train32, x_test32, y_train, y_test = bm.load_digits_split()
    x_train, x_test = x_train32.astype(np.float64), x_test32.astype(np.float64)
    profile = load_profile(REPO / "digits" / "profile.json", model="digits").numeric
    if profile is None:
        raise RuntimeError("the digits profile has no numeric part")
    policy = InputsPolicy.model_validate(yaml.safe_load((ROOT / "policies" / "inputs.yaml").read_text()))
    check = policy.adversarial.models["digits"].query_pattern or QueryPatternCheck()
    victim = Victim()

    clean_pred = victim(x_test).argmax(axis=1)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    import torch

    surrogate = train_surrogate(x_train, y_train, args.seed)
    with torch.no_grad():
        surrogate_pred = surrogate(torch.tensor(x_test, dtype=torch.float32)).argmax(dim=1).numpy()
    timings["surrogate_train_s"] = time.perf_counter() - t

    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(x_test), size=min(args.samples, len(x_test)), replace=False))
    x_att, y_att = x_test[chosen], y_test[chosen]
    t = time.perf_counter()
    sets = craft_transfer(surrogate, x_att, EPSILONS, profile, args.seed)
    timings["fgsm_pgd_s"] = time.perf_counter() - t
    t = time.perf_counter()
    hsj_idx = chosen[: args.hsj]
    hsj_adv, hsj_streams = run_hsj(victim, x_test[hsj_idx], args.seed, args.hsj_iter)
    timings["hopskipjump_s"] = time.perf_counter() - t
    sets[f"hopskipjump(L2, max_iter={args.hsj_iter})"] = hsj_adv

    detectors, calibration = build_detectors(profile, victim, x_train)
    # The per-request checks exactly as the gateway builds them from the shipped policy.
    stage = build_adversarial_stage(policy.adversarial, REPO, None)
    checks = stage.models["digits"].checks
    shipped_block = [Detector(c.name, a, per_row(c.score)) for c, a in checks if a == "block"]
    shipped_any = [Detector(c.name, a, per_row(c.score)) for c, a in checks]

    def union(ds: list[Detector]) -> Callable[[F], npt.NDArray[np.bool_]]:
        return lambda x: np.logical_or.reduce([d.fires(x) for d in ds])

    all_detectors = [
        *detectors,
        Detector("shipped policy: block", " or ".join(d.name for d in shipped_block) + " -> 422",
                 union(shipped_block)),
        Detector("shipped policy: any", " or ".join(d.name for d in shipped_any) + " (block or flag)",
                 union(shipped_any)),
    ]

    attacks: dict[str, Any] = {}
    for name, adv in sets.items():
        labels = y_test[hsj_idx] if name.startswith("hopskipjump") else y_att
        source = x_test[hsj_idx] if name.startswith("hopskipjump") else x_att
        was_right = victim(source).argmax(axis=1) == labels
        fooled = victim(adv).argmax(axis=1) != labels
        success = was_right & fooled
        delta = adv - source
        attacks[name] = {
            "n": len(adv),
            "victim_success_rate": float(success.sum() / max(was_right.sum(), 1)),
            "median_linf": float(np.median(np.abs(delta).max(axis=1))),
            "median_l2_over_16": float(np.median(np.linalg.norm(delta, axis=1) / 16.0)),
            "_success": success,
        }
        if name.startswith("hopskipjump"):
            attacks[name]["median_queries"] = float(np.median([len(s) for s in hsj_streams]))
            attacks[name]["success_at_l2_le_1"] = float(np.mean(success & (np.linalg.norm(delta, axis=1) / 16 <= 1.0)))

    results: dict[str, Any] = {}
    for det in all_detectors:
        clean = det.fires(x_test)
        row: dict[str, Any] = {"describe": det.describe, "clean_fpr": float(clean.mean()),
                               "clean_flagged": int(clean.sum())}
        if det.threshold is not None:
            row["threshold"] = det.threshold
        for name, adv in sets.items():
            fired = det.fires(adv)
            success = attacks[name]["_success"]
            row[name] = {"detection_rate_successful": _rate(fired[success]), "detection_rate_all": _rate(fired)}
        results[det.name] = row
    for entry in attacks.values():
        entry.pop("_success")

    # Query-pattern detector: HopSkipJump streams vs benign streams, shipped configuration.
    t = time.perf_counter()
    qp: dict[str, Any] = {"config": check.model_dump(mode="json"), "projection_seeds": list(range(3))}
    firsts_by_seed: list[list[int | None]] = []
    for seed in range(3):
        firsts_by_seed.append([first_fire(query_detector(profile, check, seed), s) for s in hsj_streams])
    firsts = [f for per_seed in firsts_by_seed for f in per_seed]
    flagged = [f for f in firsts if f is not None]
    qp["hopskipjump"] = {
        "streams": len(hsj_streams) * 3,
        "flagged_rate": len(flagged) / len(firsts),
        "flagged_within_100_rate": sum(1 for f in flagged if f <= 100) / len(firsts),
        "median_queries_to_flag": float(np.median(flagged)) if flagged else None,
        "max_queries_to_flag": max(flagged) if flagged else None,
    }
    benign_queries = benign_fired = benign_streams_fired = 0
    pool = np.vstack([x_test, x_train])
    for seed in range(3):
        detector = query_detector(profile, check, seed)
        order = np.random.default_rng(100 + seed).permutation(len(pool))
        any_fired = False
        for index in order:
            verdict = detector.observe("benign", pool[index:index + 1])
            benign_queries += 1
            benign_fired += verdict.fired
            any_fired |= verdict.fired
        benign_streams_fired += any_fired
    qp["benign"] = {"streams": 3, "queries": benign_queries, "queries_while_fired_rate": benign_fired / benign_queries,
                    "streams_flagged": benign_streams_fired,
                    "describe": "all 1,797 digits (test + train) in random order, one tenant, per projection seed"}
    # Under the shipped policy the block checks refuse HopSkipJump's first off-grid query.
    block = union(shipped_block)
    refusals = [int(np.argmax(block(s))) + 1 if block(s).any() else None for s in hsj_streams]
    qp["hopskipjump_first_refused_query_shipped_policy"] = {
        "median": float(np.median([r for r in refusals if r is not None])) if any(refusals) else None,
        "max": max((r for r in refusals if r is not None), default=None),
        "describe": "index of the first HopSkipJump query the shipped per-request block checks refuse"}
    timings["query_pattern_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started

    import art  # type: ignore[import-untyped]

    return {
        "meta": {
            "model": "digits", "split": "tools/build_models.py load_digits_split (test_size 0.25, seed 1234)",
            "n_test_clean": len(x_test), "n_attacked": len(x_att), "n_hopskipjump": len(hsj_idx),
            "seed": args.seed, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "art": art.__version__,
            "victim_clean_accuracy": float(np.mean(clean_pred == y_test)),
            "surrogate_clean_accuracy": float(np.mean(surrogate_pred == y_test)),
            "surrogate_victim_agreement": float(np.mean(surrogate_pred == clean_pred)),
            "timings": timings,
            "definitions": {
                "clean_fpr": "share of the 450 clean held-out test images the detector fires on",
                "detection_rate_successful": "share of adversarial examples that fool the victim (and whose "
                                             "source it classified correctly) on which the detector fires",
                "detection_rate_all": "share of all adversarial examples on which it fires",
            },
        },
        "attacks": attacks,
        "detectors": results,
        "squeezing_calibration": calibration,
        "query_pattern": qp,
    }


def markdown(report: dict[str, Any]) -> str:
    attacks = list(report["attacks"])
    short = [a.split("(")[0] + "(" + a.split("(")[1].split(",")[0].rstrip(")") + ")" for a in attacks]
    lines = ["| detector | clean FPR | " + " | ".join(short) + " |",
             "|---|---|" + "---|" * len(attacks)]
    for name, row in report["detectors"].items():
        cells = []
        for attack in attacks:
            rate = row[attack]["detection_rate_successful"]
            cells.append("–" if rate is None else f"{100 * rate:.0f}%")
        lines.append(f"| {name} | {100 * row['clean_fpr']:.1f}% | " + " | ".join(cells) + " |")
    lines += ["", "| attack | victim success | median L∞ | median L2/16 |", "|---|---|---|---|"]
    for name, entry in report["attacks"].items():
        lines.append(f"| {name} | {100 * entry['victim_success_rate']:.0f}% | {entry['median_linf']:.2f} | "
                     f"{entry['median_l2_over_16']:.2f} |")
    qp = report["query_pattern"]
    h, b = qp["hopskipjump"], qp["benign"]
    hsj = next(v for k, v in report["attacks"].items() if k.startswith("hopskipjump"))
    refused = qp["hopskipjump_first_refused_query_shipped_policy"]
    lines += ["", "| query-pattern detector (shipped configuration) | value |", "|---|---|",
              f"| HopSkipJump without the gateway: queries per image, success at L2/16 <= 1 | "
              f"{hsj['median_queries']:.0f}, {100 * hsj['success_at_l2_le_1']:.0f}% |",
              f"| first HopSkipJump query refused by the shipped block checks (median / max) | "
              f"{refused['median']} / {refused['max']} |",
              f"| HopSkipJump streams flagged | {100 * h['flagged_rate']:.0f}% of {h['streams']} |",
              f"| ... within 100 queries | {100 * h['flagged_within_100_rate']:.0f}% |",
              f"| median / max queries to flag | {h['median_queries_to_flag']} / {h['max_queries_to_flag']} |",
              f"| benign streams flagged | {b['streams_flagged']} of {b['streams']} ({b['queries']} queries) |",
              f"| benign queries answered while fired | {100 * b['queries_while_fired_rate']:.2f}% |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Evaluate the gateway's adversarial detectors on digits.")
    parser.add_argument("--samples", type=int, default=300, help="test images attacked with FGSM/PGD")
    parser.add_argument("--hsj", type=int, default=100, help="test images attacked with HopSkipJump")
    parser.add_argument("--hsj-iter", type=int, default=20, help="HopSkipJump max_iter (catalogue: 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    report = evaluate(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"\nwritten to {args.out} in {report['meta']['timings']['total_s']:.0f} s")


if __name__ == "__main__":
    main()
