"""Omega, the element-wise weights of LPAF's sparsity-aware SVD, built from a pruning result (its
importance scores or keep-mask); see :mod:`factorlm.decompose.weighted_svd` for the fit and the
reasons behind each construction."""

from __future__ import annotations

import torch

from ..errors import check

#: values of ``sparsity_aware_svd(omega=...)`` (LPAF's ``--omega``)
OMEGAS = ("scores", "scores_sqrt", "scores_quantile", "mask")


def normalized_scores(scores: torch.Tensor) -> torch.Tensor:
    """Raw importance scores -> weights ``Omega`` in [0, 1] (LPAF's "w/ S", every entry; float32, or
    float64 for float64 scores).

    * all scores ``>= 0`` (magnitude ``|W|``, PLATON / sensitivity ``|W dL/dW|``):  ``s / max(s)``;
    * any score ``< 0`` (movement pruning's signed ``-sum W dL/dW``):  ``(s - min) / (max - min)``.

    Both are increasing in ``s`` and invariant to rescaling the scores by any ``c > 0``; the most
    important entry gets 1.  For non-negative scores zero is a natural origin (no importance), so
    the ratio keeps *proportions* (an entry twice as important weighs twice as much) and removes
    only the scale -- and the scale of ``Omega`` does not change the minimiser of
    ``||Omega * (W - A B)||``, so this is the raw-score objective itself.  Signed scores have no
    natural origin (zero means "training neither grew nor shrank it", and the sum over steps can
    sit anywhere) and cannot be used raw (a negative ``Omega`` inside the norm weighs by ``s^2``:
    the entries training pushed hardest towards zero would weigh most), so the affine min-max map
    sends the least important entry to 0 and keeps ratios of *differences*; it is shift-invariant
    too.  The rule is continuous across the switch: as ``min(s) -> 0^-`` it tends to ``s / max(s)``.
    Constant scores (no information, including all zeros) give uniform weights 1 (plain SVD).
    Non-finite scores raise (a NaN/inf weight would poison the whole fit).
    """
    s = scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    check(bool(torch.isfinite(s).all()), "scores must be finite (got NaN or inf)")
    if s.numel() == 0:
        return s
    lo, hi = s.min(), s.max()
    if float(lo) >= 0.0:
        return s / hi if float(hi) > 0.0 else torch.ones_like(s)
    return (s - lo) / (hi - lo) if float(hi) > float(lo) else torch.ones_like(s)


def mask_to_omega(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keep-mask -> weights: kept 1, pruned 0 (LPAF's "w/ M": pruned entries are free)."""
    return mask.to(dtype)


def score_quantile_omega(scores: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-3) -> torch.Tensor:
    """Importance scores -> weights by *rank*, not value (not the paper's; ``omega="scores_quantile"``):
    kept entries get their score's quantile among kept entries, ``q = #{kept s' <= s} / #kept`` in
    (0, 1] (scale- and shift-free and robust to heavy-tailed accumulated scores; ties share a
    weight); pruned entries (``mask`` False) get the flat ``eps``.  ``mask=None`` keeps every entry."""
    s = torch.nan_to_num(scores.detach().float(), nan=float("-inf"))
    keep = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.to(device=s.device, dtype=torch.bool)
    omega = torch.full_like(s, float(eps))
    vals = s[keep]
    if vals.numel():
        srt = vals.sort().values
        omega[keep] = torch.searchsorted(srt, vals, right=True).to(s.dtype) / vals.numel()
    return omega


#: the earlier name of :func:`score_quantile_omega` (it always meant the quantile construction)
scores_to_omega = score_quantile_omega


def make_omega(
    omega: str, W: torch.Tensor, mask: torch.Tensor | None = None, scores: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """``Omega`` on ``W``'s device for ``omega`` in :data:`OMEGAS`:

    ``"scores"`` -> :func:`normalized_scores` of every entry (``mask`` unused);
    ``"scores_sqrt"`` -> its square root (not the paper's: the objective squares ``Omega``, so with
    first-order scores, already ~ ``(w g)^2``, the EM weights ``Omega^2`` span twice the decades of the
    scores; the root makes each entry's weight its normalised score itself);
    ``"scores_quantile"`` -> :func:`score_quantile_omega` (kept set = ``mask``, or ``W != 0``);
    ``"mask"`` -> :func:`mask_to_omega` of ``mask`` (or of ``W != 0``: a finalized pruned matrix).
    """
    check(omega in OMEGAS, f"omega must be one of {OMEGAS}, got {omega!r}")
    if mask is not None:
        check(mask.shape == W.shape, f"mask must have W's shape {tuple(W.shape)}, got {tuple(mask.shape)}")
        mask = mask.to(W.device)
    if omega in ("scores", "scores_sqrt", "scores_quantile"):
        check(scores is not None, f"omega={omega!r} needs scores")
        check(scores.shape == W.shape, f"scores must have W's shape {tuple(W.shape)}, got {tuple(scores.shape)}")
        scores = scores.to(W.device)
        if omega == "scores":
            return normalized_scores(scores)
        if omega == "scores_sqrt":
            return normalized_scores(scores).sqrt()
        return score_quantile_omega(scores, mask if mask is not None else (W != 0), eps)
    return mask_to_omega(mask if mask is not None else (W != 0))


