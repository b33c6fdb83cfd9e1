"""Pieces shared by methods: which layers, how much rank where."""

from __future__ import annotations

import torch
from torch import nn

from ..factorize import budget_plan, structure_class
from ..models.surgery import find_targets, target_shapes


def targets_for(session, model: nn.Module) -> list[str]:
    c = session.config
    targets = find_targets(model, include=c.include, exclude=c.exclude)
    if not targets:
        from ..errors import FactorLMError

        raise FactorLMError("no target nn.Linear layers found (check --include / --exclude patterns)")
    return targets


def structure_fixed(session) -> dict:
    """Fixed structure parameters from the run config (e.g. Monarch's nblocks)."""
    return {"nblocks": session.config.nblocks} if session.config.nblocks is not None else {}


def plan_for(session, model: nn.Module, targets: list[str], weights: dict[str, torch.Tensor] | None = None):
    """Uniform plan (largest shared knob within --keep, or --rank), or a global non-uniform rank plan."""
    c = session.config
    if c.rank_policy == "global" and c.rank is None:
        from ..errors import check
        from ..ranks.allocator import global_rank_plan

        check(c.structure == "lowrank", "--rank-policy global needs --structure lowrank")
        spectra = {}
        for n in targets:
            W = model.get_submodule(n).weight.detach().float()
            if weights is not None:
                W = W * weights[n].to(W)[None, :]
            spectra[n] = torch.linalg.svdvals(W)
        ranks = global_rank_plan(spectra, target_shapes(model, targets), c.keep)
        return {n: {"rank": int(r)} for n, r in ranks.items()}
    return budget_plan(model, targets, keep=c.keep, rank=c.rank, structure=structure_class(c.structure), **structure_fixed(session))
