"""Activation-aware factorization of encoders: SVD-LLM whitening (``whiten``, a published method) and
factorlm's loss-aware recipe (``kfac-global``), each followed by fine-tuning.

``whiten`` -- *Paper*: X. Wang, Y. Zheng, Z. Wan, M. Zhang, "SVD-LLM: Truncation-aware Singular Value
Decomposition for Large Language Model Compression", ICLR 2025, https://arxiv.org/abs/2403.07378.
*As published*: each target's rank-k factors minimise its output error on calibration inputs
(``||(W - W') X^T||_F``, the whitened truncation of :func:`factorlm.decompose.whiten.whiten_svd`), the
same compression ratio for every matrix (rank ``floor(keep * m * n / (m + n))`` per ``m x n`` matrix,
``--ratio-ranks true``), then the parameter update (training).  ``--ratio-ranks false`` gives every
matrix one shared rank instead (the encoder baselines' plan, SVD_Ft's: FFN matrices then keep a
smaller share than attention ones).
*Differs here*: the paper is for decoder LLMs with 256 x 2048 tokens of WikiText-2; here the calibration
inputs are the task's own training batches (``--calib-batches``, padding excluded) through the
fine-tuned encoder, and the update is the task fine-tune (SVD_Ft's, optionally distilled) instead of
sequential LoRA on each factor; the whitening is the eigen form with a tiny damping (see
:mod:`factorlm.decompose.whiten`).  ``--rank-policy global`` (not the paper's) allocates ranks by the
whitened spectra, each normalised by its matrix's output energy.

``kfac-global`` -- factorlm's own recipe, *not a published method*; its ingredients and their origins:
(1) two-sided K-FAC whitening, input Gram and output-gradient Gram of the task loss
(:mod:`factorlm.decompose.kfac`; KFAC-SVD / LEMS, and Martens & Grosse 2015 for the Kronecker
approximation), so each matrix's fit minimises the second-order estimate of the *loss* increase;
(2) one global rank plan over every matrix by those estimates, which are in loss units and so compare
across matrices without normalisation, priced per stored weight (a knapsack's greedy ratio rule), never
past a matrix's break-even rank and within ``--keep`` counted exactly (``sum k (in + out) <= keep *
sum in * out``) -- the one-shot analogue of the learned allocation of RankDyna and of LEMS' rank
allocation; (3) distillation from the dense teacher while fine-tuning (Hinton et al. 2015; weight 1 by
default, as the distilled protocol rows of BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from ..errors import check
from ..staged import DecomposeFactory
from .base import register_method
from .common import FINETUNE_DISTILL_HELP
from .svd import SVDMethod


@register_method("whiten")
class WhitenMethod(SVDMethod):
    summary = "SVD-LLM whitening on the task's own activations (output-error fit), then fine-tuning"

    @dataclass
    class Options(SVDMethod.Options):
        calib_batches: int = field(default=32, metadata={
            "help": "training batches whose activations (padding excluded) make each layer's Gram"})
        damp: float = field(default=1e-6, metadata={
            "help": "input-Gram damping, relative to its mean diagonal (0 = the published objective)"})
        ratio_ranks: bool = field(default=True, metadata={
            "help": "uniform plan: the same ratio per matrix, rank keep*m*n/(m+n) (SVD-LLM's, default) or false: "
                    "one shared rank for all matrices (SVD_Ft's plan)"})

        def __post_init__(self):
            super().__post_init__()
            check(int(self.calib_batches) >= 1, f"--calib-batches must be at least 1, got {self.calib_batches}")
            check(self.damp >= 0, f"--damp must be >= 0, got {self.damp}")

    output_grads = False  # the output-gradient Gram (kfac-global)

    def validate(self, config, num_processes: int = 1) -> None:
        check(config.structure == "lowrank", f"--method {self.name} fits low-rank factors: use --structure lowrank, "
              f"not {config.structure!r}")

    def uniform_ratio(self) -> bool:
        return bool(self.options.ratio_ranks)

    def _stats(self, session, model, names, what: str):
        from ..train.layer_stats import layer_grams

        o = self.options
        session.log(f"[{self.name}] layer statistics of {len(names)} matrices over {o.calib_batches} training "
                    f"batches ({what}{', with output gradients' if self.output_grads else ''})")
        model.to(session.accelerator.device)
        return layer_grams(model, session.train_loader(), names, max_batches=int(o.calib_batches),
                           output_grads=self.output_grads, progress=session.config.progress and not session.quiet)

    def _fits(self, ins, outs, names):
        from ..decompose.whiten import whiten_svd

        return {n: partial(_fit, whiten_svd, gram=ins[n].gram, damp=self.options.damp) for n in names}

    def _decomposers_now(self, session, model, names):
        cached, self._cached = getattr(self, "_cached", None), None  # the global plan's statistics: first step only
        if cached is not None and all(n in cached[0] for n in names):
            ins, outs = cached
        else:
            ins, outs = self._stats(session, model, names, "factorization step")
        return self._fits(ins, outs, names)

    def decomposers(self, session, model, targets):
        self._cached = None  # (set by global_spectra, which run() calls after this)
        return DecomposeFactory(lambda m, names: self._decomposers_now(session, m, names))

    def global_spectra(self, session, model, targets):
        """Whitened singular values per target, normalised per matrix (energy) by the allocator."""
        from ..decompose.whiten import GramScale, scaled_spectrum

        ins, outs = self._cached = self._stats(session, model, targets, "teacher, for the global rank plan")
        return {n: scaled_spectrum(model.get_submodule(n).weight.detach(), GramScale(ins[n].gram, self.options.damp))
                for n in targets}, "energy", session.config.rank_price == "weight"


def _fit(fn, W, rank, **kw):
    """A matrix-level fit ``f(W, rank) -> (A, B)`` in ``W``'s dtype (structures pass extra keywords)."""
    return fn(W, int(rank), **kw)


@register_method("kfac-global")
class KfacGlobalMethod(WhitenMethod):
    summary = ("factorlm recipe: two-sided K-FAC-whitened SVD, one global rank plan by estimated loss per "
               "stored weight, distilled fine-tuning")

    @dataclass
    class Options(WhitenMethod.Options):
        finetune_distill: float = field(default=1.0, metadata={"help": FINETUNE_DISTILL_HELP.replace(
            "0 = off, the default", "1 = this recipe's default")})
        damp_out: float = field(default=0.01, metadata={
            "help": "output-gradient-Gram damping, relative to its mean diagonal (> 0: that Gram is often singular)"})

        def __post_init__(self):
            super().__post_init__()
            check(self.damp_out > 0, f"--damp-out must be > 0, got {self.damp_out}")

    output_grads = True
    always_global = True  # the recipe's plan (--rank fixes one shared rank instead)

    def _fits(self, ins, outs, names):
        from ..decompose.kfac import kfac_svd

        o = self.options
        return {n: partial(_fit, kfac_svd, gram_in=ins[n].gram, gram_out=outs[n].gram, damp_in=o.damp,
                           damp_out=o.damp_out) for n in names}

    def global_spectra(self, session, model, targets):
        from ..decompose.kfac import kfac_spectrum

        o = self.options
        ins, outs = self._cached = self._stats(session, model, targets, "teacher, for the global rank plan")
        spectra = {n: kfac_spectrum(model.get_submodule(n).weight.detach(), ins[n].gram, outs[n].gram,
                                    o.damp, o.damp_out) for n in targets}
        return spectra, "none", (session.config.rank_price or "weight") == "weight"  # --rank-price; per weight by default
