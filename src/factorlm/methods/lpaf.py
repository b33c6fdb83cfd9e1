"""LPAF: Low-Rank Prune-And-Factorize.

*Paper*: Ren & Zhu, "Low-Rank Prune-And-Factorize for Language Model Compression", LREC-COLING
2024, https://arxiv.org/abs/2306.14152.

*As published* (and the default here):

1. prune the fine-tuned model T with first-order unstructured pruning (UP_first) to density v
   -> T_sparse, whose sparse matrices are closer to low rank.  The paper asks for a first-order
   criterion.  The default is ``--importance platon`` (Zhang et al. 2022, first-order sensitivity
   x uncertainty), chosen among the first-order criteria by measurement on MiniLM: at 1-3 pruning
   epochs, Sanh et al.'s movement pruning collapsed MRPC to the majority class and left matrices no
   more low-rank than the teacher's; see :mod:`factorlm.methods.prune` and BENCHMARKS.md;
2. factorize every target matrix of T_sparse (encoder linear layers; never embeddings) at the rank
   that meets ``--keep`` with **sparsity-aware SVD**, the weighted fit
   min ||Omega * (W - A B)||_F with Omega from the pruning importance scores ("w/ S",
   ``--omega scores``, the paper's choice) solved element-wise (``--decomposition em``) by
   Srebro-Jaakkola EM from the truncated SVD, up to 1000 steps, stopped earlier by a plateau rule
   (``--em-plateau``: once its last 20 steps gained under 1% of its gain so far; at BERT-base's
   sizes ~300 steps, 3x faster, ~86% of the 1000-step gain; the paper names no solver; see below);
3. **mixed-rank fine-tuning**: each factorized matrix i is replaced by its sparse dense twin W_i
   with probability p = max(0, p_init - d t) (z_i ~ Bernoulli(p), x_out = (1 - z_i)(A B)_i x +
   z_i W_i x), plus the consistency loss lambda * D(y_z1, y_z2) between two forwards with
   independent draws (symmetric KL; MSE for regression).

*Differs here* (each an option; the default is the paper's):

* ``--importance movement|magnitude|sensitivity``: Sanh et al.'s movement pruning (the other
  published first-order criterion; needs long schedules), UP_zero (the paper's ablation),
  factorlm's earlier variant.
* ``--omega mask`` is the paper's "w/ M" ablation; ``--omega scores_quantile`` (scores replaced by
  their quantiles among kept entries), ``--omega scores_sqrt`` (the root of the normalised scores: the
  objective squares Omega, and PLATON's score is already ~ (w g)^2, so "w/ S" weights entries by a
  fourth power; issue 30) and ``--decomposition row`` (Omega collapsed to one weight
  per input column, closed form) are factorlm's faster approximations; ``--decomposition svd`` is
  the w/o-sparsity-aware ablation.
* ``--solver`` (step 2's solver, not named in the paper): the default is EM from the SVD for every
  Omega.  ``--solver als`` reaches the objective's exact minimiser, which is degenerate with
  first-order scores -- a pruned weight's score |w g| vanishes, so the fit is nearly free on the
  pruned entries -- and on MiniLM it gave ||W - A B|| = 4.1 ||W|| (plain SVD 0.56) and a factorized
  MRPC model at F1 0-79 from run to run; EM kept 0.56 and lowered the paper's objective to 0.13x the
  SVD's (BENCHMARKS.md; ``benchmarks/omega.py``).  LPAF's default was ALS until 2026-12-02.
* ``--density`` defaults to ``--keep`` (equal storage: the sparse model holds as many non-zeros
  as the factorized one has weights); the paper pairs densities and ranks per budget.
* The schedule constants (``--p-init 0.5``, ``--p-zero-at 0.5`` = p reaches 0 halfway through
  step 3, ``--consistency 1.0``) are factorlm's choices where the paper gives no single value.
* ``--finetune-distill A`` (off by default) adds a KL-to-the-dense-teacher term to step 3, so that a
  comparison can give every method the same distillation (``--distill`` is step 1's, on by default).
* Step 3 draws one z per matrix per forward (as published) from the global torch RNG, which
  ``--seed`` seeds at the start of every phase.

Ablations (flags): ``--prune false`` (w/o step 1), ``--decomposition svd`` (vanilla SVD instead of
sparsity-aware), ``--finetune false`` (w/o step 3), ``--mixed-rank false`` (vanilla fine-tuning),
``--consistency 0`` (mixed-rank without L_c), ``--importance magnitude`` (UP_zero instead of UP_first).

*Lifecycle*: ``validate`` (before any work: rejects ``--schedule staged``, whose fine-tuning between
stages would refill the pruned weights the masks and scores describe, and multi-process
mixed-rank training) -> step 1 ``run_pruning`` (phase ``prune``, or ``--pruned-model``) -> step 2
``run_factorize`` with per-matrix sparsity-aware fits -> step 3 ``wrap_mixed_rank`` +
:class:`~factorlm.train.mixed_rank.MixedRankCallback` (phase ``finetune``) -> ``unwrap_mixed_rank``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..decompose.weighted_svd import DEFAULT_PLATEAU, SOLVERS
from ..errors import check
from ..staged import run_factorize
from ..models.surgery import get_module
from .base import Method, MethodResult, register_method
from .common import FINETUNE_DISTILL_HELP, plan_for, targets_for, teacher_distillation
from .prune import PRUNING_FILE, PruneOptions, load_pruned, pruning_file_writer, run_pruning

DECOMPOSITIONS = ("em", "row", "svd")
OMEGAS = ("scores", "mask", "scores_quantile", "scores_sqrt")


@register_method("lpaf")
class LPAFMethod(Method):
    summary = "LPAF: first-order pruning -> sparsity-aware SVD -> mixed-rank fine-tuning (Ren & Zhu 2024)"

    @dataclass
    class Options(PruneOptions):
        prune: bool = field(default=True, metadata={"help": "step 1 (false: factorize the dense teacher, the w/o-pruning ablation)"})
        pruned_model: str = field(default="", metadata={"help": "start from a model saved by `factorlm prune` / --save-pruned (re-use one pruning)"})
        save_pruned: str = field(default="", metadata={"help": "also save the step-1 pruned model (with masks and scores) to this folder"})
        decomposition: str = field(default="em", metadata={"choices": DECOMPOSITIONS, "help": (
            "step 2: em = element-wise weighted fit min ||Omega*(W-AB)|| from the SVD (the paper's objective; "
            "solver: --solver), "
            "row = Omega collapsed to one weight per input column, closed form (faster approximation), "
            "svd = plain truncated SVD (ablation)")})
        omega: str = field(default="scores", metadata={"choices": OMEGAS, "help": (
            "step 2 weights: scores = normalised raw pruning scores (the paper's w/ S), mask = binary keep-mask "
            "(w/ M), scores_quantile = scores' quantiles among kept entries, pruned entries 1e-3 (factorlm's earlier choice), "
            "scores_sqrt = the square root of the normalised scores (not the paper's: the objective squares Omega, and "
            "first-order scores are already ~ (w g)^2)")})
        solver: str = field(default="auto", metadata={"choices": SOLVERS, "help": (
            "step 2 with --decomposition em: auto (the default) = em_subspace, Srebro-Jaakkola EM from the SVD with "
            "one block-power M-step, up to 1000 steps (--em-plateau stops it earlier); em = EM with exact SVD M-steps; als = alternating least squares, "
            "the objective's exact minimiser, degenerate for first-order scores (see decompose/weighted_svd.py)")})
        em_iters: int | None = field(default=None, metadata={"type": int, "help": (
            "step 2: maximum iterations of the weighted fit per matrix (default: the solver's, 1000 EM steps or 100 ALS sweeps; "
            "with score weights far more EM steps drift towards ALS's degenerate minimiser; see decompose/weighted_svd.py)")})
        em_plateau: float = field(default=DEFAULT_PLATEAU, metadata={"help": (
            "step 2, EM: stop a matrix's fit once its last 20 iterations gained at most this share of its gain so far "
            "(default 0.01; 0 = run to --em-iters, the rule before issue 30; see benchmarks/lpaf_scale.py)")})
        finetune: bool = field(default=True, metadata={"help": "step 3 (false: no re-training, the ablation)"})
        mixed_rank: bool = field(default=True, metadata={"help": "step 3 with mixed-rank switching (false: vanilla fine-tuning)"})
        p_init: float = field(default=0.5, metadata={"help": "initial probability of using a matrix's sparse dense twin"})
        p_zero_at: float = field(default=0.5, metadata={"help": "fraction of step-3 training at which p reaches 0 (sets d)"})
        consistency: float = field(default=1.0, metadata={"help": "lambda of the consistency loss (0: mixed-rank without L_c)"})
        finetune_distill: float = field(default=0.0, metadata={"help": FINETUNE_DISTILL_HELP})

        def __post_init__(self) -> None:
            super().__post_init__()
            check(self.decomposition in DECOMPOSITIONS,
                  f"--decomposition must be one of {', '.join(DECOMPOSITIONS)}, got {self.decomposition!r}")
            check(self.omega in OMEGAS, f"--omega must be one of {', '.join(OMEGAS)}, got {self.omega!r}")
            check(self.solver in SOLVERS, f"--solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")
            check(self.em_iters is None or self.em_iters >= 1, f"--em-iters must be >= 1, got {self.em_iters}")
            check(0 <= self.em_plateau < 1, f"--em-plateau must be in [0, 1), got {self.em_plateau}")
            check(self.decomposition == "em" or (self.solver == "auto" and self.em_iters is None),
                  f"--solver / --em-iters set step 2's element-wise fit and only apply with --decomposition em, "
                  f"got --decomposition {self.decomposition}")
            check(0 <= self.p_init <= 1, f"--p-init must be in [0, 1], got {self.p_init}")
            check(self.p_zero_at > 0, f"--p-zero-at must be > 0, got {self.p_zero_at}")
            check(self.consistency >= 0, f"--consistency must be >= 0, got {self.consistency}")
            check(self.finetune_distill >= 0, f"--finetune-distill must be >= 0, got {self.finetune_distill}")

    def validate(self, config, num_processes: int = 1) -> None:
        o = self.options
        check(config.schedule != "staged", "--method lpaf does not support --schedule staged: fine-tuning between "
              "stages refills the pruned weights that step 2's masks and scores describe (use --schedule oneshot)")
        check(num_processes == 1 or not (o.finetune and o.mixed_rank and o.p_init > 0),
              f"--method lpaf's mixed-rank fine-tuning runs in one process only ({num_processes} launched): its "
              "consistency loss needs two forwards per step and switched-off factors get no gradient, which DDP "
              "cannot reduce; run one process or pass --mixed-rank false")

    def run(self, session, model: nn.Module) -> MethodResult:
        from ..decompose.weighted_svd import sparsity_aware_svd
        from ..layers.mixed_rank import unwrap_mixed_rank, wrap_mixed_rank
        from ..train.mixed_rank import MixedRankCallback

        o = self.options
        c = session.config
        targets = targets_for(session, model)
        info: dict = {}
        extra: dict = {}
        # step 3's optional distillation reads the dense teacher: copied now, before step 1 changes the model
        kd = teacher_distillation(model, o.finetune_distill if o.finetune else 0.0)

        # -- step 1: prune --------------------------------------------------------------------------
        masks = scores = None
        # --skip-slow, or a --ranks file's ranks past break-even, may keep some targets dense: they go
        # back to their unpruned weights below
        keeps_some_dense = c.skip_slow or c.ranks is not None
        unpruned = {n: get_module(model, n).weight.detach().clone() for n in targets} if keeps_some_dense else {}
        if o.pruned_model:
            from .. import models

            pruned = models.load(o.pruned_model)
            model.load_state_dict(pruned.state_dict())
            masks, scores, density = load_pruned(o.pruned_model, targets, model)
            session.log(f"[lpaf] starting from the pruned model {o.pruned_model} (density {density:.3f})")
            session.evaluate(model, phase="pruned")
            info["density"] = density
        elif o.prune:
            masks, scores, density = run_pruning(session, model, targets, o, c.keep)
            info["density"] = density
            extra[PRUNING_FILE] = pruning_file_writer(masks, scores, density)
            if o.save_pruned and session.accelerator.is_main_process:
                from .. import models

                models.save(model, o.save_pruned, tokenizer=session.tokenizer, overwrite=True,
                            extra_files={PRUNING_FILE: pruning_file_writer(masks, scores, density)},
                            meta={"task": session.task.name, "method": "prune", "recipe": c.to_dict(),
                                  "method_info": {"density": density}, "scores": dict(session.phases)})
                session.log(f"[lpaf] pruned model saved to {o.save_pruned}")

        # -- step 2: sparsity-aware factorization ----------------------------------------------------
        if masks is not None and o.decomposition != "svd":
            needs_scores = o.omega != "mask"
            check(not needs_scores or all(n in (scores or {}) for n in targets),
                  f"the pruning result has no importance scores for --omega {o.omega}: use --omega mask")
            kw = dict(decomposition=o.decomposition, omega=o.omega, solver=o.solver)
            info["solver"] = ("em_subspace" if o.solver == "auto" else o.solver) if o.decomposition == "em" else None
            if o.em_iters is not None:
                kw["iters"] = o.em_iters
            kw["plateau"] = o.em_plateau
            decompose = {n: partial(sparsity_aware_svd, mask=masks[n], scores=scores[n] if needs_scores else None, **kw)
                         for n in targets}
        else:
            decompose = None  # plain truncated SVD
        plan = plan_for(session, model, targets)
        kept_dense = [n for n in targets if n not in plan]
        with torch.no_grad():
            for n in kept_dense:  # not factorized: the dense teacher's matrix, not its pruned copy
                get_module(model, n).weight.copy_(unpruned[n])
        del unpruned
        twins = {n: get_module(model, n).weight.detach().clone() for n in plan}
        session.log(f"[lpaf] factorizing {len(plan)} matrices ({'sparsity-aware ' + o.decomposition if decompose else 'plain SVD'})")
        accounting = run_factorize(session, model, plan, c.structure, decompose)
        for line in accounting.lines():
            session.log(line)
        session.evaluate(model, phase="factorized", check=False)  # expected poor before its fine-tune

        # -- step 3: (mixed-rank) fine-tuning --------------------------------------------------------
        if o.finetune:
            if o.mixed_rank and o.p_init > 0:
                wrap_mixed_rank(model, twins)
                cb = MixedRankCallback(p_init=o.p_init, zero_at=o.p_zero_at, consistency_weight=o.consistency)
                try:
                    session.finetune(model, phase="finetune", callbacks=[cb, *kd])
                finally:
                    unwrap_mixed_rank(model)
            else:
                session.finetune(model, phase="finetune", callbacks=kd)
        del twins, kd
        return MethodResult(model, accounting, info, extra)
