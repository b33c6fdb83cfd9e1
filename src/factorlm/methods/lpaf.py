"""LPAF: Low-Rank Prune-And-Factorize (Ren & Zhu, LREC-COLING 2024).

1. prune the fine-tuned model T with first-order (movement) pruning to density v -> T_sparse,
   whose sparse matrices are close to low rank;
2. factorize every target matrix of T_sparse at the rank that meets --keep with **sparsity-aware
   SVD**: the weighted low-rank fit min ||Omega * (W - A B)||_F that trusts only the kept entries
   (Omega from the pruning scores or the binary mask; EM of Srebro & Jaakkola 2003);
3. re-train with **mixed-rank fine-tuning**: each factorized matrix i is replaced by its sparse
   dense twin W_i with probability p = max(0, p_init - d t), plus the consistency loss
   lambda * D(y_z1, y_z2) between two forwards with independent samples.

Ablations (flags): --prune false (w/o step 1), --decomposition svd (vanilla SVD instead of
sparsity-aware), --finetune false (w/o step 3), --mixed-rank false (vanilla fine-tuning),
--consistency 0 (mixed-rank without L_c), --importance magnitude (UP_zero instead of UP_first).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from torch import nn

from ..errors import check
from ..staged import run_factorize
from ..models.surgery import get_module
from .base import Method, MethodResult, register_method
from .common import plan_for, targets_for
from .prune import PRUNING_FILE, PruneOptions, load_pruned, pruning_file_writer, run_pruning


@register_method("lpaf")
class LPAFMethod(Method):
    summary = "LPAF: first-order pruning -> sparsity-aware SVD -> mixed-rank fine-tuning (Ren & Zhu 2024)"

    @dataclass
    class Options(PruneOptions):
        prune: bool = True  # step 1 (False: factorize the dense teacher, the w/o-pruning ablation)
        pruned_model: str = ""  # start from a model saved by `factorlm prune` / --save-pruned (re-use one pruning)
        save_pruned: str = ""  # also save the step-1 pruned model (with its masks and scores) to this folder
        decomposition: str = "row"  # row (closed-form weighted, default) | em (EM weighted fit) | svd (vanilla)
        omega: str = "scores"  # scores (importance-weighted) | mask (binary keep-mask)
        em_iters: int = 30
        finetune: bool = True  # step 3
        mixed_rank: bool = True  # False: vanilla fine-tuning in step 3
        p_init: float = 0.5  # initial probability of using a matrix's sparse dense twin
        p_zero_at: float = 0.5  # fraction of step-3 training at which p reaches 0 (sets d)
        consistency: float = 1.0  # lambda of the consistency loss (0: mixed-rank without L_c)

    def run(self, session, model: nn.Module) -> MethodResult:
        from ..decompose.weighted_svd import sparsity_aware_svd
        from ..layers.mixed_rank import unwrap_mixed_rank, wrap_mixed_rank
        from ..train.mixed_rank import MixedRankCallback

        o = self.options
        c = session.config
        check(o.decomposition in ("em", "row", "svd"), f"--decomposition must be em, row or svd, got {o.decomposition!r}")
        check(o.omega in ("scores", "mask"), f"--omega must be scores or mask, got {o.omega!r}")
        check(0 <= o.p_init <= 1, f"--p-init must be in [0, 1], got {o.p_init}")
        targets = targets_for(session, model)
        info: dict = {}
        extra: dict = {}

        # -- step 1: prune --------------------------------------------------------------------------
        masks = scores = None
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
        twins = {n: get_module(model, n).weight.detach().clone() for n in targets}

        # -- step 2: sparsity-aware factorization ----------------------------------------------------
        if masks is not None and o.decomposition != "svd":
            mode = "em" if o.decomposition == "em" else "row"
            kw = dict(mode=mode, iters=o.em_iters, solver="subspace")
            decompose = {
                n: partial(sparsity_aware_svd, mask=masks[n], **({"scores": scores[n]} if o.omega == "scores" else {}), **kw)
                for n in targets
            }
        else:
            decompose = None  # plain truncated SVD
        plan = plan_for(session, model, targets)
        session.log(f"[lpaf] factorizing {len(targets)} matrices ({'sparsity-aware ' + o.decomposition if decompose else 'plain SVD'})")
        accounting = run_factorize(session, model, plan, c.structure, decompose)
        for line in accounting.lines():
            session.log(line)
        session.evaluate(model, phase="factorized")

        # -- step 3: (mixed-rank) fine-tuning --------------------------------------------------------
        if o.finetune:
            if o.mixed_rank and o.p_init > 0:
                wrap_mixed_rank(model, twins)
                cb = MixedRankCallback(p_init=o.p_init, zero_at=o.p_zero_at, consistency_weight=o.consistency)
                try:
                    session.finetune(model, phase="finetune", callbacks=[cb])
                finally:
                    unwrap_mixed_rank(model)
            else:
                session.finetune(model, phase="finetune")
        del twins
        return MethodResult(model, accounting, info, extra)
