"""One-shot compression of causal language models (``--task lm``): ``svd``, ``asvd``, ``whiten`` (low rank),
``rtn`` (quantization alone) and ``rtn-lowrank`` (quantization + a low-rank correction, one byte budget).

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
from typing import Any, ClassVar

import torch

from ..decompose.whiten import GramScale, InputStats, asvd_scale
from ..errors import check
from ..registry import Registry
from ..methods.base import build_options

#: --task lm method name -> class
LM_METHODS: Registry[type["LMMethod"]] = Registry("--task lm method")
SEQUENTIAL = ("layer", "block", "none")


@dataclass
class CalibrationOptions:
    sequential: str = field(default="layer", metadata={
        "choices": SEQUENTIAL,
        "help": "calibration order: layer = every group of layers sees the compressed layers before it (default); "
                "block = per block; none = one pass over the dense model (SVD-LLM's profile)"})


class LMMethod:
    name: ClassVar[str] = "abstract"
    summary: ClassVar[str] = ""
    #: which input statistics the scaling needs (an empty tuple: no calibration data at all)
    stats: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = CalibrationOptions

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = build_options(self.Options, options or {}, self.name)
        seq = getattr(self.options, "sequential", "layer")
        check(seq in SEQUENTIAL, f"--sequential must be one of {', '.join(SEQUENTIAL)}, got {seq!r}")

    @property
    def calibrated(self) -> bool:
        return bool(self.stats)

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


# -- quantization, and quantization with a low-rank correction (issue 31) -------------------------------
@dataclass
class QuantOptions:
    bits: int = field(default=4, metadata={"help": "rtn / rtn-lowrank: bits per quantized weight (2-8; default 4)"})
    group_size: int = field(default=32, metadata={
        "help": "rtn / rtn-lowrank: input channels sharing one bf16 scale (must divide every target's input width; "
                "default 32)"})


@register_lm_method("rtn")
class RTN(LMMethod):
    """Round-to-nearest weight quantization alone (:func:`factorlm.decompose.quantize.rtn`): the baseline a
    user already has; ``--keep`` does not apply (the bytes follow from ``--bits`` / ``--group-size``)."""

    summary = "round-to-nearest quantization, symmetric, one bf16 scale per group (torchao's primitives)"
    Options = QuantOptions

    @property
    def quant(self) -> tuple[int, int]:
        return self.options.bits, self.options.group_size


@register_lm_method("rtn-lowrank")
class RTNLowRank(LMMethod):
    """RTN plus a whitened low-rank correction of its error (EoRA-style,
    :mod:`factorlm.decompose.quantize`; factorlm's recipe): ``--keep`` is the share of the targets' bf16
    bytes the layer may store; what the quantized weights leave buys the same share of correction rank in
    every matrix, fitted to the calibration inputs (``--sequential`` as for ``whiten``)."""

    summary = "RTN + a rank-k correction of its error in the calibration inputs' space (EoRA-style), in one byte budget"
    stats = ("gram",)

    @dataclass
    class Options(CalibrationOptions, QuantOptions):
        bits: int = field(default=3, metadata={"help": "rtn / rtn-lowrank: bits per quantized weight (2-8; default "
                                                        "4 for rtn, 3 for rtn-lowrank)"})
        group_size: int = field(default=64, metadata={
            "help": "rtn / rtn-lowrank: input channels sharing one bf16 scale (must divide every target's input "
                    "width; default 32 for rtn, 64 for rtn-lowrank)"})
        damp: float = field(default=1e-6, metadata={"help": "whiten: damping added to the Gram matrix (default 1e-6)"})

    @property
    def quant(self) -> tuple[int, int]:
        return self.options.bits, self.options.group_size

    def scale(self, stats):
        return GramScale(stats.gram, self.options.damp)


def quant_ranks(shapes: dict[str, tuple[int, int]], keep: float | None, bits: int, group: int,
                factor_bytes: int) -> dict[str, int]:
    """Correction ranks that fill ``keep`` x each matrix's bf16 bytes after its quantized weights (0 for
    ``keep=None``, i.e. RTN alone); one-line error when the quantized weights alone exceed the budget."""
    from ..decompose.quantize import rtn_bytes

    out = {}
    for n, (o, i) in shapes.items():
        check(i % group == 0, f"--group-size {group} does not divide the input width {i} of {n}")
        if keep is None:
            out[n] = 0
            continue
        left = keep * 2 * o * i - rtn_bytes((o, i), bits, group)
        check(left >= 0, f"--keep {keep:g} of the bf16 bytes is below what int{bits} in groups of {group} stores "
                         f"alone ({rtn_bytes((o, i), bits, group) / (2 * o * i):.3f} for {n}): raise --keep or lower --bits")
        out[n] = min(int(left // ((o + i) * factor_bytes)), min(o, i))
    return out
