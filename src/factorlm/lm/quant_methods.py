"""``--task lm`` quantizing methods: ``rtn`` / ``gptq`` (quantization alone) and ``rtn-lowrank`` /
``gptq-lowrank`` (quantization + a low-rank correction of its error in one byte budget; ``gptq-lowrank`` is
EoRA's published setting), with their storage spec :class:`QuantSpec` and the byte arithmetic of a rank.
The low-rank methods and the shared base class are in :mod:`factorlm.lm.methods` (which re-exports these).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..decompose.whiten import GramScale
from ..errors import check
from .methods import CalibrationOptions, LMMethod, OutputSideOptions, register_lm_method

__all__ = ["GPTQ", "GPTQLowRank", "QuantSpec", "RTN", "RTNLowRank", "quant_ranks", "rank_bytes", "zero_point_of"]


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
