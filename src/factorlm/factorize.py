"""One-shot factorization of a model's target layers (structure- and decomposition-agnostic).

    plan = budget_plan(model, targets, keep=0.25)              # {name: {"rank": 64}}
    accounting = factorize(model, plan, "lowrank", decompose)  # swaps nn.Linear -> LowRankLinear

``decompose`` is ``None`` (the structure's default: truncated SVD per matrix / per block), one
callable ``f(W, knob, **kw) -> factors`` for all layers, or ``{name: callable}`` (e.g. FWSVD with
each layer's own Fisher importance, sparsity-aware SVD with each layer's own mask).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from torch import nn

from .errors import FactorLMError, check
from .layers.base import STRUCTURES, FactorizedLinear
from .models.surgery import count_params, get_module, set_module, target_shapes
from .ranks.budget import Accounting, fixed_plan, uniform_plan

Decompose = Callable[..., Any]


def structure_class(structure: str | type[FactorizedLinear]) -> type[FactorizedLinear]:
    return STRUCTURES.get(structure) if isinstance(structure, str) else structure


def budget_plan(
    model: nn.Module,
    targets: list[str],
    *,
    keep: float | None = None,
    rank: int | None = None,
    structure: str | type[FactorizedLinear] = "lowrank",
    **fixed: Any,
) -> dict[str, dict[str, Any]]:
    """Structure parameters per target: uniform knob that fits ``keep``, or the explicit ``rank``."""
    cls = structure_class(structure)
    shapes = target_shapes(model, targets)
    if rank is not None:
        return fixed_plan(shapes, cls, rank, **fixed)
    check(keep is not None, "give either --keep or --rank")
    return uniform_plan(shapes, keep, cls, **fixed)


def dense_target_weights(model: nn.Module, targets: list[str]) -> int:
    return sum(o * i for o, i in target_shapes(model, targets).values())


def factorize(
    model: nn.Module,
    plan: Mapping[str, Mapping[str, Any]],
    structure: str | type[FactorizedLinear] = "lowrank",
    decompose: Decompose | Mapping[str, Decompose] | None = None,
) -> Accounting:
    """Replace every ``nn.Linear`` named in ``plan`` by ``structure.from_linear(linear, **plan[name])``."""
    cls = structure_class(structure)
    names = list(plan)
    before_model = count_params(model)
    before_targets = dense_target_weights(model, names)
    after_targets = 0
    for name in names:
        linear = get_module(model, name)
        check(isinstance(linear, nn.Linear), f"{name} is not an nn.Linear (already factorized?)")
        fn = decompose.get(name) if isinstance(decompose, Mapping) else decompose
        kwargs = dict(plan[name])
        if fn is not None:
            kwargs["decompose"] = fn
        try:
            new = cls.from_linear(linear, **kwargs)
        except FactorLMError as e:  # e.g. a rank out of range: say which module
            raise FactorLMError(f"{name}: {e}") from None
        set_module(model, name, new)
        after_targets += new.weight_params()
    return Accounting(before_targets, after_targets, before_model, count_params(model))
