"""Staged factorization: factorize groups of layers one after another, training in between.

Instead of replacing every target matrix at once (one big jump in the loss landscape), layers are
factorized stage by stage - bottom-up or top-down, one encoder layer or a group of consecutive
layers per stage - and the model is fine-tuned for a while after each stage so the remaining
dense layers can absorb the error.  Works with every structure and decomposition, because it only
splits the plan given to :func:`factorlm.factorize.factorize`.  Each stage's score is recorded as
phase ``stage<i>`` so instability shows in the report.

Decompositions that depend on the model (FWSVD's Fisher information) are passed as a
:class:`DecomposeFactory`: it is called at the start of every stage, on the model as the previous
stages' fine-tuning left it, for that stage's matrices only (and once, for all matrices, one-shot).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence, Union

from torch import nn

from .factorize import Decompose, factorize
from .ranks.budget import Accounting

_LAYER = re.compile(r"\.(\d+)\.")


DecomposeArg = Union[Decompose, Mapping[str, Decompose], None]


class DecomposeFactory:
    """Decomposition functions made from the model *as it is when a factorization step starts*.

    ``make(model, names)`` returns what :func:`factorlm.factorize.factorize` takes as ``decompose``
    for the matrices ``names``: ``None`` (the structure's default), one callable
    ``f(W, knob, **kw) -> factors``, or ``{name: f}``.  :func:`run_factorize` calls it once with every
    planned name (one-shot), or at the start of each stage with that stage's names, after the previous
    stages' fine-tuning (staged), so a data-dependent fit (FWSVD's Fisher information) is computed on
    the current weights and only for the matrices about to be factorized.

    A plain callable or a mapping passed as ``decompose`` keeps its meaning: fixed functions made
    before factorizing (in staged mode the same ones serve every stage).  The wrapper class, rather
    than a bare two-argument callable, is what tells the two protocols apart.
    """

    def __init__(self, make: Callable[[nn.Module, list[str]], DecomposeArg]):
        self.make = make

    def __call__(self, model: nn.Module, names: list[str]) -> DecomposeArg:
        return self.make(model, list(names))

    def map(self, fn: Callable[[Decompose], Decompose]) -> "DecomposeFactory":
        """This factory with ``fn`` applied to every function it makes (e.g. a structure's ``lift_decompose``)."""
        return DecomposeFactory(lambda model, names: map_decompose(fn, self(model, names)))


def map_decompose(fn: Callable[[Decompose], Decompose], decompose: DecomposeArg) -> DecomposeArg:
    """``fn`` applied to one decomposition function or to each of a mapping's; ``None`` stays ``None``."""
    if decompose is None:
        return None
    if isinstance(decompose, Mapping):
        return {n: fn(f) for n, f in decompose.items()}
    return fn(decompose)


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
    decompose: DecomposeArg | DecomposeFactory = None,
    callbacks: Sequence[Any] = (),
) -> Accounting:
    """Factorize ``plan`` stage by stage (``--stages``, ``--stage-order``), fine-tuning after each stage.

    ``decompose`` is used as :func:`factorlm.factorize.factorize` uses it; a :class:`DecomposeFactory`
    is called at the start of each stage with the model as it is then and that stage's names.
    ``callbacks`` (e.g. the method's distillation) go to every stage's fine-tune, so a staged run gets
    the same distillation over all its steps as a one-shot run over its fine-tune.
    """
    c = session.config
    groups = stage_groups(list(plan), c.stages, c.stage_order)
    epochs = c.stage_epochs or c.epochs / len(groups)
    total = None
    for i, group in enumerate(groups, 1):
        fns = decompose(model, group) if isinstance(decompose, DecomposeFactory) else decompose
        acc = factorize(model, {n: plan[n] for n in group}, structure, fns)
        first, last = layer_index(group[0]), layer_index(group[-1])
        session.log(f"[stage {i}/{len(groups)}] factorized {len(group)} matrices (layers {first}..{last})")
        session.finetune(model, phase=f"stage{i}", epochs=epochs, callbacks=callbacks)
        total = acc if total is None else Accounting(
            total.target_weights_before + acc.target_weights_before,
            total.target_weights_after + acc.target_weights_after,
            total.model_params_before, acc.model_params_after,
        )
    return total


def run_factorize(session, model, plan, structure, decompose: DecomposeArg | DecomposeFactory = None,
                  callbacks: Sequence[Any] = ()) -> Accounting:
    """One-shot or staged according to ``--schedule``.

    ``decompose``: ``None``, one matrix-level fit ``f(W, rank, **kw) -> (A, B)``, ``{name: f}``, or a
    :class:`DecomposeFactory` (called once one-shot, per stage staged).  Every function is passed
    through the structure's ``lift_decompose`` so block structures apply it their way.
    """
    from .factorize import structure_class

    if decompose is not None:  # matrix-level fits (fwsvd, sparsity-aware): the structure applies them its way
        lift = structure_class(structure).lift_decompose
        decompose = decompose.map(lift) if isinstance(decompose, DecomposeFactory) else map_decompose(lift, decompose)
    if session.config.schedule == "staged":
        acc = staged_factorize(session, model, plan, structure, decompose, callbacks)
    else:
        if isinstance(decompose, DecomposeFactory):
            decompose = decompose(model, list(plan))
        acc = factorize(model, plan, structure, decompose)
    return _with_kept_dense(session, model, acc)


def _with_kept_dense(session, model, acc: Accounting) -> Accounting:
    """Targets kept dense (by ``--skip-slow``, or past break-even in a ``--ranks`` file) are still
    targets: their weights count on both sides."""
    from dataclasses import replace

    from .models.surgery import target_shapes

    kept = list(getattr(session, "plan_dense", None) or [])  # --ranks: past break-even, never factorized
    kept += (getattr(session, "speed_check", None) or {}).get("kept_dense") or []
    if not kept:
        return acc
    w = sum(o * i for o, i in target_shapes(model, kept).values())
    return replace(acc, target_weights_before=acc.target_weights_before + w,
                   target_weights_after=acc.target_weights_after + w)
