"""Round-to-nearest weight quantization and a whitened low-rank correction of its error.

*Quantization* (the baseline users already have): symmetric, group-wise round-to-nearest of each row of
``W`` (out, in) in groups of ``group_size`` consecutive input channels, ``bits``-bit integer codes in
``[-2^(b-1), 2^(b-1) - 1]`` and one bf16 scale per group (rounded up, so the grid covers the group), through torchao's affine quantization
primitives (``choose_qparams_affine`` / ``quantize_affine`` / ``dequantize_affine``, symmetric mapping:
``scale = max|w| / ((q_max - q_min) / 2)``).  Stored bytes: ``bits / 8`` per weight plus 2 per group.
Optionally (``zero_point=True``) asymmetric: an integer zero point per group (torchao's asymmetric mapping,
its range widened to include 0), ``bits`` more bits per group (packed like the codes).  The calibrated quantizer on the same grid is
:mod:`factorlm.decompose.gptq`.

*Correction* (EoRA: S.-Y. Liu et al., "EoRA: Fine-tuning-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation", 2024, https://arxiv.org/abs/2410.21271, code
https://github.com/NVlabs/EoRA): the quantization error ``E = W - Q(W)`` is approximated at rank ``k``
in the space of the layer's inputs, ``min_{rank C <= k} ||(E - C) X^T||_F``, whose minimiser is the
whitened truncation of ``E`` (:mod:`factorlm.decompose.whiten`: ``C = U_k U_k^T E`` with ``U`` the left
singular vectors of ``E S``, ``S S^T = X^T X``); the layer becomes ``Q(W) + A B``.  As published: the
eigenspace of the calibration inputs' Gram (EoRA projects ``E`` onto it, scaled by the square roots of
its eigenvalues, which is one choice of ``S``; every ``S`` gives the same ``C``, see ``whiten``).
Differs: the quantizer here is RTN, where EoRA compensates GPTQ / SparseGPT models.
"""

from __future__ import annotations

import torch

from ..errors import check


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def qparams(x: torch.Tensor, bits: int, zero_point: bool = False, group_size: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero)`` (each (rows, cols / g), float32; the scale rounded to bf16 as stored) of the groups of
    ``group_size`` columns of ``x`` (None: one group of all columns), by torchao's ``choose_qparams_affine``:
    symmetric (``scale = max|x| / ((q_max - q_min) / 2)``, zero 0) or, ``zero_point=True``, asymmetric with an
    integer zero point (the range widened to include 0, so 0 stays exact).

    The float32 scale is rounded *up* to bf16 (:func:`bf16_ceil`), not to nearest as a cast does: a scale
    rounded down shrinks the grid's range below the group's extremes, so its largest weight is clipped (an
    int8 group's largest weight then errs by up to ~1 step instead of 1/2).  The zero point is computed
    with the stored scale, by torchao's formula ``q_min - round(min(x, 0) / scale)``."""
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine

    lo, hi = qrange(bits)
    rows, cols = x.shape
    g = group_size or cols
    mapping = MappingType.ASYMMETRIC if zero_point else MappingType.SYMMETRIC
    xf = x.float()
    scale, zero = choose_qparams_affine(xf, mapping, (1, g), torch.int8, quant_min=lo, quant_max=hi,
                                        scale_dtype=torch.float32)
    # torchao squeezes a single group away: back to (rows, groups)
    scale = bf16_ceil(scale.reshape(rows, cols // g)).float()
    if zero_point:
        low = xf.reshape(rows, cols // g, g).amin(dim=-1).clamp(max=0)
        zero = (lo - torch.round(low / scale)).clamp(lo, hi)
    return scale, zero.float().reshape(rows, cols // g)


def bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each element of the float32 ``x`` (a cast rounds to nearest, i.e. down about
    half the time)."""
    b = x.to(torch.bfloat16)
    return torch.where(b.float() < x, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


def quantize_groups(W: torch.Tensor, bits: int, group_size: int, zero_point: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(codes int8 (out, in), scales bf16 (out, in / g), zeros int8 (out, in / g) or None, W_hat)``: the
    group-wise RTN of ``W`` (symmetric, or with an integer zero point per group) and its dequantized value
    ``(codes - zero) * scale`` in ``W``'s dtype (computed in float32), through torchao's affine primitives."""
    from torchao.quantization.quant_primitives import dequantize_affine, quantize_affine

    check(2 <= bits <= 8, f"quantization bits must be in [2, 8], got {bits}")
    out, inp = W.shape
    check(group_size > 0 and inp % group_size == 0,
          f"the group size {group_size} must divide the input width {inp}")
    lo, hi = qrange(bits)
    block = (1, group_size)
    x = W.detach().float()
    scale, zero = qparams(x, bits, zero_point, group_size)
    zero = zero.to(torch.int32)
    codes = quantize_affine(x, block, scale, zero, torch.int8, lo, hi)
    W_hat = dequantize_affine(codes, block, scale, zero, torch.int8, lo, hi, output_dtype=torch.float32)
    zeros = zero.to(torch.int8) if zero_point else None
    return codes, scale.to(torch.bfloat16), zeros, W_hat.to(W.dtype)


def rtn(W: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes int8 (out, in), scales bf16 (out, in / group_size), W_hat)``: the group-wise symmetric RTN of
    ``W`` and its dequantized value ``codes * scale`` in ``W``'s dtype (computed in float32)."""
    codes, scale, _, W_hat = quantize_groups(W, bits, group_size)
    return codes, scale, W_hat


def rtn_bytes(shape: tuple[int, int], bits: int, group_size: int, zero_point: bool = False) -> int:
    """Stored bytes of :func:`quantize_groups`'s output: packed codes plus one bf16 scale per group (and, with
    ``zero_point``, one ``bits``-bit zero point per group, packed like the codes)."""
    out, inp = shape
    groups = out * (inp // group_size)
    return (out * inp * bits + 7) // 8 + 2 * groups + ((groups * bits + 7) // 8 if zero_point else 0)


def error_correction(W: torch.Tensor, W_hat: torch.Tensor, rank: int, scale=None, gram_out: torch.Tensor | None = None,
                     damp_out: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank`` minimising ``||(W - W_hat - A B) S||_F`` (``scale``: a
    :mod:`factorlm.decompose.whiten` input scaling, e.g. a ``GramScale``; None = plain Frobenius); with
    ``gram_out`` (the layer's output-gradient Gram) ``||L (W - W_hat - A B) S||_F`` instead, ``L L^T = gram_out``
    damped by ``damp_out`` (the two-sided K-FAC fit of :func:`factorlm.decompose.kfac.kfac_fit`)."""
    from .whiten import GramScale, factors_from_basis, scaled_factors

    E = (W.detach().double() - W_hat.detach().double())
    check(1 <= rank <= min(E.shape), f"rank {rank} is out of range for a {tuple(E.shape)} matrix")
    if gram_out is not None:
        from .kfac import kfac_fit

        check(isinstance(scale, GramScale), "a two-sided correction needs the input Gram (a GramScale)")
        A, B, _ = kfac_fit(E, rank, scale, gram_out, damp_out)
        return A.to(W.dtype), B.to(W.dtype)
    U, _ = scaled_factors(E, scale)
    A, B = factors_from_basis(E, U, rank)
    return A.to(W.dtype), B.to(W.dtype)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit integer codes -> a flat uint8 tensor of ``ceil(n * bits / 8)`` bytes (every 8
    codes fill ``bits`` bytes, little-endian; the codes are offset by ``2^(bits-1)`` to be non-negative)."""
    lo, hi = qrange(bits)
    flat = codes.reshape(-1).to(torch.int64)
    check(bool(((flat >= lo) & (flat <= hi)).all()), f"codes outside the {bits}-bit range [{lo}, {hi}]")
    n = flat.numel()
    pad = (-n) % 8
    v = torch.cat([flat - lo, flat.new_zeros(pad)]).reshape(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=flat.device) * bits
    word = (v << shifts).sum(dim=1)  # 8 * bits <= 64 bits per row
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=flat.device) * 8
    out = ((word[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: (n * bits + 7) // 8]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` signed codes as int8."""
    lo, _ = qrange(bits)
    rows = (n + 7) // 8
    raw = torch.cat([packed.reshape(-1).to(torch.int64), packed.new_zeros(rows * bits - packed.numel(),
                                                                         dtype=torch.uint8).to(torch.int64)])
    raw = raw.reshape(rows, bits)
    dev = packed.device
    word = (raw << (torch.arange(bits, dtype=torch.int64, device=dev) * 8)).sum(dim=1)
    v = (word[:, None] >> (torch.arange(8, dtype=torch.int64, device=dev) * bits)) & ((1 << bits) - 1)
    return (v.reshape(-1)[:n] + lo).to(torch.int8)
