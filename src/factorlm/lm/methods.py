"""One-shot compression of causal language models (``--task lm``): ``svd``, ``asvd``, ``whiten`` (low rank),
``rtn`` / ``gptq`` (quantization alone) and ``rtn-lowrank`` / ``gptq-lowrank`` (quantization + a low-rank
correction of its error, one byte budget; ``gptq-lowrank`` is EoRA's published setting).

Every target ``W`` (out, in) becomes ``A B`` with ``A B = U_k U_k^T W``, where ``U_k`` are the top-k
left singular vectors of ``W S`` for a method-specific input scaling ``S``
(:mod:`factorlm.decompose.whiten`); no fine-tuning is needed.

``svd``: plain truncated SVD (``S = I``), the Eckart-Young optimum in weight space; the baseline
    that collapses on LLMs.
``asvd``: ASVD (Yuan et al. 2023, "ASVD: Activation-aware Singular Value Decomposition for
    Compressing Large Language Models"): ``S = diag(mean |x|)^alpha``, alpha = 0.5.
    As published: the absolute-mean activation scaling and its exponent 0.5.  Differs: ASVD
    chooses per-layer ranks by a perplexity-sensitivity search (STRS); here ranks come from the
    shared plans below (``--rank-policy uniform|global``).
``whiten``: SVD-LLM's truncation-aware data whitening (Wang et al., ICLR 2025): ``S S^T = X^T X``,
    so truncating singular value ``sigma_i`` of ``W S`` costs exactly ``sigma_i^2`` of output
    error on the calibration inputs.  As published: the whitening and its truncation theorem.
    Differs (numerically, not in the optimum): float64 Gram, a symmetric eigendecomposition with
    optional damping instead of a Cholesky (which fails on rank-deficient data), and
    ``W' = U_k U_k^T W`` instead of an explicit ``S^{-1}``; SVD-LLM's released profiling collects
    every Gram matrix from the dense model, here the default is sequential (``--sequential layer``,
    :mod:`factorlm.lm.calibrate`); ``--sequential none`` is SVD-LLM's one-pass profile.  SVD-LLM's
    "parameter update" (a LoRA-style fine-tune of the factors) is ``--heal-steps``.

Rank plans (``factorlm.ranks``): ``uniform`` keeps the same share ``--keep`` of every matrix (SVD-LLM's
"compression ratio" convention: ratio = 1 - keep), ``global`` keeps the globally best triplets of the
scaled spectra under one exact budget, never past a matrix's break-even rank, each spectrum weighted by
the layer's output sensitivity (``--global-score fisher``, factorlm's own; measured against the
energy-normalized ``--global-score energy`` in benchmarks/llm.py);
``--rank-multiple 8`` rounds ranks down to multiples of 8 (fast kernels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..decompose.whiten import GramScale, InputStats, asvd_scale
from ..errors import check
from ..registry import Registry
from ..methods.base import build_options

#: --task lm method name -> class
LM_METHODS: Registry[type["LMMethod"]] = Registry("--task lm method")
SEQUENTIAL = ("layer", "block", "none", "anchored")


@dataclass
class CalibrationOptions:
    sequential: str = field(default="layer", metadata={
        "choices": SEQUENTIAL,
        "help": "calibration order: layer = every group of layers sees the compressed layers before it (default); "
                "block = per block; none = one pass over the dense model (SVD-LLM's profile); anchored = as layer, "
                "each layer fitted to reproduce the dense model's outputs from the compressed model's inputs "
                "(decompose/anchor.py; twice the forwards)"})
    anchor_damp: float = field(default=0.01, metadata={
        "help": "--sequential anchored: ridge toward the dense weight, relative to the mean diagonal of the shifted "
                "inputs' Gram (default 0.01; 0 = plain least squares)"})


@dataclass
class OutputSideOptions:
    damp_out: float = field(default=0.01, metadata={
        "help": "output-gradient-Gram damping, relative to its mean diagonal (> 0: that Gram is often singular)"})
    grad_batches: int = field(default=4, metadata={
        "help": "kfac / --correction-space kfac (lm): calibration batches (of up to 8 windows) back-propagated for the "
                "output-gradient Grams (default 4)"})
    gram_memory_gb: float = field(default=0.0, metadata={
        "help": "kfac / --correction-space kfac (lm): at most this many GiB of output-gradient Grams (4 out^2 bytes "
                "each) in memory at once; more are computed in extra backward passes and kept on disk in $TMPDIR "
                "(default 0 = auto: in memory when they fit in half the available RAM, else passes of a quarter of it)"})


class LMMethod:
    name: ClassVar[str] = "abstract"
    summary: ClassVar[str] = ""
    #: which input statistics the scaling needs (an empty tuple: no calibration data at all)
    stats: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = CalibrationOptions
    #: ``--refine-steps`` when not given: 0 for the published methods (their algorithm as published)
    default_refine_steps: ClassVar[int] = 0

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = build_options(self.Options, options or {}, self.name)
        seq = getattr(self.options, "sequential", "layer")
        check(seq in SEQUENTIAL, f"--sequential must be one of {', '.join(SEQUENTIAL)}, got {seq!r}")
        check(seq != "anchored" or "gram" in self.stats, f"--sequential anchored needs the input Gram, which "
                                                          f"--method {self.name} does not use: try whiten")
        check(getattr(self.options, "anchor_damp", 0) >= 0,
              f"--anchor-damp must be >= 0, got {getattr(self.options, 'anchor_damp', 0)}")
        check(getattr(self.options, "gptq_damp", 0) >= 0, f"--gptq-damp must be >= 0, got {getattr(self.options, 'gptq_damp', 0)}")

    #: the output-gradient Grams of the targets (:func:`factorlm.lm.gradients.output_grams`), set by the
    #: pipeline before any fit when :attr:`output_side` is true
    output_grams: Mapping[str, torch.Tensor] | None = None

    @property
    def calibrated(self) -> bool:
        return bool(self.stats)

    @property
    def output_side(self) -> bool:
        """Whether the fits are two-sided (need :attr:`output_grams`): ``kfac``; ``--correction-space kfac``."""
        return False

    def gram_out(self, name: str) -> torch.Tensor:
        check(self.output_grams is not None and name in self.output_grams,
              f"{self.name}: no output-gradient Gram for {name} (call factorlm.lm.gradients.output_grams first)")
        return self.output_grams[name]

    def check_output_side(self) -> None:
        o = self.options
        check(o.damp_out > 0, f"--damp-out must be > 0, got {o.damp_out}")
        check(int(o.grad_batches) >= 1, f"--grad-batches must be at least 1, got {o.grad_batches}")
        check(float(o.gram_memory_gb) >= 0, f"--gram-memory-gb must be >= 0 (0 = auto), got {o.gram_memory_gb}")

    def make_stats(self, module) -> InputStats:
        w = module.weight
        in_features = w.shape[0] if type(module).__name__ == "Conv1D" else w.shape[1]
        return InputStats(in_features, gram="gram" in self.stats, absmean="absmean" in self.stats, device=w.device)

    def scale(self, stats: InputStats | None) -> torch.Tensor | GramScale | None:
        """The input scaling ``S`` (None = identity; a vector = diagonal; a matrix = full; a
        :class:`~factorlm.decompose.whiten.GramScale` = ``S S^T`` given by a Gram)."""
        return None


def register_lm_method(name: str):
    return LM_METHODS.register(name, name_attr="name")


def get_lm_method(name: str, options: dict[str, Any] | None = None) -> LMMethod:
    return LM_METHODS.get(name)(options)


@register_lm_method("svd")
class PlainSVD(LMMethod):
    summary = "plain truncated SVD of each weight (no calibration data; the baseline)"

    @dataclass
    class Options:
        pass


@register_lm_method("asvd")
class ASVD(LMMethod):
    summary = "activation-aware SVD (Yuan et al. 2023): input channels scaled by mean |activation|^alpha"
    stats = ("absmean",)

    @dataclass
    class Options(CalibrationOptions):
        alpha: float = field(default=0.5, metadata={"help": "asvd: exponent of the activation scaling (default 0.5, as published)"})

    def scale(self, stats):
        check(self.options.alpha > 0, f"--alpha must be > 0, got {self.options.alpha}")
        return asvd_scale(stats.abs_mean, self.options.alpha)


@register_lm_method("whiten")
class Whiten(LMMethod):
    summary = "truncation-aware data whitening (SVD-LLM, Wang et al. ICLR 2025): SVD of W S, S S^T = X^T X"
    stats = ("gram",)

    @dataclass
    class Options(CalibrationOptions):
        damp: float = field(default=1e-6, metadata={
            "help": "whiten: damping added to the Gram matrix, relative to its mean diagonal (default 1e-6; it only "
                    "orders directions the calibration data never excites)"})

    def scale(self, stats):
        check(self.options.damp >= 0, f"--damp must be >= 0, got {self.options.damp}")
        return GramScale(stats.gram, self.options.damp)  # used directly on the small side (decompose.whiten)


@register_lm_method("kfac")
class KFAC(Whiten):
    """factorlm's two-sided whitening for decoders: the truncation of ``L W S`` (``L L^T`` = the dense model's
    output-gradient Gram of the layer, ``S S^T`` = its input Gram; :mod:`factorlm.decompose.kfac`), i.e. the
    rank-k replacement minimising K-FAC's estimate of the next-token loss increase; under ``--rank-policy
    global`` the plan compares the triplets' ``sigma^2`` directly (loss units: ``--global-score`` does not
    apply).  Origin: KFAC-SVD / LEMS (two-sided), SVD-LLM (the input side), Martens & Grosse (K-FAC).  Differs
    from KFAC-SVD: ``G_out`` is the empirical Fisher's (true next tokens), damped (``--damp-out``), from the
    dense model over ``--grad-batches`` calibration batches (:func:`factorlm.lm.gradients.output_grams`; memory
    ``4 sum out^2`` bytes on the CPU), the input Gram from the calibration order ``--sequential`` and summed
    over the tokens (not their mean: every target sees every token, so the plan's comparison is unchanged);
    LEMS's error-propagation-aware allocation is not implemented.  ``--refine-steps`` (off by default here)
    starts from the two-sided fit and then minimises the block outputs' squared error, a different objective."""

    summary = ("two-sided K-FAC whitening (factorlm; KFAC-SVD/LEMS + SVD-LLM): SVD of L W S, L L^T = output-gradient "
               "Gram, S S^T = input Gram")
    output_side: ClassVar[bool] = True

    @dataclass
    class Options(Whiten.Options, OutputSideOptions):
        pass

    def __init__(self, options=None):
        super().__init__(options)
        self.check_output_side()


# the quantizing methods register on import (and stay importable from here)
from .quant_methods import (GPTQ, GPTQLowRank, QuantSpec, RTN, RTNLowRank, quant_ranks, rank_bytes,  # noqa: E402,F401
                            zero_point_of)
