import pytest
import torch
from torch import nn

from factorlm.decompose import eckart_young_error, fisher_importance, fisher_weighted_svd, truncated_svd
from factorlm.errors import FactorLMError
from factorlm.layers import LowRankLinear, linear_flops, linear_params, structure_from_spec


def test_svd_error_is_eckart_young_optimum():
    torch.manual_seed(0)
    W = torch.randn(40, 30, dtype=torch.float64)
    S = torch.linalg.svdvals(W)
    for k in (1, 5, 17, 30):
        A, B = truncated_svd(W, k)
        err = torch.linalg.norm(W - A @ B)
        assert abs(float(err) - float(S[k:].pow(2).sum().sqrt())) < 1e-10
        assert abs(float(err) - eckart_young_error(W, k)) < 1e-10
        assert A.shape == (40, k) and B.shape == (k, 30)
    # balanced split: both factors carry sqrt(S)
    A, B = truncated_svd(W, 5)
    assert torch.allclose(A.norm(dim=0), B.norm(dim=1), atol=1e-10)


def test_svd_keeps_dtype_and_computes_in_fp32():
    W = torch.randn(16, 8).to(torch.bfloat16)
    A, B = truncated_svd(W, 4)
    assert A.dtype == B.dtype == torch.bfloat16


def test_fwsvd_uniform_weights_equals_svd():
    torch.manual_seed(1)
    W = torch.randn(24, 16, dtype=torch.float64)
    A0, B0 = truncated_svd(W, 6)
    for dim in (0, 1):
        n = W.shape[1 - dim] if dim == 1 else W.shape[0]
        n = W.shape[1] if dim == 1 else W.shape[0]
        A, B = fisher_weighted_svd(W, 6, torch.full((n,), 3.7, dtype=torch.float64), dim=dim)
        assert torch.allclose(A @ B, A0 @ B0, atol=1e-10)


def test_fwsvd_minimises_weighted_error():
    torch.manual_seed(2)
    W = torch.randn(20, 12, dtype=torch.float64)
    fisher = torch.rand(20, 12, dtype=torch.float64) ** 4
    I = fisher_importance(fisher, dim=0)
    assert I.shape == (12,)
    A, B = fisher_weighted_svd(W, 4, I)
    A0, B0 = truncated_svd(W, 4)
    werr = lambda M: float(torch.linalg.norm((W - M) * I[None, :]))  # noqa: E731
    # FWSVD is the exact optimum of the weighted problem: better than plain SVD and than perturbations
    assert werr(A @ B) <= werr(A0 @ B0) + 1e-12
    for _ in range(5):
        P = torch.randn_like(A) * 1e-3
        assert werr(A @ B) <= werr((A + P) @ B) + 1e-12


def test_full_rank_lowrank_reproduces_linear():
    torch.manual_seed(0)
    lin = nn.Linear(12, 20)
    lr = LowRankLinear.from_linear(lin, 12)
    x = torch.randn(3, 5, 12)
    assert torch.allclose(lr(x), lin(x), atol=1e-5)
    assert torch.allclose(lr.to_linear()(x), lin(x), atol=1e-5)
    assert lr.in_features == 12 and lr.out_features == 20 and lr.rank == 12


def test_lowrank_param_and_flop_counts_exact():
    lr = LowRankLinear(384, 1536, rank=64)
    assert lr.num_params() == sum(p.numel() for p in lr.parameters()) == 64 * (384 + 1536) + 1536
    assert lr.flops() == 2 * 64 * (384 + 1536) + 1536
    lin = nn.Linear(384, 1536)
    assert linear_params(lin) == 384 * 1536 + 1536
    assert linear_flops(lin) == 2 * 384 * 1536 + 1536
    nb = LowRankLinear(10, 6, rank=2, bias=False)
    assert nb.num_params() == 2 * 16 and nb.flops() == 2 * 2 * 16


def test_spec_round_trip():
    lr = LowRankLinear(10, 6, rank=3)
    spec = lr.spec()
    assert spec == {"structure": "lowrank", "shape": [6, 10], "bias": True, "rank": 3}
    clone = structure_from_spec(spec)
    clone.load_state_dict(lr.state_dict())
    x = torch.randn(4, 10)
    assert torch.equal(clone(x), lr(x))


@pytest.mark.parametrize("rank", [0, -1, 7])
def test_bad_rank(rank):
    with pytest.raises(FactorLMError, match="rank"):
        LowRankLinear.from_linear(nn.Linear(6, 8), rank)
