"""decompose.quantize: RTN against an independent numpy implementation, exact byte counts, and the
whitened error correction (EoRA) against an independent fp64 SVD of E S and against every other rank-k
correction tried."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factorlm.decompose.quantize import error_correction, rtn, rtn_bytes
from factorlm.decompose.whiten import GramScale
from factorlm.errors import FactorLMError


@pytest.mark.parametrize("bits,group", [(4, 32), (3, 16), (8, 64)])
def test_rtn_matches_a_numpy_reference(bits, group):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 128, generator=g) * torch.rand(24, 1, generator=g)
    codes, scales, W_hat = rtn(W, bits, group)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = W.numpy().reshape(24, 128 // group, group).astype(np.float64)
    s = np.abs(x).max(axis=2, keepdims=True) / ((hi - lo) / 2)
    s = torch.from_numpy(s).float().bfloat16().double().numpy()  # one bf16 scale per group, as stored
    q = np.clip(np.round(x / s), lo, hi)
    ref = (q * s).reshape(24, 128)
    assert codes.dtype == torch.int8 and int(codes.min()) >= lo and int(codes.max()) <= hi
    assert scales.shape == (24, 128 // group) and scales.dtype == torch.bfloat16
    # ties of x / s at .5 may round either way in float32 vs float64: allow one step on a few entries
    diff = np.abs(W_hat.double().numpy() - ref)
    step = np.repeat(s.reshape(24, -1), group, axis=1)
    assert (diff <= 1e-6 + 1e-6 * np.abs(ref)).mean() > 0.995 and (diff <= step + 1e-6).all()
    assert rtn_bytes((24, 128), bits, group) == (24 * 128 * bits + 7) // 8 + 2 * 24 * (128 // group)


def test_rtn_refuses_a_group_that_does_not_divide_the_width():
    with pytest.raises(FactorLMError, match="group size 48 must divide"):
        rtn(torch.randn(4, 64), 4, 48)


def _gram(n_in, cond, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -np.log10(cond), n_in, dtype=torch.float64)
    return (Q * lam) @ Q.T


@pytest.mark.parametrize("shape", [(48, 64), (64, 40)])
def test_error_correction_is_the_optimal_rank_k_fit_in_the_input_space(shape):
    """||(E - AB) S||_F equals the tail of E S's singular values (numpy fp64 SVD), and no other rank-k
    correction (plain SVD of E, random) does better under the Gram."""
    out, n_in = shape
    g = torch.Generator().manual_seed(3)
    W = torch.randn(out, n_in, generator=g, dtype=torch.float64)
    _, _, W_hat = rtn(W.float(), 3, 8)
    W_hat = W_hat.double()
    G = _gram(n_in, 1e6, 4)
    S = np.linalg.cholesky(G.numpy() + 1e-12 * np.eye(n_in))
    E = (W - W_hat).numpy()
    k = 6
    A, B = error_correction(W, W_hat, k, GramScale(G, 0.0))
    got = np.linalg.norm((E - (A @ B).numpy()) @ S)
    sv = np.linalg.svd(E @ S, compute_uv=False)
    assert got == pytest.approx(np.sqrt((sv[k:] ** 2).sum()), rel=1e-7)
    U, s, Vt = np.linalg.svd(E)
    plain = (U[:, :k] * s[:k]) @ Vt[:k]
    assert got < np.linalg.norm((E - plain) @ S)
    rng = np.random.default_rng(0)
    for _ in range(20):  # rank-k neighbours of the fit
        C = (A.numpy() + 1e-3 * rng.standard_normal((out, k))) @ (B.numpy() + 1e-3 * rng.standard_normal((k, n_in)))
        assert got <= np.linalg.norm((E - C) @ S) + 1e-12
    # the corrected layer's output error is below RTN's alone
    assert got < np.linalg.norm(E @ S)
