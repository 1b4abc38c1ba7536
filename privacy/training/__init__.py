"""Training-time differential privacy: DP-SGD (Opacus) for the served models, ONNX export, model cards.

Why a subpackage with lazy imports: torch and opacus cost ~2.5 s and ~330 MB to
import and belong to the optional training extra.  Nothing here imports them at
module level, so ``import privacy`` / ``import privacy.training`` stay cheap and
the gateway, which never trains, never loads them.  ``tools/train_dp.py`` is the
one command that rebuilds the DP models.
"""

from privacy.training.cards import TrainingRecord, render_card
from privacy.training.dpsgd import RECIPES, Preprocessing, Recipe, TrainResult, find_noise_multiplier, train

__all__ = [
    "RECIPES",
    "Preprocessing",
    "Recipe",
    "TrainResult",
    "TrainingRecord",
    "find_noise_multiplier",
    "render_card",
    "train",
]
