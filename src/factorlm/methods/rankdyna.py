"""RankDyna (Hua et al., Findings EMNLP 2023): from a *pre-trained* model, one round of fine-tuning
that adapts to the task and compresses at once, moving rank between matrices (one global
importance threshold over all singular triplets).  See :mod:`factorlm.ranks.rankdyna`."""

from __future__ import annotations

import json
from dataclasses import dataclass

from torch import nn

from ..errors import check
from ..models.surgery import count_params, target_shapes
from ..ranks.budget import Accounting, stored_weights
from .base import Method, MethodResult, register_method
from .common import targets_for


@register_method("rankdyna")
class RankDynaMethod(Method):
    needs_teacher = False
    summary = "dynamic rank allocation during one fine-tune (RankDyna, Hua et al. 2023)"

    @dataclass
    class Options:
        init_rank: int = 0  # starting rank of every matrix's SVD re-parameterisation; 0 = full rank
        warmup: float = 0.1  # fraction of steps before the first triplet is removed
        final: float = 0.2  # fraction of steps at the target budget, masks frozen
        delta_t: int = 10  # steps between re-allocations
        orth_reg: float = 0.1  # weight of the U/V orthogonality regulariser

    def run(self, session, model: nn.Module) -> MethodResult:
        from ..ranks.rankdyna import RankDynaCallback, plot_budget, plot_ranks, to_svd_linear

        c = session.config
        check(c.structure == "lowrank", "rankdyna produces low-rank layers: use --structure lowrank")
        check(c.rank is None and c.keep is not None, "rankdyna allocates ranks itself: give --keep, not --rank")
        o = self.options
        targets = targets_for(session, model)
        dense_w = sum(a * b for a, b in target_shapes(model, targets).values())
        params_before = count_params(model)
        to_svd_linear(model, targets, init_rank=o.init_rank or None)
        cb = RankDynaCallback(c.keep, warmup=o.warmup, final=o.final, delta_t=o.delta_t, orth_reg=o.orth_reg)
        session.finetune(model, phase="rankdyna", callbacks=[cb])
        ranks = cb.final_ranks if cb.final_ranks else cb.finalize(model)
        shapes = target_shapes(model, targets)
        kept = sum(stored_weights(*shapes[n], r) for n, r in ranks.items())
        if cb.dense_modules:
            session.log(f"[rankdyna] {len(cb.dense_modules)} matrices kept a rank past break-even: stored dense "
                        f"({', '.join(cb.dense_modules)})")
        accounting = Accounting(dense_w, kept, params_before, count_params(model))
        for line in accounting.lines():
            session.log(line)
        summary = cb.summary()
        info = {"ranks": ranks, "dense": cb.dense_modules, "budget_history": cb.history}
        extra = {
            "rankdyna/ranks.png": lambda p: plot_ranks(ranks, p, title=f"RankDyna ranks, keep {c.keep:g}"),
            "rankdyna/budget.png": lambda p: plot_budget(cb.history, p, target=cb.target_budget),
            "rankdyna/summary.json": json.dumps(summary, indent=1, default=str),
        }
        return MethodResult(model, accounting, info, extra)
