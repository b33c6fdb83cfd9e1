"""SVD_Ft and FWSVD_Ft: factorize the fine-tuned model's target layers, then fine-tune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..staged import run_factorize
from .base import Method, MethodResult, register_method
from .common import plan_for, targets_for


@register_method("svd")
class SVDMethod(Method):
    summary = "truncated SVD of every target matrix, then fine-tuning (SVD_Ft)"

    @dataclass
    class Options:
        finetune: bool = True  # False = no re-training (the w/o-step-3 ablation)

    def decomposers(self, session, model: nn.Module, targets: list[str]) -> Any:
        """Per-target decomposition callables, or None for the structure's default (plain SVD)."""
        return None

    def spectra_weights(self, session, model, targets):
        """Importance used by --rank-policy global (None = plain singular values)."""
        return None

    def run(self, session, model: nn.Module) -> MethodResult:
        targets = targets_for(session, model)
        decompose = self.decomposers(session, model, targets)
        plan = plan_for(session, model, targets, weights=self.spectra_weights(session, model, targets))
        accounting = run_factorize(session, model, plan, session.config.structure, decompose)
        for line in accounting.lines():
            session.log(line)
        session.evaluate(model, phase="factorized")
        if self.options.finetune:
            session.finetune(model, phase="finetune")
        return MethodResult(model, accounting)


@register_method("fwsvd")
class FWSVDMethod(SVDMethod):
    summary = "Fisher-weighted SVD (Hsu et al. 2022), then fine-tuning (FWSVD_Ft)"

    @dataclass
    class Options:
        finetune: bool = True
        fisher_batches: int = 64  # batches of task data used to accumulate the Fisher information

    def _importance(self, session, model, targets):
        if getattr(self, "_cached", None) is None:
            from ..decompose import fisher_importance
            from ..train.fisher import accumulate_fisher

            session.log(f"[fwsvd] accumulating Fisher information over {self.options.fisher_batches} batches")
            model.to(session.accelerator.device)
            fisher = accumulate_fisher(model, session.train_loader(), targets, max_batches=self.options.fisher_batches,
                                       progress=session.config.progress and not session.quiet)
            self._cached = {n: fisher_importance(f, dim=0) for n, f in fisher.items()}
        return self._cached

    def decomposers(self, session, model, targets):
        from functools import partial

        from ..decompose import fisher_weighted_svd

        imp = self._importance(session, model, targets)
        return {n: partial(fisher_weighted_svd, importance=imp[n], dim=1) for n in targets}

    def spectra_weights(self, session, model, targets):
        return self._importance(session, model, targets)
