"""Sparsity-aware (weighted) low-rank approximation -- LPAF step 2 (Ren & Zhu, LREC-COLING 2024).

Problem.  For ``W`` (out, in) and elementwise weights ``Omega >= 0`` of the same shape,

    min_{A (out, k), B (k, in)}  J(A B) = || Omega * (W - A B) ||_F^2 = sum_ij w_ij (W - A B)_ij^2,

with ``w = Omega^2`` the weight on each *squared* residual (``Omega`` multiplies the residual
inside the norm, as FWSVD's ``diag(I)`` does; for a 0/1 mask ``w = Omega``).  Unlike plain SVD
(``Omega = 1``) there is no closed form in general (Srebro & Jaakkola, ICML 2003).

* :func:`weighted_svd_em` -- Srebro & Jaakkola's EM.  With ``w`` normalised into ``[0, 1]``,
  treat ``W`` as observed with probability ``w`` and fill the rest with the current estimate:

      X_t = w * W + (1 - w) * Z_{t-1};     Z_t = best rank-k approximation of X_t (truncated SVD).

  It is a majorise-minimise step: ``Q(Z) = ||X_t - Z||_F^2 + const`` upper-bounds ``J(Z)`` (the gap
  is ``sum (1 - w)(Z - Z_{t-1})^2 >= 0``) and touches it at ``Z_{t-1}``, hence
  ``J(Z_t) <= Q(Z_t) <= Q(Z_{t-1}) = J(Z_{t-1})``: the weighted error never increases.
* :func:`row_weighted_svd` -- closed-form fast path: collapse ``w`` to one weight per column (input
  feature; or per row / both), which FWSVD solves exactly by scale -> SVD -> unscale.
* :func:`sparsity_aware_svd` -- builds ``Omega`` from a pruning keep-mask or first-order scores and
  dispatches to one of the two.

All functions are pure: tensors in, factors ``(A, B)`` with ``A @ B ~ W`` out (in ``W``'s dtype);
the maths runs in float32 (float64 if ``W`` is float64, or ``compute_dtype``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import check
from .svd import split_factors, svd, truncated_svd


def _cdtype(W: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def _check_rank(W: torch.Tensor, rank: int) -> None:
    check(W.dim() == 2, f"expected a matrix, got shape {tuple(W.shape)}")
    check(1 <= rank <= min(W.shape), f"rank must be in [1, {min(W.shape)}] for a {W.shape[0]}x{W.shape[1]} matrix, got {rank}")


def weighted_error(W: torch.Tensor, Omega: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``|| Omega * (W - A B) ||_F^2`` (computed in float64)."""
    W64, O64 = W.to(torch.float64), Omega.to(torch.float64)
    R = W64 - A.to(torch.float64) @ B.to(torch.float64)
    return float((O64 * R).pow(2).sum())


def _rank_k(X: torch.Tensor, rank: int):
    """Balanced factors of the best rank-``rank`` approximation of ``X`` plus its right basis."""
    U, S, Vh = svd(X, X.dtype)
    A, B = split_factors(U, S, Vh, rank)
    return A, B, Vh[:rank].T


def _subspace_step(X: torch.Tensor, V: torch.Tensor, rank: int):
    """One block-power step from the right basis ``V`` of ``Z_{t-1}``: ``Q = orth(X V)``, ``Z = Q Q^T X``.

    ``||X - Q Q^T X|| <= ||X - X V V^T|| <= ||X - Z_{t-1}||``, so this still decreases the EM bound
    (a *generalised* EM step) at O(out * in * k) instead of a full SVD.
    """
    Q, _ = torch.linalg.qr(X @ V)
    C = Q.T @ X  # (k, in)
    u, s, vh = torch.linalg.svd(C, full_matrices=False)
    A, B = split_factors(Q @ u, s, vh, rank)
    return A, B, vh[:rank].T


def weighted_svd_em(
    W: torch.Tensor,
    Omega: torch.Tensor,
    rank: int,
    iters: int = 50,
    tol: float = 1e-6,
    init: "str | Sequence[torch.Tensor] | None" = None,
    compute_dtype: torch.dtype | None = None,
    solver: str = "svd",
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Rank-``rank`` factors minimising ``||Omega * (W - A B)||_F^2`` by Srebro-Jaakkola EM.

    Args:
        W: (out, in) matrix.  Omega: weights >= 0 of the same shape (only relative values matter:
            ``w = (Omega / max Omega)^2`` lies in [0, 1], as the EM requires).
        rank: target rank k.
        iters: maximum EM iterations.  tol: stop when the relative decrease of the weighted error
            over one iteration falls below ``tol``.
        init: ``None`` (default) = the better, under ``J``, of the truncated SVDs of ``W`` and of
            ``w * W`` (the latter is the first EM step from ``Z = 0``, i.e. zero-filled pruned
            entries; the former is better when the unobserved entries of ``W`` are informative);
            ``"svd"`` / ``"weighted"`` for one of them; or explicit factors ``(A0, B0)``.
        compute_dtype: float32/float64 (default float32, float64 for float64 ``W``).
        solver: ``"svd"`` = exact EM (a full SVD per iteration); ``"subspace"`` = one block-power
            step per iteration (generalised EM, also monotone, much cheaper for big matrices).

    Returns:
        ``(A, B, history)``: factors in ``W``'s dtype and ``history[t] = ||Omega * (W - A_t B_t)||_F^2``
        (``history[0]`` = the initialisation).  ``history`` is non-increasing: an increase can only
        come from round-off at convergence, and the iteration stops there without accepting it.
    """
    _check_rank(W, rank)
    check(Omega.shape == W.shape, f"Omega must have W's shape {tuple(W.shape)}, got {tuple(Omega.shape)}")
    check(solver in ("svd", "subspace"), f"solver must be 'svd' or 'subspace', got {solver!r}")
    cd = _cdtype(W, compute_dtype)
    Wc = W.detach().to(cd)
    Om = Omega.detach().to(device=Wc.device, dtype=cd).clamp_min(0)
    mx = Om.max()
    if float(mx) <= 0.0:  # nothing observed: any rank-k matrix is optimal
        A, B = truncated_svd(Wc, rank, cd)
        return A.to(W.dtype), B.to(W.dtype), [0.0]
    w = (Om / mx).pow(2)

    def err(A, B) -> float:
        return float((Om * (Wc - A @ B)).pow(2).sum())

    # -- initialisation
    if init is None or isinstance(init, str):
        choice = init or "best"
        check(choice in ("best", "svd", "weighted"), f"init must be None, 'svd', 'weighted' or (A, B), got {init!r}")
        cands = []
        if choice in ("best", "svd"):
            cands.append(_rank_k(Wc, rank))
        if choice in ("best", "weighted"):
            cands.append(_rank_k(w * Wc, rank))
        A, B, V = min(cands, key=lambda c: err(c[0], c[1]))
    else:
        A0, B0 = init
        check(A0.shape == (W.shape[0], rank) and B0.shape == (rank, W.shape[1]),
              f"init factors must have shapes {(W.shape[0], rank)} and {(rank, W.shape[1])}")
        A, B = A0.detach().to(Wc), B0.detach().to(Wc)
        V = torch.linalg.qr(B.T)[0]

    history = [err(A, B)]
    for _ in range(iters):
        Z = A @ B
        X = Z + w * (Wc - Z)  # = w * W + (1 - w) * Z
        A_new, B_new, V_new = _rank_k(X, rank) if solver == "svd" else _subspace_step(X, V, rank)
        e = err(A_new, B_new)
        prev = history[-1]
        if e > prev:  # round-off at convergence; keep the better previous iterate
            break
        A, B, V = A_new, B_new, V_new
        history.append(e)
        if prev - e <= tol * max(prev, torch.finfo(cd).tiny):
            break
    return A.to(W.dtype), B.to(W.dtype), history


def row_weighted_svd(
    W: torch.Tensor,
    Omega: torch.Tensor,
    rank: int,
    dim: int | None = 1,
    compute_dtype: torch.dtype | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form weighted SVD after collapsing ``w = Omega^2`` to separable weights.

    ``dim=1`` (default): one weight per *column* = input feature, ``c_j = mean_i w_ij`` (for a
    keep-mask: the fraction of column ``j`` that survived pruning), and

        min || (W - A B) diag(sqrt c) ||_F^2   solved exactly as FWSVD:  SVD of ``W diag(sqrt c)``,
        then ``B <- B diag(sqrt c)^{-1}``.

    Columns are the better-founded axis: the error a layer makes on its output, ``E||(W - AB) x||^2``,
    is weighted per input feature (the columns in nn.Linear's (out, in) layout), which is also the
    axis FWSVD's Fisher importance and activation-aware methods use, and ``c_j`` preserves each
    column's total weight.  ``dim=0`` collapses to rows instead; ``dim=None`` uses the rank-one
    (independence) fit ``w_ij ~ r_i c_j / mean(w)`` and scales both sides -- exact whenever the
    weights are separable.  Weights are floored at ``eps * max`` so fully pruned rows/columns stay
    invertible (their factors then come out as the least-squares fit in the retained subspace).
    """
    _check_rank(W, rank)
    check(Omega.shape == W.shape, f"Omega must have W's shape {tuple(W.shape)}, got {tuple(Omega.shape)}")
    check(dim in (0, 1, None), f"dim must be 0 (rows), 1 (columns) or None (both), got {dim!r}")
    cd = torch.float64 if compute_dtype is None else compute_dtype
    Wc = W.detach().to(cd)
    w = Omega.detach().to(device=Wc.device, dtype=cd).clamp_min(0).pow(2)
    if float(w.max()) <= 0.0:
        return truncated_svd(W, rank, compute_dtype)

    def scale(v: torch.Tensor) -> torch.Tensor:
        v = v / v.max()
        return v.clamp_min(eps).sqrt()

    r = scale(w.mean(dim=1)) if dim in (0, None) else None  # per row
    c = scale(w.mean(dim=0)) if dim in (1, None) else None  # per column
    X = Wc
    if r is not None:
        X = X * r[:, None]
    if c is not None:
        X = X * c[None, :]
    U, S, Vh = svd(X, cd)
    A, B = split_factors(U, S, Vh, rank)
    if r is not None:
        A = A / r[:, None]
    if c is not None:
        B = B / c[None, :]
    return A.to(W.dtype), B.to(W.dtype)


# -- Omega from pruning results --------------------------------------------------------------------
def mask_to_omega(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keep-mask -> weights: kept 1, pruned 0 (pruned entries are free in the approximation)."""
    return mask.to(dtype)


def scores_to_omega(scores: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-3) -> torch.Tensor:
    """Importance scores -> weights: kept entries get their score's quantile among kept entries,
    ``q = #{kept s' <= s} / #kept`` in (0, 1] (scale-free and robust to the heavy tails of
    accumulated movement scores; ties share a weight); pruned entries (``mask`` False) get ``eps``.
    ``mask=None`` treats every entry as kept."""
    s = torch.nan_to_num(scores.detach().float(), nan=float("-inf"))
    keep = torch.ones_like(s, dtype=torch.bool) if mask is None else mask.to(device=s.device, dtype=torch.bool)
    omega = torch.full_like(s, float(eps))
    vals = s[keep]
    if vals.numel():
        srt = vals.sort().values
        omega[keep] = torch.searchsorted(srt, vals, right=True).to(s.dtype) / vals.numel()
    return omega


def sparsity_aware_svd(
    W: torch.Tensor,
    rank: int,
    mask: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
    mode: str = "em",
    *,
    eps: float = 1e-3,
    iters: int = 50,
    tol: float = 1e-6,
    init: "str | Sequence[torch.Tensor] | None" = None,
    solver: str = "svd",
    dim: int | None = 1,
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LPAF's sparsity-aware SVD of a pruned matrix ``W``: factors ``(A, B)``, ``A @ B ~ W``.

    ``Omega`` is built from the pruning result:

    * ``scores`` given -> :func:`scores_to_omega` (kept entries weighted by normalised first-order
      importance in (0, 1], pruned ones ``eps``); the kept set is ``mask`` or, if ``mask`` is None,
      the non-zeros of ``W`` (a finalized pruned matrix);
    * only ``mask`` -> 0/1 weights: pruned entries are unconstrained (low-rank matrix completion of
      the kept entries);
    * neither -> plain truncated SVD.

    ``mode="em"`` -> :func:`weighted_svd_em` (``iters``, ``tol``, ``init``, ``solver``);
    ``mode="row"`` -> :func:`row_weighted_svd` (``dim``).  Signature-compatible with
    ``LowRankLinear.from_linear(linear, rank, decompose=sparsity_aware_svd, mask=..., scores=...)``.
    """
    check(mode in ("em", "row"), f"mode must be 'em' or 'row', got {mode!r}")
    _check_rank(W, rank)
    if scores is not None:
        check(scores.shape == W.shape, f"scores must have W's shape {tuple(W.shape)}")
        keep = mask if mask is not None else (W != 0)
        Omega = scores_to_omega(scores.to(W.device), keep.to(W.device), eps)
    elif mask is not None:
        check(mask.shape == W.shape, f"mask must have W's shape {tuple(W.shape)}")
        Omega = mask_to_omega(mask.to(W.device))
    else:
        return truncated_svd(W, rank, compute_dtype)
    if mode == "row":
        return row_weighted_svd(W, Omega, rank, dim=dim, compute_dtype=compute_dtype)
    A, B, _ = weighted_svd_em(W, Omega, rank, iters=iters, tol=tol, init=init, compute_dtype=compute_dtype, solver=solver)
    return A, B
