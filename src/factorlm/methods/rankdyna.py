"""RankDyna (Hua et al., Findings EMNLP 2023): from a *pre-trained* model, one round of fine-tuning
that adapts to the task and compresses at once, moving rank between matrices (one global
importance threshold over all singular triplets).  See :mod:`factorlm.ranks.rankdyna`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from torch import nn

from ..errors import check
from ..layers.svd_masked import MASKING
from ..models.surgery import count_params, target_shapes
from ..ranks.budget import Accounting
from ..ranks.rankdyna import BUDGET_UNITS
from .base import Method, MethodResult, register_method
from .common import targets_for


def _stored_weights(module: nn.Module) -> int:
    """Weights a finalized target layer really stores: ``k (in + out)`` factors or the dense ``in * out``."""
    from ..layers.base import FactorizedLinear

    if isinstance(module, FactorizedLinear):
        return module.weight_params()
    return module.weight.numel()


@register_method("rankdyna")
class RankDynaMethod(Method):
    uses_plan = False  # no budget plan: the speed check does not apply
    needs_teacher = False
    summary = "dynamic rank allocation during one fine-tune (RankDyna, Hua et al. 2023)"

    @dataclass
    class Options:
        init_rank: int = field(default=0, metadata={
            "help": "starting rank of every matrix's SVD re-parameterisation; 0 = full rank (same function)"})
        warmup: float = field(default=0.1, metadata={
            "help": "fraction of steps (or a step count >= 1) before the first triplet is removed"})
        final: float = field(default=0.2, metadata={
            "help": "fraction of steps (or a step count >= 1) at the target budget, allocation fixed"})
        delta_t: int = field(default=10, metadata={"help": "steps between re-allocations"})
        orth_reg: float = field(default=0.1, metadata={"help": "weight of the U/V orthogonality regulariser"})
        budget_unit: str = field(default="triplets", metadata={
            "help": "triplets: the paper's budget, the uniform plan's rank total at --keep spent on the globally "
                    "best singular triplets (kept weights may differ from --keep, reported); weights: each "
                    "triplet costs its in+out weights, kept weights <= --keep",
            "choices": BUDGET_UNITS})
        masking: str = field(default="zero", metadata={
            "help": "zero: the paper, removed singular values are set to 0 and may come back; mask: a buffer "
                    "mask, removed triplets get no gradient and are frozen out once their smoothed score has decayed",
            "choices": MASKING})
        min_one: bool = field(default=True, metadata={
            "help": "keep at least one triplet per matrix (false: the paper, a matrix may reach rank 0)"})
        densify: bool = field(default=True, metadata={
            "help": "store a matrix whose kept rank is past break-even, k(in+out) >= in*out, dense"})
        balanced: bool = field(default=True, metadata={
            "help": "truncated factors A = U sqrt|s|, B = sqrt|s| V (false: A = U s, B = V; same function)"})

        def __post_init__(self) -> None:
            check(self.init_rank >= 0, f"--init-rank must be >= 0 (0 = full rank), got {self.init_rank}")
            check(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
            check(self.final >= 0, f"--final must be >= 0, got {self.final}")
            check(self.delta_t >= 1, f"--delta-t must be >= 1, got {self.delta_t}")
            check(self.orth_reg >= 0, f"--orth-reg must be >= 0, got {self.orth_reg}")
            check(self.budget_unit in BUDGET_UNITS,
                  f"--budget-unit must be one of {', '.join(BUDGET_UNITS)}, got {self.budget_unit!r}")
            check(self.masking in MASKING, f"--masking must be one of {', '.join(MASKING)}, got {self.masking!r}")

    def run(self, session, model: nn.Module) -> MethodResult:
        from ..ranks.rankdyna import RankDynaCallback, plot_budget, plot_ranks, to_svd_linear

        c = session.config
        check(c.structure == "lowrank", "rankdyna produces low-rank layers: use --structure lowrank")
        check(c.rank is None and c.keep is not None, "rankdyna allocates ranks itself: give --keep, not --rank")
        o = self.options
        targets = targets_for(session, model)
        dense_w = sum(a * b for a, b in target_shapes(model, targets).values())
        params_before = count_params(model)
        to_svd_linear(model, targets, init_rank=o.init_rank or None, masking=o.masking)
        cb = RankDynaCallback(c.keep, warmup=o.warmup, final=o.final, delta_t=o.delta_t, orth_reg=o.orth_reg,
                              budget_unit=o.budget_unit, masking=o.masking, min_one=o.min_one, densify=o.densify,
                              balanced=o.balanced)
        session.finetune(model, phase="rankdyna", callbacks=[cb])
        ranks = cb.final_ranks if cb.final_ranks else cb.finalize(model)
        if cb.budget_unit == "triplets":
            session.log(f"[rankdyna] budget: {cb.target_budget:,} singular triplets = the uniform plan's rank total "
                        f"at keep {c.keep:g} (rank {cb.uniform_rank} per matrix), masking {cb.masking}")
        else:
            session.log(f"[rankdyna] budget: {cb.target_budget:,} weights (keep {c.keep:g}), masking {cb.masking}")
        kept = sum(_stored_weights(model.get_submodule(n)) for n in ranks)  # what is really stored
        session.log(f"[rankdyna] kept {sum(ranks.values()):,} triplets: {cb.final_kept_params:,} factor weights "
                    f"({cb.final_kept_params / dense_w:.2%} of the dense target weights; keep {c.keep:g}), "
                    f"{kept:,} stored")
        if cb.dense_modules:
            session.log(f"[rankdyna] {len(cb.dense_modules)} matrices kept a rank past break-even: stored dense "
                        f"({', '.join(cb.dense_modules)})")
        accounting = Accounting(dense_w, kept, params_before, count_params(model))
        for line in accounting.lines():
            session.log(line)
        summary = cb.summary()
        info = {"ranks": ranks, "dense": cb.dense_modules, "budget_unit": cb.budget_unit, "masking": cb.masking,
                "target_budget": cb.target_budget, "budget_history": cb.history}
        extra = {
            "rankdyna/ranks.png": lambda p: plot_ranks(ranks, p, title=f"RankDyna ranks, keep {c.keep:g}"),
            "rankdyna/budget.png": lambda p: plot_budget(cb.history, p, target=cb.target_budget, unit=cb.budget_unit),
            "rankdyna/summary.json": json.dumps(summary, indent=1, default=str),
        }
        return MethodResult(model, accounting, info, extra)
