"""Activation-aware low-rank fits (SVD-LLM whitening, ASVD, plain SVD): exactness at full rank, the
SVD-LLM truncation theorem, independent references (Cholesky + explicit inverse, ASVD's S^{-1}),
rank-deficient calibration, streaming statistics, factor balancing, input checks."""

from __future__ import annotations

import pytest
import torch

from factorlm.decompose.svd import truncated_svd
from factorlm.decompose.whiten import (
    InputStats,
    asvd,
    asvd_scale,
    factors_from_basis,
    output_error,
    scaled_factors,
    scaled_spectrum,
    scaled_svd,
    whiten_svd,
    whitening_scale,
)
from factorlm.errors import FactorLMError


pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def calib(n: int, d: int, *, spread: float = 3.0, seed: int = 0) -> torch.Tensor:
    """(n, d) float64 inputs, correlated, with column scales log-spaced over ``spread`` decades."""
    torch.manual_seed(seed)
    mix = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, dtype=F64) / d ** 0.5
    scales = torch.logspace(0, -spread, d, dtype=F64)
    return (torch.randn(n, d, dtype=F64) @ mix) * scales


def weight(out: int, inp: int, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(out, inp, dtype=F64)


def rel(X: torch.Tensor, Y: torch.Tensor) -> float:
    return float((X - Y).norm() / Y.norm())


# 1. full rank reproduces the outputs on X -----------------------------------------------------------

@pytest.mark.parametrize("shape", [(40, 32), (24, 32)])
@pytest.mark.parametrize("kind", ["whiten", "asvd", "plain"])
def test_full_rank_reproduces_outputs(shape, kind):
    out, d = shape
    X = calib(100, d)
    W = weight(out, d)
    stats = InputStats(d, gram=True, absmean=True)
    stats.update(X)
    k = min(out, d)
    if kind == "whiten":
        A, B = whiten_svd(W, k, stats.gram)
    elif kind == "asvd":
        A, B = asvd(W, k, stats.abs_mean)
    else:
        A, B = scaled_svd(W, k)
    assert A.shape == (out, k) and B.shape == (k, d)
    assert torch.allclose(X @ (A @ B).T, X @ W.T, rtol=0, atol=1e-10 * float((X @ W.T).abs().max()))


# 2. the SVD-LLM theorem and its advantage over plain SVD ---------------------------------------------

@pytest.mark.parametrize("k", [1, 4, 8, 20])
def test_truncation_theorem_and_beats_plain_svd(k):
    d = 32
    X = calib(200, d, spread=3.0)
    W = weight(40, d)
    G = X.T @ X
    S = whitening_scale(G)
    sigma = scaled_spectrum(W, S)
    A, B = scaled_svd(W, k, S)
    err = output_error(W, A, B, G)
    # definition of the output error, computed directly on X
    assert err == pytest.approx(float((X @ (W - A @ B).T).pow(2).sum()), rel=1e-10)
    # the theorem: error = sum of the discarded squared singular values of W S
    assert err == pytest.approx(float(sigma[k:].pow(2).sum()), rel=1e-8)
    # plain SVD of W ignores the input scales: whitening is much better on anisotropic inputs
    # (measured ratios 0.84 / 0.22 / 0.04 / 0.0007 at k = 1 / 4 / 8 / 20)
    Ap, Bp = truncated_svd(W, k)
    plain = output_error(W, Ap, Bp, G)
    assert err < (0.9 if k == 1 else 0.5) * plain, (err, plain)


def test_spectrum_independent_of_square_root():
    """The spectrum of W S depends on G only: eigh-based S and Cholesky L give the same values."""
    X = calib(200, 16, spread=1.0)
    W = weight(20, 16)
    G = X.T @ X
    L = torch.linalg.cholesky(G)
    assert torch.allclose(scaled_spectrum(W, whitening_scale(G)), torch.linalg.svdvals(W @ L), rtol=1e-10, atol=0)
    S = whitening_scale(G, damp=0.1)
    assert torch.allclose(S @ S.T, G + 0.1 * G.diagonal().mean() * torch.eye(16, dtype=F64), rtol=0, atol=1e-10 * float(G.abs().max()))


# 3. independent reference: SVD-LLM's explicit formula ------------------------------------------------

@pytest.mark.parametrize("k", [3, 10])
def test_matches_svdllm_explicit_formula(k):
    d = 24
    torch.manual_seed(3)
    X = torch.randn(300, d, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64)  # well conditioned
    W = weight(30, d, seed=4)
    G = X.T @ X
    # SVD-LLM as published: S = cholesky(G), W S = U Sigma V^T, W' = U_k Sigma_k V_k^T S^{-1}
    L = torch.linalg.cholesky(G)
    U, s, Vh = torch.linalg.svd(W @ L, full_matrices=False)
    ref = (U[:, :k] * s[:k]) @ Vh[:k] @ torch.linalg.inv(L)
    A, B = whiten_svd(W, k, G)
    assert rel(A @ B, ref) < 1e-10


# 4. rank-deficient calibration -------------------------------------------------------------------

def test_rank_deficient_gram():
    n, d, out = 10, 32, 24
    X = calib(n, d, spread=1.0)
    W = weight(out, d)
    G = X.T @ X
    assert int(torch.linalg.matrix_rank(G)) == n
    total = float((X @ W.T).pow(2).sum())
    S = whitening_scale(G)
    assert torch.isfinite(S).all()
    sigma = scaled_spectrum(W, S)
    for k in range(1, out + 1):
        A, B = scaled_svd(W, k, S)
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        err = output_error(W, A, B, G)
        if k >= n:  # W X^T has rank n: nothing left to lose
            assert err < 1e-12 * total, (k, err)
        else:
            assert err == pytest.approx(float(sigma[k:].pow(2).sum()), rel=1e-8)
            assert err > 1e-6 * total
    # damping keeps everything finite and only costs a little on the calibration data
    A, B = whiten_svd(W, n, G, damp=0.01)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert output_error(W, A, B, G) < 0.05 * total


# 5. ASVD against its published formula; dead channels ------------------------------------------------

@pytest.mark.parametrize("k", [2, 9])
def test_asvd_matches_reference(k):
    d = 20
    X = calib(150, d, spread=2.0)
    W = weight(28, d)
    stats = InputStats(d, gram=False, absmean=True)
    stats.update(X)
    m = X.abs().mean(dim=0)
    s = asvd_scale(stats.abs_mean, alpha=0.5)
    assert torch.allclose(s, m.sqrt(), rtol=1e-12, atol=0)
    U, sig, Vh = torch.linalg.svd(W * m.sqrt(), full_matrices=False)
    ref = (U[:, :k] * sig[:k]) @ Vh[:k] / m.sqrt()  # U_k Sigma_k V_k^T diag(s)^{-1}
    A, B = asvd(W, k, stats.abs_mean, alpha=0.5)
    assert rel(A @ B, ref) < 1e-10
    # a different alpha really changes the fit (the scale is used)
    A1, B1 = asvd(W, k, stats.abs_mean, alpha=1.0)
    assert rel(A1 @ B1, ref) > 1e-3


def test_asvd_dead_channels_finite():
    d = 16
    X = calib(50, d, spread=1.0)
    X[:, [2, 9]] = 0.0
    W = weight(12, d)
    stats = InputStats(d, gram=True, absmean=True)
    stats.update(X)
    s = asvd_scale(stats.abs_mean)
    assert (s > 0).all() and torch.isfinite(s).all()
    assert float(s[2]) == pytest.approx(1e-6 * float(s.max()))
    A, B = asvd(W, 5, stats.abs_mean)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    # all-zero statistics: no information, falls back to plain SVD instead of NaN
    assert torch.equal(asvd_scale(torch.zeros(d, dtype=F64)), torch.ones(d, dtype=F64))
    # whitening with dead channels (singular G) is finite too
    A, B = whiten_svd(W, 5, stats.gram)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()


# 6. scale=None is the Eckart-Young truncation -----------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 12])
def test_no_scale_equals_truncated_svd(k):
    W = weight(18, 12)
    A, B = scaled_svd(W, k, None)
    Ar, Br = truncated_svd(W, k)
    assert rel(A @ B, Ar @ Br) < 1e-10
    assert torch.allclose(scaled_spectrum(W, None), torch.linalg.svdvals(W), rtol=1e-12, atol=0)


# 7. streaming statistics ------------------------------------------------------------------------

def test_input_stats_streaming_merge_and_bf16():
    d = 12
    torch.manual_seed(5)
    X = torch.randn(4, 9, d, dtype=torch.float32)
    flat = X.reshape(-1, d).to(F64)
    stats = InputStats(d, gram=True, absmean=True)
    for chunk in X:  # (9, d) chunks
        stats.update(chunk)
    assert stats.tokens == 36
    assert stats.gram.dtype == F64 and stats.abs_mean.dtype == F64
    # float32 input: each update's product in float32, the running sum in float64
    assert torch.allclose(stats.gram, flat.T @ flat, rtol=1e-5, atol=1e-5)
    assert torch.allclose(stats.abs_mean, flat.abs().mean(0), rtol=1e-12, atol=0)
    # leading dims flattened: one 3-D update equals the chunks
    one = InputStats(d, gram=True, absmean=True)
    one.update(X)
    assert torch.allclose(one.gram, stats.gram, rtol=1e-5, atol=1e-5)
    # merge_: two halves merged == one accumulator over both; an empty accumulator merges as a no-op
    a, b = InputStats(d, absmean=True), InputStats(d, absmean=True)
    a.update(X[:1])
    b.update(X[1:])
    assert a.merge_(b) is a
    a.merge_(InputStats(d, absmean=True))
    assert a.tokens == 36
    assert torch.allclose(a.gram, stats.gram, rtol=1e-5, atol=1e-5)
    assert torch.allclose(a.abs_mean, stats.abs_mean, rtol=1e-12, atol=0)
    fresh = InputStats(d, absmean=True).merge_(a)
    assert fresh.tokens == 36 and torch.allclose(fresh.gram, stats.gram, rtol=1e-5, atol=1e-5)
    # float64 input: exact
    s64 = InputStats(d, gram=True)
    s64.update(flat)
    assert torch.allclose(s64.gram, flat.T @ flat, rtol=1e-12, atol=1e-12)
    # bf16 input: from the bf16 values (products in float32), summed in float64
    xb = X.to(torch.bfloat16)
    sb = InputStats(d, gram=True, absmean=True)
    sb.update(xb)
    fb = xb.reshape(-1, d).to(F64)
    assert sb.gram.dtype == F64
    assert torch.allclose(sb.gram, fb.T @ fb, rtol=1e-5, atol=1e-5)
    assert torch.allclose(sb.abs_mean, fb.abs().mean(0), rtol=1e-12, atol=0)
    # gram-only accumulator has no abs_mean
    assert InputStats(d).abs_mean is None
    with pytest.raises(FactorLMError):
        stats.update(torch.randn(3, d + 1))
    with pytest.raises(FactorLMError):
        stats.update(torch.ones(3, d, dtype=torch.int64))
    with pytest.raises(FactorLMError):
        stats.merge_(InputStats(d + 1, absmean=True))
    with pytest.raises(FactorLMError):
        stats.merge_(InputStats(d))  # different statistics collected


# 8. input checks --------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -1, 14, 2.5, True])
def test_bad_rank_raises(rank):
    W = weight(13, 20)
    with pytest.raises(FactorLMError):
        scaled_svd(W, rank)
    U, _ = scaled_factors(W, None)
    with pytest.raises(FactorLMError):
        factors_from_basis(W, U, rank)


def test_bad_inputs_raise():
    W = weight(8, 6)
    with pytest.raises(FactorLMError):
        scaled_svd(W, 2, torch.ones(5, dtype=F64))  # wrong diagonal length
    with pytest.raises(FactorLMError):
        scaled_svd(W, 2, torch.eye(5, dtype=F64))  # wrong matrix shape
    G = torch.eye(6, dtype=F64)
    G[0, 0] = float("nan")
    with pytest.raises(FactorLMError):
        whitening_scale(G)
    with pytest.raises(FactorLMError):
        whitening_scale(torch.zeros(6, 6, dtype=F64))
    with pytest.raises(FactorLMError):
        whitening_scale(torch.eye(6, dtype=F64), damp=-1.0)


# 9. factor balancing, one-SVD path, dtypes ---------------------------------------------------------

def test_balancing_and_one_svd_path():
    d = 20
    X = calib(80, d, spread=2.0)
    W = weight(30, d)
    S = whitening_scale(X.T @ X)
    U, sigma = scaled_factors(W, S)
    # eigvalsh vs eigh of the same small-side matrix: equal to rounding of sigma^2 (absolute in sigma_max^2)
    assert torch.allclose(sigma.cpu(), scaled_spectrum(W, S), rtol=1e-9, atol=1e-9 * float(sigma[0]))
    for k in (1, 6, 20):
        A, B = factors_from_basis(W, U, k)
        Uk = U[:, :k]
        assert rel(A @ B, Uk @ Uk.T @ W) < 1e-12  # product unchanged by the rebalancing
        assert torch.allclose(A.norm(dim=0), B.norm(dim=1), rtol=1e-10, atol=0)
        A2, B2 = scaled_svd(W, k, S)
        assert torch.allclose(A2, A, rtol=0, atol=1e-12) and torch.allclose(B2, B, rtol=0, atol=1e-12)


def test_balancing_zero_rows_and_dtype():
    # W of rank 3: at k = 5 two rows of U_k^T W are zero -> guarded, no NaN
    torch.manual_seed(6)
    W = torch.randn(10, 3, dtype=F64) @ torch.randn(3, 8, dtype=F64)
    A, B = scaled_svd(W, 5)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert rel(A @ B, W) < 1e-12
    # a sparse W whose null directions come back from LAPACK as exact basis vectors: exact-zero rows
    Wd = torch.zeros(6, 4, dtype=F64)
    Wd[0, 0], Wd[1, 1] = 2.0, 1.0
    A, B = scaled_svd(Wd, 4)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    assert torch.allclose(A @ B, Wd, rtol=0, atol=1e-14)
    # factors come back in W's dtype, computed in float64
    W32 = weight(16, 12).float()
    G = calib(60, 12).T @ calib(60, 12)
    A, B = whiten_svd(W32, 4, G)
    assert A.dtype == torch.float32 and B.dtype == torch.float32
    A64, B64 = whiten_svd(W32.double(), 4, G)
    assert rel((A @ B).double(), A64 @ B64) < 1e-5


def test_cli_default_damping_changes_the_optimum_negligibly():
    """The CLI's --damp default (1e-6 of the mean diagonal) costs < 1e-4 of the optimal output error
    on the calibration inputs, and still fits when the data are rank-deficient."""
    from factorlm.decompose.whiten import output_error, scaled_svd, whitening_scale

    torch.manual_seed(11)
    W = torch.randn(24, 32, dtype=F64)
    X = torch.randn(200, 32, dtype=F64) * torch.logspace(0, 2, 32, dtype=F64)
    G = X.T @ X
    for k in (4, 12):
        e0 = output_error(W, *scaled_svd(W, k, whitening_scale(G, 0.0)), G)
        e6 = output_error(W, *scaled_svd(W, k, whitening_scale(G, 1e-6)), G)
        assert e0 <= e6 <= e0 * (1 + 1e-4)
    Xs = X[:10]
    Gs = Xs.T @ Xs
    A, B = scaled_svd(W, 12, whitening_scale(Gs, 1e-6))
    assert torch.isfinite(A).all() and output_error(W, A, B, Gs) < 1e-8 * float((W @ Xs.T).pow(2).sum())


# 10. through the small side (eigh of the out x out or in x in problem), against a float64 SVD of W S --------

def _ill_gram(d: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    lam = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), d, dtype=F64)
    return (Q * lam) @ Q.T


@pytest.mark.parametrize("out,inn", [(12, 40), (40, 12), (24, 24)])
@pytest.mark.parametrize("damp", [0.0, 1e-6])
def test_small_side_matches_float64_svd_on_ill_conditioned_grams(out, inn, damp):
    from factorlm.decompose.whiten import GramScale, output_error

    G = _ill_gram(inn, 1e10, seed=out + inn)
    W = torch.randn(out, inn, generator=torch.Generator().manual_seed(3), dtype=F64)
    Gd = G + damp * float(G.diagonal().mean()) * torch.eye(inn, dtype=F64)
    lam, Q = torch.linalg.eigh(Gd)
    S_ref = Q * lam.clamp_min(0).sqrt()  # independent square root of G' (no whitening_scale)
    ref = torch.linalg.svdvals(W @ S_ref)
    for scale in (GramScale(G, damp), whitening_scale(G, damp)):
        U, sigma = scaled_factors(W, scale)
        assert U.shape == (out, min(out, inn)) and sigma.shape == (min(out, inn),)
        assert torch.allclose(sigma, ref, rtol=0, atol=1e-9 * float(ref[0]))
        assert torch.allclose(scaled_spectrum(W, scale), ref, rtol=0, atol=1e-9 * float(ref[0]))
        for k in (1, min(out, inn) // 3, min(out, inn) - 1):
            A, B = factors_from_basis(W, U, k)
            # the Eckart-Young optimum of ||(W - AB) S||^2 is the tail of the reference spectrum
            best = float(ref[k:].pow(2).sum())
            got = output_error(W, A, B, Gd)
            assert abs(got - best) <= 1e-8 * float(ref.pow(2).sum()), (k, got, best)


def test_small_side_rank_deficient_tall_matrix_has_zero_columns_not_nan():
    from factorlm.decompose.whiten import GramScale

    # out > in and W S of rank 3: the vanishing singular directions get zero columns of U
    W = torch.randn(30, 3, dtype=F64) @ torch.randn(3, 8, dtype=F64)
    U, sigma = scaled_factors(W, GramScale(torch.eye(8, dtype=F64)))
    assert torch.isfinite(U).all() and (sigma[3:] < 1e-6 * sigma[0]).all()
    assert torch.allclose(U[:, :3].T @ U[:, :3], torch.eye(3, dtype=F64), atol=1e-10)
    A, B = factors_from_basis(W, U, 5)
    assert rel(A @ B, W) < 1e-10


def test_gram_is_accumulated_in_column_blocks(monkeypatch):
    """Past ``_GRAM_CHUNK`` entries the float32 products come in column blocks (an uneven last one):
    the float64 sum is still X^T X of every update, against an independent float64 product."""
    import factorlm.decompose.whiten as W

    monkeypatch.setattr(W, "_GRAM_CHUNK", 37 * 5)  # 37 features: blocks of 5 columns, the last of 2
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 11, 37, generator=g), torch.randn(7, 37, generator=g)]
    st = W.InputStats(37)
    for x in xs:
        st.update(x)
    ref = sum(x.reshape(-1, 37).double().T @ x.reshape(-1, 37).double() for x in xs)
    torch.testing.assert_close(st.gram, ref, rtol=1e-5, atol=1e-5)
    assert st.tokens == 29 and st.gram.dtype == torch.float64
