"""Stage: plan the ranks of the targets (``--rank``, ``--rank-policy uniform | global``).

The global plan needs every target's scaled spectrum from the dense model (:func:`spectra`): one
calibration pass (no factorization) for a calibrated method, weights alone for ``svd`` with
``--global-score energy``; ``--global-score fisher`` weights each spectrum by the layer's output
sensitivity, which needs calibration batches (:func:`factorlm.lm.gradients.output_sensitivity`);
``--method kfac``'s spectra (of ``L W S``) estimate the loss already and are compared as they are.
"""

from __future__ import annotations

import math

import torch

from ..config import RunConfig
from ..errors import check
from ..models.surgery import get_module, linear_weight


def plan_ranks(c: RunConfig, shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor] | None,
               loss_units: bool = False) -> dict[str, int]:
    """``{target: rank}``: ``--rank``, the same share of every matrix (uniform), or global allocation.
    ``loss_units``: the spectra already estimate loss (``kfac``'s), compared as they are."""
    from ..ranks.allocator import global_rank_plan
    from ..ranks.budget import break_even_rank, ratio_plan, round_rank

    if c.rank is not None:
        out = {}
        for n, (o, i) in shapes.items():
            check(c.rank <= min(o, i), f"--rank {c.rank} is larger than {n} ({o}x{i}) allows ({min(o, i)})")
            out[n] = c.rank
        return out
    if c.rank_policy == "uniform":
        return ratio_plan(shapes, c.keep, c.rank_multiple)
    # fisher: the spectra are already loss-weighted (comparable in absolute units); energy: each
    # matrix's relative error
    plan = global_rank_plan(spectra, shapes, c.keep, "none" if loss_units or c.global_score == "fisher" else "energy",
                            per_param=c.rank_price == "weight")
    return {n: round_rank(k, c.rank_multiple, break_even_rank(*shapes[n])) for n, k in plan.items()}


def spectra(model, targets, method, batches, log, score: str = "energy", offload_to=None) -> dict[str, torch.Tensor]:
    """Every target's scaled spectrum from the dense model (for the global plan); ``score="fisher"``
    multiplies each by ``sqrt(lambda)``, its output sensitivity (:func:`gradients.output_sensitivity`),
    so that a squared singular value estimates the loss its truncation costs.  ``offload_to``: see
    :func:`factorlm.lm.calibrate.stream` (fisher's full backward is refused there: see
    :mod:`factorlm.lm.placement`)."""
    from ..decompose.whiten import scaled_spectrum
    from .calibrate import stream
    from .gradients import output_sensitivity

    out: dict[str, torch.Tensor] = {}
    if getattr(method, "output_side", False):  # kfac: sigma of L W S, already loss units (--global-score n/a)
        from ..decompose.kfac import kfac_spectrum

        def on_kfac(i, names, stats):
            scale = method.scale(stats)
            for n in names:
                out[n] = kfac_spectrum(linear_weight(get_module(model, n)).detach(), scale.gram, method.gram_out(n),
                                       scale.damp, method.options.damp_out).cpu()

        stream(model, targets, batches, method.make_stats, on_kfac, mode="none", log=log, offload_to=offload_to)
        return out
    if score == "fisher":
        check(len(batches) > 0, "--global-score fisher needs calibration batches (the output sensitivity is "
                                "measured on them)")
        check(offload_to is None, "--global-score fisher back-propagates through the whole model at once, which "
                                  "--offload cannot bound: use --global-score energy or --rank-policy uniform")
        lam = output_sensitivity(model, targets, batches)
        plain = spectra(model, targets, method, batches, log)
        return {n: sv * lam[n] ** 0.5 for n, sv in plain.items()}
    if not method.calibrated:
        for n in targets:
            W = linear_weight(get_module(model, n)).detach()
            out[n] = scaled_spectrum(W if offload_to is None else W.to(offload_to), None).cpu()
        return out

    def on_group(i, names, stats):
        scale = method.scale(stats)
        for n in names:
            out[n] = scaled_spectrum(linear_weight(get_module(model, n)).detach(), scale).cpu()

    stream(model, targets, batches, method.make_stats, on_group, mode="none", log=log, offload_to=offload_to)
    return out


PLAN_GROUPS = (192, 128, 64, 32)


def grid_candidates(method, shapes: dict[str, tuple[int, int]]) -> list:
    """The grids ``--byte-plan global`` chooses from (:class:`factorlm.lm.quant_methods.QuantSpec` each): the
    bits of ``--bits`` if given, else 8, 4 and 3; each in every group of :data:`PLAN_GROUPS` that divides
    every input width (``--group-size`` if given; 8 bits: only the largest, int8 being lossless already);
    zero points as :func:`factorlm.lm.quant_methods.zero_point_of` gives them for those bits."""
    import copy

    from .quant_methods import QuantSpec, zero_point_of

    o = method.options
    base = method.quant  # the quantizer (RTN or GPTQ, its damping and order) every grid shares
    given_bits, given_group = getattr(method, "given", (o.bits, o.group_size))  # before resolve() filled them
    widths = {i for _, i in shapes.values()}
    groups = [given_group] if given_group is not None else [g for g in PLAN_GROUPS if all(w % g == 0 for w in widths)]
    check(bool(groups) and all(w % groups[0] == 0 for w in widths),
          f"no group size of {groups or PLAN_GROUPS} divides every input width ({sorted(widths)}): give --group-size")
    out = []
    for bits in ([given_bits] if given_bits is not None else [8, 4, 3]):
        for group in (groups[:1] if bits == 8 else groups):
            opts = copy.copy(o)
            opts.bits, opts.group_size = bits, group
            out.append(QuantSpec(bits, group, base.factor_bits, zero_point_of(opts), base.gptq, base.percdamp,
                                 base.act_order))
    return out


def check_byte_plan(method, keep: float, shapes: dict[str, tuple[int, int]]) -> list:
    """The grids of :func:`grid_candidates`, after checking (before any work) that the cheapest grid of every
    matrix fits ``keep`` x the targets' bf16 bytes."""
    from ..decompose.quantize import rtn_bytes

    grids = grid_candidates(method, shapes)
    total = 2 * sum(o * i for o, i in shapes.values())
    floor = sum(min(rtn_bytes(s, q.bits, q.group_size, q.zero_point) for q in grids) for s in shapes.values())
    names = ", ".join(f"int{q.bits} in groups of {q.group_size}" + (" with zero points" if q.zero_point else "")
                      for q in grids)
    check(floor <= keep * total, f"--keep {keep:g} of the bf16 bytes is below what the cheapest grid ({names}) "
                                 f"stores alone ({floor / total:.3f}): raise --keep, lower --bits or enlarge --group-size")
    return grids


def byte_plan_targets(model, targets, method, batches, keep: float, shapes: dict[str, tuple[int, int]], log,
                      elem_bytes: int, grids: list) -> tuple[dict[str, int], dict]:
    """``--byte-plan global``: ``({target: correction rank}, {target: QuantSpec})`` within ``keep`` x the
    targets' bf16 bytes, by :func:`factorlm.ranks.byte_plan.byte_plan` over the grids of
    :func:`grid_candidates`.  A grid's loss at correction rank ``r`` is ``lambda / 2 * sum_{j > r} sigma_j^2``:
    ``sigma`` the singular values of the whitened quantization error ``(W - Q(W)) S`` (RTN's, or GPTQ's for
    ``gptq-lowrank``) on the dense model's calibration
    inputs (one pass, SVD-LLM's ``none`` order) and ``lambda`` the layer's output sensitivity
    (:func:`factorlm.lm.gradients.output_sensitivity`, as ``--global-score fisher``)."""
    from ..ranks.byte_plan import byte_plan
    from .calibrate import stream
    from .gradients import output_sensitivity

    check(len(batches) > 0, "--byte-plan global needs calibration batches (the output sensitivity is measured on them)")
    budget = keep * 2 * sum(o * i for o, i in shapes.values())
    two_sided = bool(getattr(method, "output_side", False))  # --correction-space kfac: L E S's spectra, loss units
    log(f"  byte plan over {', '.join(f'int{q.bits}-g{q.group_size}' + ('-zp' if q.zero_point else '') for q in grids)}: "
        + ("the two-sided (K-FAC) error spectra of every grid (dense model)" if two_sided else
           "output sensitivity, then the whitened error spectra of every grid (dense model)"))
    lam = {n: 1.0 for n in targets} if two_sided else output_sensitivity(model, targets, batches)
    bad = [n for n, v in lam.items() if not math.isfinite(v)]
    check(not bad, f"the output sensitivity of {bad[0] if bad else ''} is not finite (NaN/Inf gradients on the "
                   "calibration text): use --byte-plan uniform")
    options: dict[str, list] = {}

    def on_group(i, names, stats):
        scale = method.scale(stats)
        for n in names:
            options[n] = grid_options(linear_weight(get_module(model, n)).detach(), scale, lam[n], grids, elem_bytes,
                                      gram=stats.gram, gram_out=method.gram_out(n) if two_sided else None,
                                      damp_out=getattr(method.options, "damp_out", 0.01))

    stream(model, targets, batches, method.make_stats, on_group, mode="none", log=log)
    plan = byte_plan(options, budget)
    return {n: r for n, (q, r) in plan.items()}, {n: grids[q] for n, (q, r) in plan.items()}


def grid_options(W: torch.Tensor, scale, lam: float, grids, elem_bytes: int, gram: torch.Tensor | None = None,
                 gram_out: torch.Tensor | None = None, damp_out: float = 0.01) -> list:
    """One :class:`factorlm.ranks.byte_plan.GridOption` per grid for the weight ``W`` (out, in): the bytes of
    its codes, of one correction rank, and the loss ``lam / 2 * sum_{j > r} sigma_j^2`` left at every rank
    ``r``, ``sigma`` the singular values of ``(W - Q(W)) S`` under the input scaling ``scale``; ``Q`` is RTN,
    or GPTQ under the input Gram ``gram`` for a grid with ``gptq`` set; with ``gram_out`` the spectrum is that of
    ``L (W - Q(W)) S`` (``L L^T`` = the damped output-gradient Gram: K-FAC's loss estimate; give ``lam`` 1)."""
    from ..decompose.gptq import gptq
    from ..decompose.quantize import quantize_groups, rtn_bytes
    from ..decompose.whiten import scaled_spectrum
    from ..ranks.byte_plan import GridOption
    from .quant_methods import rank_bytes

    o, i = W.shape
    out = []
    if gram_out is not None:
        from ..decompose.kfac import output_root

        L = output_root(gram_out.to(W.device), damp_out)[0]
    for q in grids:
        if q.gptq:
            check(gram is not None, "a GPTQ grid needs the layer's input Gram")
            Q = gptq(W, gram, q.bits, q.group_size, zero_point=q.zero_point, percdamp=q.percdamp, act_order=q.act_order)[3]
        else:
            Q = quantize_groups(W, q.bits, q.group_size, q.zero_point)[3]
        E = W.double() - Q.double()
        if gram_out is not None:
            E = L @ E
        tail = scaled_spectrum(E, scale).pow(2).flip(0).cumsum(0).flip(0)  # tail[r] = sum_{j >= r} sigma_j^2
        loss = torch.cat([tail, tail.new_zeros(1)]) * (lam / 2)
        if q.factor_bits == 8 and (o % 32 or i % 32):  # int8 factors come in groups of 32: no correction here
            loss = loss[:1]
        out.append(GridOption(rtn_bytes((o, i), q.bits, q.group_size, q.zero_point),
                              rank_bytes(o, i, q.factor_bits, elem_bytes), loss))
    return out
