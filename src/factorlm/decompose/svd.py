"""Truncated SVD: the Eckart-Young optimal rank-k approximation in Frobenius norm."""

from __future__ import annotations

import torch


def _compute_dtype(W: torch.Tensor, compute_dtype: torch.dtype | None) -> torch.dtype:
    if compute_dtype is not None:
        return compute_dtype
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def svd(W: torch.Tensor, compute_dtype: torch.dtype | None = None):
    """Thin SVD ``W = U diag(S) Vh`` computed in float32/float64 whatever ``W``'s dtype."""
    return torch.linalg.svd(W.to(_compute_dtype(W, compute_dtype)), full_matrices=False)


def split_factors(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int):
    """``A = U_k sqrt(S_k)``, ``B = sqrt(S_k) Vh_k`` (balanced split: both factors get equal scale)."""
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def truncated_svd(W: torch.Tensor, rank: int, compute_dtype: torch.dtype | None = None):
    """Best rank-``rank`` factors ``(A, B)`` of ``W`` (out, in), ``A @ B ~ W``, in ``W``'s dtype."""
    U, S, Vh = svd(W, compute_dtype)
    A, B = split_factors(U, S, Vh, rank)
    return A.to(W.dtype), B.to(W.dtype)


def eckart_young_error(W: torch.Tensor, rank: int) -> float:
    """The optimal Frobenius error ``sqrt(sum_{i>k} s_i^2)`` of any rank-``rank`` approximation."""
    S = torch.linalg.svdvals(W.to(_compute_dtype(W, None)))
    return float(S[rank:].pow(2).sum().sqrt())
