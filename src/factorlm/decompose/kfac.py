"""Two-sided (K-FAC) whitened low-rank fit of one linear layer: the loss-aware version of SVD-LLM.

*Objective*: a linear layer ``y = x W^T`` inside a model with loss ``L``; calibration tokens with
inputs ``x_t`` and output gradients ``g_t = dL/dy_t``; the input Gram *per token*
``G_in = (1/n) sum_t x_t x_t^T`` and the output-gradient Gram ``G_out = sum_t g_t g_t^T`` (a sum: the
gradients of the examples' own losses).  Under K-FAC's Kronecker approximation of the Fisher (Martens
& Grosse, ICML 2015: the inputs and output gradients taken independent), the second-order estimate of
the loss increase summed over the calibration examples, caused by replacing ``W`` with ``W'``, is

    dL ~ 1/2 * sum_t (g_t^T (W - W') x_t)^2  ~  1/2 * ||L (W - W') R||_F^2,   L L^T = G_out,  R R^T = G_in,

so the best rank-k replacement is an Eckart-Young truncation in that norm: with ``M = L W R =
U Sigma V^T``, ``W' = L^{-1} U_k U_k^T L W`` (then ``L W' R = U_k Sigma_k V_k^T``), and the
estimated loss increase of rank k is ``1/2 sum_{i>k} sigma_i^2``: the triplets' ``sigma_i^2`` are
(twice) *loss units*, so they compare across matrices without any per-matrix normalisation (which is
what a global rank allocation needs) -- including matrices that see different numbers of tokens,
since ``G_in`` is a per-token mean.  With ``G_out = I`` this is SVD-LLM's output-error fit
(:func:`factorlm.decompose.whiten.whiten_svd`; the input Gram's scale does not change ``W'``).
The Fisher here is the *empirical* one (the true labels' gradients), not K-FAC's with sampled labels.

*Origin*: the two-sided whitening is KFAC-SVD's (LEMS, "error-propagation-aware" SVD compression,
github.com/lems-svd/lems; also the "Fisher-aware" factor of Hsu et al.'s FWSVD taken to both
sides); the input side is SVD-LLM's (Wang et al., ICLR 2025).  *Differs here*: ``L`` is the
symmetric square root of ``G_out + damp_out * mean(diag G_out) I`` (an output-gradient Gram is
often far from full rank -- a classifier's gradient reaches the upper layers through a few tokens --
so a damping is needed for ``L^{-1}``; ``damp_out = 0`` requires a positive definite ``G_out``);
``R`` as in :mod:`factorlm.decompose.whiten` (any root of ``G_in``, no inverse needed).
"""

from __future__ import annotations

import torch

from ..errors import check
from .whiten import GramScale, _checked_gram, scaled_factors, scaled_spectrum

__all__ = ["kfac_fit", "kfac_loss_estimate", "kfac_spectrum", "kfac_svd", "output_root"]


def output_root(gram_out: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, L^{-1})``, float64: the symmetric square root of ``G_out + damp * mean(diag G_out) I``
    and its inverse (one ``eigh``).  FactorLMError if the damped Gram is not positive definite."""
    G = _checked_gram(gram_out, damp)
    lam, Q = torch.linalg.eigh(G)
    lam = lam.clamp_min(0.0) + damp * float(G.diagonal().mean())
    check(bool((lam > 1e-12 * max(float(lam.max()), 1e-300)).all()), "output-gradient Gram is singular: use damp_out > 0")
    r = lam.sqrt()
    return (Q * r) @ Q.T, (Q / r) @ Q.T


def kfac_spectrum(W: torch.Tensor, gram_in: torch.Tensor, gram_out: torch.Tensor,
                  damp_in: float = 0.0, damp_out: float = 0.01) -> torch.Tensor:
    """Singular values of ``L W R`` (descending, float64, CPU): ``sum_{i>k} s_i^2`` estimates (x2) the
    loss increase of rank k."""
    L, _ = output_root(gram_out.to(W.device), damp_out)
    return scaled_spectrum(L @ W.detach().to(torch.float64), GramScale(gram_in.to(W.device), damp_in))


def kfac_svd(W: torch.Tensor, rank: int, gram_in: torch.Tensor, gram_out: torch.Tensor,
             damp_in: float = 0.0, damp_out: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors ``(A, B)`` minimising ``||L (W - A B) R||_F`` (module docstring), in ``W``'s
    dtype and device; ``A`` (out, k) and ``B`` (k, in) carry equal row/column norms."""
    A, B, _ = kfac_fit(W, rank, GramScale(gram_in.to(W.device), damp_in), gram_out, damp_out)
    return A, B


def kfac_fit(W: torch.Tensor, rank: int, scale: GramScale, gram_out: torch.Tensor,
             damp_out: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`kfac_svd` with the input side given as a :class:`~factorlm.decompose.whiten.GramScale`, also
    returning the singular values of ``L W R`` (float64, descending: ``sum_{i>k} s_i^2`` is the estimate)."""
    check(W.dim() == 2, f"W must be a 2-D (out, in) matrix, got shape {tuple(W.shape)}")
    out, inn = W.shape
    check(isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= min(out, inn),
          f"rank must be an integer in [1, {min(out, inn)}] for a {tuple(W.shape)} matrix, got {rank!r}")
    check(gram_out.shape == (out, out), f"output-gradient Gram must be ({out}, {out}), got {tuple(gram_out.shape)}")
    L, Linv = output_root(gram_out.to(W.device), damp_out)
    LW = L @ W.detach().to(torch.float64)
    U, sigma = scaled_factors(LW, GramScale(scale.gram.to(W.device), scale.damp))
    Uk = U[:, :rank]
    A, B = Linv @ Uk, Uk.T @ LW
    # balance: the k-th column of A and row of B get the same norm (their product is unchanged)
    a, b = A.norm(dim=0), B.norm(dim=1)
    s = torch.where((a > 0) & (b > 0), (b / torch.where(a > 0, a, torch.ones_like(a))).sqrt(), torch.ones_like(a))
    return (A * s).to(W.dtype), (B / s[:, None]).to(W.dtype), sigma


def kfac_loss_estimate(W: torch.Tensor, W2: torch.Tensor, gram_in: torch.Tensor, gram_out: torch.Tensor,
                       damp_in: float = 0.0, damp_out: float = 0.01) -> float:
    """``||L (W - W2) R||_F^2`` in float64 (the objective :func:`kfac_svd` minimises)."""
    D = W.detach().to(torch.float64) - W2.detach().to(torch.float64)
    Gi = _checked_gram(gram_in.to(D.device), damp_in)
    Gi = Gi + damp_in * float(Gi.diagonal().mean()) * torch.eye(Gi.shape[0], dtype=Gi.dtype, device=Gi.device)
    L, _ = output_root(gram_out.to(D.device), damp_out)
    LD = L @ D
    return max(float(((LD @ Gi) * LD).sum()), 0.0)
