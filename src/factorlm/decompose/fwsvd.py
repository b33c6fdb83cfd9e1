"""Fisher-weighted SVD (FWSVD; Hsu et al., ICLR 2022, "Language model compression with weighted
low-rank factorization").

Each input feature ``j`` of a linear layer gets an importance ``I_j = sqrt(sum_i F_ij)`` where
``F = sum over data of (dL/dW)^2`` (the empirical Fisher of the task loss, accumulated per weight).
The paper writes the layer as ``y = x W`` with ``W`` of shape (in, out) and weights its *rows*, i.e.
the input features; in ``nn.Linear``'s (out, in) layout those are the *columns*.  FWSVD solves

    min_{rank k} || (W - A B) diag(I) ||_F       (nn.Linear layout)

exactly: ``W diag(I) = U S V^T`` -> ``A = U_k S_k^{1/2}``, ``B = S_k^{1/2} V_k^T diag(I)^{-1}``.
(The paper puts all of ``S_k`` on one side; the product ``A B`` is identical.)
"""

from __future__ import annotations

import torch

from .svd import split_factors, svd


def fisher_importance(fisher: torch.Tensor, dim: int = 0, eps: float = 1e-12) -> torch.Tensor:
    """Per-feature importance ``sqrt(sum of the Fisher over `dim`)``; ``dim=0`` -> one per input feature."""
    return fisher.to(torch.float64).sum(dim=dim).clamp_min(eps).sqrt()


def fisher_weighted_svd(
    W: torch.Tensor,
    rank: int,
    importance: torch.Tensor | None = None,
    *,
    dim: int = 1,
    compute_dtype: torch.dtype | None = None,
):
    """Rank-``rank`` factors of ``W`` (out, in) minimising the importance-weighted Frobenius error.

    ``importance`` is a positive vector over the columns (``dim=1``, input features, FWSVD's choice)
    or rows (``dim=0``, output features) of ``W``; ``None`` or all-equal importance gives plain SVD.
    """
    if importance is None:
        from .svd import truncated_svd

        return truncated_svd(W, rank, compute_dtype)
    cd = torch.float64 if compute_dtype is None else compute_dtype
    Wc = W.to(cd)
    I = importance.to(cd)
    I = I / I.mean()  # scale-free: only relative importance matters, keeps the SVD well conditioned
    if dim == 1:
        U, S, Vh = svd(Wc * I[None, :], cd)
        A, B = split_factors(U, S, Vh, rank)
        B = B / I[None, :]
    elif dim == 0:
        U, S, Vh = svd(Wc * I[:, None], cd)
        A, B = split_factors(U, S, Vh, rank)
        A = A / I[:, None]
    else:
        raise ValueError("dim must be 0 (rows) or 1 (columns)")
    return A.to(W.dtype), B.to(W.dtype)
