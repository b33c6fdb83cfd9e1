"""Parameter budgets: which structure parameters fit ``keep`` x the target layers' weights.

Every structure exposes one integer *knob* that grows its size (low-rank: ``rank``; Monarch:
``block_rank``; block-wise: ``block_rank``), plus ``weight_params_for(out, in, knob=..., **fixed)``
and ``knob_max(out, in, **fixed)``.  The default (uniform) policy picks the **largest single knob
value shared by all target matrices** whose total factorized weight count is at most
``keep * (sum of the dense target weights)`` - the LPAF convention.  For low rank that is

    k = floor(keep * sum_i m_i n_i / sum_i (m_i + n_i))

e.g. BERT-base 0.5 / 0.25 / 0.16 -> k = 256 / 128 / 81 and MiniLM-L6 -> 128 / 64 / 40.
Biases are not part of the budget (they are kept as they are).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import FactorLMError, check


def check_keep(keep: float) -> float:
    try:
        keep = float(keep)
    except (TypeError, ValueError):
        raise FactorLMError(f"--keep must be a number in (0, 1], got {keep!r}") from None
    check(0.0 < keep <= 1.0, f"--keep must be in (0, 1] (fraction of target parameters kept), got {keep}")
    return keep


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest rank whose factors ``k (in + out)`` are no more than the dense ``in * out`` weights."""
    return out_features * in_features // (out_features + in_features)


def past_break_even(out_features: int, in_features: int, rank: int) -> bool:
    """True when rank-``rank`` factors need at least as many weights as the dense matrix (store it dense)."""
    return rank * (in_features + out_features) >= in_features * out_features


def stored_weights(out_features: int, in_features: int, rank: int) -> int:
    """Weights of a rank-``rank`` matrix stored the cheaper way: factors, or dense past break-even."""
    return min(rank * (in_features + out_features), in_features * out_features)


def _params(cls, shape, knob: int, fixed: dict[str, Any]) -> int:
    out_f, in_f = shape
    return cls.weight_params_for(out_f, in_f, **{cls.budget_knob: min(knob, cls.knob_max(out_f, in_f, **fixed))}, **fixed)


def uniform_plan(
    shapes: dict[str, tuple[int, int]],
    keep: float,
    structure_cls,
    **fixed: Any,
) -> dict[str, dict[str, Any]]:
    """Largest shared knob whose total factorized weights fit ``keep`` of the dense total.

    Returns ``{module name: {knob: value, **fixed}}``; per-matrix values are clamped to the
    structure's maximum for that shape.  Raises FactorLMError if even knob = 1 does not fit.
    """
    keep = check_keep(keep)
    check(len(shapes) > 0, "no target layers to factorize (check --include/--exclude patterns)")
    budget = keep * sum(o * i for o, i in shapes.values())
    hi = max(structure_cls.knob_max(o, i, **fixed) for o, i in shapes.values())
    total = lambda k: sum(_params(structure_cls, s, k, fixed) for s in shapes.values())  # noqa: E731
    if total(1) > budget:
        raise FactorLMError(
            f"--keep {keep} is too small for structure {structure_cls.structure!r}: even "
            f"{structure_cls.budget_knob}=1 needs {total(1) / (budget / keep):.4f} of the target parameters"
        )
    lo = 1
    while lo < hi:  # total() is non-decreasing in the knob
        mid = (lo + hi + 1) // 2
        if total(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return {
        name: {structure_cls.budget_knob: min(lo, structure_cls.knob_max(o, i, **fixed)), **fixed}
        for name, (o, i) in shapes.items()
    }


def fixed_plan(shapes: dict[str, tuple[int, int]], structure_cls, knob: int, **fixed: Any) -> dict[str, dict[str, Any]]:
    """The same explicit knob (e.g. ``--rank K``) for every matrix; errors if it is out of range."""
    check(int(knob) == knob and knob >= 1, f"--{structure_cls.budget_knob.replace('_', '-')} must be a positive integer, got {knob}")
    plan = {}
    for name, (o, i) in shapes.items():
        mx = structure_cls.knob_max(o, i, **fixed)
        check(knob <= mx, f"{structure_cls.budget_knob} {knob} is larger than the maximum {mx} for {name} ({o}x{i})")
        plan[name] = {structure_cls.budget_knob: int(knob), **fixed}
    return plan


def plan_params(shapes: dict[str, tuple[int, int]], plan: dict[str, dict[str, Any]], structure_cls) -> int:
    return sum(structure_cls.weight_params_for(*shapes[n], **p) for n, p in plan.items())


@dataclass
class Accounting:
    """Exact parameter accounting of a compression (weights of target layers, and the whole model)."""

    target_weights_before: int
    target_weights_after: int
    model_params_before: int
    model_params_after: int

    @property
    def target_ratio(self) -> float:
        return self.target_weights_after / self.target_weights_before if self.target_weights_before else 1.0

    @property
    def model_ratio(self) -> float:
        return self.model_params_after / self.model_params_before if self.model_params_before else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_ratio": self.target_ratio, "model_ratio": self.model_ratio}

    def lines(self) -> list[str]:
        return [
            f"target weights : {self.target_weights_before:>12,} -> {self.target_weights_after:>12,}  ({self.target_ratio:.2%} kept)",
            f"model params   : {self.model_params_before:>12,} -> {self.model_params_after:>12,}  ({self.model_ratio:.2%} kept)",
        ]


def ratio_plan(shapes: dict[str, tuple[int, int]], keep: float, multiple: int = 1) -> dict[str, int]:
    """Low-rank ranks that keep the same share ``keep`` of **every** matrix (SVD-LLM's and ASVD's
    "compression ratio" convention): ``k = floor(keep * out * in / (out + in))``, so no matrix goes
    past its break-even rank, rounded down to a multiple of ``multiple`` (at least one multiple, or
    1, when the share is smaller).  Unlike :func:`uniform_plan` (one rank shared by every matrix),
    narrow matrices such as grouped-query k/v projections keep their own share."""
    keep = check_keep(keep)
    check(len(shapes) > 0, "no target layers to factorize (check --include/--exclude patterns)")
    check(multiple >= 1, f"rank multiple must be >= 1, got {multiple}")
    out = {}
    for name, (o, i) in shapes.items():
        k = math.floor(keep * o * i / (o + i))
        out[name] = round_rank(max(k, 1), multiple, break_even_rank(o, i))
    return out


def round_rank(rank: int, multiple: int, cap: int | None = None) -> int:
    """``rank`` rounded down to a multiple of ``multiple`` (a smaller rank stays as it is: rounding
    never takes a matrix to rank 0), never above ``cap``."""
    r = int(rank)
    if multiple > 1 and r >= multiple:
        r -= r % multiple
    if cap is not None:
        r = min(r, max(1, cap))
    return max(1, r)
