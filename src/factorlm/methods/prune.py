"""Unstructured pruning as a method of its own (``factorlm prune`` / ``--method prune``) and as
LPAF's step 1 (UP_first).

* *Papers*: movement pruning -- Sanh, Wolf & Rush, NeurIPS 2020, https://arxiv.org/abs/2005.07683;
  PLATON -- Zhang et al., ICML 2022, https://arxiv.org/abs/2206.12562; gradual magnitude pruning --
  Zhu & Gupta 2017, https://arxiv.org/abs/1710.01878.  Criteria and mask mechanics:
  :mod:`factorlm.prune.importance`, :mod:`factorlm.prune.pruner`.
* *As published*: every target matrix is pruned to ``density`` kept entries on the cubic schedule
  (``--prune-warmup`` / ``--prune-cooldown`` fractions at full / final density), optionally
  distilled from the dense teacher (Sanh et al. distil too).  ``movement``: learned scores, hard
  top-k, masked weight gradient, per-matrix top-k; ``platon``: EMA sensitivity x uncertainty, one
  global threshold, weights zeroed every 10 steps.
* *Differs here*: ``--prune-scope`` and ``--prune-every`` can override each criterion's published
  scope / period; ``sensitivity`` is factorlm's earlier variant (PLATON's score with a per-matrix
  straight-through masked forward), not a published method; ``magnitude`` without
  ``--prune-epochs`` is one-shot (the UP_zero ablation needs no training).
* *Defaults and why*: ``--importance platon``, chosen by measurement (issue 11, part 3;
  ``benchmarks/premise.py``, BENCHMARKS.md "LPAF's premise at scale").  LPAF's step 1 is
  first-order pruning, and both movement and PLATON are first-order criteria.  On MiniLM-L6 / MRPC
  (full training set), pruning to 10% or 25% density over 1 or 3 epochs went as follows:
  movement's learned scores collapsed the model to the majority class in every cell, and its
  matrices were no easier to factorize than the teacher's.  PLATON kept F1 within 0.6-3 points of
  the teacher, and the relative error of the best rank-k fit fell from 0.69 to 0.45-0.59.  Movement
  is Sanh et al.'s published criterion for long schedules (10+ epochs); it stays available as
  ``--importance movement``, with ``--scores-lr 1e-2`` and warm-up 0.1 / cool-down 0.2, Sanh et
  al.'s GLUE settings (1 + 2 of 10 epochs).  ``--distill 1.0``.
* *Lifecycle*: ``run_pruning`` builds a :class:`~factorlm.prune.Pruner` (masks and learned scores
  installed on the model), trains one phase ``prune`` with it (hooks: ``on_step_begin`` updates
  masks, ``on_after_backward`` accumulates gradient scores), then ``Pruner.finalize`` bakes zeros
  into the weights and returns masks + scores, saved as ``pruning.safetensors``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import check
from ..models.surgery import count_params, get_module, target_shapes
from ..ranks.budget import Accounting
from .base import Method, MethodResult, register_method
from .common import targets_for

PRUNING_FILE = "pruning.safetensors"


CRITERIA = ("movement", "platon", "magnitude", "sensitivity")
SCOPES = ("per_matrix", "global")


@dataclass
class PruneOptions:
    importance: str = field(default="platon", metadata={"choices": CRITERIA, "help": (
        "pruning criterion: platon = Zhang et al. 2022 (first-order: EMA sensitivity x uncertainty, global "
        "threshold, weights zeroed; default, chosen by measurement: BENCHMARKS.md), movement = Sanh et al. 2020 "
        "(first-order, learned scores, top-k; needs long schedules), magnitude = |W| (UP_zero), sensitivity = "
        "factorlm's earlier variant (PLATON score, per-matrix straight-through masking)")})
    density: float | None = field(default=None, metadata={"type": float, "help": (
        "fraction of target weights kept after pruning (default: --keep, equal storage)")})
    prune_epochs: float | None = field(default=None, metadata={"type": float, "help": (
        "epochs of the pruning phase (default: --epochs)")})
    prune_warmup: float = field(default=0.1, metadata={"help": "fraction of pruning steps at full density first"})
    prune_cooldown: float = field(default=0.2, metadata={"help": "fraction of pruning steps at the final density last"})
    prune_scope: str | None = field(default=None, metadata={"choices": SCOPES, "help": (
        "top-k per matrix or one global threshold (default: the criterion's paper: movement and magnitude "
        "per_matrix, platon global)")})
    prune_every: int | None = field(default=None, metadata={"type": int, "help": (
        "steps between mask updates during the ramp (default: the criterion's: platon 10, others 1)")})
    scores_lr: float = field(default=1e-2, metadata={"help": "movement: learning rate of the learned scores (Sanh et al.)"})
    distill: float = field(default=1.0, metadata={"help": "weight of the KL-to-teacher term while pruning (0 = off)"})

    def __post_init__(self) -> None:
        check(self.importance in CRITERIA, f"--importance must be one of {', '.join(CRITERIA)}, got {self.importance!r}")
        check(self.density is None or 0 < self.density <= 1, f"--density must be in (0, 1], got {self.density}")
        check(self.prune_epochs is None or self.prune_epochs > 0, f"--prune-epochs must be > 0, got {self.prune_epochs}")
        check(0 <= self.prune_warmup < 1 and 0 <= self.prune_cooldown < 1 and self.prune_warmup + self.prune_cooldown < 1,
              f"--prune-warmup and --prune-cooldown must be fractions in [0, 1) summing to < 1, got "
              f"{self.prune_warmup} and {self.prune_cooldown}")
        check(self.prune_scope is None or self.prune_scope in SCOPES,
              f"--prune-scope must be per_matrix or global, got {self.prune_scope!r}")
        check(self.prune_every is None or self.prune_every >= 1, f"--prune-every must be >= 1, got {self.prune_every}")
        check(self.scores_lr > 0, f"--scores-lr must be > 0, got {self.scores_lr}")
        check(self.distill >= 0, f"--distill must be >= 0, got {self.distill}")


def pruning_density(options, keep: float | None) -> float:
    from ..prune import default_density

    if options.density is not None:
        return float(options.density)
    check(keep is not None, "pruning needs --density or --keep")
    return float(default_density(keep))


def run_pruning(session, model: nn.Module, targets: list[str], options, keep: float | None):
    """Prune ``model`` in place; returns ``(masks, scores, density)`` and records the "pruned" phase."""
    from ..prune import Pruner, prune_once
    from .common import teacher_distillation

    density = pruning_density(options, keep)
    if options.importance == "magnitude" and options.prune_epochs is None:
        # zero-order one-shot baseline: no gradient information needed
        session.log(f"[prune] magnitude pruning to density {density:g} (one shot)")
        masks, scores = prune_once(model, targets, "magnitude", density, scope=options.prune_scope or "per_matrix")
    else:
        callbacks = teacher_distillation(model, options.distill)
        pruner = Pruner(model, targets, options.importance, density, warmup_steps=options.prune_warmup,
                        cooldown_steps=options.prune_cooldown, scope=options.prune_scope,
                        update_every=options.prune_every, scores_lr=options.scores_lr)
        session.log(f"[prune] {options.importance} pruning to density {density:g}, cubic schedule, "
                    f"{pruner.scope} top-k, masks {pruner.application} every {pruner.update_every} step(s)")
        # keep_best=False: an earlier (denser) checkpoint must not come back at the end
        session.finetune(model, phase="prune", callbacks=[pruner, *callbacks], epochs=options.prune_epochs,
                         keep_best=False, param_groups=lambda m: pruner.param_groups(m, session.config.weight_decay))
        masks, scores = pruner.finalize()
        del callbacks
    session.evaluate(model, phase="pruned")
    return masks, scores, density


def pruning_file_writer(masks, scores, density):
    from ..prune import save_pruning_state

    return lambda path: save_pruning_state(str(path), masks, scores, metadata={"density": str(density)})


@register_method("prune")
class PruneMethod(Method):
    uses_plan = False  # no budget plan: the speed check does not apply
    summary = "unstructured pruning: PLATON or movement (first-order) or magnitude, cubic schedule (LPAF step 1)"

    Options = PruneOptions

    def run(self, session, model: nn.Module) -> MethodResult:
        targets = targets_for(session, model)
        dense = sum(o * i for o, i in target_shapes(model, targets).values())
        params = count_params(model)
        masks, scores, density = run_pruning(session, model, targets, self.options, session.config.keep)
        kept = int(sum(int(m.sum()) for m in masks.values()))
        # a sparse model stores its non-zeros (plus their indices): report the non-zero count
        acc = Accounting(dense, kept, params, params - dense + kept)
        for line in acc.lines():
            session.log(line + "   (non-zeros)")
        return MethodResult(model, acc, {"density": density, "nonzero_target_weights": kept},
                            {PRUNING_FILE: pruning_file_writer(masks, scores, density)})


def load_pruned(path: str, targets: list[str], model: nn.Module):
    """Masks and scores saved next to a pruned model by ``--method prune`` (checked against it)."""
    from pathlib import Path

    from ..errors import FactorLMError
    from ..prune import load_pruning_state

    f = Path(path) / PRUNING_FILE
    if not f.is_file():
        raise FactorLMError(f"{path} has no {PRUNING_FILE}: make it with `factorlm prune` (or --method prune)")
    masks, scores = load_pruning_state(str(f))
    missing = [t for t in targets if t not in masks]
    if missing:
        raise FactorLMError(f"{f} has no mask for {missing[0]} (pruned with other --include/--exclude?)")
    for t in targets:
        w = get_module(model, t).weight
        if masks[t].shape != w.shape or bool(((w != 0) & ~masks[t].to(w.device)).any()):
            raise FactorLMError(f"{f} does not match the weights of {t} in {path}")
    return masks, scores, float(torch.cat([masks[t].flatten().float() for t in targets]).mean())
