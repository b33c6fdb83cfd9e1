"""Stage: plan the ranks of the targets (``--rank``, ``--rank-policy uniform | global``).

The global plan needs every target's scaled spectrum from the dense model (:func:`spectra`): one
calibration pass (no factorization) for a calibrated method, weights alone for ``svd`` with
``--global-score energy``; ``--global-score fisher`` weights each spectrum by the layer's output
sensitivity, which needs calibration batches (:func:`factorlm.lm.calibrate.output_sensitivity`).
"""

from __future__ import annotations

import torch

from ..config import RunConfig
from ..errors import check
from ..models.surgery import get_module, linear_weight


def plan_ranks(c: RunConfig, shapes: dict[str, tuple[int, int]], spectra: dict[str, torch.Tensor] | None) -> dict[str, int]:
    """``{target: rank}``: ``--rank``, the same share of every matrix (uniform), or global allocation."""
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
    plan = global_rank_plan(spectra, shapes, c.keep, "none" if c.global_score == "fisher" else "energy",
                            per_param=c.rank_price == "weight")
    return {n: round_rank(k, c.rank_multiple, break_even_rank(*shapes[n])) for n, k in plan.items()}


def spectra(model, targets, method, batches, log, score: str = "energy", offload_to=None) -> dict[str, torch.Tensor]:
    """Every target's scaled spectrum from the dense model (for the global plan); ``score="fisher"``
    multiplies each by ``sqrt(lambda)``, its output sensitivity (:func:`calibrate.output_sensitivity`),
    so that a squared singular value estimates the loss its truncation costs.  ``offload_to``: see
    :func:`factorlm.lm.calibrate.stream` (fisher's full backward is refused there: see
    :mod:`factorlm.lm.placement`)."""
    from ..decompose.whiten import scaled_spectrum
    from .calibrate import output_sensitivity, stream

    out: dict[str, torch.Tensor] = {}
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
