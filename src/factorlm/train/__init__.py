"""Fine-tuning: an accelerate-based :class:`Trainer`, evaluation helpers, hooks and distillation."""

from .callbacks import Callback
from .distill import DistillationCallback, distillation_loss
from .evaluate import evaluate, main_score, predict
from .loop import Trainer, TrainConfig, TrainState, default_param_groups

__all__ = [
    "Callback",
    "Trainer",
    "TrainConfig",
    "TrainState",
    "evaluate",
    "predict",
    "main_score",
    "DistillationCallback",
    "distillation_loss",
    "default_param_groups",
]
