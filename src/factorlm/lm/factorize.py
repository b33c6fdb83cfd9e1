"""Stage: factorize every target in place with the method's input scaling, block by block.

Each target ``W`` becomes a :class:`~factorlm.layers.lowrank.LowRankLinear` ``A B`` with
``A B = U_k U_k^T W`` (:mod:`factorlm.decompose.whiten`: ``U`` of ``W S`` through the small side, in
float64), the factors cast to the model's dtype.  A calibrated method gets its statistics from
:func:`factorlm.lm.calibrate.stream` (the calibration order ``--sequential``); each block's time is
logged.  Only one matrix's float64 work exists at a time beside the model.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from ..layers.lowrank import LowRankLinear
from ..layers.quantized import QuantLowRankLinear
from ..models.surgery import get_module, linear_weight, set_module
from .calibrate import stream


def factorize(model: nn.Module, targets: list[str], ranks: dict[str, int], method, batches, *,
              mode: str, log=None, keep_dense: dict[str, nn.Module] | None = None,
              offload_to=None, quant=None, refine=None, refine_metrics=None) -> dict[str, Any]:
    """Replace every target by its rank-``ranks[name]`` :class:`LowRankLinear` (in place); returns
    per-target facts (rank, share of the scaled spectrum's energy discarded), the stream's work and
    the seconds per block.  ``keep_dense``: a dict that receives the replaced dense modules (moved to
    the CPU), for a distillation teacher; None drops them.  ``offload_to``: the execution device of a
    model kept on the CPU (blocks visit it one at a time; an uncalibrated method's matrices do too).
    ``quant`` (a :class:`factorlm.lm.quant_methods.QuantSpec`, or one per target): every target becomes a :class:`QuantLowRankLinear`
    (RTN or GPTQ codes + a rank-``ranks[name]`` correction of their error under the method's scaling) instead.
    ``refine`` (a :class:`factorlm.lm.refine.RefineSpec` with steps > 0): every block's factors are then
    refined to the dense block's outputs (:mod:`factorlm.lm.refine`); its per-block errors are returned.
    ``refine_metrics`` ({block index: M}, ``--refine-loss fisher``): each block's error weighted by its M."""
    from ..decompose.whiten import factors_from_basis, scaled_factors
    from ..decompose.anchor import anchored_target
    from ..decompose.kfac import kfac_fit
    from ..decompose.whiten import GramScale

    facts: dict[str, dict[str, Any]] = {}
    two_sided = bool(getattr(method, "output_side", False))  # kfac / --correction-space kfac
    block_seconds: list[float] = []
    clock = {"t": time.perf_counter(), "block": None}

    def replace(names, scale, stats=None):
        for n in names:
            m = get_module(model, n)
            W = linear_weight(m).detach()
            home = W.device
            if offload_to is not None:
                W = W.to(offload_to)
            k = ranks[n]
            bias = m.bias.detach() if getattr(m, "bias", None) is not None else None
            if getattr(stats, "cross", None) is not None:  # --sequential anchored: reproduce the dense outputs
                lam = method.options.anchor_damp
                W = anchored_target(W, stats.gram, stats.cross, lam)
                if isinstance(scale, GramScale):  # the ridge's objective is the truncation under C + lam I
                    scale = GramScale(scale.gram, max(scale.damp, lam))
            if quant:
                q = quant[n] if isinstance(quant, dict) else quant  # --byte-plan global: one grid per target
                gram = stats.gram if q.gptq else None
                new = QuantLowRankLinear.from_weight(W, q.bits, q.group_size, k, scale, bias,
                                                     factor_bits=q.factor_bits, zero_point=q.zero_point,
                                                     gram=gram, percdamp=q.percdamp, act_order=q.act_order,
                                                     gram_out=method.gram_out(n) if two_sided and k else None,
                                                     damp_out=getattr(method.options, "damp_out", 0.01)).to(home)
                set_module(model, n, new)
                if keep_dense is not None:
                    keep_dense[n] = m.cpu().requires_grad_(False)
                facts[n] = {"rank": k, "shape": list(W.shape), **q.describe(),
                            "factor_bits": q.factor_bits or "model dtype"}
                continue
            if two_sided:  # kfac: the truncation of L W S (decompose/kfac.py)
                A, B, sigma = kfac_fit(W, k, scale, method.gram_out(n), method.options.damp_out)
            else:
                U, sigma = scaled_factors(W, scale)
                A, B = factors_from_basis(W, U, k)
                del U
            A, B = A.to(home), B.to(home)
            energy = sigma.pow(2)
            lost = float(energy[k:].sum() / energy.sum()) if energy.sum() > 0 else 0.0
            set_module(model, n, LowRankLinear.from_factors(A.contiguous(), B.contiguous(), bias))
            if keep_dense is not None:
                keep_dense[n] = m.cpu().requires_grad_(False)
            facts[n] = {"rank": k, "shape": list(W.shape), "energy_lost": round(lost, 6)}

    def on_group(i, names, stats):
        if clock["block"] is not None and clock["block"] != i:
            block_seconds.append(round(time.perf_counter() - clock["t"], 2))
            clock["t"] = time.perf_counter()
            if log:
                log(f"  block {clock['block']}: {block_seconds[-1]:.1f}s")
        clock["block"] = i
        replace(names, method.scale(stats), stats)

    work: dict[str, Any] = {}
    if not method.calibrated:
        replace(targets, None)
        return {"modules": facts, "calibration": work}
    refined: list[dict[str, Any]] = []

    def on_block(i, block, local, calls, dense_out):
        from .refine import refine_block

        t0 = time.perf_counter()
        r = refine_block(block, local, calls, dense_out, refine, None if refine_metrics is None else refine_metrics[i])
        refined.append({"block": i, **r, "seconds": round(time.perf_counter() - t0, 2)})
        if log:
            log(f"  block {i} refined: output error {r['error_before']:.4g} -> {r['error_after']:.4g}"
                + ("" if r["kept"] else " (not better: one-shot fit kept)"))

    use_refine = refine is not None and refine.steps > 0
    prog = stream(model, targets, batches, method.make_stats, on_group, mode=mode, log=log, offload_to=offload_to,
                  refine=on_block if use_refine else None)
    block_seconds.append(round(time.perf_counter() - clock["t"], 2))
    work = {"blocks": prog.blocks, "groups": prog.groups, "block_forwards": prog.forwards, "tokens": prog.tokens,
            "groups_of_block_0": prog.group_names[: prog.groups // max(prog.blocks, 1)],
            "seconds_per_block": block_seconds}
    out = {"modules": facts, "calibration": work}
    if use_refine:
        out["refine"] = {"steps": refine.steps, "lr": refine.lr, "params": refine.params,
                         "loss": "mse" if refine_metrics is None else "fisher", "warmup": refine.warmup,
                         "floor": refine.floor, "clip": refine.clip, "guard": refine.guard, "weight_decay": 0.0,
                         "blocks": refined,
                         "kept": sum(r["kept"] for r in refined)}
    return out
