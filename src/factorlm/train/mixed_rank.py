"""Mixed-rank fine-tuning (LPAF step 3, Ren & Zhu, LREC-COLING 2024) as a :class:`Callback`.

The model's factorized matrices are wrapped in
:class:`~factorlm.layers.mixed_rank.MixedRankLinear`: in each training forward every matrix
independently uses its frozen pruned dense twin with probability ``p`` and its trainable
factorization otherwise.  This callback

1. anneals ``p`` linearly: ``p_t = max(0, p_init - d * t)`` at ``on_step_begin``
   (``t = trainer.state.step``); with ``decay=None``, ``d = p_init / (zero_at * total_steps)`` so
   ``p`` reaches 0 after a fraction ``zero_at`` of training (default half) and the second half
   trains the purely factorized network that will be deployed;
2. adds a consistency term: a second forward on the same batch (independent switch draws, and
   independent dropout) gives ``y2``; with ``y1`` the logits already in ``outputs``

       loss <- loss + lambda * D(y1, y2),
       D = 1/2 [KL(P1 || P2) + KL(P2 || P1)]   (classification, softmax over the last dim, batch mean;
                                               ``divergence="kl"`` for KL(P1 || P2) only)
       D = MSE(y1, y2)                         (regression)

   Gradients flow through both forwards (as in R-Drop), pulling the sub-networks that use
   different dense/factorized mixes to agree, so that the factorized network inherits the dense
   twins' behaviour.  QA models (``start_logits`` / ``end_logits``) average ``D`` over the two heads
   (a softmax over the tokens each), as their span loss averages the start and end cross-entropies.
   When ``p == 0`` both draws are the same network, so the second forward is skipped
   (the term is ~0 in expectation up to dropout noise); ``consistency_weight=0`` disables it
   entirely (ablation).

Defaults: ``p_init = 0.5`` -- a fair coin per matrix maximises the diversity of sampled dense/
factorized mixes (the variance of each switch) while still training every factorized matrix in
half the forwards at the start; ``zero_at = 0.5``; ``consistency_weight = 1.0``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import check
from ..layers.mixed_rank import MixedRankLinear, mixed_rank_layers
from .callbacks import Callback
from .evaluate import model_inputs, output_heads

__all__ = ["MixedRankCallback", "consistency_loss", "mixed_rank_p"]

DIVERGENCES = ("symmetric_kl", "kl")


def mixed_rank_p(step: int, total_steps: int, p_init: float = 0.5, decay: float | None = None,
                 zero_at: float = 0.5) -> float:
    """``max(0, p_init - d * step)`` with ``d = decay`` or, if ``None``, ``p_init / (zero_at * total_steps)``."""
    check(0.0 <= p_init <= 1.0, f"p_init must be in [0, 1], got {p_init}")
    if decay is None:
        check(0.0 < zero_at, f"zero_at must be > 0, got {zero_at}")
        check(total_steps >= 1, f"total_steps must be >= 1, got {total_steps}")
        decay = p_init / (zero_at * total_steps)
    check(decay >= 0, f"decay must be >= 0, got {decay}")
    return float(max(0.0, p_init - decay * step))


def consistency_loss(y1: torch.Tensor, y2: torch.Tensor, regression: bool = False,
                     divergence: str = "symmetric_kl") -> torch.Tensor:
    """``D(y1, y2)`` between two forwards' logits (see module doc), a float32 0-d tensor."""
    check(divergence in DIVERGENCES, f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    a, b = y1.float(), y2.float()
    if regression:
        return F.mse_loss(a, b)
    a = F.log_softmax(a.reshape(-1, a.shape[-1]), dim=-1)
    b = F.log_softmax(b.reshape(-1, b.shape[-1]), dim=-1)
    kl_ab = F.kl_div(b, a, reduction="batchmean", log_target=True)  # KL(P1 || P2)
    if divergence == "kl":
        return kl_ab
    kl_ba = F.kl_div(a, b, reduction="batchmean", log_target=True)  # KL(P2 || P1)
    return 0.5 * (kl_ab + kl_ba)


class MixedRankCallback(Callback):
    """Anneal the dense-twin probability ``p`` of every MixedRankLinear and add the consistency loss.

    Args:
        p_init: ``p`` at step 0.
        decay: per-step decrease ``d``; ``None`` = reach 0 at ``zero_at * total_steps``.
        zero_at: fraction of training after which ``p = 0`` (used when ``decay`` is None).
        consistency_weight: ``lambda``; 0 disables the second forward (ablation).
        divergence: ``"symmetric_kl"`` (default) or ``"kl"`` (classification only).
        regression: ``None`` = ``trainer.task.is_regression`` if present, else one logit = regression.
        total_steps: schedule length; ``None`` = ``trainer.state.total_steps``.
        model: the model holding the MixedRankLinear layers; ``None`` = ``trainer.unwrapped_model``
            (or ``trainer.model``).
    """

    def __init__(self, p_init: float = 0.5, decay: float | None = None, zero_at: float = 0.5,
                 consistency_weight: float = 1.0, divergence: str = "symmetric_kl",
                 regression: bool | None = None, total_steps: int | None = None, model=None):
        check(0.0 <= p_init <= 1.0, f"p_init must be in [0, 1], got {p_init}")
        check(decay is None or decay >= 0, f"decay must be >= 0, got {decay}")
        check(zero_at > 0, f"zero_at must be > 0, got {zero_at}")
        check(consistency_weight >= 0, f"consistency_weight must be >= 0, got {consistency_weight}")
        check(divergence in DIVERGENCES, f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.p_init = float(p_init)
        self.decay = decay
        self.zero_at = float(zero_at)
        self.consistency_weight = float(consistency_weight)
        self.divergence = divergence
        self.regression = regression
        self.total_steps = total_steps
        self.model = model
        self.p = self.p_init
        #: last consistency value (detached 0-d tensor) for logging, None if skipped
        self.last_consistency: torch.Tensor | None = None

    # -- helpers ------------------------------------------------------------------------------
    def _layers(self, trainer) -> dict[str, MixedRankLinear]:
        model = self.model if self.model is not None else getattr(trainer, "unwrapped_model", trainer.model)
        return mixed_rank_layers(model)

    def p_at(self, step: int) -> float:
        check(self.total_steps is not None or self.decay is not None,
              "MixedRankCallback.total_steps is unknown (pass it or run inside a Trainer)")
        return mixed_rank_p(step, self.total_steps or 1, self.p_init, self.decay, self.zero_at)

    def set_p(self, trainer, p: float) -> None:
        self.p = float(p)
        for m in self._layers(trainer).values():
            m.p = self.p

    def _is_regression(self, trainer, logits: torch.Tensor) -> bool:
        if self.regression is not None:
            return self.regression
        task_reg = getattr(getattr(trainer, "task", None), "is_regression", None)
        return bool(task_reg) if task_reg is not None else logits.shape[-1] == 1

    # -- hooks --------------------------------------------------------------------------------
    def on_train_begin(self, trainer) -> None:
        if self.total_steps is None and self.decay is None:
            self.total_steps = int(trainer.state.total_steps)
        check(bool(self._layers(trainer)), "mixed-rank fine-tuning needs MixedRankLinear layers (see wrap_mixed_rank)")
        self.set_p(trainer, self.p_at(int(trainer.state.step)))

    def on_step_begin(self, trainer) -> None:
        if self.total_steps is None and self.decay is None:
            self.total_steps = int(trainer.state.total_steps)
        self.set_p(trainer, self.p_at(int(trainer.state.step)))

    def compute_loss(self, trainer, batch: dict[str, Any], outputs: Any, loss: torch.Tensor) -> torch.Tensor:
        self.last_consistency = None
        if self.consistency_weight == 0.0:
            return loss
        layers = self._layers(trainer).values()
        sampling = any(m.force is None and m.training and m.p > 0 for m in layers)
        forced = any(m.force is not None for m in layers)
        if not (sampling or forced):  # p == 0: both forwards would be the same factorized network
            return loss
        outputs2 = trainer.model(**model_inputs(batch))
        h1, h2 = output_heads(outputs), output_heads(outputs2)
        reg = self._is_regression(trainer, next(iter(h1.values())))
        div = sum(consistency_loss(h1[k], h2[k], reg, self.divergence) for k in h1) / len(h1)
        self.last_consistency = div.detach()
        return loss + self.consistency_weight * div.to(loss.dtype)

    def on_train_end(self, trainer) -> None:
        self.set_p(trainer, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"p": self.p}
