# pytest asserts are the point of this file.
"""CATALOGUE §1.9 / §2: evasion, extraction and membership inference through a real gateway.

Every attack talks HTTP to ``infergate serve`` (embedded onnxruntime backend, the attack
world of ``security_tests/ml/world``) with a real token; the *baseline* runs the same
attack against the upstream called directly (onnxruntime on the same ``model.onnx``, no
gateway) and must be strong — that is the "protection off → attack succeeds" proof, so
the protected numbers mean something. Targets are CATALOGUE §2.4, never loosened here;
where the world's policy cannot meet one, the test asserts what is enforced and the gap
is written to ``security_tests/results/ml_attacks.json`` (``"target_met": false``).

Protections in the world policy: ``tab_mlp`` Laplace b = 1 per coordinate then top-1,
and a DP budget of 100 rows per tenant per day; ``tab_dp`` b = 2, 10 rows per day, top-1
for the untrusted role ``external``; ``lr_bc`` b = 2 then rounding to 2 decimals, 310
rows per principal per day; ``digits_clf`` range/grid (block), training-range/Mahalanobis
(flag), query-pattern detector (block), 1,000 rows per principal per day.

Statistics: the gateway's noise comes from a CSPRNG and cannot be seeded, so membership
targets are asserted on a one-sided 95% confidence bound over the candidates (seeded
folds), with enough margin that the assertion does not flake (see ``mia_advantage``),
and EX-02 on the median of independent attempts.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from security_tests.ml.world.harness import AttackGateway, deep
from security_tests.ml.world.models import World

RESULTS = Path(__file__).resolve().parents[1] / "results" / "ml_attacks.json"
FloatArray = npt.NDArray[np.float64]
_RESULTS: dict[str, Any] = {}
Z_ONE_SIDED_95 = 1.6448536269514722
MI_RUNS = 2  # independent attacks averaged per candidate (see mia_advantage)
K_MAX = 10  # tab_dp answers per tenant per day (privacy.yaml: ε 50 a day, 5 a row)
LAB_ROWS_PER_DAY = 180  # the lab tenant's 200-row day, in whole candidates and batches of 60
EX_ATTEMPTS = 21


@pytest.fixture(scope="module", autouse=True)
def write_results() -> Iterator[None]:
    yield
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {"about": "security_tests/ml/test_ml_attacks.py: protected (through the gateway) vs baseline "
                    "(upstream called directly); targets CATALOGUE §2.4", "deep": deep(), "attacks": _RESULTS}
    RESULTS.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def record(attack: str, **values: Any) -> None:
    _RESULTS[attack] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in values.items()}


class Direct:
    """The upstream without the gateway (baseline)."""

    def __init__(self, world: World, model: str) -> None:
        path = world.repo / model / "1" / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: npt.ArrayLike) -> FloatArray:
        return np.asarray(self.session.run(None, {self.input: np.asarray(x, np.float32)})[0], np.float64)


def gateway_rows(gw: AttackGateway, model: str, tenant: str, sub: str, x: FloatArray, *, rows_per_day: int,
                 input_name: str = "x", batch: int = 50, roles: Sequence[str] = ("predictor",)) -> FloatArray:
    """Answers for every row, ``rows_per_day`` per simulated day (the cap), in batches."""
    out: list[FloatArray] = []
    for day_start in range(0, x.shape[0], rows_per_day):
        gw.next_period()
        token = gw.token(sub, tenant, roles=roles)
        day = x[day_start:day_start + rows_per_day]
        for start in range(0, day.shape[0], batch):
            reply = gw.infer(model, token, day[start:start + batch], input_name=input_name)
            assert reply.status == 200, reply.body
            out.append(reply.output())
    return np.concatenate(out)


def best_threshold(pos: FloatArray, neg: FloatArray) -> float:
    """The threshold t maximising TPR − FPR of "score ≥ t ⇒ member" on (pos, neg)."""
    candidates = np.unique(np.concatenate([pos, neg]))
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tpr = 1.0 - np.searchsorted(pos_sorted, candidates, "left") / pos.size
    fpr = 1.0 - np.searchsorted(neg_sorted, candidates, "left") / neg.size
    return float(candidates[int(np.argmax(tpr - fpr))])


def crossfit_decisions(scores: FloatArray, member: npt.NDArray[np.bool_], seed: int) -> FloatArray:
    """Recipe 4a both ways: the threshold chosen on one half judges the other half and
    back, so every candidate is judged once, by a threshold not chosen on it."""
    fold = np.random.default_rng(seed).random(scores.size) < 0.5
    decided = np.zeros(scores.size)
    for side in (True, False):
        chosen_on, judged = fold == side, fold != side
        t = best_threshold(scores[chosen_on & member], scores[chosen_on & ~member])
        decided[judged] = scores[judged] >= t
    return decided


@dataclass(frozen=True)
class Advantage:
    """TPR − FPR of the threshold attack, with a one-sided 95% confidence bound."""

    value: float
    lower: float
    upper: float


def mia_advantage(runs: Sequence[FloatArray], member: npt.NDArray[np.bool_], seed: int = 7) -> Advantage:
    """Advantage of ``len(runs)`` independent attacks (each one answer set, fresh noise) on
    the same candidates: each candidate's cross-fitted decisions are averaged over the runs,
    advantage = mean over members − mean over non-members. The bound is the normal one on
    that difference of means with the empirical per-candidate variances: candidates are
    the sampling unit, so it covers the draw of members and non-members, not only the
    noise (Wilson-like; n = 1,000 per group). Averaging runs shrinks the noise part of the
    variance, which is what keeps the CI assertion from flaking (seeds fix the folds)."""
    decided = np.mean([crossfit_decisions(s, member, seed + i) for i, s in enumerate(runs)], axis=0)
    inside, outside = decided[member], decided[~member]
    value = float(inside.mean() - outside.mean())
    se = math.sqrt(inside.var(ddof=1) / inside.size + outside.var(ddof=1) / outside.size)
    return Advantage(value, value - Z_ONE_SIDED_95 * se, value + Z_ONE_SIDED_95 * se)


def tpr_at_fpr(scores: FloatArray, is_member: npt.NDArray[np.bool_], fpr: float) -> float:
    t = float(np.quantile(scores[~is_member], 1.0 - fpr, method="higher"))
    return float(np.mean(scores[is_member] > t))


def fidelity_surrogate(x: FloatArray, labels: npt.NDArray[np.int64], x_test: FloatArray,
                       victim_test: npt.NDArray[np.int64]) -> float:
    """Recipe 3a: an MLP(64) trained on the answers; agreement with the victim on held-out data."""
    from sklearn.exceptions import ConvergenceWarning  # type: ignore[import-untyped]
    from sklearn.neural_network import MLPClassifier  # type: ignore[import-untyped]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        thief = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(x, labels)
    return float(np.mean(thief.predict(x_test) == victim_test))


def candidates(world: World, n: int = 1000) -> tuple[FloatArray, npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """``n`` training members (of 1,000) and ``n`` non-members from the same distribution."""
    tab = world.tab
    x = np.concatenate([tab.x_members[:n], tab.x_nonmembers[:n]])
    y = np.concatenate([tab.y_members[:n], tab.y_nonmembers[:n]])
    return x, y, np.concatenate([np.ones(n, bool), np.zeros(n, bool)])


# --------------------------------------------------------------------------- MI-01 / MI-03


@pytest.fixture(scope="module")
def mia_answers(attack_gw: AttackGateway, attack_world: World) -> dict[str, Any]:
    """1,000 members + 1,000 non-members, one query each per run, MI_RUNS independent runs
    (each its own simulated days: 100 rows per tenant per day on tab_mlp), through the
    gateway; and the upstream's raw answers."""
    x, y, member = candidates(attack_world)
    runs = [gateway_rows(attack_gw, "tab_mlp", "alpha", f"mallory{r}", x, rows_per_day=100)
            for r in range(MI_RUNS)]
    raw = Direct(attack_world, "tab_mlp")(x)
    return {"x": x, "y": y, "member": member, "runs": runs, "raw": raw}


@pytest.mark.parametrize("case", ["MI-01"])
def test_mi01_confidence_threshold(case: str, mia_answers: dict[str, Any], attack_gw: AttackGateway,
                                   attack_world: World) -> None:
    """True-class confidence threshold (recipe 4a). Protection: Laplace b = 1 then top-1
    (tab_mlp's output policy). Target: the one-sided 95% upper bound of the advantage ≤
    0.15 (expected ≈ 0.05 + 0.03); the raw baseline's lower bound must clear 0.15, so the
    same assertion fails on an unprotected model."""
    y, member = mia_answers["y"], mia_answers["member"]
    rows = np.arange(y.size)
    protected = [run[rows, y] for run in mia_answers["runs"]]
    baseline = mia_answers["raw"][rows, y]
    adv, adv_raw = mia_advantage(protected, member), mia_advantage([baseline], member)
    tpr = float(np.mean([tpr_at_fpr(s, member, 0.01) for s in protected]))
    tpr_raw = tpr_at_fpr(baseline, member, 0.01)
    released = mia_answers["runs"][0]
    assert np.all(np.sum(released != np.min(released, axis=1, keepdims=True), axis=1) == 1)  # top-1 only
    victim_test = Direct(attack_world, "tab_mlp")(attack_world.tab.x_test[:100]).argmax(axis=1)
    # The cap: row 101 of a day is refused.
    attack_gw.next_period()
    token = attack_gw.token("mallory", "alpha")
    x = attack_world.tab.x_test[:100]
    first, second = attack_gw.infer("tab_mlp", token, x[:50]), attack_gw.infer("tab_mlp", token, x[50:])
    assert (first.status, second.status) == (200, 200)
    assert attack_gw.infer("tab_mlp", token, x[:1]).status == 429
    utility = float(np.mean(np.concatenate([first.output(), second.output()]).argmax(axis=1) == victim_test))
    record(case, advantage=adv.value, advantage_upper_95=adv.upper, baseline_advantage=adv_raw.value,
           baseline_advantage_lower_95=adv_raw.lower, tpr_at_1pct_fpr=tpr, baseline_tpr_at_1pct_fpr=tpr_raw,
           released_label_equals_model_label=utility, runs=MI_RUNS,
           protection="Laplace b = 1 per coordinate (DP stage), then top-1 (output hardening), 100 rows/tenant/day",
           target="advantage <= 0.15 (one-sided 95% upper bound) and TPR@1%FPR <= 0.03",
           target_met=adv.upper <= 0.15 and tpr <= 0.03, members=int(member.sum()),
           non_members=int((~member).sum()),
           note="gateway DP is not training-time DP: released labels match the model's only ~20% of the time at "
                "b = 1 (top-1 costs nothing more); label-only without noise leaks the generalisation gap (~0.28)")
    assert adv_raw.lower > 0.15  # protection off: the attack works (≈ 0.43) and this test would catch it
    assert adv.upper <= 0.15
    assert tpr <= 0.03


@pytest.mark.parametrize("case", ["MI-03"])
def test_mi03_label_only(case: str, mia_answers: dict[str, Any]) -> None:
    """Gap attack: "classified correctly ⇒ member". The noisy label must not beat the raw
    label-only baseline (≈ train − test accuracy) by more than 0.02."""
    y, member = mia_answers["y"], mia_answers["member"]
    correct = [(run.argmax(axis=1) == y).astype(np.float64) for run in mia_answers["runs"]]
    protected = np.mean(correct, axis=0)
    baseline = (mia_answers["raw"].argmax(axis=1) == y).astype(np.float64)
    adv = float(protected[member].mean() - protected[~member].mean())
    adv_raw = float(baseline[member].mean() - baseline[~member].mean())
    se = math.sqrt(protected[member].var(ddof=1) / member.sum() + protected[~member].var(ddof=1) / (~member).sum())
    record(case, advantage=adv, advantage_upper_95=adv + Z_ONE_SIDED_95 * se, baseline_advantage=adv_raw,
           target="<= label-only baseline + 0.02", target_met=adv + Z_ONE_SIDED_95 * se <= adv_raw + 0.02)
    assert adv_raw >= 0.2
    assert adv + Z_ONE_SIDED_95 * se <= adv_raw + 0.02


# --------------------------------------------------------------------------- MI-02


@pytest.mark.parametrize("case", ["MI-02"])
def test_mi02_averaging_capped_by_the_dp_budget(case: str, attack_gw: AttackGateway, attack_world: World) -> None:
    """Each candidate asked k = 10 times — the most a tenant gets per day on tab_dp (the
    11th row is 429) — and the true-class scores averaged. The untrusted role ``external``
    gets top-1 of the §0.3 noise (b = 2). 1,000 + 1,000 candidates, MI_RUNS independent
    runs (40,000 noised rows: the gateway's exact sampler makes rows the cost); the answers
    are collected under the ``lab`` tenant, whose larger budget only packs 18 candidates
    into a simulated day (same mechanism, same role, same k). Target: one-sided 95% upper
    bound ≤ 0.15: expected ≈ 0.06 + 0.025 (simulated on this model, the bound has sd
    0.015, so 0.15 is > 4 sd away). Without top-1 (role predictor, the whole noisy vector)
    the same simulation gives ≈ 0.12 and a bound ≈ 0.15: no margin, hence the role policy."""
    x, y, member = candidates(attack_world)
    # The cap, for the untrusted role on an ordinary tenant: k = 10 answered, the 11th refused.
    attack_gw.next_period()
    token = attack_gw.token("mallory", "beta", roles=("external",))
    reply = attack_gw.infer("tab_dp", token, np.repeat(x[:1], K_MAX, axis=0))
    assert reply.status == 200
    assert np.all(np.sum(reply.output() != np.min(reply.output(), axis=1, keepdims=True), axis=1) == 1)
    assert attack_gw.infer("tab_dp", token, x[:1]).status == 429

    def averaged(rows: FloatArray, roles: tuple[str, ...], sub: str) -> FloatArray:
        answers = gateway_rows(attack_gw, "tab_dp", "lab", sub, np.repeat(rows, K_MAX, axis=0),
                               rows_per_day=LAB_ROWS_PER_DAY, batch=60, roles=roles)
        mean: FloatArray = answers.reshape(rows.shape[0], K_MAX, -1).mean(axis=1)
        return mean

    rows = np.arange(y.size)
    protected = [averaged(x, ("external",), f"mallory-ext{r}")[rows, y] for r in range(MI_RUNS)]
    adv = mia_advantage(protected, member)
    raw = Direct(attack_world, "tab_dp")(x)[rows, y]
    adv_raw = mia_advantage([raw], member)
    record(case, advantage=adv.value, advantage_upper_95=adv.upper, baseline_advantage=adv_raw.value,
           baseline_advantage_lower_95=adv_raw.lower, k_max=K_MAX, runs=MI_RUNS, candidates=int(x.shape[0]),
           protection="Laplace b = 2 (DP, k = 10 rows/tenant/day) then top-1 for role external",
           target="advantage <= 0.15 at k_max (one-sided 95% upper bound)", target_met=adv.upper <= 0.15)
    assert adv_raw.lower > 0.15  # protection off: the attack works (≈ 0.45)
    assert adv.upper <= 0.15


# --------------------------------------------------------------------------- EX-01


@pytest.mark.parametrize("queries", ["in_distribution", "uniform"])
def test_ex01_retraining_extraction_at_the_cap(queries: str, attack_gw: AttackGateway, attack_world: World) -> None:
    """Y = 1,000 answers (10 simulated days at 100 rows) → MLP(64) on the noisy argmax;
    fidelity on 2,000 held-out points. Baseline: the same queries answered raw."""
    tab = attack_world.tab
    rng = np.random.default_rng(11)
    if queries == "in_distribution":
        x = tab.x_pool[:1000]
    else:
        x = rng.uniform(tab.low, tab.high, size=(1000, tab.x_pool.shape[1]))
    direct = Direct(attack_world, "tab_mlp")
    victim_test = direct(tab.x_test).argmax(axis=1)
    noisy = gateway_rows(attack_gw, "tab_mlp", "gamma", f"thief-{queries}", x, rows_per_day=100)
    fidelity = fidelity_surrogate(x, noisy.argmax(axis=1), tab.x_test, victim_test)
    baseline = fidelity_surrogate(x, direct(x).argmax(axis=1), tab.x_test, victim_test)
    target = 0.50 if queries == "in_distribution" else 0.40
    record(f"EX-01/{queries}", fidelity=fidelity, baseline_fidelity=baseline, queries=1000,
           enforced_cap="100 rows/tenant/day (DP budget); row 101 -> 429", target=f"fidelity <= {target}",
           target_met=fidelity <= target)
    assert baseline >= (0.75 if queries == "in_distribution" else 0.6)
    assert fidelity <= target


# --------------------------------------------------------------------------- EX-02


@pytest.mark.parametrize("factor", [1, 10])
def test_ex02_equation_solving_on_lr_bc(factor: int, attack_gw: AttackGateway, attack_world: World) -> None:
    """d+1 = 31 and 10(d+1) = 310 queries (random points around the data), solve
    w·x + β = logit(p) by least squares. Protection: Laplace b = 2 on both probabilities,
    then rounding to 2 decimals; 310 rows per principal per day (row 311 → 429).

    The attack's outcome is random (the gateway's noise cannot be seeded), with a long
    tail: at 310 queries ≈ 6% of attempts reach cosine > 0.90 and ≈ 12% agreement > 0.95
    (simulated over 3,000 attempts). So EX_ATTEMPTS = 21 independent attempts (fresh
    principal and day, fresh query points, seeded) are run and the *median* attempt must
    meet §2.4 (a majority of 21 exceeding a 12% tail: p ≈ 1e-5); the share of attempts
    over target is recorded. What a useful
    output policy could do is recorded too: label-only without noise (the released label
    always equals the model's) lets the same least squares recover the direction from
    the labels alone (cosine ≈ 0.96, agreement ≈ 0.99 at 310 queries)."""
    from gateway.adversarial.hardening import OutputHardener

    bc = attack_world.bc
    d = bc.x_train.shape[1]
    n = factor * (d + 1)
    mean, std = bc.x_train.mean(axis=0), bc.x_train.std(axis=0)
    direct = Direct(attack_world, "lr_bc")

    def solve(x: FloatArray, p: FloatArray) -> tuple[FloatArray, float]:
        q = np.clip(p[:, 1], 1e-3, 1 - 1e-3)
        design = np.hstack([x, np.ones((x.shape[0], 1))])
        sol, *_ = np.linalg.lstsq(design, np.log(q / (1 - q)), rcond=None)
        return sol[:-1], float(sol[-1])

    def metrics(w_hat: FloatArray, b_hat: float) -> tuple[float, float]:
        cos = float(w_hat @ bc.weights / (np.linalg.norm(w_hat) * np.linalg.norm(bc.weights)))
        agree = float(np.mean(((bc.x_test @ w_hat + b_hat) > 0) == ((bc.x_test @ bc.weights + bc.bias) > 0)))
        return cos, agree

    cosines, agreements, raw_cos, raw_agree, label_cos, label_agree = [], [], [], [], [], []
    for attempt in range(EX_ATTEMPTS):
        attack_gw.next_period()  # one attempt a day: lr_bc's DP budget is 1,000 rows per tenant per day
        rng = np.random.default_rng(1000 * factor + attempt)
        x = np.maximum(mean + std * rng.normal(size=(n, d)), 0.0)
        token = attack_gw.token(f"solver{factor}-{attempt}", "delta")
        answers = [attack_gw.infer("lr_bc", token, x[s:s + 62]) for s in range(0, n, 62)]
        assert all(a.status == 200 for a in answers)
        protected = np.concatenate([a.output() for a in answers])
        assert np.allclose(np.round(protected, 2), protected, atol=1e-6)  # the output policy rounded (FP32)
        if factor == 10 and attempt == 0:
            assert attack_gw.infer("lr_bc", token, x[:1]).status == 429  # row 311 of the day
        cos, agree = metrics(*solve(x, protected))
        cosines.append(cos)
        agreements.append(agree)
        raw = direct(x)
        cos, agree = metrics(*solve(x, raw))
        raw_cos.append(cos)
        raw_agree.append(agree)
        cos, agree = metrics(*solve(x, OutputHardener(label_only=True).harden(raw)))
        label_cos.append(cos)
        label_agree.append(agree)
    # Utility of the protected output for an honest caller: released label == model label.
    attack_gw.next_period()
    token = attack_gw.token(f"honest{factor}", "delta")
    x_test = bc.x_test[:248]
    released = np.concatenate([attack_gw.infer("lr_bc", token, x_test[s:s + 62]).output()
                               for s in range(0, x_test.shape[0], 62)])
    utility = float(np.mean(released.argmax(axis=1) == direct(x_test).argmax(axis=1)))
    cos_med, agree_med = float(np.median(cosines)), float(np.median(agreements))
    over = float(np.mean((np.array(cosines) > 0.90) & (np.array(agreements) > 0.95)))
    record(f"EX-02/{n}", cosine_median=cos_med, agreement_median=agree_med, cosine_max=float(np.max(cosines)),
           agreement_max=float(np.max(agreements)), attempts=EX_ATTEMPTS,
           attempts_over_cosine_target=float(np.mean(np.array(cosines) > 0.90)),
           attempts_over_agreement_target=float(np.mean(np.array(agreements) > 0.95)),
           attempts_over_both_targets=over,
           baseline_cosine_median=float(np.median(raw_cos)), baseline_agreement_median=float(np.median(raw_agree)),
           label_only_no_noise_cosine_median=float(np.median(label_cos)),
           label_only_no_noise_agreement_median=float(np.median(label_agree)),
           released_label_equals_model_label=utility, queries=n,
           protection="Laplace b = 2 on both probabilities, rounding to 2 decimals, 310 rows/principal/day",
           target="cosine <= 0.90 and agreement <= 0.95 (median attempt)",
           target_met=cos_med <= 0.90 and agree_med <= 0.95,
           gap="met only by noise that makes the answers near-useless (released label = model label ~0.6); any "
               "output that keeps the label useful lets 310 labelled queries recover the decision boundary "
               "(label-only, no noise: cosine ~0.96, agreement ~0.99); a minority of attempts beats the target "
               "even at b = 2. Per-day caps slow the attack down, they do not bound it over days.")
    if factor == 10:
        assert np.median(raw_cos) >= 0.99  # protection off: exact recovery
        assert np.median(raw_agree) >= 0.99
        assert np.median(label_cos) >= 0.90  # a useful label-only output does not stop it (the gap above)
    assert cos_med <= 0.90
    assert agree_med <= 0.95


# --------------------------------------------------------------------------- EV-01


def detected(gw: AttackGateway, replies: list[tuple[int, str]]) -> npt.NDArray[np.bool_]:
    """Refused (422/429) or flagged by a detector (audit ``detectors_fired``)."""
    fired = {r["request_id"] for r in gw.audit() if (r.get("notes") or {}).get("detectors_fired")}
    return np.array([status in (422, 429) or rid in fired for status, rid in replies])


@pytest.mark.parametrize("case", ["EV-01"])
def test_ev01_fgsm_pgd_transfer(case: str, attack_gw: AttackGateway, attack_world: World) -> None:
    """Surrogate: logistic regression on half the training split (ART SklearnClassifier);
    FGSM and PGD-40 (eps_step eps/10) at eps 2/16 (deep: 1, 2, 4), one image per request so
    every row gets its own verdict. CI 80 test images, deep 360."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent  # type: ignore[import-untyped]
    from art.estimators.classification import SklearnClassifier  # type: ignore[import-untyped]
    from sklearn.linear_model import LogisticRegression  # type: ignore[import-untyped]

    x_train, x_test, y_train, y_test = attack_world.digits
    n = x_test.shape[0] if deep() else 80
    x, y = x_test[:n].astype(np.float32), y_test[:n]
    direct = Direct(attack_world, "digits_clf")
    surrogate = SklearnClassifier(LogisticRegression(max_iter=3000).fit(x_train[::2], y_train[::2]),
                                  clip_values=(0.0, 16.0))
    attack_gw.next_period()
    token = attack_gw.token("eve", "gamma")

    def through(batch: npt.NDArray[Any]) -> tuple[list[tuple[int, str]], npt.NDArray[np.int64]]:
        replies, labels = [], []
        for row in batch:
            reply = attack_gw.infer("digits_clf", token, row, input_name="pixels")
            replies.append((reply.status, reply.headers.get("x-request-id", "")))
            labels.append(int(reply.output().argmax()) if reply.status == 200 else -1)
        return replies, np.array(labels)

    clean_replies, clean_labels = through(x)
    clean_direct = float(np.mean(direct(x).argmax(axis=1) == y))
    clean_gateway = float(np.mean(clean_labels == y))
    fpr = float(np.mean(detected(attack_gw, clean_replies)))
    results: dict[str, Any] = {"clean_accuracy_direct": clean_direct, "clean_accuracy_gateway": clean_gateway,
                               "detector_fpr": fpr}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for eps in ((1.0, 2.0, 4.0) if deep() else (2.0,)):
            for name, attack in (("fgsm", FastGradientMethod(surrogate, eps=eps)),
                                 ("pgd", ProjectedGradientDescent(surrogate, eps=eps, eps_step=eps / 10, max_iter=40,
                                                                  norm=np.inf, verbose=False))):
                adv = np.asarray(attack.generate(x=x), np.float32)
                fooled = direct(adv).argmax(axis=1) != y  # baseline: the upstream called directly
                replies, labels = through(adv)
                flagged = detected(attack_gw, replies)
                key = f"{name}_eps{eps:g}"
                results[f"{key}_success_direct"] = float(np.mean(fooled))
                results[f"{key}_robust_accuracy_gateway"] = float(np.mean(labels == y))
                results[f"{key}_detector_tpr"] = float(np.mean(flagged[fooled])) if fooled.any() else 1.0
    tpr = results["pgd_eps2_detector_tpr"]
    record(case, **results, target="clean drop <= 1 pt; detector TPR >= 0.5 at FPR <= 0.05 (PGD eps 2/16)",
           target_met=clean_direct - clean_gateway <= 0.01 and tpr >= 0.5 and fpr <= 0.05)
    assert results["pgd_eps2_success_direct"] >= 0.3  # protection off: the transfer attack works
    assert clean_direct - clean_gateway <= 0.01
    assert tpr >= 0.5
    assert fpr <= 0.05


# --------------------------------------------------------------------------- EV-02


class GatewayOracle:
    """ART ``predict_fn`` over HTTP: counts rows, keeps the first refusal's index."""

    def __init__(self, gw: AttackGateway, token: str) -> None:
        self.gw, self.token = gw, token
        self.rows = 0
        self.answered = 0
        self.first_refusal: int | None = None
        self.fallback = np.full(10, 0.1)

    def __call__(self, x: npt.NDArray[Any]) -> FloatArray:
        out = []
        for start in range(0, x.shape[0], 64):
            batch = np.asarray(x[start:start + 64], np.float64).reshape(-1, 64)
            reply = self.gw.infer("digits_clf", self.token, batch, input_name="pixels")
            if reply.status == 200:
                self.answered += batch.shape[0]
                out.append(reply.output())
            else:
                if self.first_refusal is None:
                    self.first_refusal = self.rows + 1
                out.append(np.repeat(self.fallback[None, :], batch.shape[0], axis=0))
            self.rows += batch.shape[0]
        return np.concatenate(out)


def hsj(predict: Callable[[npt.NDArray[Any]], FloatArray], x: FloatArray) -> FloatArray:
    from art.attacks.evasion import HopSkipJump
    from art.estimators.classification import BlackBoxClassifier

    classifier = BlackBoxClassifier(predict, input_shape=(64,), nb_classes=10, clip_values=(0.0, 16.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attack = HopSkipJump(classifier, targeted=False, norm=2, max_iter=20, max_eval=1000, init_eval=100,
                             verbose=False)
        return np.asarray(attack.generate(x=x.astype(np.float32)), np.float64)


@pytest.mark.parametrize("case", ["EV-02"])
def test_ev02_hopskipjump_through_the_gateway(case: str, attack_gw: AttackGateway, attack_world: World) -> None:
    """Recipe 2 on CI 6 / deep 20 test digits, each from a fresh principal of one tenant.
    Baseline: the same attack on the upstream directly. Success = misclassified by the
    model at L2 ≤ 1.0 on the [0, 1] scale (16 on the pixel scale)."""
    _, x_test, _, y_test = attack_world.digits
    n = 20 if deep() else 6
    direct = Direct(attack_world, "digits_clf")
    picks = [i for i in range(60) if direct(x_test[i:i + 1]).argmax() == y_test[i]][:n]
    attack_gw.next_period()
    base_success, base_l2, flagged_at, gw_success, answered = [], [], [], [], []
    np.random.seed(0)  # ART draws its random starts from numpy's global RNG
    for j, i in enumerate(picks):
        x0 = x_test[i:i + 1]
        adv = hsj(direct, x0)
        l2 = float(np.linalg.norm(adv - x0)) / 16.0
        base_success.append(bool(direct(adv).argmax() != y_test[i] and l2 <= 1.0))
        base_l2.append(l2)
        oracle = GatewayOracle(attack_gw, attack_gw.token(f"hsj{j}", "delta"))
        oracle.fallback = np.eye(10)[y_test[i]]  # a refusal tells the attacker nothing new
        adv_gw = hsj(oracle, x0)
        l2_gw = float(np.linalg.norm(adv_gw - x0)) / 16.0
        gw_success.append(bool(direct(adv_gw).argmax() != y_test[i] and l2_gw <= 1.0))
        flagged_at.append(oracle.first_refusal if oracle.first_refusal is not None else 10**9)
        answered.append(oracle.answered)
    success = float(np.mean(gw_success))
    flagged_within_100 = float(np.mean(np.array(flagged_at) <= 100))
    record(case, success_rate=success, baseline_success_rate=float(np.mean(base_success)),
           baseline_median_l2=float(np.median(base_l2)), flagged_within_100_queries=flagged_within_100,
           first_refusal_query=[int(f) for f in flagged_at], rows_answered_per_sequence=answered,
           target="success <= 10% at L2 <= 1.0; >= 95% of sequences flagged within 100 queries",
           target_met=success <= 0.10 and flagged_within_100 >= 0.95)
    assert np.mean(base_success) >= 0.6  # protection off: HopSkipJump gets there (5-6 of 6 measured)
    assert max(answered) <= 1000  # the per-principal cap
    assert success <= 0.10
    assert flagged_within_100 >= 0.95
