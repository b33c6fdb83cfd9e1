"""Sparsity-aware (weighted) SVD: EM monotonicity, reductions to plain SVD / FWSVD, completion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factorlm.decompose.fwsvd import fisher_weighted_svd
from factorlm.decompose.svd import truncated_svd
from factorlm.decompose.weighted_svd import (
    row_weighted_svd,
    scores_to_omega,
    sparsity_aware_svd,
    weighted_error,
    weighted_svd_em,
)
from factorlm.errors import FactorLMError
from factorlm.layers.lowrank import LowRankLinear


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def masked_lowrank(seed=0, m=40, n=30, r=2, keep=0.7):
    """A rank-r matrix M, a keep-mask, and W = M on the mask, garbage elsewhere."""
    g = gen(seed)
    M = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    mask = torch.rand(m, n, generator=g) < keep
    W = torch.where(mask, M, 5 * torch.randn(m, n, generator=g, dtype=torch.float64))
    return M, mask, W


@pytest.mark.parametrize("solver", ["svd", "subspace"])
@pytest.mark.parametrize("kind", ["soft", "mask"])
def test_em_history_never_increases(solver, kind):
    g = gen(1)
    W = torch.randn(24, 18, generator=g)
    Omega = torch.rand(24, 18, generator=g) * 3 if kind == "soft" else (torch.rand(24, 18, generator=g) < 0.6).float()
    A, B, hist = weighted_svd_em(W, Omega, 4, iters=40, tol=0.0, solver=solver)
    assert len(hist) >= 2
    assert all(b <= a for a, b in zip(hist, hist[1:])), hist
    assert hist[-1] < hist[0]
    assert A.shape == (24, 4) and B.shape == (4, 18) and A.dtype == W.dtype
    assert weighted_error(W, Omega, A, B) == pytest.approx(hist[-1], rel=1e-4)


def test_ones_weights_equal_plain_svd():
    W = torch.randn(20, 12, generator=gen(2), dtype=torch.float64)
    A0, B0 = truncated_svd(W, 3)
    A, B, hist = weighted_svd_em(W, torch.ones_like(W), 3)
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)
    A, B = row_weighted_svd(W, torch.ones_like(W), 3)
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)
    A, B = sparsity_aware_svd(W, 3)  # no mask, no scores
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)
    A, B = sparsity_aware_svd(W, 3, mask=torch.ones_like(W, dtype=torch.bool))
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)


@pytest.mark.parametrize("solver", ["svd", "subspace"])
def test_em_recovers_low_rank_matrix_from_its_mask(solver):
    M, mask, W = masked_lowrank()
    A, B, hist = weighted_svd_em(W, mask.double(), 2, iters=500, tol=1e-12, solver=solver)
    Z = A @ B
    rel = lambda X, Y: float((X - Y).norm() / Y.norm())
    assert rel(Z[mask], M[mask]) < 1e-6
    assert rel(Z[~mask], M[~mask]) < 1e-6  # completion off the mask too
    A0, B0 = truncated_svd(W, 2)
    assert rel(A0 @ B0, M) > 0.1  # plain SVD is fooled by the garbage


def test_em_beats_plain_svd_under_same_weights():
    for seed in range(3):
        g = gen(10 + seed)
        W = torch.randn(30, 25, generator=g)
        for Omega in ((torch.rand(30, 25, generator=g) < 0.5).float(), torch.rand(30, 25, generator=g)):
            A0, B0 = truncated_svd(W, 5)
            A, B, _ = weighted_svd_em(W, Omega, 5, iters=30)
            assert weighted_error(W, Omega, A, B) <= weighted_error(W, Omega, A0, B0) * (1 + 1e-6)
            A1, B1 = sparsity_aware_svd(W, 5, mask=Omega > 0.5)
            Om = (Omega > 0.5).float()
            assert weighted_error(W, Om, A1, B1) <= weighted_error(W, Om, A0, B0) * (1 + 1e-6)


def test_em_init_options():
    M, mask, W = masked_lowrank(seed=3)
    Om = mask.double()
    _, _, h_best = weighted_svd_em(W, Om, 2, iters=0)
    _, _, h_svd = weighted_svd_em(W, Om, 2, iters=0, init="svd")
    _, _, h_w = weighted_svd_em(W, Om, 2, iters=0, init="weighted")
    assert h_best[0] == pytest.approx(min(h_svd[0], h_w[0]))
    A0, B0 = truncated_svd(M, 2)
    _, _, h = weighted_svd_em(W, Om, 2, iters=0, init=(A0, B0))
    assert h[0] < 1e-18
    with pytest.raises(FactorLMError):
        weighted_svd_em(W, Om, 2, init="random")


def test_row_weighted_is_exact_for_column_weights():
    g = gen(4)
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    c = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    Omega = c.sqrt()[None, :].expand(16, 12)  # w = Omega^2 = c_j per column
    A, B = row_weighted_svd(W, Omega, 3)
    Af, Bf = fisher_weighted_svd(W, 3, importance=c.sqrt(), dim=1)
    assert torch.allclose(A @ B, Af @ Bf, atol=1e-10)
    # it is the optimum, so EM cannot do better
    _, _, hist = weighted_svd_em(W, Omega, 3, iters=100, tol=1e-14)
    assert weighted_error(W, Omega, A, B) <= hist[-1] * (1 + 1e-8)
    # separable two-sided weights: dim=None is exact too
    r = torch.rand(16, generator=g, dtype=torch.float64) + 0.1
    Om2 = (r[:, None] * c[None, :]).sqrt()
    A2, B2 = row_weighted_svd(W, Om2, 3, dim=None)
    _, _, hist2 = weighted_svd_em(W, Om2, 3, iters=300, tol=1e-15)
    assert weighted_error(W, Om2, A2, B2) <= hist2[-1] * (1 + 1e-8)
    # a fully pruned column stays finite
    mask = torch.ones(16, 12, dtype=torch.bool)
    mask[:, 0] = False
    A3, B3 = sparsity_aware_svd(W * mask, 3, mask=mask, mode="row")
    assert torch.isfinite(A3 @ B3).all()


def test_scores_to_omega():
    s = torch.tensor([[4.0, -1.0, 2.0], [2.0, 9.0, 0.5]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    om = scores_to_omega(s, mask, eps=1e-3)
    assert om[~mask].eq(1e-3).all()
    kept = om[mask]
    assert kept.max() == 1.0 and kept.min() > 0 and (kept <= 1).all()
    assert om[1, 1] == 1.0 and om[0, 1] == 0.25  # highest -> 1, lowest of 4 -> 1/4
    assert om[1, 0] == 0.5  # order preserved: -1 < 2 < 4 < 9
    assert om[0, 0] == 0.75


def test_sparsity_aware_svd_modes_and_dtype():
    M, mask, W = masked_lowrank(seed=5)
    Wp = (W * mask).to(torch.bfloat16)  # a finalized pruned matrix in a low-precision dtype
    scores = torch.randn(W.shape, generator=gen(6))
    for kw in ({"mask": mask}, {"scores": scores}, {"mask": mask, "scores": scores},
               {"mask": mask, "mode": "row"}, {"scores": scores, "mode": "row"}):
        A, B = sparsity_aware_svd(Wp, 2, **kw)
        assert A.dtype == B.dtype == torch.bfloat16
        assert A.shape == (40, 2) and B.shape == (2, 30)
        assert torch.isfinite(A.float() @ B.float()).all()
    # mask mode on the pruned matrix (zeros off-mask) still completes the rank-2 structure
    A, B = sparsity_aware_svd(W * mask, 2, mask=mask, iters=500, tol=1e-12)
    assert float((A @ B - M).norm() / M.norm()) < 1e-5
    with pytest.raises(FactorLMError):
        sparsity_aware_svd(W, 2, mask=mask, mode="exact")
    with pytest.raises(FactorLMError):
        sparsity_aware_svd(W, 31, mask=mask)


def test_plugs_into_lowrank_from_linear():
    lin = nn.Linear(30, 40)
    M, mask, _ = masked_lowrank(seed=7)
    with torch.no_grad():
        lin.weight.copy_((M * mask).float())
    lr = LowRankLinear.from_linear(lin, 2, decompose=sparsity_aware_svd, mask=mask)
    assert isinstance(lr, LowRankLinear) and lr.rank == 2
    assert torch.equal(lr.bias, lin.bias)
    assert float((lr.to_dense().detach().double() - M).norm() / M.norm()) < 1e-2
