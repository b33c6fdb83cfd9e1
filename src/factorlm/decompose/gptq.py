"""GPTQ: calibrated group-wise weight quantization with error feedback (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023, https://arxiv.org/abs/2210.17323;
reference code https://github.com/IST-DASLab/gptq, ``gptq.py`` ``fasterquant``).

GPTQ minimises the layer's output error on calibration inputs ``X``, ``||X W^T - X Q^T||_F^2 =
tr((W - Q) H (W - Q)^T)`` with ``H = X^T X`` (the same Gram SVD-LLM whitens with), one input column at a
time: column ``j`` is rounded to the grid, and its error, divided by ``[H^-1]_jj``, is subtracted from the
columns not yet quantized along row ``j`` of the upper Cholesky factor of ``H^-1`` (the optimal update of the
remaining weights, Optimal Brain Surgeon), lazily in blocks of columns.

As published (Algorithm 1 and the reference ``fasterquant``): the damping ``percdamp * mean(diag H)`` (0.01),
dead inputs (``H_jj = 0``) zeroed, the Cholesky form of ``H^-1``, lazy batch updates, group parameters
computed when the group's first column is reached, from the error-updated weights.  Differs: (1) the grid is
factorlm's (:func:`factorlm.decompose.quantize.rtn`: torchao's affine primitives, symmetric by default or
with an integer zero point, bf16 scales), so with ``H = I`` GPTQ returns exactly the RTN codes (tested);
(2) a group's parameters are taken from the block's *updated* columns (the reference reads the group from
the outer matrix, whose columns inside the current block are not yet updated); the block length is a
multiple of the group size so a group never straddles two blocks.  ``act_order=True`` (opt-in, off by default
as in the reference): the columns are visited in descending ``H_jj`` (the reference's ``--act-order``) with
*static* groups, i.e. every group's parameters computed up front from the unquantized weights, so the stored
groups stay contiguous (AutoGPTQ's ``desc_act`` + ``static_groups``; the reference's act-order with groups
re-reads the parameters in the permuted order and needs a group index per column instead).

Why here rather than a library: torchao's GPTQ (``torchao.prototype.gptq``) asserts a CUDA device (and its
int4 path needs ``mslk``); llm-compressor pins transformers <= 5.17; GPTQModel / AutoGPTQ need CUDA builds.
"""

from __future__ import annotations

import torch

from ..errors import check
from .quantize import qparams, qrange


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, *, zero_point: bool = False,
         percdamp: float = 0.01, block_size: int = 128, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                                 torch.Tensor]:
    """``(codes int8 (out, in), scales bf16 (out, in / g), zeros int8 (out, in / g) or None, W_hat)``: GPTQ of
    ``W`` (out, in) under the input Gram ``H`` (in, in, e.g. ``sum x x^T`` of the calibration inputs; its
    scale does not matter), on the grid of :func:`factorlm.decompose.quantize.rtn` (same bits, groups and
    zero-point convention; ``W_hat`` = the codes dequantized, in ``W``'s dtype)."""
    check(2 <= bits <= 8, f"quantization bits must be in [2, 8], got {bits}")
    out, inp = W.shape
    check(group_size > 0 and inp % group_size == 0, f"the group size {group_size} must divide the input width {inp}")
    check(tuple(H.shape) == (inp, inp), f"GPTQ's Gram must be {inp}x{inp} for a {out}x{inp} weight, got {tuple(H.shape)}")
    check(percdamp >= 0, f"GPTQ damping must be >= 0, got {percdamp}")
    dev = W.device
    Wf = W.detach().to(torch.float32).clone()
    Hf = H.detach().to(device=dev, dtype=torch.float32).clone()
    check(bool(torch.isfinite(Hf).all()), "GPTQ's Gram has NaN/Inf entries (non-finite layer inputs?)")
    dead = Hf.diagonal() == 0
    Hf[dead, dead] = 1
    Wf[:, dead] = 0
    perm = None
    if act_order:  # static groups from the unquantized weights, then the columns by descending H_jj
        s_all, z_all = qparams(Wf, bits, zero_point, group_size)
        perm = torch.argsort(Hf.diagonal(), descending=True)
        Wf, Hf = Wf[:, perm], Hf[perm][:, perm]
    Hf.diagonal().add_(percdamp * float(Hf.diagonal().mean()))
    L, info = torch.linalg.cholesky_ex(Hf)
    check(int(info) == 0, "GPTQ: the damped Gram is not positive definite (raise the damping)")
    Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    check(int(info) == 0, "GPTQ: the inverse Gram lost positive definiteness (raise --gptq-damp)")
    del Hf, L
    lo, hi = qrange(bits)
    ngroups = inp // group_size
    codes = torch.empty(out, inp, dtype=torch.int8, device=dev)
    W_hat = torch.empty(out, inp, dtype=torch.float32, device=dev)
    scales = torch.empty(out, ngroups, dtype=torch.bfloat16, device=dev)
    zeros = torch.empty(out, ngroups, dtype=torch.int8, device=dev) if zero_point else None
    if act_order:
        scales.copy_(s_all.to(torch.bfloat16))
        if zeros is not None:
            zeros.copy_(z_all.to(torch.int8))
        order = perm.tolist()
    step = group_size * max(1, -(-block_size // group_size))  # a multiple of the group size
    for b0 in range(0, inp, step):
        b1 = min(b0 + step, inp)
        W1 = Wf[:, b0:b1].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if act_order:  # the column's own (static) group
                oc = order[col]
                g = oc // group_size
                sf, zf = s_all[:, g], z_all[:, g]
                inv = 1.0 / sf
            elif col % group_size == 0:
                g = col // group_size
                s, z = qparams(W1[:, i:i + group_size], bits, zero_point)  # (out, 1) each, s bf16-rounded
                scales[:, g] = s[:, 0].to(torch.bfloat16)
                if zeros is not None:
                    zeros[:, g] = z[:, 0].to(torch.int8)
                inv, zf = 1.0 / s[:, 0], z[:, 0].float()
                sf = s[:, 0]
            w = W1[:, i]
            q = torch.clamp(torch.round(w * inv) + zf, lo, hi)  # torchao's quantize_affine, one column
            wq = (q - zf) * sf  # its dequantize_affine
            oc = order[col] if act_order else col
            codes[:, oc] = q.to(torch.int8)
            W_hat[:, oc] = wq
            err = (w - wq) / Hb[i, i]
            W1[:, i:] -= err[:, None] * Hb[i, i:][None, :]
            Err[:, i] = err
        Wf[:, b1:] -= Err @ Hinv[b0:b1, b1:]
    return codes, scales, zeros, W_hat.to(W.dtype)


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - W_hat) H (W - W_hat)^T)``: the squared output error on the inputs whose Gram is ``H``."""
    E = W.detach().double() - W_hat.detach().double()
    return float(((E @ H.double()) * E).sum())
