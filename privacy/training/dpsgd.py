"""DP-SGD training of the served models with Opacus and the RDP accountant.

Why this exists: the non-private models in ``triton_repo/`` can leak whether a
record was in their training set (membership inference), however well the
gateway guards the answers.  Only training-time DP bounds that leak for every
query at once.  This module trains ``digits`` and ``risk`` with per-example
clipping and Gaussian noise (Opacus ``PrivacyEngine``, Poisson sampling) to a
target (ε, δ), with the noise multiplier found for that target by the same
bisection Opacus's ``make_private_with_epsilon`` uses.

Design decisions, each for a privacy reason:

* **Standardisation is baked into the network and is itself private.**  A scaler
  fitted on the training split (mean/std) is a non-private release of 2·d
  statistics that the ε would not cover.  ``digits`` therefore uses the *public*
  pixel range (x / 16, no data used).  ``risk`` has no public ranges, so it uses a
  fixed ``log(x + 1e-3)`` (features are non-negative measurements spanning 1e-3 ..
  1e4) and a per-feature centre estimated with the **Gaussian mechanism** on
  clipped values; that release is added to the Opacus RDP accountant's history,
  so the reported ε covers it (it costs ~0.1 in noise multiplier at ε = 8).
* **Seeded, deterministic training.**  Separate ``torch.Generator`` objects for
  initialisation, Poisson sampling, preprocessing noise and gradient noise,
  ``torch.use_deterministic_algorithms(True)``, one thread.  Reproducibility and
  DP pull in opposite directions: whoever knows the seed can regenerate the
  noise.  The seed is therefore an input (public default for CI, secret seed file
  for a release), ``secure_mode`` is off (its ``torchcsprng`` dependency cannot be
  installed), and the model card says so.
* **torch and opacus are imported inside functions only**: ``import privacy`` and
  ``import privacy.training`` must stay cheap, and the gateway never loads them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

DEFAULT_SEED: Final = 1234
DEFAULT_DELTA: Final = 1e-5
ACCOUNTANT: Final = "rdp"
#: Same tolerance as ``opacus.accountants.utils.get_noise_multiplier``.
EPSILON_TOLERANCE: Final = 0.01

#: (noise multiplier, sample rate, steps): the RDP accountant's history format.
HistoryEntry = tuple[float, float, int]


@dataclass(frozen=True)
class Preprocessing:
    """``z = (T(x) - centre) / scale`` with ``T`` identity or ``log(max(x, 0) + log_offset)``.

    ``centre`` is either fixed in advance (``fixed_centre``, from public knowledge only)
    or, when ``fixed_centre`` is ``None``, estimated privately: per-feature mean of
    ``T(x)`` clipped to the public range ``[clip_low, clip_high]``, plus Gaussian noise
    with ``noise_multiplier`` times the L2 sensitivity.
    """

    transform: Literal["identity", "log"]
    scale: float
    fixed_centre: float | None = None
    log_offset: float = 1e-3
    clip_low: float = 0.0
    clip_high: float = 0.0
    noise_multiplier: float = 0.0

    @property
    def is_private_estimate(self) -> bool:
        return self.fixed_centre is None

    def describe(self) -> str:
        t = "x" if self.transform == "identity" else f"log(max(x, 0) + {self.log_offset:g})"
        if self.fixed_centre is not None:
            centre = f"the fixed constant {self.fixed_centre:g}"
        else:
            centre = (
                f"a per-feature DP mean of {t} clipped to the public range "
                f"[{self.clip_low:.3f}, {self.clip_high:.3f}] (Gaussian mechanism, noise multiplier "
                f"{self.noise_multiplier:g}, L2 sensitivity {(self.clip_high - self.clip_low) / 2:.3f}·√d)"
            )
        return f"z = ({t} - centre) / {self.scale:g}, centre = {centre}"


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one model, chosen by a small manual search (see the model card).

    ``n_classes == 2`` means one logit and a sigmoid ``score`` = P(class 1), matching the
    ``[N, 1]`` contract of ``risk``; otherwise softmax over ``n_classes``.
    """

    name: str
    dataset: str
    input_name: str
    output_name: str
    output_meaning: str
    n_features: int
    n_classes: int
    preprocessing: Preprocessing
    default_epsilon: float
    epochs: int
    batch_size: int
    max_grad_norm: float
    learning_rate: float
    momentum: float = 0.9
    hidden: tuple[int, ...] = ()

    @property
    def n_outputs(self) -> int:
        return 1 if self.n_classes == 2 else self.n_classes

    def describe_architecture(self) -> str:
        widths = [self.n_features, *self.hidden, self.n_outputs]
        kind = "logistic regression" if not self.hidden else "MLP (tanh)"
        head = "sigmoid" if self.n_classes == 2 else "softmax"
        return f"{kind} {'-'.join(map(str, widths))} with {head} output"


RECIPES: Final[dict[str, Recipe]] = {
    "digits": Recipe(
        name="digits",
        dataset="scikit-learn bundled `load_digits` (8x8 images, pixel values 0..16)",
        input_name="pixels",
        output_name="probabilities",
        output_meaning="Handwritten digit classifier: softmax probabilities over the digits 0..9.",
        n_features=64,
        n_classes=10,
        # The public pixel range 0..16: no statistic of the training data is needed.
        preprocessing=Preprocessing(transform="identity", scale=16.0, fixed_centre=0.0),
        default_epsilon=3.0,
        epochs=100,
        batch_size=1024,
        max_grad_norm=0.5,
        learning_rate=0.5,
    ),
    "risk": Recipe(
        name="risk",
        dataset="scikit-learn bundled `load_breast_cancer` (Wisconsin diagnostic, 30 features); "
        "label 1 = malignant",
        input_name="features",
        output_name="score",
        output_meaning="Breast-cancer malignancy score: `score` = P(malignant) in [0, 1].",
        n_features=30,
        n_classes=2,
        preprocessing=Preprocessing(
            transform="log",
            scale=0.5,
            log_offset=1e-3,
            clip_low=math.log(1e-3),
            clip_high=math.log(1e4),
            noise_multiplier=2.0,
        ),
        default_epsilon=8.0,
        epochs=100,
        batch_size=256,
        max_grad_norm=1.0,
        learning_rate=0.5,
    ),
}


@dataclass
class TrainResult:
    """A trained (unwrapped, eval-mode) module plus the privacy numbers that describe it."""

    recipe: Recipe
    module: torch.nn.Module
    target_epsilon: float
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    expected_batch_size: int
    steps: int
    epochs: int
    seed: int
    centre: list[float]
    accountant_history: list[HistoryEntry] = field(default_factory=list)
    wall_seconds: float = 0.0


# --------------------------------------------------------------------------- accounting


def rdp_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε of a composition, with Opacus's own RDP accountant (the oracle the engine uses too).

    Memoised: Opacus's RDP for fractional orders at q = 0.5 costs ~0.5-1 s per call, and
    the noise bisection and repeated (seeded, identical) builds ask the same questions.
    """
    return _rdp_epsilon(tuple((float(s), float(q), int(n)) for s, q, n in history), float(delta))


@functools.lru_cache(maxsize=4096)
def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]

    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        return float(accountant.get_epsilon(delta=delta))


def find_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    prefix: Sequence[HistoryEntry] = (),
    tolerance: float = EPSILON_TOLERANCE,
) -> float:
    """Smallest-ish DP-SGD noise multiplier whose composition with ``prefix`` stays ≤ target ε.

    The bisection is Opacus's ``get_noise_multiplier`` (same start, same tolerance, so
    with an empty prefix it returns the same σ as ``make_private_with_epsilon``); it is
    reimplemented only so that earlier releases (the private preprocessing) are part of
    the budget instead of silently on top of it.  The returned σ always satisfies
    ε ≤ target (it is the upper end of the bracket).
    """
    if not 0.0 < sample_rate <= 1.0 or steps < 1 or target_epsilon <= 0.0:
        raise ValueError("need 0 < sample_rate <= 1, steps >= 1 and target_epsilon > 0")
    if prefix and rdp_epsilon(prefix, delta) >= target_epsilon:
        raise ValueError(f"the preprocessing release alone spends ε >= {target_epsilon}")

    def eps(sigma: float) -> float:
        return rdp_epsilon([*prefix, (sigma, sample_rate, steps)], delta)

    sigma_low, sigma_high = 0.0, 10.0
    eps_high = eps(sigma_high)
    while eps_high > target_epsilon:
        sigma_low, sigma_high = sigma_high, 2.0 * sigma_high
        if sigma_high > 1e6:
            raise ValueError(f"target ε {target_epsilon} is unreachable")
        eps_high = eps(sigma_high)
    while target_epsilon - eps_high > tolerance:
        sigma = (sigma_low + sigma_high) / 2.0
        eps_mid = eps(sigma)
        if eps_mid < target_epsilon:
            sigma_high, eps_high = sigma, eps_mid
        else:
            sigma_low = sigma
    return sigma_high


# --------------------------------------------------------------------------- torch helpers


@contextlib.contextmanager
def deterministic_torch(threads: int = 1) -> Iterator[None]:
    """Deterministic kernels, one thread, and a forked global RNG; everything restored afterwards.

    One thread is also *faster* on a loaded 2-core machine (PRIVACY.md §4), and restoring
    the previous state keeps a test process's other tests unaffected.
    """
    import torch

    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_threads = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads)
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(previous_det, warn_only=previous_warn_only)
        torch.set_num_threads(previous_threads)


@contextlib.contextmanager
def _quiet_known_warnings() -> Iterator[None]:
    """Silence the warnings Opacus/torch always emit here, each one understood and harmless.

    - "Secure RNG turned off": deliberate (seeded reproducibility), stated in the card.
    - "Full backward hook is firing ... no inputs require gradients": Opacus's hooks on
      the first layer, whose input is data (PRIVACY.md §1).
    - "Optimal order is the ...": RDP order grid edge while bisecting very large σ.
    Anything else still surfaces (and fails the test suite, which turns warnings into errors).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


@functools.cache
def _network_class() -> Callable[[Recipe, npt.NDArray[np.float64]], torch.nn.Module]:
    """Define the module class on first use so that importing this file never imports torch."""
    import torch
    from torch import nn

    class DPNet(nn.Module):
        """Raw features in, logits out; the standardisation constants are buffers, so they are
        exported as initializers and the ONNX graph takes raw values like the current models."""

        input_centre: torch.Tensor
        input_scale: torch.Tensor

        def __init__(self, recipe: Recipe, centre: npt.NDArray[np.float64]) -> None:
            super().__init__()
            pre = recipe.preprocessing
            self.log_offset: float | None = pre.log_offset if pre.transform == "log" else None
            self.register_buffer("input_centre", torch.tensor(centre, dtype=torch.float32))
            self.register_buffer(
                "input_scale", torch.full((recipe.n_features,), float(pre.scale), dtype=torch.float32)
            )
            layers: list[nn.Module] = []
            width = recipe.n_features
            for hidden in recipe.hidden:
                layers += [nn.Linear(width, hidden), nn.Tanh()]
                width = hidden
            layers.append(nn.Linear(width, recipe.n_outputs))
            self.body = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.log_offset is not None:
                # Negative inputs are outside the domain; clamping keeps the score finite.
                x = torch.log(torch.clamp(x, min=0.0) + self.log_offset)
            z = (x - self.input_centre) / self.input_scale
            out: torch.Tensor = self.body(z)
            return out

    return DPNet


def build_network(recipe: Recipe, centre: npt.NDArray[np.float64]) -> torch.nn.Module:
    """Fresh, randomly initialised network (the global RNG must be seeded by the caller)."""
    return _network_class()(recipe, centre)


def transform_inputs(recipe: Recipe, x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """``T(x)`` in float64, exactly as the network applies it (before centring)."""
    x64 = np.asarray(x, dtype=np.float64)
    if recipe.preprocessing.transform == "log":
        return np.log(np.maximum(x64, 0.0) + recipe.preprocessing.log_offset)
    return x64


def private_centre(
    recipe: Recipe, x_train: FloatArray, generator: torch.Generator
) -> tuple[npt.NDArray[np.float64], list[HistoryEntry]]:
    """The input centre, and the accountant entries its release costs (none if it is fixed).

    Gaussian mechanism on the sum of per-example vectors ``clip(T(x), lo, hi) - mid``:
    each coordinate lies in ``[-h, h]`` (``h`` = half the public range), so adding or
    removing one example moves the sum by at most ``h·√d`` in L2.  Noise with standard
    deviation ``σ·h·√d``; dividing by n (public, as in Opacus) and clipping the result
    back into the range are post-processing.  For the accountant this is one step of
    the Gaussian mechanism with sample rate 1: RDP α / (2σ²).
    """
    import torch

    pre = recipe.preprocessing
    d = recipe.n_features
    if not pre.is_private_estimate:
        return np.full(d, float(pre.fixed_centre or 0.0)), []
    if pre.noise_multiplier <= 0.0 or pre.clip_high <= pre.clip_low:
        raise ValueError(f"{recipe.name}: a private centre needs noise_multiplier > 0 and a clip range")
    mid = (pre.clip_low + pre.clip_high) / 2.0
    half = (pre.clip_high - pre.clip_low) / 2.0
    z = np.clip(transform_inputs(recipe, x_train), pre.clip_low, pre.clip_high) - mid
    sensitivity = half * math.sqrt(d)
    noise = torch.normal(
        0.0, pre.noise_multiplier * sensitivity, size=(d,), generator=generator, dtype=torch.float64
    ).numpy()
    centre = mid + (z.sum(axis=0) + noise) / len(z)
    return np.clip(centre, pre.clip_low, pre.clip_high), [(pre.noise_multiplier, 1.0, 1)]


def _seeds(seed: int) -> tuple[int, int, int, int]:
    """Four decorrelated 32-bit seeds (init, sampling, preprocessing noise, gradient noise)."""
    a, b, c, d = (int(s) for s in np.random.SeedSequence(seed).generate_state(4))
    return a, b, c, d


def _loss(recipe: Recipe) -> torch.nn.Module:
    from torch import nn

    return nn.BCEWithLogitsLoss() if recipe.n_classes == 2 else nn.CrossEntropyLoss()


def _targets(recipe: Recipe, y: IntArray) -> torch.Tensor:
    import torch

    if recipe.n_classes == 2:
        return torch.tensor(np.asarray(y, dtype=np.float32).reshape(-1, 1))
    return torch.tensor(np.asarray(y, dtype=np.int64))


def predict_labels(recipe: Recipe, module: torch.nn.Module, x: FloatArray) -> IntArray:
    """Class labels from the logits (threshold 0.5 on the score for binary models)."""
    import torch

    with torch.no_grad():
        logits = module(torch.tensor(np.asarray(x, dtype=np.float32))).numpy()
    if recipe.n_classes == 2:
        return np.asarray(logits[:, 0] >= 0.0, dtype=np.int64)
    return np.asarray(logits.argmax(axis=1), dtype=np.int64)


def accuracy(recipe: Recipe, module: torch.nn.Module, x: FloatArray, y: IntArray) -> float:
    return float(np.mean(predict_labels(recipe, module, x) == np.asarray(y)))


# --------------------------------------------------------------------------- training


def train(
    recipe: Recipe,
    x_train: FloatArray,
    y_train: IntArray,
    *,
    target_epsilon: float | None = None,
    delta: float = DEFAULT_DELTA,
    seed: int = DEFAULT_SEED,
    epochs: int | None = None,
) -> TrainResult:
    """Train ``recipe`` with DP-SGD to ``target_epsilon`` (default: the recipe's) at ``delta``.

    Raises if the accountant's final ε exceeds the target: a model that overspent must
    not be written anywhere.
    """
    import torch
    from opacus import PrivacyEngine  # type: ignore[import-untyped]

    target = recipe.default_epsilon if target_epsilon is None else float(target_epsilon)
    n_epochs = recipe.epochs if epochs is None else int(epochs)
    if n_epochs < 1:
        raise ValueError("epochs must be >= 1")
    x = np.ascontiguousarray(x_train, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != recipe.n_features or len(x) != len(y_train):
        raise ValueError(f"{recipe.name}: expected x of shape [n, {recipe.n_features}] and n labels")

    started = time.perf_counter()
    init_seed, sampling_seed, pre_seed, noise_seed = _seeds(seed)
    with deterministic_torch(), _quiet_known_warnings():
        centre, prefix = private_centre(recipe, x, torch.Generator().manual_seed(pre_seed))
        torch.manual_seed(init_seed)
        net = build_network(recipe, centre)

        dataset = torch.utils.data.TensorDataset(torch.tensor(x), _targets(recipe, y_train))
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=recipe.batch_size, generator=torch.Generator().manual_seed(sampling_seed)
        )
        # Opacus: sample_rate = 1 / len(loader); Poisson batches have this expected size.
        sample_rate = 1.0 / len(loader)
        steps = n_epochs * len(loader)
        noise_multiplier = find_noise_multiplier(
            target_epsilon=target, delta=delta, sample_rate=sample_rate, steps=steps, prefix=prefix
        )

        criterion = _loss(recipe)
        optimizer = torch.optim.SGD(net.parameters(), lr=recipe.learning_rate, momentum=recipe.momentum)
        engine = PrivacyEngine(accountant=ACCOUNTANT, secure_mode=False)
        engine.accountant.history.extend(prefix)
        model, dp_optimizer, dp_loader = engine.make_private(
            module=net,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=recipe.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(noise_seed),
        )
        model.train()
        for _ in range(n_epochs):
            for xb, yb in dp_loader:
                dp_optimizer.zero_grad()
                loss = criterion(model(xb), yb)
                loss.backward()
                dp_optimizer.step()

        history: list[HistoryEntry] = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
        # What ``engine.get_epsilon(delta)`` computes (a fresh RDPAccountant over the engine's
        # own history), memoised: identical seeded rebuilds then cost no accounting time.
        epsilon = rdp_epsilon(history, delta)
        trained: torch.nn.Module = model.to_standard_module()
        trained.eval()

    if epsilon > target + 1e-9:
        raise RuntimeError(f"{recipe.name}: accountant reports ε={epsilon:.4f} above the target {target}")
    return TrainResult(
        recipe=recipe,
        module=trained,
        target_epsilon=target,
        epsilon=epsilon,
        delta=delta,
        noise_multiplier=float(noise_multiplier),
        sample_rate=sample_rate,
        expected_batch_size=int(len(x) * sample_rate),
        steps=steps,
        epochs=n_epochs,
        seed=seed,
        centre=[float(c) for c in centre],
        accountant_history=history,
        wall_seconds=time.perf_counter() - started,
    )
