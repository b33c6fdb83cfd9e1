"""Staged factorization: factorize groups of layers one after another, training in between.

Instead of replacing every target matrix at once (one big jump in the loss landscape), layers are
factorized stage by stage - bottom-up or top-down, one encoder layer or a group of consecutive
layers per stage - and the model is fine-tuned for a while after each stage so the remaining
dense layers can absorb the error.  Works with every structure and decomposition, because it only
splits the plan given to :func:`factorlm.factorize.factorize`.  Each stage's score is recorded as
phase ``stage<i>`` so instability shows in the report.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import nn

from .factorize import Decompose, factorize
from .ranks.budget import Accounting

_LAYER = re.compile(r"\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def stage_groups(names: list[str], stages: int = 0, order: str = "bottom_up") -> list[list[str]]:
    """Split target names into stages of consecutive layers (names without a layer index go last)."""
    layers = sorted({i for n in names if (i := layer_index(n)) is not None})
    if order == "top_down":
        layers = layers[::-1]
    n = len(layers) if stages <= 0 else min(stages, max(1, len(layers)))
    chunks = [layers[round(k * len(layers) / n): round((k + 1) * len(layers) / n)] for k in range(n)] if layers else []
    groups = [[nm for nm in names if layer_index(nm) in set(chunk)] for chunk in chunks]
    rest = [nm for nm in names if layer_index(nm) is None]
    if rest:
        groups.append(rest)
    return [g for g in groups if g]


def staged_factorize(
    session,
    model: nn.Module,
    plan: Mapping[str, Mapping[str, Any]],
    structure,
    decompose: Decompose | Mapping[str, Decompose] | None = None,
) -> Accounting:
    c = session.config
    groups = stage_groups(list(plan), c.stages, c.stage_order)
    epochs = c.stage_epochs or c.epochs / len(groups)
    total = None
    for i, group in enumerate(groups, 1):
        acc = factorize(model, {n: plan[n] for n in group}, structure, decompose)
        first, last = layer_index(group[0]), layer_index(group[-1])
        session.log(f"[stage {i}/{len(groups)}] factorized {len(group)} matrices (layers {first}..{last})")
        session.finetune(model, phase=f"stage{i}", epochs=epochs)
        total = acc if total is None else Accounting(
            total.target_weights_before + acc.target_weights_before,
            total.target_weights_after + acc.target_weights_after,
            total.model_params_before, acc.model_params_after,
        )
    return total


def run_factorize(session, model, plan, structure, decompose=None) -> Accounting:
    """One-shot or staged according to ``--schedule``."""
    from collections.abc import Mapping

    from .factorize import structure_class

    if decompose is not None:  # matrix-level fits (fwsvd, sparsity-aware): the structure applies them its way
        cls = structure_class(structure)
        decompose = ({n: cls.lift_decompose(f) for n, f in decompose.items()} if isinstance(decompose, Mapping)
                     else cls.lift_decompose(decompose))
    if session.config.schedule == "staged":
        return staged_factorize(session, model, plan, structure, decompose)
    return factorize(model, plan, structure, decompose)
