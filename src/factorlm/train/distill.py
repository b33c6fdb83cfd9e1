"""Knowledge distillation from a frozen teacher, as a :class:`Callback`.

Loss seen by the optimizer::

    task_weight * task_loss + alpha * KD
    KD = T^2 * KL(softmax(teacher / T) || softmax(student / T))     (classification, batch mean)
    KD = MSE(student_logits, teacher_logits)                          (regression; T unused)
    KD = 1/2 [KD(start logits) + KD(end logits)]                       (extractive QA: a softmax over
                                                                       the tokens for each head)

``task_weight`` is 1 by default, or ``1 - alpha`` with ``scale_task_loss=True`` (the classic
Hinton mix; then ``alpha`` must be in [0, 1]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check
from .callbacks import Callback
from .evaluate import LABEL_KEYS, output_heads

__all__ = ["DistillationCallback", "distillation_loss"]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
                      regression: bool = False) -> torch.Tensor:
    """``T^2 * KL(p_teacher^T || p_student^T)`` averaged over the batch, or logits MSE for regression."""
    s = student_logits.float()
    t = teacher_logits.detach().float()
    if regression:
        return F.mse_loss(s, t)
    s = s.reshape(-1, s.shape[-1])
    t = t.reshape(-1, t.shape[-1])
    kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                  reduction="batchmean", log_target=True)
    return kl * temperature ** 2


class DistillationCallback(Callback):
    """Add a distillation term from a frozen ``teacher`` to the training loss.

    The teacher is frozen (``requires_grad=False``), put in eval mode and moved to
    ``trainer.accelerator.device`` at ``on_train_begin``; it is called on the same batch as the
    student minus ``labels`` (under ``accelerator.autocast()``).  ``regression=None`` follows
    ``trainer.task.is_regression`` (else: one output logit means regression).  The last KD value is
    kept in ``self.last_kd`` (a detached 0-d tensor, no device sync) for logging.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 2.0,
                 scale_task_loss: bool = False, regression: bool | None = None):
        check(temperature > 0, f"distillation temperature must be > 0, got {temperature}")
        check(alpha >= 0, f"distillation alpha must be >= 0, got {alpha}")
        check(not scale_task_loss or alpha <= 1, f"with scale_task_loss, alpha must be <= 1, got {alpha}")
        self.teacher = teacher
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.scale_task_loss = bool(scale_task_loss)
        self.regression = regression
        self.last_kd: torch.Tensor | None = None
        self._device: torch.device | None = None

    def _prepare_teacher(self, trainer) -> None:
        check(self.teacher is not trainer.unwrapped_model, "the teacher must not be the student itself")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._device = trainer.accelerator.device
        self.teacher.to(self._device)

    def on_train_begin(self, trainer) -> None:
        self._prepare_teacher(trainer)

    def _is_regression(self, trainer, logits: torch.Tensor) -> bool:
        if self.regression is not None:
            return self.regression
        task_reg = getattr(getattr(trainer, "task", None), "is_regression", None)
        return bool(task_reg) if task_reg is not None else logits.shape[-1] == 1

    def compute_loss(self, trainer, batch: dict[str, Any], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        if self._device is None:
            self._prepare_teacher(trainer)
        inputs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        self.teacher.eval()
        with torch.no_grad(), trainer.accelerator.autocast():
            t_heads = output_heads(self.teacher(**inputs))
        s_heads = output_heads(outputs)
        reg = self._is_regression(trainer, next(iter(s_heads.values())))
        kd = sum(distillation_loss(s_heads[k], t_heads[k], self.temperature, reg) for k in s_heads) / len(s_heads)
        self.last_kd = kd.detach()
        task_weight = (1.0 - self.alpha) if self.scale_task_loss else 1.0
        return task_weight * loss + self.alpha * kd.to(loss.dtype)
