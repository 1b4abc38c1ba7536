"""False-alarm rate and detection delay of drift monitoring, with the shipped policy.

Streams rows through a :class:`gateway.drift.monitor.DriftMonitor` configured from
``policies/gateway.yaml`` exactly as the gateway does (count window, ``min_samples``,
a verdict every ``evaluate_every`` rows), with predictions from the real ONNX model in
``triton_repo/``. No HTTP: this measures the statistics and the policy, not the plumbing.

* **False alarms**: ``--streams`` independent streams of ``--rows`` clean rows each, drawn
  with replacement from the held-out test split of ``tools/build_models.py`` (never seen
  in training, nor in the profile). Printed: the share of verdicts at warning or above
  and at critical, and the share of streams that ever left ``ok``. Drawing with
  replacement from 450 (digits) or 143 (risk) rows repeats rows inside a window, which
  makes windows *less* like the population than fresh traffic: the rate is an upper bound.
* **Detection**: after a full window of clean rows, shifted rows (brightness +2, Gaussian
  noise sigma 1, one class only; for risk: every feature x1.3, noise of 0.3 std, one class
  only); printed: rows until the first warning and the first critical verdict.

    .venv/bin/python bench/bench_drift.py [--streams 100] [--rows 2000] [--json bench/results/drift.json]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import structlog

from gateway.drift.evaluate import DriftState
from gateway.drift.monitor import DriftMonitor
from gateway.drift.policy import DriftPolicy
from gateway.observability.metrics import Metrics
from gateway.policy.loader import load_policy_dir
from privacy.training.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
REPO = ROOT / "triton_repo"
Array = npt.NDArray[np.float32]


def build_module() -> ModuleType:
    return load_script("infergate_build_models", ROOT / "tools" / "build_models.py")


class Model:
    """The ONNX model and its drift output (argmax class or score)."""

    def __init__(self, name: str) -> None:
        self.session = ort.InferenceSession(str(REPO / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.kind = "class" if name == "digits" else "score"

    def outputs(self, x: Array) -> Array:
        out = np.asarray(self.session.run(None, {self.input: x.astype(np.float32)})[0])
        if self.kind == "class":
            return np.argmax(out, axis=1).astype(np.float32)
        return out.reshape(len(x), -1)[:, 0].astype(np.float32)


def monitor_for(model: str, policy: DriftPolicy) -> DriftMonitor:
    monitor = DriftMonitor(Metrics(), REPO)
    monitor.configure({model: policy})
    return monitor


def feed(monitor: DriftMonitor, model: str, net: Model, x: Array, step: int,
         worst: dict[str, float] | None = None) -> list[DriftState | None]:
    """Feed rows in chunks of ``step``; the verdict after each chunk (None while collecting)."""
    states: list[DriftState | None] = []
    for start in range(0, len(x), step):
        chunk = x[start:start + step]
        if monitor.ingest(model, chunk, net.outputs(chunk)):
            report = monitor.evaluate(model)
            assert report is not None
            states.append(None if report.collecting else report.state)
            if worst is not None and report.features:
                worst["input_psi"] = max(worst["input_psi"], max(f.psi for f in report.features))
                worst["input_ks"] = max(worst["input_ks"], max(f.ks or 0.0 for f in report.features))
            if worst is not None and report.output is not None:
                worst["output_psi"] = max(worst["output_psi"], report.output.psi)
    return states


def false_alarms(model: str, policy: DriftPolicy, net: Model, clean: Array, *, streams: int, rows: int,
                 rng: np.random.Generator) -> dict[str, Any]:
    verdicts = warnings = criticals = streams_alarmed = 0
    worst = {"input_psi": 0.0, "input_ks": 0.0, "output_psi": 0.0}
    for _ in range(streams):
        monitor = monitor_for(model, policy)
        x = clean[rng.integers(0, len(clean), rows)]
        states = [s for s in feed(monitor, model, net, x, policy.evaluate_every, worst) if s is not None]
        verdicts += len(states)
        warnings += sum(s >= DriftState.WARNING for s in states)
        criticals += sum(s >= DriftState.CRITICAL for s in states)
        streams_alarmed += any(s >= DriftState.WARNING for s in states)
    return {"streams": streams, "rows_per_stream": rows, "verdicts": verdicts,
            "warning_or_above_rate": warnings / verdicts, "critical_rate": criticals / verdicts,
            "streams_with_any_alarm": streams_alarmed / streams,
            "largest_on_clean": {k: round(v, 4) for k, v in worst.items()}}


def detection(model: str, policy: DriftPolicy, net: Model, clean: Array, shifted: Array,
              rng: np.random.Generator) -> dict[str, int | None]:
    monitor = monitor_for(model, policy)
    feed(monitor, model, net, clean[rng.integers(0, len(clean), policy.window)], policy.evaluate_every)
    first: dict[str, int | None] = {"warning": None, "critical": None}
    step = policy.evaluate_every
    for start in range(0, 2 * policy.window, step):
        chunk = shifted[rng.integers(0, len(shifted), step)]
        if monitor.ingest(model, chunk, net.outputs(chunk)):
            report = monitor.evaluate(model)
            assert report is not None
            for level in (DriftState.WARNING, DriftState.CRITICAL):
                key = level.name.lower()
                if first[key] is None and report.state >= level:
                    first[key] = start + step
    return first


def shifts(model: str, x: Array, y: npt.NDArray[np.int64], rng: np.random.Generator) -> dict[str, Array]:
    if model == "digits":
        return {
            "brightness +2 (clipped to 16)": np.clip(x + 2, 0, 16).astype(np.float32),
            "gaussian noise sigma 1": (x + rng.normal(0, 1, x.shape)).astype(np.float32),
            "one class only (0)": x[y == 0],
        }
    std = x.std(axis=0)
    return {
        "every feature x1.3": (x * 1.3).astype(np.float32),
        "gaussian noise 0.3 std": np.abs(x + rng.normal(0, 1, x.shape) * 0.3 * std).astype(np.float32),
        "one class only (benign)": x[y == 0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=20240)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    # State changes are logged at warning; thousands of simulated ones would bury the numbers.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    bm = build_module()
    policies = {m: p.drift for m, p in load_policy_dir(ROOT / "policies").gateway.models.items() if p.drift}
    results: dict[str, Any] = {}
    for model, split in (("digits", bm.load_digits_split), ("risk", bm.load_risk_split)):
        policy = policies[model]
        _, x_test, _, y_test = split()
        net = Model(model)
        rng = np.random.default_rng(args.seed)
        fa = false_alarms(model, policy, net, x_test, streams=args.streams, rows=args.rows, rng=rng)
        detected = {name: detection(model, policy, net, x_test, rows, rng)
                    for name, rows in shifts(model, x_test, y_test, rng).items()}
        results[model] = {"policy": policy.model_dump(), "held_out_rows": len(x_test), "false_alarms": fa,
                          "rows_to_detect": detected}
        print(f"{model}: window {policy.window}, min_samples {policy.min_samples}, verdict every "
              f"{policy.evaluate_every} rows; warning PSI {policy.warning.psi} / KS {policy.warning.ks}, "
              f"critical PSI {policy.critical.psi} / KS {policy.critical.ks}")
        print(f"  clean ({len(x_test)} held-out rows, {fa['streams']} streams x {fa['rows_per_stream']} rows, "
              f"{fa['verdicts']} verdicts): warning-or-above {fa['warning_or_above_rate']:.4%}, "
              f"critical {fa['critical_rate']:.4%}, streams ever alarmed {fa['streams_with_any_alarm']:.2%}")
        print(f"  largest statistics seen on clean data: {fa['largest_on_clean']}")
        for name, first in detected.items():
            print(f"  {name}: first warning after {first['warning']} rows, first critical after "
                  f"{first['critical']} rows")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")



if __name__ == "__main__":
    main()
