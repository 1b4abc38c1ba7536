"""Output DP: utility vs ε per row, and the CPU cost of the dp_noise stage.

1. Utility, on the held-out splits of the shipped models (embedded onnxruntime backend),
   with the mechanisms the stage uses (OpenDP, clamp [0, 1], exact grid):
   - ``digits``: accuracy of the noisy argmax of the 10 probabilities
     (Laplace: L1 sensitivity 10; Gaussian: L2 sensitivity √10, δ = 1e-6 per row);
   - ``risk``: mean absolute error of the noisy score (sensitivity 1), and of the average of
     the k = E/ε answers a tenant can get per day at E = 5.
2. CPU µs per request of the whole stage (on_request + on_response + finalize, in-memory
   ledger) for a 10-float output; target < 200 µs.

Prints markdown tables and writes ``bench/results/dp.json``.

    .venv/bin/python bench/bench_dp.py [--draws 5] [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from gateway.context import Action, Principal, RequestContext
from gateway.kserve import InferRequest, InferResponse, Tensor
from gateway.stages.dp_noise import DpPolicy, build_dp_stage
from gateway.upstream.embedded import EmbeddedUpstream
from privacy.dp.ledger import InMemoryBudgetLedger
from privacy.dp.mechanisms import GridMechanism, Mechanism, NoiseSpec

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "dp.json"
EPSILONS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
DELTA_ROW = 1e-6
DAY_BUDGET = 5.0


def load_splits() -> tuple[Any, Any]:
    spec = importlib.util.spec_from_file_location("build_models", ROOT / "tools" / "build_models.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("build_models", module)
    spec.loader.exec_module(module)
    return module.load_digits_split(), module.load_risk_split()


async def model_outputs(upstream: EmbeddedUpstream, model: str, name: str, x: np.ndarray) -> np.ndarray:
    out = []
    for start in range(0, x.shape[0], 64):
        batch = np.ascontiguousarray(x[start:start + 64], dtype=np.float32)
        # Version 1: what the gateway serves by default (the flags route unversioned calls to it).
        resp = await upstream.infer(InferRequest(model, "1", [Tensor(name, "FP32", batch.shape, batch)]), timeout_s=10)
        out.append(np.asarray(resp.outputs[0].data, dtype=np.float64))
    return np.concatenate(out)


def noisy(spec: NoiseSpec, width: int, values: np.ndarray) -> np.ndarray:
    mechanism = GridMechanism(spec, width)
    flat = values.reshape(-1, width)
    out = [mechanism.release(flat[i:i + 64]) for i in range(0, flat.shape[0], 64)]  # batches as served
    return np.concatenate(out).reshape(values.shape)


async def utility(draws: int) -> dict[str, Any]:
    (_, xd, _, yd), (_, xr, _, _) = load_splits()
    upstream = EmbeddedUpstream(ROOT / "triton_repo")
    await upstream.start()
    try:
        probs = await model_outputs(upstream, "digits", "pixels", xd)
        scores = await model_outputs(upstream, "risk", "features", xr)
    finally:
        await upstream.close()
    scores = scores.reshape(-1)
    clean_acc = float(np.mean(probs.argmax(axis=1) == yd))
    rows: list[dict[str, Any]] = []
    for eps in EPSILONS:
        row: dict[str, Any] = {"epsilon_per_row": eps}
        mechs: tuple[Mechanism, ...] = ("laplace", "gaussian")
        for mech in mechs:
            delta = DELTA_ROW if mech == "gaussian" else None
            spec = NoiseSpec(mech, 0.0, 1.0, eps, delta)
            acc = [float(np.mean(noisy(spec, 10, probs).argmax(axis=1) == yd)) for _ in range(draws)]
            mae = [float(np.mean(np.abs(noisy(spec, 1, scores) - scores))) for _ in range(draws)]
            # answers a tenant gets per day at E = 5 (none when one row costs more than E)
            k = math.floor(DAY_BUDGET / eps + 1e-9) if mech == "laplace" else 0
            row[mech] = {
                "digits_accuracy": statistics.fmean(acc),
                "risk_mae": statistics.fmean(mae),
                "noise_scale_digits": GridMechanism(spec, 10).scale,
                "noise_scale_risk": GridMechanism(spec, 1).scale,
            }
            if mech == "laplace":
                row[mech]["answers_per_day_at_E5"] = k
            if k:
                avg = [float(np.mean(np.abs(
                    noisy(spec, 1, np.repeat(scores[:, None], k, axis=1)).mean(axis=1) - scores)))
                    for _ in range(draws)]
                row[mech]["risk_day_average_mae"] = statistics.fmean(avg)
        rows.append(row)
    return {"digits_clean_accuracy": clean_acc, "digits_test_rows": int(xd.shape[0]),
            "risk_test_rows": int(xr.shape[0]), "draws": draws, "rows": rows}


async def stage_cpu(n: int, mechanism: Mechanism, *, fast_ffi: bool = True, cache: bool = False,
                    jitter_ms: float = 0.0) -> dict[str, float]:
    """CPU µs per request through the stage for one row of 10 floats (median of batches).

    Without timing jitter by default: the jitter is a sleep, whose CPU cost in a loop doing
    nothing else is a full sleep/wake cycle per request (measured separately)."""
    output: dict[str, Any] = {"mechanism": mechanism, "bounds": [0.0, 1.0], "epsilon": 10.0, "width": 10}
    budget: dict[str, Any] = {"epsilon": 1000.0}
    if mechanism == "gaussian":
        output["delta"] = DELTA_ROW
        budget["delta"] = 1e-5
    policy = DpPolicy.model_validate({"models": {"digits": {
        "privacy_unit": "one image in the training data", "outputs": {"probabilities": output},
        "budget": budget, "repeat_cache_entries": 64 if cache else 0, "timing_jitter_ms": jitter_ms}}})
    clock_now = [time.time()]
    ledger = InMemoryBudgetLedger(lambda: clock_now[0])
    stage = build_dp_stage(policy, ledger, lambda: clock_now[0], fast_ffi=fast_ffi)
    principal = Principal("alice", "acme", frozenset({"analyst"}), "bench", "c")
    req = InferRequest("digits", "", [Tensor("pixels", "FP32", (1, 64), np.zeros((1, 64), np.float32))])
    probs = np.full((1, 10), 0.1, np.float32)
    resp = InferResponse("digits", "1", [Tensor("probabilities", "FP32", (1, 10), probs)])
    batch = 40  # rows a day's budget pays for at ε 10 with room to spare (Gaussian: more)

    async def one_batch() -> float:
        ctxs = [RequestContext("r", "bench", Action.INFER, "bench", "127.0.0.1", model="digits",
                               principal=principal) for _ in range(batch)]
        start = time.process_time()
        for ctx in ctxs:
            r = await stage.on_request(ctx, req)
            assert r is req
            await stage.on_response(ctx, resp)
            await stage.finalize(ctx, True)
        elapsed = time.process_time() - start
        clock_now[0] += 86_400  # a fresh day for the next batch, outside the timed region
        return elapsed / batch

    for _ in range(5):
        await one_batch()  # warm-up: measurements, caches
    samples = [await one_batch() for _ in range(max(1, n // batch))]
    noise = GridMechanism(NoiseSpec(mechanism, 0.0, 1.0, 10.0, DELTA_ROW if mechanism == "gaussian" else None),
                          10, fast_ffi=fast_ffi)
    x = np.full(10, 0.1)
    noise.release(x)
    start = time.process_time()
    for _ in range(n):
        noise.release(x)
    noise_us = (time.process_time() - start) / n * 1e6
    return {"median_us": statistics.median(samples) * 1e6, "p90_us": float(np.percentile(samples, 90) * 1e6),
            "noise_only_us": noise_us, "requests": len(samples) * batch}


def fmt(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--draws", type=int, default=5, help="noise draws averaged per utility cell")
    parser.add_argument("--n", type=int, default=2000, help="requests per CPU measurement")
    args = parser.parse_args()
    result: dict[str, Any] = {"utility": asyncio.run(utility(args.draws))}
    cpu = {
        "laplace": asyncio.run(stage_cpu(args.n, "laplace")),
        "gaussian": asyncio.run(stage_cpu(args.n, "gaussian")),
        "laplace_public_opendp_call": asyncio.run(stage_cpu(args.n // 2, "laplace", fast_ffi=False)),
        "laplace_repeat_cache_hit": asyncio.run(stage_cpu(args.n, "laplace", cache=True)),
        "laplace_with_1ms_timing_jitter_idle_loop": asyncio.run(stage_cpu(args.n // 2, "laplace", jitter_ms=1.0)),
    }
    result["stage_cpu_10_floats"] = cpu
    result["environment"] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "opendp": importlib.metadata.version("opendp"), "numpy": importlib.metadata.version("numpy"),
    }
    u = result["utility"]
    print(f"## Output DP utility (digits: {u['digits_test_rows']} test images, clean accuracy "
          f"{u['digits_clean_accuracy']:.3f}; risk: {u['risk_test_rows']} test patients; mean of {u['draws']} draws)\n")
    print("| ε per row | digits noisy-argmax acc, Laplace | digits acc, Gaussian (δ=1e-6) | risk MAE, Laplace "
          "| risk MAE, Gaussian | answers/day at E=5 (Laplace) | risk MAE of the day's average |")
    print("|---|---|---|---|---|---|---|")
    for row in u["rows"]:
        lap, gau = row["laplace"], row["gaussian"]
        day = f"{lap['risk_day_average_mae']:.3f}" if "risk_day_average_mae" in lap else "– (ε > E)"
        print(f"| {row['epsilon_per_row']:g} | {lap['digits_accuracy']:.3f} | {gau['digits_accuracy']:.3f} | "
              f"{lap['risk_mae']:.3f} | {gau['risk_mae']:.3f} | {lap['answers_per_day_at_E5']} | {day} |")
    print("\n## dp_noise stage CPU per request, one row of 10 floats (target < 200 µs)\n")
    print("| variant | median µs | p90 µs | OpenDP noise alone µs |")
    print("|---|---|---|---|")
    for name, c in cpu.items():
        print(f"| {name} | {fmt(c['median_us'])} | {fmt(c['p90_us'])} | {fmt(c['noise_only_us'])} |")
    print(f"\nload average {result['environment']['load_average']}, {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
