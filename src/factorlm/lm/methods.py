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


# -- quantization, and quantization with a low-rank correction (issue 31) -------------------------------
@dataclass(frozen=True)
class QuantSpec:
    """How a quantizing method stores each target: ``bits``-bit codes in groups of ``group_size`` input
    channels (bf16 scales; ``zero_point``: a ``bits``-bit zero point per group too, packed), chosen by RTN or by GPTQ
    (``gptq``, damping ``percdamp``), plus a correction whose factors are int8 (``factor_bits=8``) or in the
    model's dtype (None)."""

    bits: int
    group_size: int
    factor_bits: int | None = None
    zero_point: bool = False
    gptq: bool = False
    percdamp: float = 0.01
    act_order: bool = False

    def describe(self) -> dict[str, Any]:
        d = {"bits": self.bits, "group_size": self.group_size, "zero_point": self.zero_point,
             "quantizer": "gptq" if self.gptq else "rtn"}
        if self.gptq:
            d.update(gptq_damp=self.percdamp, gptq_act_order=self.act_order)
        return d


ZERO_POINT = field(default=None, metadata={
    "type": bool,
    "help": "rtn / gptq (+ -lowrank): a zero point per group, packed to the codes' bits (asymmetric grid, torchao's asymmetric mapping; "
            "as many bits per group as the codes; default: on at 2-4 bits, where it measured better at equal bytes, off at 5-8)"})


def zero_point_of(options) -> bool:
    """``--zero-point`` as given, else on at 2-4 bits (SmolLM2-135M, BENCHMARKS.md "Decoder LLMs at equal
    bytes": int4-g192 1.34x dense with zero points vs 1.75x without, int3-g64 2.91x at 0.211 of the bf16
    bytes vs int3-g32's 4.01x at 0.219) and off at 5-8 bits (int8 is lossless without one)."""
    zp = getattr(options, "zero_point", None)
    return bool(zp) if zp is not None else options.bits <= 4


GPTQ_DAMP = field(default=0.01, metadata={
    "help": "gptq / gptq-lowrank: damping added to the Gram's diagonal, relative to its mean (GPTQ's percdamp; "
            "default 0.01, as published)"})
GPTQ_ACT_ORDER = field(default=False, metadata={
    "help": "gptq / gptq-lowrank: quantize the columns in descending order of the Gram's diagonal, with static "
            "groups (GPTQ's --act-order; default false, as the reference)"})


@dataclass
class QuantOptions:
    bits: int = field(default=4, metadata={"help": "rtn / rtn-lowrank: bits per quantized weight (2-8; default 4)"})
    group_size: int = field(default=32, metadata={
        "help": "rtn / rtn-lowrank: input channels sharing one bf16 scale (must divide every target's input width; "
                "default 32)"})
    zero_point: bool | None = ZERO_POINT


@register_lm_method("rtn")
class RTN(LMMethod):
    """Round-to-nearest weight quantization alone (:func:`factorlm.decompose.quantize.quantize_groups`): the
    baseline a user already has; ``--keep`` does not apply (the bytes follow from ``--bits`` /
    ``--group-size``)."""

    summary = "round-to-nearest quantization, one bf16 scale per group (torchao's primitives; --zero-point: asymmetric)"
    Options = QuantOptions
    #: whether ``--keep`` buys a low-rank correction of the quantization error
    corrects: ClassVar[bool] = False

    @property
    def quant(self) -> QuantSpec:
        return QuantSpec(self.options.bits, self.options.group_size, None, zero_point_of(self.options))


@register_lm_method("gptq")
class GPTQ(RTN):
    """GPTQ alone (Frantar et al., ICLR 2023; :mod:`factorlm.decompose.gptq`): the calibrated quantizer, on
    RTN's grid, from each layer's input Gram (``--sequential`` as for ``whiten``; ``none`` = every Gram from
    the dense model); ``--keep`` does not apply.  As published: damping 0.01, columns in input order
    (``--gptq-act-order true``: the reference's act-order, with static groups), the asymmetric grid at 2-4 bits
    (the reference's default, ``--sym`` off); differs: symmetric at 5-8 bits unless ``--zero-point true``."""

    summary = "GPTQ (Frantar et al. 2023): calibrated quantization with error feedback, on RTN's grid"
    stats = ("gram",)

    @dataclass
    class Options(CalibrationOptions, QuantOptions):
        gptq_damp: float = GPTQ_DAMP
        gptq_act_order: bool = GPTQ_ACT_ORDER

    @property
    def quant(self) -> QuantSpec:
        return QuantSpec(self.options.bits, self.options.group_size, None, zero_point_of(self.options), True,
                         self.options.gptq_damp, bool(self.options.gptq_act_order))


@register_lm_method("rtn-lowrank")
class RTNLowRank(LMMethod):
    """RTN plus a whitened low-rank correction of its error (EoRA-style,
    :mod:`factorlm.decompose.quantize`; factorlm's recipe, the default of ``--task lm``): ``--keep`` is the
    share of the targets' bf16 bytes the layers may store.  ``--byte-plan global`` (the default where the
    model is not offloaded; :mod:`factorlm.ranks.byte_plan`): every matrix gets its own grid (int8, int4 or
    int3, groups of 192 / 128 / 64 / 32, zero points at 2-4 bits) and correction rank, the pair priced by the
    layer's output-sensitivity weighted whitened error (the loss estimate of the global Fisher rank plan,
    ``--global-score fisher``), one Lagrangian price for all matrices.  ``--byte-plan uniform``: one grid
    (``--bits`` / ``--group-size``, else chosen from ``--keep`` by :meth:`resolve` from the measured
    frontier) and the same share of correction rank in every matrix.  The correction is fitted to the
    calibration inputs (``--sequential`` as for ``whiten``).  Ingredients: RTN on torchao's grid, EoRA's
    whitened correction (Liu et al. 2024), HAWQ-style sensitivity-priced mixed precision (Yao et al. 2021),
    factorlm's Fisher-weighted spectra; measured in BENCHMARKS.md, "Decoder LLMs at equal bytes".
    ``--correction-space kfac`` (opt-in): the correction is fitted, and the byte plan prices it, in the two-sided
    K-FAC norm ``||L (W - Q(W) - A B) S||`` of ``--method kfac`` (the output-gradient Grams replace the scalar
    output sensitivity)."""

    summary = ("RTN + a rank-k correction of its error in the calibration inputs' space (EoRA-style), grid and "
               "rank per matrix in one byte budget")
    stats = ("gram",)
    corrects: ClassVar[bool] = True
    #: per-block refinement of the int8 correction factors (AA-SVD's, :mod:`factorlm.lm.refine`) by default:
    #: 1.29x / 1.27x / 1.28x -> 1.19x / 1.16x / 1.17x dense over 3 calibration seeds at 0.25 of the bytes on
    #: SmolLM2-135M, paired t p < 0.001 (BENCHMARKS.md, "Decoder LLMs, session 42")
    default_refine_steps: ClassVar[int] = 32
    #: --byte-plan uniform: (smallest keep, bits, preferred groups) of the measured frontier (SmolLM2-135M,
    #: zero points at 3-4 bits): int8 from 0.52 of the bf16 bytes (1.00x dense), int4 in large groups from
    #: 0.26 (int4-g192-zp + 1% correction 1.18x at 0.267), int3 below (int3-g32-zp + 1.6% 1.61x at 0.249,
    #: int3-g64-zp + 3.9% 1.59x; the global plan: 1.30x at 0.250)
    AUTO = ((0.52, 8, (192, 128, 64, 32)), (0.26, 4, (192, 128, 64, 32)), (0.0, 3, (32, 64, 16)))

    @dataclass
    class Options(CalibrationOptions, OutputSideOptions):
        bits: int | None = field(default=None, metadata={
            "help": "rtn / rtn-lowrank: bits per quantized weight (2-8; rtn: default 4; rtn-lowrank: default "
                    "chosen from --keep: 8 from 0.52, 4 from 0.26, else 3)"})
        group_size: int | None = field(default=None, metadata={
            "help": "rtn / rtn-lowrank: input channels sharing one bf16 scale (must divide every target's input "
                    "width; rtn: default 32; rtn-lowrank: 32 for 3 bits, else the largest of 192 / 128 / 64 / 32 that "
                    "divides every input width)"})
        damp: float = field(default=1e-6, metadata={"help": "whiten: damping added to the Gram matrix (default 1e-6)"})
        factor_bits: int = field(default=8, metadata={
            "choices": (8, 16),
            "help": "rtn-lowrank: the correction factors stored as int8 codes in groups of 32 (8, default: half the "
                    "bytes, twice the rank; frozen) or in the model's dtype (16: trainable by --heal-steps)"})
        zero_point: bool | None = ZERO_POINT
        correction_space: str = field(default="input", metadata={
            "choices": ("input", "kfac"),
            "help": "rtn-lowrank / gptq-lowrank: where the correction is fitted and the byte plan prices it: input "
                    "(default: EoRA's whitened input space) or kfac (two-sided, as --method kfac: also the layer's "
                    "output-gradient Gram, --grad-batches / --damp-out; one backward per calibration window; "
                    "--refine-steps then starts from that fit and moves it toward the block outputs' squared error)"})
        byte_plan: str = field(default="auto", metadata={
            "choices": ("auto", "global", "uniform"),
            "help": "rtn-lowrank / gptq-lowrank: auto (default: global, or uniform under --offload, where the output "
                    "sensitivity's full backward is refused), uniform (one grid, the same share of correction bytes in every matrix) or "
                    "global (each matrix's grid among int8 / int4 / int3, or those of --bits, and its correction rank "
                    "from one byte budget, priced by the output-sensitivity weighted whitened error: "
                    "factorlm.ranks.byte_plan)"})

    def __init__(self, options=None):
        super().__init__(options)
        check(self.options.correction_space in ("input", "kfac"),
              f"--correction-space must be input or kfac, got {self.options.correction_space!r}")
        self.check_output_side()

    @property
    def output_side(self) -> bool:
        return self.options.correction_space == "kfac"

    def resolve(self, keep: float, shapes: dict[str, tuple[int, int]]) -> None:
        """Fill in ``bits`` / ``group_size`` left to the default (see :attr:`AUTO`): the bits of the first
        entry whose smallest keep ``keep`` reaches, then the first preferred group that divides every input
        width and whose codes (with the zero points of :func:`zero_point_of`) fit within ``keep``."""
        from ..decompose.quantize import rtn_bytes

        o = self.options
        self.given = (o.bits, o.group_size)  # as the user gave them (--byte-plan global chooses among grids)
        if o.bits is None:
            o.bits = next(b for lo, b, _ in self.AUTO if keep >= lo)
        if o.group_size is None:
            prefs = next((g for _, b, g in self.AUTO if b == o.bits), (128, 64, 32))
            widths = {i for _, i in shapes.values()}
            divide = [g for g in prefs if all(w % g == 0 for w in widths)]
            check(bool(divide), f"no group size of {prefs} divides every input width ({sorted(widths)}): give --group-size")
            zp = zero_point_of(o)
            fit = [g for g in divide if all(rtn_bytes(s, o.bits, g, zp) <= keep * 2 * s[0] * s[1] for s in shapes.values())]
            o.group_size = (fit or divide)[0]  # none fits: quant_ranks says which matrix and what to change

    @property
    def quant(self) -> QuantSpec:
        check(self.options.bits is not None and self.options.group_size is not None, "rtn-lowrank: unresolved bits")
        return QuantSpec(self.options.bits, self.options.group_size, 8 if self.options.factor_bits == 8 else None,
                         zero_point_of(self.options))

    def scale(self, stats):
        return GramScale(stats.gram, self.options.damp)


@register_lm_method("gptq-lowrank")
class GPTQLowRank(RTNLowRank):
    """EoRA as published (Liu et al. 2024: GPTQ, then the whitened low-rank correction of *its* error) in one
    byte budget: :class:`RTNLowRank` with GPTQ's codes (:mod:`factorlm.decompose.gptq`) instead of RTN's; the
    correction is fitted to the error of the stored GPTQ weights under the same input Gram."""

    summary = "EoRA (Liu et al. 2024): GPTQ + a rank-k correction of its error in the inputs' space, one byte budget"
    default_refine_steps = 0  # EoRA as published: no refinement unless asked

    @dataclass
    class Options(RTNLowRank.Options):
        gptq_damp: float = GPTQ_DAMP
        gptq_act_order: bool = GPTQ_ACT_ORDER

    @property
    def quant(self) -> QuantSpec:
        q = super().quant
        return QuantSpec(q.bits, q.group_size, q.factor_bits, q.zero_point, True, self.options.gptq_damp,
                         bool(self.options.gptq_act_order))


def quant_ranks(shapes: dict[str, tuple[int, int]], keep: float | None, spec: QuantSpec,
                elem_bytes: int) -> dict[str, int]:
    """Correction ranks that fill ``keep`` x each matrix's bf16 bytes after its quantized weights (0 for
    ``keep=None``, i.e. quantization alone); one-line error when the quantized weights alone exceed the budget."""
    from ..decompose.quantize import rtn_bytes

    bits, group, factor_bits = spec.bits, spec.group_size, spec.factor_bits
    out = {}
    for n, (o, i) in shapes.items():
        check(i % group == 0, f"--group-size {group} does not divide the input width {i} of {n}")
        if keep is None:
            out[n] = 0
            continue
        q = rtn_bytes((o, i), bits, group, spec.zero_point)
        left = keep * 2 * o * i - q
        zp = " with zero points" if spec.zero_point else ""
        check(left >= 0, f"--keep {keep:g} of the bf16 bytes is below what int{bits} in groups of {group}{zp} stores "
                         f"alone ({q / (2 * o * i):.3f} for {n}): raise --keep, lower --bits or enlarge --group-size")
        out[n] = min(int(left // rank_bytes(o, i, factor_bits, elem_bytes)), min(o, i))
        check(not (out[n] and factor_bits == 8 and (o % 32 or i % 32)),
              f"int8 correction factors are stored in groups of 32, and {n} is {o}x{i}: use --factor-bits 16")
    return out


def rank_bytes(o: int, i: int, factor_bits: int | None, elem_bytes: int) -> int:
    """Bytes of one correction rank of an ``o x i`` matrix: ``o + i`` factor weights, int8 with a bf16 scale
    per 32 (``factor_bits=8``), or in the model's dtype (``elem_bytes`` each)."""
    return (o + i) + 2 * (o + i) // 32 if factor_bits == 8 else (o + i) * elem_bytes
