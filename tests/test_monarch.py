import pytest
import torch
from torch import nn

from factorlm.decompose.monarch import (
    monarch_optimal_error,
    monarch_project,
    monarch_to_blocks,
    monarch_to_dense,
)
from factorlm.errors import FactorLMError
from factorlm.layers import STRUCTURES, linear_flops, linear_params, structure_from_spec
from factorlm.layers.monarch import MonarchLinear
from factorlm.ranks.budget import plan_params, uniform_plan

MINILM = {
    **{f"l{i}.{n}": (384, 384) for i in range(6) for n in ("q", "k", "v", "o")},
    **{f"l{i}.up": (1536, 384) for i in range(6)},
    **{f"l{i}.down": (384, 1536) for i in range(6)},
}
BERT = {
    **{f"l{i}.{n}": (768, 768) for i in range(12) for n in ("q", "k", "v", "o")},
    **{f"l{i}.up": (3072, 768) for i in range(12)},
    **{f"l{i}.down": (768, 3072) for i in range(12)},
}


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def random_monarch(out_f, in_f, b, r, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(b, out_f // b, b * r, generator=g, dtype=dtype)
    R = torch.randn(b, b * r, in_f // b, generator=g, dtype=dtype)
    return L, R


def test_registered():
    assert STRUCTURES.get("monarch") is MonarchLinear
    assert MonarchLinear.structure == "monarch" and MonarchLinear.budget_knob == "block_rank"


@pytest.mark.parametrize("shape", [(16, 16), (48, 16), (16, 48)])
@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_exact_monarch_is_recovered(shape, r, dtype, tol):
    out_f, in_f = shape
    L, R = random_monarch(out_f, in_f, 4, r, dtype)
    W = monarch_to_dense(L, R)
    L2, R2 = monarch_project(W, 4, r)
    assert L2.shape == L.shape and R2.shape == R.shape and L2.dtype == R2.dtype == dtype
    assert rel(monarch_to_dense(L2, R2), W) < tol
    # the class is exactly "every b x b grid block has rank <= r"
    blocks = W.reshape(4, out_f // 4, 4, in_f // 4).transpose(1, 2)
    assert int(torch.linalg.matrix_rank(blocks).max()) <= r


def test_block_structure_of_factors():
    L, R = random_monarch(12, 8, 2, 3)
    W = monarch_to_dense(L, R)
    for i in range(2):
        for j in range(2):
            blk = W[i * 6:(i + 1) * 6, j * 4:(j + 1) * 4]
            assert torch.allclose(blk, L[i][:, j * 3:(j + 1) * 3] @ R[j][i * 3:(i + 1) * 3, :])
    A4, B4 = monarch_to_blocks(L, R)
    assert torch.allclose(A4[1, 0] @ B4[1, 0], W[6:, :4])


def test_matches_dao_square_definition():
    # n = b^2, r = 1: Dao et al.'s M = P L P^T R with block-diagonal L, R and reshape-transpose P
    b = 4
    n = b * b
    g = torch.Generator().manual_seed(3)
    Lb = [torch.randn(b, b, generator=g, dtype=torch.float64) for _ in range(b)]
    Rb = [torch.randn(b, b, generator=g, dtype=torch.float64) for _ in range(b)]
    P = torch.eye(n, dtype=torch.float64)[torch.arange(n).reshape(b, b).T.reshape(-1)]
    M = P @ torch.block_diag(*Lb) @ P.T @ torch.block_diag(*Rb)
    # our layer is L P^T R, i.e. P^T M; and its L, R blocks are exactly Dao's
    L, R = torch.stack(Lb), torch.stack(Rb)
    assert torch.allclose(monarch_to_dense(L, R), P.T @ M, atol=1e-12)
    Lp, Rp = monarch_project(P.T @ M, b, 1)
    assert rel(P @ monarch_to_dense(Lp, Rp), M) < 1e-10


def test_projection_is_optimal():
    torch.manual_seed(0)
    W = torch.randn(32, 16, dtype=torch.float64)
    b, r = 4, 2
    L, R = monarch_project(W, b, r)
    err = float(torch.linalg.norm(W - monarch_to_dense(L, R)))
    # equals the independent per-block Eckart-Young bound
    S = torch.linalg.svdvals(W.reshape(b, 8, b, 4).transpose(1, 2))
    assert abs(err - float(S[..., r:].pow(2).sum().sqrt())) < 1e-10
    assert abs(err - monarch_optimal_error(W, b, r)) < 1e-10
    # no worse than random Monarch matrices (optimally scaled) and perturbations of the optimum
    for s in range(5):
        Lr, Rr = random_monarch(32, 16, b, r, seed=10 + s)
        M = monarch_to_dense(Lr, Rr)
        M = M * (W * M).sum() / (M * M).sum()
        assert err <= float(torch.linalg.norm(W - M))
        for eps in (1e-1, 1e-3):
            Lq = L + eps * torch.randn_like(L)
            Rq = R + eps * torch.randn_like(R)
            assert err <= float(torch.linalg.norm(W - monarch_to_dense(Lq, Rq))) + 1e-12
    # gradient descent from the projection cannot improve it (stationary + global optimum)
    Lg, Rg = L.clone().requires_grad_(), R.clone().requires_grad_()
    opt = torch.optim.SGD([Lg, Rg], lr=1e-2)
    for _ in range(50):
        opt.zero_grad()
        loss = (W - monarch_to_dense(Lg, Rg)).pow(2).sum()
        loss.backward()
        opt.step()
    err_gd = float(torch.linalg.norm(W - monarch_to_dense(Lg.detach(), Rg.detach())))
    assert err_gd >= err * (1 - 1e-6)


def test_gradient_descent_from_random_does_not_beat_projection():
    torch.manual_seed(1)
    W = torch.randn(16, 24, dtype=torch.float64)
    err = monarch_optimal_error(W, 2, 3)
    Lr, Rr = random_monarch(16, 24, 2, 3, seed=5)
    Lg, Rg = (0.3 * Lr).requires_grad_(), (0.3 * Rr).requires_grad_()
    opt = torch.optim.Adam([Lg, Rg], lr=3e-2)
    for _ in range(300):
        opt.zero_grad()
        (W - monarch_to_dense(Lg, Rg)).pow(2).sum().backward()
        opt.step()
    assert float(torch.linalg.norm(W - monarch_to_dense(Lg.detach(), Rg.detach()))) >= err * (1 - 1e-6)


@pytest.mark.parametrize("shape,b,r", [((48, 16), 4, 2), ((16, 48), 2, 3), ((24, 24), 3, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dense_and_grads_flow(shape, b, r, bias):
    out_f, in_f = shape
    torch.manual_seed(0)
    m = MonarchLinear(in_f, out_f, r, bias=bias, nblocks=b, dtype=torch.float64)
    if bias:
        nn.init.normal_(m.bias)
    x = torch.randn(3, 5, in_f, dtype=torch.float64, requires_grad=True)
    y = m(x)
    ref = x @ m.to_dense().T + (m.bias if bias else 0)
    assert y.shape == (3, 5, out_f)
    assert torch.allclose(y, ref, atol=1e-12)
    assert torch.allclose(m(x[0, 0]), ref[0, 0], atol=1e-12)  # 1-D input
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and m.L.grad is not None and m.R.grad is not None
    assert m.L.grad.abs().sum() > 0 and m.R.grad.abs().sum() > 0
    # gradients agree with the dense reference
    m.zero_grad()
    g = torch.randn(3, 5, out_f, dtype=torch.float64)
    (m(x.detach()) * g).sum().backward()
    gL, gR = m.L.grad.clone(), m.R.grad.clone()
    m.zero_grad()
    (((x.detach() @ m.to_dense().T) * g).sum()).backward()
    assert torch.allclose(gL, m.L.grad, atol=1e-10) and torch.allclose(gR, m.R.grad, atol=1e-10)


def test_params_and_flops_exact():
    for (out_f, in_f), b, r, bias in [((1536, 384), 4, 32, True), ((384, 1536), 4, 16, False), ((48, 16), 2, 3, True)]:
        m = MonarchLinear(in_f, out_f, r, bias=bias, nblocks=b)
        hand = r * b * (in_f + out_f)
        assert hand == b * (in_f // b) * (b * r) + b * (b * r) * (out_f // b)
        assert m.weight_params() == hand == MonarchLinear.weight_params_for(out_f, in_f, r, nblocks=b)
        assert m.L.numel() + m.R.numel() == hand
        assert m.num_params() == sum(p.numel() for p in m.parameters()) == linear_params(m)
        assert m.weight_flops() == 2 * hand
        assert m.flops() == linear_flops(m) == 2 * hand + (out_f if bias else 0)
        # same count as a low-rank layer of rank r*b
        from factorlm.layers import LowRankLinear

        assert hand == LowRankLinear.weight_params_for(out_f, in_f, r * b)


def test_spec_round_trip():
    torch.manual_seed(0)
    m = MonarchLinear(48, 32, 3, nblocks=4)
    spec = m.spec()
    assert spec == {"structure": "monarch", "shape": [32, 48], "bias": True, "nblocks": 4, "block_rank": 3}
    m2 = structure_from_spec(spec)
    assert isinstance(m2, MonarchLinear)
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert list(sd) == list(sd2) and set(sd) == {"bias", "L", "R"}
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sd2.items()}
    m2.load_state_dict(sd)
    x = torch.randn(2, 7, 48)
    assert torch.equal(m(x), m2(x))
    nb = MonarchLinear.from_spec({"structure": "monarch", "shape": [8, 8], "bias": False, "nblocks": 2, "block_rank": 1})
    assert nb.bias is None and "bias" not in nb.state_dict()


def test_from_linear():
    torch.manual_seed(0)
    lin = nn.Linear(16, 48).double()
    m = MonarchLinear.from_linear(lin, block_rank=2, nblocks=4)
    L, R = monarch_project(lin.weight.detach(), 4, 2)
    assert torch.allclose(m.to_dense(), monarch_to_dense(L, R))
    assert torch.equal(m.bias, lin.bias)
    full = MonarchLinear.from_linear(lin, block_rank=MonarchLinear.knob_max(48, 16, nblocks=4), nblocks=4)
    x = torch.randn(5, 16, dtype=torch.float64)
    assert torch.allclose(full(x), lin(x), atol=1e-10)  # full block rank is exact
    # dtype is preserved (computed in fp32)
    mb = MonarchLinear.from_linear(nn.Linear(16, 16).to(torch.bfloat16), 1, nblocks=2)
    assert mb.L.dtype == mb.R.dtype == mb.bias.dtype == torch.bfloat16
    # custom decompose hook: f(W, block_rank, nblocks=..., **kw) -> (L, R)
    seen = {}

    def deco(W, k, nblocks, tag):
        seen.update(k=k, nblocks=nblocks, tag=tag)
        return monarch_project(W, nblocks, k)

    MonarchLinear.from_linear(lin, 2, nblocks=4, decompose=deco, tag="x")
    assert seen == {"k": 2, "nblocks": 4, "tag": "x"}


@pytest.mark.parametrize("keep,expect", [(0.5, 32), (0.25, 16)])
def test_uniform_plan_minilm(keep, expect):
    plan = uniform_plan(MINILM, keep, MonarchLinear, nblocks=4)
    knob = {p["block_rank"] for p in plan.values()}
    assert knob == {expect} and all(p["nblocks"] == 4 for p in plan.values())
    budget = keep * sum(o * i for o, i in MINILM.values())
    assert plan_params(MINILM, plan, MonarchLinear) <= budget
    bigger = {n: {**p, "block_rank": p["block_rank"] + 1} for n, p in plan.items()}
    assert plan_params(MINILM, bigger, MonarchLinear) > budget
    # = floor(low-rank rank / nblocks): low rank gets 128 / 64 at these keeps
    assert expect == {0.5: 128, 0.25: 64}[keep] // 4


def test_uniform_plan_bert_and_other_nblocks():
    plan = uniform_plan(BERT, 0.25, MonarchLinear, nblocks=4)
    assert {p["block_rank"] for p in plan.values()} == {32}
    plan = uniform_plan(MINILM, 0.5, MonarchLinear, nblocks=2)
    assert {p["block_rank"] for p in plan.values()} == {64}


def test_knob_max_and_errors():
    assert MonarchLinear.knob_max(1536, 384, nblocks=4) == 96
    assert MonarchLinear.knob_max(384, 384) == 96  # default nblocks = 4
    with pytest.raises(FactorLMError, match="divisible|cannot be cut"):
        MonarchLinear(30, 16, 1, nblocks=4)
    with pytest.raises(FactorLMError):
        MonarchLinear.knob_max(384, 100, nblocks=3)
    with pytest.raises(FactorLMError):
        MonarchLinear.weight_params_for(384, 100, 1, nblocks=3)
    with pytest.raises(FactorLMError):
        monarch_project(torch.randn(10, 16), 4, 1)
    with pytest.raises(FactorLMError):
        MonarchLinear.from_linear(nn.Linear(18, 16), 1, nblocks=4)
    with pytest.raises(FactorLMError, match="block_rank"):
        MonarchLinear(16, 16, 5, nblocks=4)  # blocks are 4x4
    with pytest.raises(FactorLMError, match="block_rank"):
        MonarchLinear(16, 16, 0, nblocks=4)
    with pytest.raises(FactorLMError, match="nblocks"):
        MonarchLinear(16, 16, 1, nblocks=0)


def test_minilm_sized_forward_runs():
    m = MonarchLinear(384, 1536, 32, nblocks=4)
    x = torch.randn(32, 128, 384)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (32, 128, 1536) and torch.isfinite(y).all()
    m2 = MonarchLinear(1536, 384, 16, nblocks=4)
    with torch.no_grad():
        assert m2(y).shape == (32, 128, 384)
