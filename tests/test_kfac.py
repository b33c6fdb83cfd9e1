"""Two-sided (K-FAC) whitened fit against independent references; encoder layer statistics against
brute force; the encoder methods ``whiten`` and ``kfac-global`` end to end on a tiny BERT."""

import copy

import numpy as np
import pytest
import torch

from conftest import tiny_bert
from factorlm.decompose.kfac import kfac_loss_estimate, kfac_spectrum, kfac_svd
from factorlm.decompose.whiten import whiten_svd
from factorlm.config import RunConfig
from factorlm.errors import FactorLMError
from factorlm.methods import get_method
from factorlm.models import find_targets
from factorlm.train.layer_stats import layer_grams
from test_fisher import FakeSession, _batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _gram(n, tokens, seed, rank=None):
    g = np.random.default_rng(seed)
    X = g.standard_normal((tokens, rank or n)) @ g.standard_normal((rank or n, n))
    return torch.from_numpy(X.T @ X)


def _np_reference(W, k, Gi, Go, damp_out):
    """Independent numpy: symmetric roots by eigh, SVD of L W R, truncation, W' = L^-1 (U S V^T)_k R^-1."""
    W, Gi, Go = (np.asarray(t, dtype=np.float64) for t in (W, Gi, Go))
    lo, Qo = np.linalg.eigh(Go)
    lo = np.clip(lo, 0, None) + damp_out * np.mean(np.diag(Go))
    L = (Qo * np.sqrt(lo)) @ Qo.T
    li, Qi = np.linalg.eigh(Gi)
    R = (Qi * np.sqrt(np.clip(li, 0, None))) @ Qi.T
    U, s, Vt = np.linalg.svd(L @ W @ R)
    Mk = (U[:, :k] * s[:k]) @ Vt[:k]
    W2 = np.linalg.solve(L, Mk) @ np.linalg.inv(R)
    return W2, s


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_kfac_svd_is_optimal_against_numpy_and_neighbours(shape):
    out, inn = shape
    W = torch.from_numpy(np.random.default_rng(0).standard_normal(shape))
    Gi, Go = _gram(inn, 200, 1), _gram(out, 300, 2)
    k, d = 5, 0.01
    A, B = kfac_svd(W, k, Gi, Go, damp_out=d)
    assert A.shape == (out, k) and B.shape == (k, inn) and A.dtype == W.dtype
    ref, s = _np_reference(W.numpy(), k, Gi.numpy(), Go.numpy(), d)
    assert np.abs((A @ B).numpy() - ref).max() < 1e-8 * np.abs(ref).max()
    err = kfac_loss_estimate(W, A @ B, Gi, Go, damp_out=d)
    assert err == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-9)  # Eckart-Young in the L.R norm
    torch.testing.assert_close(kfac_spectrum(W, Gi, Go, damp_out=d), torch.from_numpy(s[: min(shape)]), rtol=1e-9, atol=1e-9)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):  # every rank-k neighbour is worse
        A2 = A + 1e-3 * torch.randn(A.shape, generator=g, dtype=A.dtype)
        B2 = B + 1e-3 * torch.randn(B.shape, generator=g, dtype=B.dtype)
        assert kfac_loss_estimate(W, A2 @ B2, Gi, Go, damp_out=d) > err
    # the factors are balanced
    torch.testing.assert_close(A.norm(dim=0), B.norm(dim=1))


def test_kfac_with_identity_output_side_is_svd_llm_whitening():
    W = torch.from_numpy(np.random.default_rng(4).standard_normal((10, 16)))
    Gi = _gram(16, 100, 5)
    A, B = kfac_svd(W, 4, Gi, torch.eye(10, dtype=torch.float64), damp_out=0.5)  # damping of I: still a multiple of I
    A2, B2 = whiten_svd(W, 4, Gi)
    torch.testing.assert_close(A @ B, A2 @ B2, rtol=1e-9, atol=1e-9)


def test_kfac_singular_output_gram_needs_damping_and_bad_input_is_one_line():
    W = torch.randn(8, 6, dtype=torch.float64)
    Go = _gram(8, 50, 6, rank=3)  # rank-3 output-gradient Gram
    with pytest.raises(FactorLMError, match="damp_out > 0"):
        kfac_svd(W, 2, _gram(6, 40, 7), Go, damp_out=0.0)
    A, B = kfac_svd(W, 2, _gram(6, 40, 7), Go, damp_out=1e-3)
    assert torch.isfinite(A @ B).all()
    with pytest.raises(FactorLMError, match="rank must be"):
        kfac_svd(W, 7, _gram(6, 40, 7), Go)
    with pytest.raises(FactorLMError, match="output-gradient Gram must be"):
        kfac_svd(W, 2, _gram(6, 40, 7), torch.eye(5, dtype=torch.float64))


def test_layer_grams_match_brute_force_and_skip_padding():
    """Input Grams over non-padded tokens; output-gradient Grams of each example's own loss (the
    example run alone, unpadded), i.e. padding-independent."""
    model = tiny_bert()
    batches = _batches()
    names = ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"]
    ins, outs = layer_grams(model, batches, names, output_grads=True)
    ref_in = {n: torch.zeros_like(ins[n].gram) for n in names}
    ref_out = {n: torch.zeros_like(outs[n].gram) for n in names}
    count = {n: 0 for n in names}
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            L = int(b["attention_mask"][i].sum())
            seen = {}

            def keep(n):
                def hook(mod, a, o):
                    o.retain_grad()
                    seen[n] = (a[0], o)
                return hook

            hs = [m.get_submodule(n).register_forward_hook(keep(n)) for n in names]
            x = m.get_input_embeddings()(b["input_ids"][i:i + 1, :L]).requires_grad_(True)
            m(inputs_embeds=x, attention_mask=b["attention_mask"][i:i + 1, :L], labels=b["labels"][i:i + 1]).loss.backward()
            for h in hs:
                h.remove()
            for n in names:
                xin, o = seen[n]
                ref_in[n] += (xin[0].double().T @ xin[0].double())
                count[n] += xin.shape[1]
                ref_out[n] += (o.grad[0].double().T @ o.grad[0].double())
    for n in names:  # the input Gram is a per-token mean, the output-gradient Gram a sum
        torch.testing.assert_close(ins[n].gram, ref_in[n] / count[n], rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(outs[n].gram, ref_out[n], rtol=1e-3, atol=1e-9)
        assert ins[n].tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad is False for p in model.parameters())


@pytest.mark.parametrize("method", ["whiten", "kfac-global"])
def test_encoder_methods_fit_their_objective_and_respect_keep(method):
    from factorlm.layers import LowRankLinear

    teacher = tiny_bert()
    model = copy.deepcopy(teacher)
    targets = find_targets(teacher)
    s = FakeSession()
    res = get_method(method, {"calib_batches": 2, "finetune": False}).run(s, model)
    ins, outs = layer_grams(teacher, s._batches, targets, output_grads=True)
    stored = 0
    for n in targets:
        lr = model.get_submodule(n)
        assert isinstance(lr, LowRankLinear)
        W = teacher.get_submodule(n).weight.detach().double()
        AB = lr.to_dense().detach().double()
        k = lr.rank
        stored += k * sum(W.shape)
        if method == "whiten":
            A2, B2 = whiten_svd(W, k, ins[n].gram, damp=1e-6)
        else:
            A2, B2 = kfac_svd(W, k, ins[n].gram, outs[n].gram, damp_in=1e-6, damp_out=0.01)
        torch.testing.assert_close(AB, (A2 @ B2).double(), rtol=1e-3, atol=1e-5)
    total = sum(teacher.get_submodule(n).weight.numel() for n in targets)
    assert stored <= 0.5 * total  # keep 0.5, counted exactly
    ranks = {n: model.get_submodule(n).rank for n in targets}
    if method == "whiten":  # SVD-LLM: the same ratio for every matrix
        from factorlm.ranks.budget import ratio_plan
        from factorlm.models.surgery import target_shapes

        assert ranks == ratio_plan(target_shapes(teacher, targets), 0.5)
    else:
        assert len(set(ranks.values())) > 1
    assert get_method("kfac-global").options.finetune_distill == 1.0
    with pytest.raises(FactorLMError, match="--damp-out"):
        get_method("kfac-global", {"damp_out": 0})


def test_kfac_loss_estimate_with_input_damping_equals_the_spectrum_tail():
    W = torch.from_numpy(np.random.default_rng(11).standard_normal((9, 14)))
    Gi, Go = _gram(14, 60, 12), _gram(9, 80, 13)
    for k in (1, 4):
        A, B = kfac_svd(W, k, Gi, Go, damp_in=0.1, damp_out=0.05)
        s = kfac_spectrum(W, Gi, Go, damp_in=0.1, damp_out=0.05)
        assert kfac_loss_estimate(W, A @ B, Gi, Go, damp_in=0.1, damp_out=0.05) == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-9)


def test_whiten_staged_recomputes_statistics_per_stage_and_refuses_block_structures(monkeypatch):
    from factorlm.train import layer_stats

    calls = []
    real = layer_stats.layer_grams

    def counting(model, loader, names, **kw):
        calls.append(list(names))
        return real(model, loader, names, **kw)

    monkeypatch.setattr(layer_stats, "layer_grams", counting)
    model = tiny_bert()
    targets = find_targets(model)
    s = FakeSession(schedule="staged", stages=2)
    get_method("kfac-global", {"calib_batches": 2, "finetune": False}).run(s, model)
    # the global plan's statistics (all targets, on the teacher) serve stage 1; stage 2 is measured anew
    assert calls == [targets, targets[6:]]
    with pytest.raises(FactorLMError, match="--structure lowrank"):
        get_method("whiten").validate(RunConfig(structure="monarch"))


def test_kfac_global_rank_price_triplet_changes_the_plan():
    ranks = {}
    for price in ("weight", "triplet"):
        model = tiny_bert()
        s = FakeSession(rank_price=price)
        get_method("kfac-global", {"calib_batches": 2, "finetune": False}).run(s, model)
        ranks[price] = {n: model.get_submodule(n).rank for n in find_targets(tiny_bert())}
    assert ranks["weight"] != ranks["triplet"]
