"""Unstructured pruning as a method of its own (``factorlm prune`` / ``--method prune``) and as
LPAF's step 1.  First-order movement pruning (UP_first) or magnitude pruning (UP_zero) of every
target matrix to ``density`` kept entries with the cubic schedule of movement pruning, optionally
distilled from the dense teacher; the result is a normal model with zeros plus its masks and
importance scores (``pruning.safetensors``) so factorization can start from it later."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import check
from ..models.surgery import count_params, get_module, target_shapes
from ..ranks.budget import Accounting
from .base import Method, MethodResult, register_method
from .common import targets_for

PRUNING_FILE = "pruning.safetensors"


@dataclass
class PruneOptions:
    importance: str = "sensitivity"  # first-order (UP_first): sensitivity (PLATON) | movement; zero-order (UP_zero): magnitude
    density: float = 0.0  # fraction of target weights kept after pruning; 0 = default_density(keep)
    prune_epochs: float = 0.0  # 0 = --epochs
    prune_warmup: float = 0.1  # fraction of pruning steps at full density before the cubic ramp
    prune_cooldown: float = 0.2  # fraction of pruning steps at the final density
    prune_scope: str = "per_matrix"  # per_matrix | global top-k
    distill: float = 1.0  # weight of the KL-to-teacher term while pruning (0 = off)


def pruning_density(options, keep: float | None) -> float:
    from ..prune import default_density

    if options.density:
        check(0 < options.density <= 1, f"--density must be in (0, 1], got {options.density}")
        return float(options.density)
    check(keep is not None, "pruning needs --density or --keep")
    return float(default_density(keep))


def run_pruning(session, model: nn.Module, targets: list[str], options, keep: float | None):
    """Prune ``model`` in place; returns ``(masks, scores, density)`` and records the "pruned" phase."""
    from ..prune import Pruner, prune_once
    from ..train import DistillationCallback

    density = pruning_density(options, keep)
    check(options.prune_scope in ("per_matrix", "global"), f"--prune-scope must be per_matrix or global, got {options.prune_scope!r}")
    if options.importance == "magnitude" and not options.prune_epochs:
        # zero-order one-shot baseline: no gradient information needed
        session.log(f"[prune] magnitude pruning to density {density:g} (one shot)")
        masks, scores = prune_once(model, targets, "magnitude", density, scope=options.prune_scope)
    else:
        session.log(f"[prune] {options.importance} pruning to density {density:g}, cubic schedule")
        callbacks = []
        if options.distill > 0:
            teacher = copy.deepcopy(model).eval()
            callbacks.append(DistillationCallback(teacher, alpha=options.distill))
        pruner = Pruner(model, targets, options.importance, density, warmup_steps=options.prune_warmup,
                        cooldown_steps=options.prune_cooldown, scope=options.prune_scope)
        # keep_best=False: an earlier (denser) checkpoint must not come back at the end
        session.finetune(model, phase="prune", callbacks=[pruner, *callbacks],
                         epochs=options.prune_epochs or None, keep_best=False)
        masks, scores = pruner.finalize()
        del callbacks
    session.evaluate(model, phase="pruned")
    return masks, scores, density


def pruning_file_writer(masks, scores, density):
    from ..prune import save_pruning_state

    return lambda path: save_pruning_state(str(path), masks, scores, metadata={"density": str(density)})


@register_method("prune")
class PruneMethod(Method):
    summary = "unstructured pruning: movement (first-order) or magnitude, cubic schedule (LPAF step 1)"

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
