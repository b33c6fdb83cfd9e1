"""Pure mask maths: exact top-k masks from scores, per matrix or global, and LPAF's default density."""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import check

SCOPES = ("per_matrix", "global")


def kept_count(density: float, numel: int) -> int:
    """Number of entries a mask of ``density`` keeps among ``numel``: ``round(density * numel)``."""
    return int(min(max(round(density * numel), 0), numel))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask (shape of ``scores``) keeping exactly the ``k`` highest scores.

    Ties at the threshold are broken deterministically in favour of the lower flat index (so the
    result does not depend on the device's sort/top-k implementation).  NaN counts as ``-inf``.
    O(n): one ``kthvalue`` + one ``cumsum``.
    """
    flat = torch.nan_to_num(scores.detach().reshape(-1).float(), nan=float("-inf"))
    n = flat.numel()
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    thr = flat.kthvalue(n - k + 1).values  # the k-th largest value
    above = flat > thr
    need = k - above.sum()
    tie = flat == thr
    mask = above | (tie & (torch.cumsum(tie, 0) <= need))
    return mask.reshape(scores.shape)


def compute_masks(scores: Mapping[str, torch.Tensor], density: float, scope: str = "per_matrix") -> dict[str, torch.Tensor]:
    """Keep-masks (True = kept) at ``density`` from ``scores`` (higher = keep).

    ``per_matrix``: every matrix keeps exactly ``round(density * numel)`` entries.
    ``global``: one threshold over all matrices; exactly ``round(density * total)`` kept overall
    (ties broken by the order of ``scores`` then flat index), per-matrix densities may differ.
    """
    check(0.0 <= density <= 1.0, f"density must be in [0, 1], got {density}")
    check(scope in SCOPES, f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "per_matrix":
        return {n: topk_mask(s, kept_count(density, s.numel())) for n, s in scores.items()}
    names = list(scores)
    if not names:
        return {}
    device = scores[names[0]].device
    flat = torch.cat([scores[n].detach().reshape(-1).float().to(device) for n in names])
    mask = topk_mask(flat, kept_count(density, flat.numel()))
    out, i = {}, 0
    for n in names:
        s = scores[n]
        out[n] = mask[i:i + s.numel()].reshape(s.shape).to(s.device)
        i += s.numel()
    return out


def mask_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Overall fraction of kept entries."""
    total = sum(m.numel() for m in masks.values())
    return float(sum(int(m.sum()) for m in masks.values()) / max(total, 1))


#: multiplier ``c`` of :func:`default_density`
DEFAULT_DENSITY_FACTOR = 1.0


def default_density(keep: float, c: float = DEFAULT_DENSITY_FACTOR) -> float:
    """LPAF's default pruning density ``v = min(1, c * keep)`` for a factorization budget ``keep``.

    ``keep`` is the fraction of a matrix's parameters the factorized model keeps (rank ``k`` of an
    ``m x n`` matrix keeps ``k (m + n) / (m n)``).  The paper prunes to a density comparable to that
    budget; we default to ``c = 1`` -- *equal storage*: the sparse model then holds exactly as many
    non-zeros as the factorized model has weights, so pruning (which is trained, and moves the
    information into the surviving weights) does the forgetting, and the subsequent rank-``k``
    factorization only has to re-express, not further discard, what survived.  A denser ``c > 1``
    keeps more of the task solution but leaves matrices further from rank ``k`` (larger
    factorization error); ``c < 1`` throws away more than the budget requires.
    """
    check(keep > 0, f"keep must be > 0, got {keep}")
    check(c > 0, f"c must be > 0, got {c}")
    return float(min(1.0, c * keep))
