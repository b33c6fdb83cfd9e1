"""SVD_Ft and FWSVD_Ft: factorize the fine-tuned model's target layers, then fine-tune.

The fine-tune uses the task loss only, as in the baselines of Hsu et al. 2022 and Ren & Zhu 2024;
``--finetune-distill A`` adds a KL-to-the-dense-teacher term (weight A, the teacher copied before
factorization), so that a comparison can give every method the same distillation.  With
``--schedule staged`` it applies to every fine-tune (between stages and the last), so a staged run
distils over as many steps as a one-shot one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import check
from ..staged import DecomposeFactory, run_factorize
from .base import Method, MethodResult, register_method
from .common import FINETUNE_DISTILL_HELP, plan_for, targets_for, teacher_distillation

FISHER_ESTIMATES = ("per_example", "batch")


@register_method("svd")
class SVDMethod(Method):
    summary = "truncated SVD of every target matrix, then fine-tuning (SVD_Ft)"

    @dataclass
    class Options:
        finetune: bool = field(default=True, metadata={
            "help": "fine-tune the factorized model on the task (false: no re-training, the w/o-step-3 ablation)"})
        finetune_distill: float = field(default=0.0, metadata={"help": FINETUNE_DISTILL_HELP})

        def __post_init__(self) -> None:
            check(self.finetune_distill >= 0, f"--finetune-distill must be >= 0, got {self.finetune_distill}")

    def decomposers(self, session, model: nn.Module, targets: list[str]) -> Any:
        """What ``run_factorize(decompose=...)`` takes: None for the structure's default (plain SVD),
        fixed per-target callables, or a :class:`~factorlm.staged.DecomposeFactory` (made per stage)."""
        return None

    #: the method's plan is always the global one (unless --rank or --ranks fixes the ranks)
    always_global = False

    def uniform_ratio(self) -> bool:
        """Uniform plan: the same compression ratio per matrix (True) or one shared rank (False, SVD_Ft's)."""
        return False

    def global_spectra(self, session, model, targets):
        """``(spectra, normalize, per_param)`` for the global rank plan, or None: the plan then uses the
        (``spectra_weights``-weighted) singular values of the weights."""
        return None

    def spectra_weights(self, session, model, targets):
        """Importance used by --rank-policy global (None = plain singular values); only asked for then."""
        return None

    def run(self, session, model: nn.Module) -> MethodResult:
        c = session.config
        targets = targets_for(session, model)
        decompose = self.decomposers(session, model, targets)
        global_plan = (c.rank_policy == "global" or self.always_global) and c.rank is None and c.ranks is None
        spectra = self.global_spectra(session, model, targets) if global_plan else None
        weights = self.spectra_weights(session, model, targets) if global_plan and spectra is None else None
        plan = plan_for(session, model, targets, weights=weights, spectra=spectra, global_plan=global_plan,
                        uniform_ratio=self.uniform_ratio())
        # the dense teacher, copied before factorization (only when the fine-tune distils from it)
        kd = teacher_distillation(model, self.options.finetune_distill if self.options.finetune else 0.0)
        accounting = run_factorize(session, model, plan, c.structure, decompose, callbacks=kd)
        for line in accounting.lines():
            session.log(line)
        session.evaluate(model, phase="factorized", check=False)  # expected poor before its fine-tune
        if self.options.finetune:
            session.finetune(model, phase="finetune", callbacks=kd)
        del kd
        return MethodResult(model, accounting)


@register_method("fwsvd")
class FWSVDMethod(SVDMethod):
    """Fisher-weighted SVD, then fine-tuning (FWSVD_Ft).

    *Paper*: Y.-C. Hsu, T. Hua, S. Chang, Q. Lou, Y. Shen, H. Jin, "Language model compression with
    weighted low-rank factorization", ICLR 2022, https://openreview.net/forum?id=uPv9Y3gmAI5
    (arXiv:2207.00112).

    *As published*: the importance of weight ``W_ij`` is its empirical Fisher information, the
    average over the task's training examples of the squared per-example gradient
    ``(dL(d)/dW_ij)^2``; the weights of one row of the paper's ``W`` (one input feature) share the
    row sum ``I_i = sum_j I_ij``; the weighted objective ``||diag(sqrt(I)) (W - A B)||_F`` (each
    row's squared error weighted by ``I_i``) is solved in closed form by the SVD of
    ``diag(sqrt(I)) W``; the factorized model is then fine-tuned on the task.  See
    :mod:`factorlm.decompose.fwsvd` for the formulas and the layout.

    *Differs here*:

    - ``--fisher-batches`` (default 64) batches of the shuffled training set, not the whole set, so
      the cost stays bounded (a full pass is an epoch of backward passes) on large tasks.  A value at
      least the number of training batches restores the paper's average over the data.
    - The Fisher is a sum, not a mean, over examples: FWSVD normalises the importance by its mean,
      so only relative values matter (and every matrix gets the same factor for
      ``--rank-policy global``); nothing to restore.
    - ``--fisher batch`` is an option the paper does not have: squared gradients of the batches'
      *mean* losses, one backward per batch with no per-example products (faster, less memory), as
      many re-implementations compute it; a different and noisier quantity at a converged teacher.
      ``--fisher per_example`` (the default) is the paper's.
    - ``--schedule staged`` (not in the paper) re-computes the Fisher per stage (see *Lifecycle*).

    *Defaults and why*: ``--fisher per_example`` because it is the paper's definition and the
    batch estimate is dominated by gradient noise once the teacher has converged; 64 batches as
    above; ``--finetune true`` because this is the FWSVD_Ft baseline (factorize, then fine-tune);
    ``false`` keeps the factorized model as it is.

    *Lifecycle*: one-shot, the Fisher of all target matrices is computed once on the teacher, just
    before factorizing.  Staged (``--schedule staged``), it is computed at the start of each stage
    on the model as the previous stages' fine-tuning left it, for that stage's matrices only (a
    :class:`~factorlm.staged.DecomposeFactory`), so each stage is weighted by the Fisher of the
    weights it actually factorizes.  ``--rank-policy global`` needs importance-weighted spectra for
    its plan, which is made once before any factorization: that Fisher is computed on the teacher
    for all targets and reused by the first factorization step (one-shot, or stage 1), which runs
    before any training, so one-shot still computes the Fisher once.
    """

    summary = "Fisher-weighted SVD (Hsu et al. 2022), then fine-tuning (FWSVD_Ft)"

    @dataclass
    class Options(SVDMethod.Options):
        fisher_batches: int = field(default=64, metadata={
            "help": "batches of task training data over which the Fisher information is accumulated"})
        fisher: str = field(default="per_example", metadata={
            "help": "Fisher estimate: per_example (sum of squared per-example gradients, the paper's) "
                    "or batch (squared gradients of batch-mean losses: faster, noisier, not the paper's)",
            "choices": FISHER_ESTIMATES})

        def __post_init__(self):
            super().__post_init__()
            check(self.fisher in FISHER_ESTIMATES,
                  f"--fisher must be one of {', '.join(FISHER_ESTIMATES)}, got {self.fisher!r}")
            check(int(self.fisher_batches) >= 1, f"--fisher-batches must be at least 1, got {self.fisher_batches}")

    def _fisher(self, session, model, names, what: str):
        from ..train.fisher import accumulate_fisher

        o = self.options
        session.log(f"[fwsvd] {o.fisher.replace('_', '-')} Fisher information of {len(names)} matrices "
                    f"over {o.fisher_batches} batches ({what})")
        model.to(session.accelerator.device)
        return accumulate_fisher(model, session.train_loader(), names, max_batches=o.fisher_batches,
                                 per_example=o.fisher == "per_example",
                                 progress=session.config.progress and not session.quiet)

    def _decomposers_now(self, session, model, names):
        """FWSVD fits for ``names`` from the Fisher of the model as it is now."""
        from functools import partial

        from ..decompose import fisher_importance, fisher_weighted_svd

        teacher, self._teacher_fisher = getattr(self, "_teacher_fisher", None), None  # valid for the first step only
        if teacher is not None and all(n in teacher for n in names):
            fisher = teacher
        else:
            fisher = self._fisher(session, model, names, "factorization step")
        return {n: partial(fisher_weighted_svd, importance=fisher_importance(fisher[n], dim=0), dim=1) for n in names}

    def decomposers(self, session, model, targets):
        self._teacher_fisher = None
        return DecomposeFactory(lambda m, names: self._decomposers_now(session, m, names))

    def spectra_weights(self, session, model, targets):
        from ..decompose import fisher_importance

        fisher = self._fisher(session, model, targets, "teacher, for the global rank plan")
        self._teacher_fisher = fisher  # the first factorization step (before any training) reuses it
        return {n: fisher_importance(f, dim=0) for n, f in fisher.items()}
