"""Knowledge distillation from a frozen teacher, as a :class:`Callback`.

Loss seen by the optimizer::

    task_weight * task_loss + alpha * KD
    KD = T^2 * KL(softmax(teacher / T) || softmax(student / T))     (classification, batch mean)
    KD = MSE(student_logits, teacher_logits)                          (regression; T unused)
    KD = 1/2 [KD(start logits) + KD(end logits)]                       (extractive QA: a softmax over
                                                                       the tokens for each head)

``task_weight`` is 1 by default, or ``1 - alpha`` with ``scale_task_loss=True`` (the classic
Hinton mix; then ``alpha`` must be in [0, 1]).

Teacher logits are cached per training example (``cache_logits=True``, the default) when batches
carry ``example_index`` (``make_dataloader(with_index=True)``, as every session's training loader
does) and the teacher's outputs are one row per example (classification, regression): the frozen
teacher in eval mode is a fixed function of the example, so from the second epoch on its forward
pass is skipped (with several processes, whose shards change every epoch, it runs on the rows not
seen yet only). The cache is one float32 ``[examples, classes]`` tensor on the training device. The cached row was computed in another batch, padded to another length; with the
attention mask that changes the logits only by floating-point rounding (bf16 rounding under bf16
autocast). Token-level heads (QA spans, LM) are padded per batch and never cached.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check
from .callbacks import Callback
from ..data.loaders import EXAMPLE_INDEX
from .evaluate import model_inputs, output_heads

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
    kept in ``self.last_kd`` (a detached 0-d tensor, no device sync) for logging.  ``cache_logits``:
    see the module docstring; ``teacher_examples`` / ``cached_examples`` count the examples the
    teacher ran on and those served from the cache.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 1.0, temperature: float = 2.0,
                 scale_task_loss: bool = False, regression: bool | None = None, cache_logits: bool = True):
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
        self.cache_logits = bool(cache_logits)
        self._logits: torch.Tensor | None = None  # [examples, classes] float32, row i = example i's teacher logits
        self._seen: torch.Tensor | None = None  # [examples] bool: which rows hold logits
        self._uncacheable = False
        self.teacher_examples = 0
        self.cached_examples = 0

    def _prepare_teacher(self, trainer) -> None:
        check(self.teacher is not trainer.unwrapped_model, "the teacher must not be the student itself")
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self._device = trainer.accelerator.device
        self.teacher.to(self._device)

    def on_train_begin(self, trainer) -> None:
        self._clear()  # a phase never reads another phase's rows (they may index another dataset)
        self._prepare_teacher(trainer)

    def _run_teacher(self, trainer, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        self.teacher.eval()
        with torch.no_grad(), trainer.accelerator.autocast():
            heads = output_heads(self.teacher(**inputs))
        self.teacher_examples += next(iter(heads.values())).shape[0]
        return heads

    def _store(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Rows ``index`` of the cache (grown by doubling to the largest index seen) := ``logits``."""
        need = int(index.max()) + 1
        if self._logits is None or need > self._logits.shape[0]:
            size = max(need, 2 * (0 if self._logits is None else self._logits.shape[0]))
            grown = torch.zeros(size, logits.shape[1], device=logits.device, dtype=torch.float32)
            seen = torch.zeros(size, device=logits.device, dtype=torch.bool)
            if self._logits is not None:
                grown[: self._logits.shape[0]] = self._logits
                seen[: self._seen.shape[0]] = self._seen
            self._logits, self._seen = grown, seen
        self._logits[index] = logits.float()
        self._seen[index] = True

    def _teacher_heads(self, trainer, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The teacher's heads for ``batch``: from the cache for the examples already seen, from a
        teacher forward on the others (only those rows)."""
        index = batch.get(EXAMPLE_INDEX) if self.cache_logits and not self._uncacheable else None
        if index is None:
            return self._run_teacher(trainer, model_inputs(batch))
        n = index.shape[0]
        missing = torch.ones(n, dtype=torch.bool, device=index.device)
        if self._seen is not None:
            index = index.to(self._seen.device)
            inside = index < self._seen.shape[0]
            missing = ~(self._seen[index.clamp(max=self._seen.shape[0] - 1)] & inside)
        n_missing = int(missing.sum())
        if n_missing:
            inputs = model_inputs(batch)
            if n_missing < n:  # only the rows not cached yet
                rows = missing.to(next(iter(inputs.values())).device)
                inputs = {k: v[rows] if torch.is_tensor(v) and v.dim() and v.shape[0] == n else v
                          for k, v in inputs.items()}
            heads = self._run_teacher(trainer, inputs)
            if set(heads) != {"logits"} or heads["logits"].dim() != 2:  # token-level heads: never cached
                self._uncacheable = True
                return heads
            self._store(index[missing.to(index.device)], heads["logits"])
            if n_missing == n:
                return heads
        self.cached_examples += n - n_missing
        return {"logits": self._logits[index]}

    def _clear(self) -> None:
        self._logits = self._seen = None
        self._uncacheable = False

    def on_train_end(self, trainer) -> None:
        self._clear()

    def _is_regression(self, trainer, logits: torch.Tensor) -> bool:
        if self.regression is not None:
            return self.regression
        task_reg = getattr(getattr(trainer, "task", None), "is_regression", None)
        return bool(task_reg) if task_reg is not None else logits.shape[-1] == 1

    def compute_loss(self, trainer, batch: dict[str, Any], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        if self._device is None:
            self._prepare_teacher(trainer)
        t_heads = self._teacher_heads(trainer, batch)
        s_heads = output_heads(outputs)
        reg = self._is_regression(trainer, next(iter(s_heads.values())))
        kd = sum(distillation_loss(s_heads[k], t_heads[k], self.temperature, reg) for k in s_heads) / len(s_heads)
        self.last_kd = kd.detach()
        task_weight = (1.0 - self.alpha) if self.scale_task_loss else 1.0
        return task_weight * loss + self.alpha * kd.to(loss.dtype)
