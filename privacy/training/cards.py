"""The numbers of one DP-SGD build, and the model card written from them.

Why a separate, torch-free module: the card is the artefact a reviewer reads to
decide whether a model may be served, so it is rendered from exactly the record
that is also written as ``training.json`` (one source of numbers, no hand-copied
values), and the gateway or a docs build can render or parse it without
importing torch.

Everything here is deterministic: no clock, host name or wall time is read, and
the build date is whatever the caller passes in (a fixed string by default), so
two builds with the same seed and library versions give byte-identical cards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Final

#: Written when no ``--date`` is given: a fixed string keeps rebuilt files byte-identical.
UNDATED: Final = "undated (reproducible build; pass --date YYYY-MM-DD to stamp a release)"

RECORD_VERSION: Final = 1


@dataclass(frozen=True)
class TrainingRecord:
    """Everything a reviewer needs to judge one DP model; serialised as ``training.json``.

    Accuracies are fractions in [0, 1] on the held-out test split (the same split
    the non-private baseline was evaluated on).  ``seed`` is ``None`` when the seed
    was supplied as a secret: publishing it would let anyone regenerate the noise.
    """

    model: str
    dataset: str
    n_train: int
    n_test: int
    split: str
    architecture: str
    preprocessing: str
    preprocessing_noise_multiplier: float | None
    target_epsilon: float
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    epochs: int
    steps: int
    sample_rate: float
    expected_batch_size: int
    optimizer: str
    learning_rate: float
    momentum: float
    secure_mode: bool
    seed: int | None
    seed_is_public_default: bool
    accuracy_dp: float
    accuracy_dp_torch: float
    accuracy_baseline: float
    baseline: str
    export_max_abs_error: float
    input_name: str
    input_shape: list[int]
    output_name: str
    output_shape: list[int]
    output_meaning: str
    onnx_sha256: str
    onnx_bytes: int
    onnx_opset: int
    build_date: str
    command: str
    versions: dict[str, str] = field(default_factory=dict)
    record_version: int = RECORD_VERSION

    def to_json(self) -> str:
        """Fixed key order, fixed float repr, trailing newline: part of byte-for-byte reproducibility."""
        return json.dumps(asdict(self), indent=1, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainingRecord:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


def _pct(x: float) -> str:
    return f"{100.0 * x:.2f}%"


def _seed_line(r: TrainingRecord) -> str:
    if r.seed is None:
        return (
            "- **Seed**: secret (read from a seed file, not recorded). Whoever holds it can rebuild "
            "this model bit for bit; nobody else can regenerate the noise."
        )
    if r.seed_is_public_default:
        return (
            f"- **Seed**: `{r.seed}`, the public default. **With a public seed the DP guarantee is "
            "nominal only**: anyone with this code can regenerate the exact sampling and noise and "
            "subtract it. Fine for development and CI; for a release rebuild with "
            "`--seed-file` holding a secret random seed."
        )
    return (
        f"- **Seed**: `{r.seed}` (given on the command line and recorded here, so the noise is "
        "reproducible by anyone reading this card: the guarantee is nominal unless this card stays private)."
    )


def render_card(r: TrainingRecord) -> str:
    """Markdown model card: the privacy claim first, then what it does and does not cover."""
    gap = r.accuracy_baseline - r.accuracy_dp
    one_example = 1.0 / r.n_test if r.n_test else float("nan")
    pre_dp = (
        f"released with the Gaussian mechanism (noise multiplier {r.preprocessing_noise_multiplier:g}) "
        "and composed into the same RDP accountant, so it is **inside** the ε below"
        if r.preprocessing_noise_multiplier is not None
        else "fixed in advance from the public input range, so it uses no training data"
    )
    versions = ", ".join(f"{k} {v}" for k, v in r.versions.items())
    return f"""# {r.model} (differentially private, DP-SGD)

{r.output_meaning}

## Privacy guarantee

| | |
|---|---|
| ε (spent, RDP accountant) | **{r.epsilon:.3f}** (target {r.target_epsilon:g}) |
| δ | {r.delta:g} |
| accountant | Opacus `{r.accountant.upper()}Accountant` (Rényi DP, converted to (ε, δ)) |
| noise multiplier (DP-SGD) | {r.noise_multiplier:.4f} |
| max grad norm (per-example clipping, flat) | {r.max_grad_norm:g} |
| epochs / optimizer steps | {r.epochs} / {r.steps} |
| sampling | Poisson, rate q = {r.sample_rate:.4f} (expected batch {r.expected_batch_size} of {r.n_train}) |
| optimizer | {r.optimizer}, learning rate {r.learning_rate:g}, momentum {r.momentum:g} |
| Opacus `secure_mode` | {"on" if r.secure_mode else "**off**"} |

The model is ({r.epsilon:.3f}, {r.delta:g})-differentially private with respect to **adding or
removing one training example** (one row of the {r.n_train}-row training split). Input
standardisation is baked into the graph; its centre was {pre_dp}.

**What this ε protects**
- Membership and attributes of any *single training example*: whatever an attacker does with
  the model (white-box weights, unlimited queries through the gateway), their ability to tell
  whether a given record was in the training split is bounded by ε, δ. Answers are
  post-processing, so **no number of queries spends more budget**.

**What it does not protect**
- `profile.json` next to this model is copied from the non-private build and computed from the
  **same training split without DP** (per-feature minima/maxima are actual training values,
  plus quantiles, means and a covariance). Keep it server-side; it is not covered by ε.
- The test split ({r.n_test} rows): not used for training, but the accuracies below are computed
  on it in the clear, and the hyper-parameters (learning rate, clipping, epochs, batch size,
  preprocessing) were chosen by a small manual search that looked at this split. That tuning
  is **not** accounted in ε.
- Groups: k related records get only a kε-style guarantee. Population-level facts (what the
  model learns from *everyone*) are not hidden; that is the point of training.
- The data set size n is treated as public, as Opacus does (it fixes q and the averaging).
- Inference-time inputs sent to the gateway, and robustness: DP training adds no resistance
  to adversarial (evasion) examples and does not stop model extraction by queries.
- `secure_mode` is off (torch's pseudo-random generators, float Gaussian sampling): chosen for
  seeded reproducibility; Opacus's secure mode needs `torchcsprng`, which cannot be installed.
{_seed_line(r)}

## Accuracy (held-out test split, {r.n_test} rows; one row = {_pct(one_example)})

| model | accuracy |
|---|---|
| this DP model, ONNX via onnxruntime (float32) | **{_pct(r.accuracy_dp)}** |
| this DP model, torch before export | {_pct(r.accuracy_dp_torch)} |
| non-private baseline: {r.baseline} | {_pct(r.accuracy_baseline)} |

Cost of privacy on this split: {100.0 * gap:+.2f} percentage points
({"worse" if gap > 0 else "not worse"} than the baseline). Max |torch − ONNX| output difference
{r.export_max_abs_error:.2e}.

## Training

- **Data**: {r.dataset}; {r.split}: {r.n_train} training / {r.n_test} test rows.
- **Architecture**: {r.architecture}.
- **Preprocessing (inside the graph)**: {r.preprocessing}.
- **Determinism**: fixed seeds for initialisation, Poisson sampling, preprocessing noise and
  gradient noise (separate generators), `torch.use_deterministic_algorithms(True)`, one CPU
  thread. The same seed and library versions rebuild the same weights and a byte-identical
  `model.onnx` (sha256 `{r.onnx_sha256}`, {r.onnx_bytes} bytes, opset {r.onnx_opset}).
- **Toolchain**: {versions}.
- **Command**: `{r.command}`
- **Build date**: {r.build_date}

## Interface

Input `{r.input_name}` FP32 `{r.input_shape}` (raw values, as for the non-private model);
output `{r.output_name}` FP32 `{r.output_shape}`. Same `config.pbtxt` as the model it replaces.

`profile.json` is a byte copy from the non-private model: its input statistics stay valid
(same training split), but its `output` section (class distribution, confidence or score
histogram) describes the **non-private** model's outputs. A DP model is typically less
confident, so output-drift checks calibrated on that section will flag this model.

## Limitations

A small demonstration model. It is not a medical device, is not robust to adversarial
perturbations, and says nothing useful about inputs outside the training distribution.
"""


def render_version_section(r: TrainingRecord, version: str) -> str:
    """The card of a DP model served as one more version of an existing model.

    Same text and numbers as :func:`render_card` (one renderer, so the section cannot
    drift from a standalone card), with every heading one level down under a title that
    names the version: it is appended to the served model's ``MODEL_CARD.md``.
    """
    lines = render_card(r).splitlines()
    title = f"## Version {version}: {r.model}, differentially private (DP-SGD)"
    body = ["#" + line if line.startswith("#") else line for line in lines[1:]]
    return "\n".join([title, *body]) + "\n"
