"""Training hooks.  Later methods (pruning schedules, rank allocation, mixed-rank sampling,
distillation) plug into :class:`factorlm.train.Trainer` through these, never by editing the loop.

Order inside one optimisation step::

    on_step_begin -> forward -> compute_loss (chained through every callback) -> backward
    -> on_after_backward (grads present, before clipping) -> clip -> optimizer.step
    -> scheduler.step -> zero_grad -> on_step_end -> [evaluate -> on_evaluate]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .loop import Trainer


class Callback:
    """Base class: override what you need. ``trainer.state.step`` counts finished optimizer steps."""

    def on_train_begin(self, trainer: "Trainer") -> None: ...

    def on_step_begin(self, trainer: "Trainer") -> None: ...

    def compute_loss(self, trainer: "Trainer", batch: dict[str, Any], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        """Return the (possibly augmented) loss; e.g. add a distillation or consistency term."""
        return loss

    def on_after_backward(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer") -> None: ...

    def on_evaluate(self, trainer: "Trainer", metrics: dict[str, float]) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Extra state saved with checkpoints (e.g. pruning scores)."""
        return {}
