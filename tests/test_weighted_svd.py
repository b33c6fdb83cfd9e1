"""Sparsity-aware (weighted) SVD: per-step descent of the raw iterates, independently known optima
(exact low rank, separable weights, matrix completion), Omega construction, LPAF options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from factorlm.decompose.fwsvd import fisher_weighted_svd
from factorlm.decompose.svd import truncated_svd
from factorlm.decompose.weighted_svd import (
    make_omega,
    normalized_scores,
    row_weighted_svd,
    score_quantile_omega,
    sparsity_aware_svd,
    weighted_error,
    weighted_low_rank,
    weighted_svd_als,
    weighted_svd_als_step,
    weighted_svd_em,
    weighted_svd_em_step,
)
from factorlm.errors import FactorLMError
from factorlm.layers.lowrank import LowRankLinear


pytestmark = pytest.mark.usefixtures("one_thread")
SOLVERS = ["em", "em_subspace", "als"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(X, Y):
    return float((X - Y).norm() / Y.norm())


def masked_lowrank(seed=0, m=40, n=30, r=2, keep=0.7):
    """A rank-r matrix M, a keep-mask, and W = M on the mask, garbage elsewhere."""
    g = gen(seed)
    M = torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(r, n, generator=g, dtype=torch.float64)
    mask = torch.rand(m, n, generator=g) < keep
    W = torch.where(mask, M, 5 * torch.randn(m, n, generator=g, dtype=torch.float64))
    return M, mask, W


# -- every raw iterate decreases the weighted error (no guard involved) ---------------------------------
@pytest.mark.parametrize("step", ["svd", "subspace", "als"])
@pytest.mark.parametrize("kind", ["soft", "mask"])
def test_each_raw_step_decreases_the_weighted_error(step, kind):
    g = gen(1)
    W = torch.randn(24, 18, generator=g, dtype=torch.float64)
    Omega = (torch.rand(24, 18, generator=g, dtype=torch.float64) if kind == "soft"
             else (torch.rand(24, 18, generator=g) < 0.6).double())
    w = Omega.pow(2)  # already in [0, 1]
    A, B = truncated_svd(W, 4)
    V = None
    errs = [weighted_error(W, Omega, A, B)]
    for _ in range(30):
        if step == "als":
            A, B = weighted_svd_als_step(W, w, A, B)
        else:
            A, B, V = weighted_svd_em_step(W, w, A, B, solver=step, V=V)
        errs.append(weighted_error(W, Omega, A, B))
    drops = [a - b for a, b in zip(errs, errs[1:])]
    assert all(d > 0 for d in drops), drops  # strictly: far from convergence after 30 steps
    assert errs[-1] < 0.9 * errs[0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_unguarded_history_is_monotone(solver):
    g = gen(2)
    W = torch.randn(30, 20, generator=g, dtype=torch.float64)
    Omega = torch.rand(30, 20, generator=g, dtype=torch.float64) * 3  # any scale
    A, B, hist = weighted_low_rank(W, Omega, 5, solver=solver, iters=25, tol=0.0, guard=False)
    assert len(hist) == 26
    assert all(b < a for a, b in zip(hist, hist[1:])), hist
    assert weighted_error(W, Omega, A, B) == pytest.approx(hist[-1], rel=1e-10)


def test_weighted_svd_em_step_is_the_em_update():
    """One exact EM step = best rank-k fit of the filled-in matrix w * W + (1 - w) * Z."""
    g = gen(3)
    W = torch.randn(12, 9, generator=g, dtype=torch.float64)
    w = torch.rand(12, 9, generator=g, dtype=torch.float64)
    A, B = truncated_svd(torch.randn(12, 9, generator=g, dtype=torch.float64), 3)
    A1, B1, _ = weighted_svd_em_step(W, w, A, B, solver="svd")
    Af, Bf = truncated_svd(w * W + (1 - w) * (A @ B), 3)
    assert torch.allclose(A1 @ B1, Af @ Bf, atol=1e-12)


# -- independently known optima ----------------------------------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_exact_low_rank_is_recovered_from_a_random_start(solver):
    """W of rank exactly k: the optimum is W itself (error 0) whatever the positive weights."""
    g = gen(4)
    W = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 16, generator=g, dtype=torch.float64)
    Omega = 0.3 + torch.rand(20, 16, generator=g, dtype=torch.float64)  # arbitrary, positive
    A0, B0 = torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randn(3, 16, generator=g, dtype=torch.float64)
    iters = 50 if solver == "als" else 3000
    A, B, hist = weighted_low_rank(W, Omega, 3, solver=solver, init=(A0, B0), iters=iters, tol=1e-14, plateau=0.0)
    assert hist[0] > 1.0
    assert hist[-1] < 1e-16 * hist[0]
    assert rel(A @ B, W) < 1e-7
    # the default start (SVD of W) is already exact
    _, _, h = weighted_low_rank(W, Omega, 3, solver=solver)
    assert h[0] < 1e-20


def separable_optimum(W, r, c, rank):
    """min sum r_i c_j (W - Z)_ij^2 over rank-k Z: scale rows by sqrt r, columns by sqrt c, SVD, unscale."""
    sr, sc = r.sqrt(), c.sqrt()
    A, B = truncated_svd(sr[:, None] * W * sc[None, :], rank)
    return A / sr[:, None], B / sc[None, :]


@pytest.mark.parametrize("solver", SOLVERS)
def test_separable_weights_reach_the_closed_form_optimum(solver):
    g = gen(5)
    W = torch.randn(20, 15, generator=g, dtype=torch.float64)
    r = 0.3 + torch.rand(20, generator=g, dtype=torch.float64)
    c = 0.3 + torch.rand(15, generator=g, dtype=torch.float64)
    Omega = (r[:, None] * c[None, :]).sqrt()  # w = Omega^2 = r_i c_j
    Ao, Bo = separable_optimum(W, r, c, 3)
    opt = weighted_error(W, Omega, Ao, Bo)
    A, B, hist = weighted_low_rank(W, Omega, 3, solver=solver, iters=4000, tol=1e-15, plateau=0.0)
    assert hist[0] > opt * (1 + 1e-3)  # the SVD start is not already optimal
    assert weighted_error(W, Omega, A, B) == pytest.approx(opt, rel=1e-6)
    assert rel(A @ B, Ao @ Bo) < 1e-3
    # row_weighted_svd(dim=None) is exact for separable weights
    A2, B2 = row_weighted_svd(W, Omega, 3, dim=None)
    assert weighted_error(W, Omega, A2, B2) == pytest.approx(opt, rel=1e-9)


@pytest.mark.parametrize("solver", SOLVERS)
def test_mask_completes_a_low_rank_matrix(solver):
    """0/1 Omega on a rank-2 matrix: the optimum fits the kept entries exactly and, with enough of them
    observed, is the matrix itself -- the unobserved entries are recovered (garbage there ignored)."""
    M, mask, W = masked_lowrank()
    A, B, _ = weighted_low_rank(W, mask.double(), 2, solver=solver, iters=3000, tol=1e-15, plateau=0.0)
    Z = A @ B
    assert rel(Z[mask], M[mask]) < 1e-6
    assert rel(Z[~mask], M[~mask]) < 1e-6  # completion off the mask too
    A0, B0 = truncated_svd(W, 2)
    assert rel(A0 @ B0, M) > 0.1  # plain SVD is fooled by the garbage


def test_ones_weights_equal_plain_svd():
    W = torch.randn(20, 12, generator=gen(6), dtype=torch.float64)
    A0, B0 = truncated_svd(W, 3)
    for solver in SOLVERS:
        A, B, _ = weighted_low_rank(W, torch.ones_like(W), 3, solver=solver)
        assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)
    A, B = row_weighted_svd(W, torch.ones_like(W), 3)
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)
    A, B = sparsity_aware_svd(W, 3)  # no mask, no scores
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)
    A, B = sparsity_aware_svd(W, 3, mask=torch.ones_like(W, dtype=torch.bool))
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)


def test_init_options():
    M, mask, W = masked_lowrank(seed=3)
    Om = mask.double()
    _, _, h_def = weighted_svd_em(W, Om, 2, iters=0)
    _, _, h_svd = weighted_svd_em(W, Om, 2, iters=0, init="svd")
    _, _, h_w = weighted_svd_em(W, Om, 2, iters=0, init="weighted")
    _, _, h_best = weighted_svd_em(W, Om, 2, iters=0, init="best")
    assert h_def[0] == h_svd[0] and h_svd[0] != h_w[0]
    assert h_best[0] == pytest.approx(min(h_svd[0], h_w[0]))
    A0, B0 = truncated_svd(M, 2)
    for solver in SOLVERS:
        _, _, h = weighted_low_rank(W, Om, 2, solver=solver, iters=0, init=(A0, B0))
        assert h[0] < 1e-18
    with pytest.raises(FactorLMError):
        weighted_svd_em(W, Om, 2, init="random")
    with pytest.raises(FactorLMError):
        weighted_low_rank(W, Om, 2, solver="newton")


def test_row_weighted_is_exact_for_column_weights():
    g = gen(4)
    W = torch.randn(16, 12, generator=g, dtype=torch.float64)
    c = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    Omega = c.sqrt()[None, :].expand(16, 12)  # w = Omega^2 = c_j per column
    A, B = row_weighted_svd(W, Omega, 3)
    Af, Bf = fisher_weighted_svd(W, 3, importance=c.sqrt(), dim=1)
    assert torch.allclose(A @ B, Af @ Bf, atol=1e-10)
    # a fully pruned column stays finite
    mask = torch.ones(16, 12, dtype=torch.bool)
    mask[:, 0] = False
    A3, B3 = sparsity_aware_svd(W * mask, 3, mask=mask, decomposition="row")
    assert torch.isfinite(A3 @ B3).all()


# -- Omega from pruning scores -----------------------------------------------------------------------
def test_normalized_scores_non_negative_and_signed():
    s = torch.tensor([[4.0, 0.0, 2.0], [1.0, 8.0, 0.5]])
    assert torch.equal(normalized_scores(s), s / 8)  # proportions kept, zero stays zero
    signed = torch.tensor([[4.0, -2.0, 2.0], [0.0, 8.0, -1.0]])
    om = normalized_scores(signed)
    assert torch.allclose(om, (signed + 2) / 10)  # min -> 0, max -> 1
    for x in (s, signed):
        o = normalized_scores(x)
        assert float(o.min()) >= 0 and float(o.max()) == 1.0
        order = x.flatten().argsort()
        assert (o.flatten()[order].diff() >= 0).all()  # monotone
        assert torch.allclose(normalized_scores(7 * x), o)  # scale-free
    assert torch.allclose(normalized_scores(signed - 3.5), om)  # signed: shift-free too
    assert torch.equal(normalized_scores(torch.full((2, 3), -3.0)), torch.ones(2, 3))  # no information
    assert torch.equal(normalized_scores(torch.zeros(2, 3)), torch.ones(2, 3))
    with pytest.raises(FactorLMError):
        normalized_scores(torch.tensor([1.0, float("nan")]))


def test_scores_omega_uses_every_entry_raw():
    """omega='scores' (the default with scores): pruned entries keep their own normalised score (no
    eps floor), kept entries their value (no quantiles); the mask is not used."""
    g = gen(7)
    W = torch.randn(10, 8, generator=g)
    s = torch.rand(10, 8, generator=g) * 5
    mask = s > 2.5
    om = make_omega("scores", W * mask, mask, s)
    assert torch.allclose(om, s / s.max())
    assert torch.equal(om, make_omega("scores", W * mask, None, s))
    q = make_omega("scores_quantile", W * mask, mask, s)
    assert torch.all(q[~mask] == 1e-3) and float(q[mask].max()) == 1.0
    assert torch.equal(make_omega("mask", W * mask, mask), mask.float())
    assert torch.equal(make_omega("mask", W * mask), (W * mask != 0).float())  # finalized pruned matrix
    with pytest.raises(FactorLMError):
        make_omega("scores", W, mask)  # no scores
    with pytest.raises(FactorLMError):
        make_omega("magnitude", W, mask, s)


def test_score_quantile_omega():
    s = torch.tensor([[4.0, -1.0, 2.0], [2.0, 9.0, 0.5]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    om = score_quantile_omega(s, mask, eps=1e-3)
    assert om[~mask].eq(1e-3).all()
    kept = om[mask]
    assert kept.max() == 1.0 and kept.min() > 0 and (kept <= 1).all()
    assert om[1, 1] == 1.0 and om[0, 1] == 0.25  # highest -> 1, lowest of 4 -> 1/4
    assert om[1, 0] == 0.5  # order preserved: -1 < 2 < 4 < 9
    assert om[0, 0] == 0.75


@pytest.mark.parametrize("signed", [False, True])
def test_scaled_scores_give_identical_factors_and_changed_scores_change_them(signed):
    g = gen(8)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    s = torch.randn(24, 16, generator=g, dtype=torch.float64)
    s = s if signed else s.abs()
    mask = s.abs() > 0.6
    Wp = W * mask
    kw = dict(iters=20, tol=0.0)
    A, B = sparsity_aware_svd(Wp, 4, mask=mask, scores=s, **kw)
    A7, B7 = sparsity_aware_svd(Wp, 4, mask=mask, scores=7 * s, **kw)
    assert torch.allclose(A, A7, atol=1e-10) and torch.allclose(B, B7, atol=1e-10)
    # a different Omega -> different factors (Omega is really used)
    s2 = s.clone()
    s2[:12] = s2[:12] * 3
    A2, B2 = sparsity_aware_svd(Wp, 4, mask=mask, scores=s2, **kw)
    assert rel(A2 @ B2, A @ B) > 1e-3
    outs = [sparsity_aware_svd(Wp, 4, mask=mask, scores=s, omega=o, **kw) for o in ("scores", "scores_quantile", "mask")]
    Zs = [a @ b for a, b in outs]
    assert torch.allclose(Zs[0], A @ B, atol=1e-12)  # the default is omega="scores"
    assert rel(Zs[1], Zs[0]) > 1e-3 and rel(Zs[2], Zs[0]) > 1e-3 and rel(Zs[2], Zs[1]) > 1e-3


# -- the LPAF entry point ----------------------------------------------------------------------------
def test_defaults_are_the_elementwise_fit_of_normalised_raw_scores():
    """sparsity_aware_svd(W, k, mask=, scores=) = weighted_low_rank on normalized_scores of every
    entry; solver "auto" = EM-subspace for soft weights and 0/1 masks alike (1000 steps)."""
    g = gen(9)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    s = torch.randn(24, 16, generator=g, dtype=torch.float64)
    mask = s.abs() > 0.6
    Wp = W * mask
    A, B = sparsity_aware_svd(Wp, 4, mask=mask, scores=s)
    Aa, Ba, hist = weighted_svd_em(Wp, normalized_scores(s), 4, solver="subspace")
    assert torch.equal(A, Aa) and torch.equal(B, Ba)
    assert 2 < len(hist) <= 1001
    A, B = sparsity_aware_svd(Wp, 4, mask=mask, scores=s, solver="als")
    Aa, Ba, hist = weighted_svd_als(Wp, normalized_scores(s), 4)
    assert torch.equal(A, Aa) and torch.equal(B, Ba)
    assert 2 < len(hist) <= 101
    A, B = sparsity_aware_svd(Wp, 4, mask=mask)
    Ae, Be, hist = weighted_svd_em(Wp, mask.double(), 4, solver="subspace")
    assert torch.equal(A, Ae) and torch.equal(B, Be)
    assert 2 < len(hist) <= 1001
    _, _, h_auto = weighted_low_rank(Wp, normalized_scores(s), 4, iters=3)
    _, _, h_em = weighted_low_rank(Wp, normalized_scores(s), 4, solver="em_subspace", iters=3)
    assert h_auto == h_em


def test_first_order_scores_make_the_exact_minimiser_unbounded_and_the_default_stays_bounded():
    """Why the default solver is EM from the SVD, not ALS (BENCHMARKS.md, issue 11 part 4): once a
    weight is pruned its first-order score |w g| vanishes, so "w/ S" leaves A B nearly free on the
    pruned entries and the exact minimiser (ALS) fills them with values far larger than W (worse
    than the zero matrix).  The default keeps ||W - A B|| below ||W|| and still fits the paper's
    objective far better than the plain SVD it starts from."""
    g = gen(21)
    W = torch.randn(96, 48, generator=g, dtype=torch.float64)
    s = (W * torch.randn(96, 48, generator=g, dtype=torch.float64)).abs()
    s = s * torch.exp(1.5 * torch.randn(96, 48, generator=g, dtype=torch.float64))  # heavy-tailed, as PLATON's
    mask = s > s.flatten().kthvalue(int(0.75 * s.numel())).values
    Wp, s = W * mask, torch.where(mask, s, s * 1e-9)  # density 0.25; pruned entries' scores ~0
    om = normalized_scores(s)
    A0, B0 = truncated_svd(Wp, 12)
    j_svd = weighted_error(Wp, om, A0, B0)
    rel = lambda A, B: float((Wp - A @ B).norm() / Wp.norm())  # noqa: E731
    Aa, Ba = sparsity_aware_svd(Wp, 12, mask=mask, scores=s, solver="als")
    assert weighted_error(Wp, om, Aa, Ba) < 1e-3 * j_svd  # the literal objective: nearly 0 ...
    assert rel(Aa, Ba) > 1.5 and float((Aa @ Ba).abs().max()) > 3 * float(Wp.abs().max())  # ... far from W
    A, B = sparsity_aware_svd(Wp, 12, mask=mask, scores=s)
    assert rel(A, B) < 1.0 and rel(A, B) < 1.25 * rel(A0, B0)
    # (the default's plateau rule stops EM after a few hundred steps: 0.14x here, 0.09x at the 1000-step cap)
    assert weighted_error(Wp, om, A, B) < 0.2 * j_svd


def test_sparsity_aware_svd_options_and_dtype():
    M, mask, W = masked_lowrank(seed=5)
    Wp = (W * mask).to(torch.bfloat16)  # a finalized pruned matrix in a low-precision dtype
    scores = torch.randn(W.shape, generator=gen(6))
    for kw in ({"mask": mask}, {"scores": scores}, {"mask": mask, "scores": scores},
               {"mask": mask, "scores": scores, "omega": "scores_quantile"},
               {"mask": mask, "scores": scores, "omega": "mask", "solver": "em_subspace"},
               {"mask": mask, "decomposition": "row"}, {"scores": scores, "mode": "row"},
               {"mask": mask, "scores": scores, "decomposition": "svd"}, {"mask": mask, "solver": "subspace"}):
        A, B = sparsity_aware_svd(Wp, 2, **kw)
        assert A.dtype == B.dtype == torch.bfloat16, kw
        assert A.shape == (40, 2) and B.shape == (2, 30)
        assert torch.isfinite(A.float() @ B.float()).all()
    # decomposition="svd" ignores Omega
    A, B = sparsity_aware_svd(W * mask, 2, mask=mask, scores=scores, decomposition="svd")
    A0, B0 = truncated_svd(W * mask, 2)
    assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)
    # mask Omega on the pruned matrix (zeros off-mask) completes the rank-2 structure
    A, B = sparsity_aware_svd(W * mask, 2, mask=mask, iters=500, tol=1e-15, plateau=0.0)
    assert rel(A @ B, M) < 1e-6
    for bad in ({"decomposition": "exact"}, {"omega": "magnitude"}, {"solver": "newton"},
                {"decomposition": "em", "mode": "row"}, {"omega": "scores"}):
        with pytest.raises(FactorLMError):
            sparsity_aware_svd(W, 2, mask=mask, **bad)
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


def test_em_plateau_rule_stops_where_it_says_and_zero_restores_the_cap():
    """The plateau rule stops at the first t >= 20 with J_{t-20} - J_t <= 0.01 (J_0 - J_t); plateau=0
    runs to the cap; the subspace loop (Z carried in the state) equals repeated weighted_svd_em_step."""
    from factorlm.decompose.weighted_svd import weighted_svd_em, weighted_svd_em_step

    g = gen(7)
    W = torch.randn(40, 30, generator=g, dtype=torch.float64)
    Omega = torch.rand(40, 30, generator=g, dtype=torch.float64) ** 4  # heavy-tailed: EM creeps
    _, _, full = weighted_svd_em(W, Omega, 5, iters=400, tol=0.0, solver="subspace", plateau=0.0)
    assert len(full) == 401
    _, _, short = weighted_svd_em(W, Omega, 5, iters=400, tol=0.0, solver="subspace")
    t = len(short) - 1
    assert 20 <= t < 400
    assert short == full[: t + 1]  # the same iterates, only fewer
    rule = [s >= 20 and full[s - 20] - full[s] <= 0.01 * (full[0] - full[s]) for s in range(401)]
    assert rule.index(True) == t
    # the subspace loop against the public one-step function
    A, B = __import__("factorlm.decompose.svd", fromlist=["truncated_svd"]).truncated_svd(W, 5)
    w = (Omega / Omega.max()) ** 2
    ref = [float((Omega * (W - A @ B)).pow(2).sum())]
    V = None
    for _ in range(10):
        A, B, V = weighted_svd_em_step(W, w, A, B, "subspace", V)
        ref.append(float((Omega * (W - A @ B)).pow(2).sum()))
    assert max(abs(a - b) / b for a, b in zip(ref, full[:11])) < 1e-9


def test_omega_scores_sqrt_is_the_root_of_the_normalised_scores():
    from factorlm.decompose.weighted_svd import make_omega, normalized_scores

    g = gen(9)
    W = torch.randn(6, 5, generator=g, dtype=torch.float64)
    s = torch.rand(6, 5, generator=g, dtype=torch.float64) ** 3
    om = make_omega("scores_sqrt", W, scores=s)
    assert torch.equal(om, normalized_scores(s).sqrt())
    assert float(om.max()) == 1.0 and torch.allclose(om ** 2, s / s.max())
