# pytest asserts are the point of this file.
"""CATALOGUE §1.9 / §2: evasion, extraction and membership inference through a real gateway.

Every attack talks HTTP to ``infergate serve`` (embedded onnxruntime backend, the attack
world of ``security_tests/ml/world``) with a real token; the *baseline* runs the same
attack against the upstream called directly (onnxruntime on the same ``model.onnx``, no
gateway) and must be strong — that is the "protection off → attack succeeds" proof, so
the protected numbers mean something. Targets are CATALOGUE §2.4, never loosened here;
where the world's policy cannot meet one, the test asserts what is enforced and the gap
is written to ``security_tests/results/ml_attacks.json`` (``"target_met": false``).

Protections in the world policy: ``tab_mlp`` Laplace b = 1 per coordinate and a DP
budget of 100 rows per tenant per day; ``tab_dp`` b = 2, 10 rows per day; ``lr_bc``
b = 2 then rounding to 2 decimals, 1,000 rows per principal per day; ``digits_clf``
range/grid (block), training-range/Mahalanobis (flag), query-pattern detector (block),
1,000 rows per principal per day.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator
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
                 input_name: str = "x", batch: int = 50) -> FloatArray:
    """Answers for every row, ``rows_per_day`` per simulated day (the cap), in batches."""
    out: list[FloatArray] = []
    for day_start in range(0, x.shape[0], rows_per_day):
        gw.next_period()
        token = gw.token(sub, tenant)
        day = x[day_start:day_start + rows_per_day]
        for start in range(0, day.shape[0], batch):
            reply = gw.infer(model, token, day[start:start + batch], input_name=input_name)
            assert reply.status == 200, reply.body
            out.append(reply.output())
    return np.concatenate(out)


def best_threshold(pos: FloatArray, neg: FloatArray) -> float:
    candidates = np.unique(np.concatenate([pos, neg]))
    gains = [(float(np.mean(pos >= t) - np.mean(neg >= t)), float(t)) for t in candidates]
    return max(gains)[1]


def split_half_advantage(scores: FloatArray, is_member: npt.NDArray[np.bool_], seed: int = 7) -> float:
    """Threshold chosen on one half, advantage TPR − FPR measured on the other (recipe 4a)."""
    pick = np.random.default_rng(seed).random(scores.size) < 0.5
    t = best_threshold(scores[pick & is_member], scores[pick & ~is_member])
    rest_in, rest_out = scores[~pick & is_member], scores[~pick & ~is_member]
    return float(np.mean(rest_in >= t) - np.mean(rest_out >= t))


def advantage_se(is_member: npt.NDArray[np.bool_]) -> float:
    """Standard error of a split-half advantage (half of each group evaluates; p(1−p) ≤ 1/4)."""
    half_in, half_out = is_member.sum() / 2, (~is_member).sum() / 2
    return math.sqrt(0.25 / half_in + 0.25 / half_out)


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


# --------------------------------------------------------------------------- MI-01 / MI-03


@pytest.fixture(scope="module")
def mia_answers(attack_gw: AttackGateway, attack_world: World) -> dict[str, Any]:
    """500 members + 500 non-members (deep: 1,000 + 1,000), one query each, through the gateway
    on tab_mlp (100 rows per simulated day) and directly."""
    n = 1000 if deep() else 500
    tab = attack_world.tab
    x = np.concatenate([tab.x_members[:n], tab.x_nonmembers[:n]])
    y = np.concatenate([tab.y_members[:n], tab.y_nonmembers[:n]])
    is_member = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])
    noisy = gateway_rows(attack_gw, "tab_mlp", "alpha", "mallory", x, rows_per_day=100)
    raw = Direct(attack_world, "tab_mlp")(x)
    return {"x": x, "y": y, "member": is_member, "noisy": noisy, "raw": raw}


@pytest.mark.parametrize("case", ["MI-01"])
def test_mi01_confidence_threshold(case: str, mia_answers: dict[str, Any], attack_gw: AttackGateway,
                                   attack_world: World) -> None:
    y, member = mia_answers["y"], mia_answers["member"]
    rows = np.arange(y.size)
    protected = mia_answers["noisy"][rows, y]
    baseline = mia_answers["raw"][rows, y]
    adv, adv_raw = split_half_advantage(protected, member), split_half_advantage(baseline, member)
    tpr, tpr_raw = tpr_at_fpr(protected, member, 0.01), tpr_at_fpr(baseline, member, 0.01)
    # The cap: row 101 of a day is refused.
    attack_gw.next_period()
    token = attack_gw.token("mallory", "alpha")
    x = attack_world.tab.x_pool[:50]
    assert [attack_gw.infer("tab_mlp", token, x).status for _ in range(2)] == [200, 200]
    assert attack_gw.infer("tab_mlp", token, x[:1]).status == 429
    se = advantage_se(member)
    record(case, advantage=adv, baseline_advantage=adv_raw, tpr_at_1pct_fpr=tpr, baseline_tpr_at_1pct_fpr=tpr_raw,
           target="advantage <= 0.15 and TPR@1%FPR <= 0.03", target_met=adv <= 0.15 and tpr <= 0.03,
           members=int(member.sum()), non_members=int((~member).sum()), standard_error=se)
    assert adv_raw >= 0.3  # protection off: the attack works (TPR@1%FPR is ~0 raw too: confidences saturate at 1.0)
    assert adv_raw > 0.15 + 3 * se
    # Population advantage ≈ 0.13 at b = 1 (simulation): one-sided test at 3 SE, see MI-02.
    assert adv <= 0.15 + 3 * se
    assert tpr <= 0.03


@pytest.mark.parametrize("case", ["MI-03"])
def test_mi03_label_only(case: str, mia_answers: dict[str, Any]) -> None:
    """Gap attack: "classified correctly ⇒ member". The noisy label must not beat the raw
    label-only baseline (≈ train − test accuracy) by more than 0.02."""
    y, member = mia_answers["y"], mia_answers["member"]
    protected = (mia_answers["noisy"].argmax(axis=1) == y).astype(np.float64)
    baseline = (mia_answers["raw"].argmax(axis=1) == y).astype(np.float64)
    adv = float(protected[member].mean() - protected[~member].mean())
    adv_raw = float(baseline[member].mean() - baseline[~member].mean())
    se = math.sqrt(0.5 / member.sum())  # SE of a difference of two proportions (upper bound)
    record(case, advantage=adv, baseline_advantage=adv_raw, target="<= label-only baseline + 0.02",
           target_met=adv <= adv_raw + 0.02)
    assert adv_raw >= 0.2
    assert adv <= adv_raw + 0.02 + 2 * se


# --------------------------------------------------------------------------- MI-02


@pytest.mark.parametrize("case", ["MI-02"])
def test_mi02_averaging_capped_by_the_dp_budget(case: str, attack_gw: AttackGateway, attack_world: World) -> None:
    """Each candidate asked k = 10 times (the most a tenant gets per day on tab_dp), answers
    averaged. CI 300 + 300 candidates (one simulated day each), deep 1,000 + 1,000;
    split-half threshold. A simulation on the same model puts the population advantage at
    ≈ 0.13 for b = 2, k = 10 — inside the 0.15 target with no margin — so CI asserts the
    target as a one-sided test (reject when the estimate exceeds it by 3 SE) and records
    the point estimate; the raw baseline (≈ 0.45) fails that test by far."""
    n = 1000 if deep() else 300
    tab = attack_world.tab
    x = np.concatenate([tab.x_members[:n], tab.x_nonmembers[:n]])
    y = np.concatenate([tab.y_members[:n], tab.y_nonmembers[:n]])
    member = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])
    averaged = np.empty(x.shape[0])
    for i in range(x.shape[0]):
        attack_gw.next_period()
        token = attack_gw.token("mallory", "beta")
        reply = attack_gw.infer("tab_dp", token, np.repeat(x[i:i + 1], 10, axis=0))
        assert reply.status == 200
        averaged[i] = reply.output()[:, y[i]].mean()
        if i == 0:
            assert attack_gw.infer("tab_dp", token, x[i]).status == 429  # k = 11 is refused
    adv = split_half_advantage(averaged, member)
    raw = Direct(attack_world, "tab_dp")(x)[np.arange(x.shape[0]), y]
    t_raw = best_threshold(raw[member], raw[~member])
    adv_raw = float(np.mean(raw[member] >= t_raw) - np.mean(raw[~member] >= t_raw))
    se = advantage_se(member)
    record(case, advantage=adv, baseline_advantage=adv_raw, k_max=10, target="advantage <= 0.15 at k_max",
           target_met=adv <= 0.15, candidates=int(x.shape[0]), standard_error=se)
    assert adv_raw >= 0.3
    assert adv_raw > 0.15 + 3 * se  # the test below would catch the unprotected model
    assert adv <= 0.15 + 3 * se


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
    w·x + β = logit(p) by least squares. Through the gateway (noise + rounding) vs raw."""
    bc = attack_world.bc
    n = factor * (bc.x_train.shape[1] + 1)
    rng = np.random.default_rng(5 + factor)
    mean, std = bc.x_train.mean(axis=0), bc.x_train.std(axis=0)
    x = np.maximum(mean + std * rng.normal(size=(n, mean.size)), 0.0)

    def solve(p: FloatArray) -> tuple[FloatArray, float]:
        q = np.clip(p[:, 1], 1e-3, 1 - 1e-3)
        design = np.hstack([x, np.ones((n, 1))])
        sol, *_ = np.linalg.lstsq(design, np.log(q / (1 - q)), rcond=None)
        return sol[:-1], float(sol[-1])

    def metrics(w_hat: FloatArray, b_hat: float) -> tuple[float, float]:
        cos = float(w_hat @ bc.weights / (np.linalg.norm(w_hat) * np.linalg.norm(bc.weights)))
        agree = float(np.mean(((bc.x_test @ w_hat + b_hat) > 0) == ((bc.x_test @ bc.weights + bc.bias) > 0)))
        return cos, agree

    attack_gw.next_period()
    token = attack_gw.token(f"solver{factor}", "delta")
    answers = [attack_gw.infer("lr_bc", token, x[s:s + 50]) for s in range(0, n, 50)]
    assert all(a.status == 200 for a in answers)
    protected = np.concatenate([a.output() for a in answers])
    assert np.allclose(np.round(protected, 2), protected, atol=1e-6)  # the output policy rounded (FP32)
    cos, agree = metrics(*solve(protected))
    cos_raw, agree_raw = metrics(*solve(Direct(attack_world, "lr_bc")(x)))
    record(f"EX-02/{n}", cosine=cos, agreement=agree, baseline_cosine=cos_raw, baseline_agreement=agree_raw,
           queries=n, target="cosine <= 0.90 and agreement <= 0.95", target_met=cos <= 0.90 and agree <= 0.95,
           gap="agreement is not held <= 0.95 by output noise: breast-cancer classes are separable with a wide "
               "margin, so any roughly aligned w-hat agrees; measured 0.62-0.98 at b = 2 over runs. Reported to "
               "the lead; only the cosine part is asserted.")
    if factor == 10:
        assert cos_raw >= 0.99  # protection off: exact recovery
        assert agree_raw >= 0.99
    assert cos <= 0.90


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
