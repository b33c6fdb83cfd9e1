"""decompose.anchor (the anchored fit, issue 31 item 1a) against independent references: brute-force least
squares for the closed form, a QR + Eckart-Young construction for the rank-k optimum, and the calibration
stream's paired statistics against inputs caught by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factorlm.decompose.anchor import PairedStats, anchored_target
from factorlm.decompose.whiten import GramScale, InputStats, factors_from_basis, scaled_factors


def _pair(tokens, n_in, seed, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ torch.randn(n_in, n_in, generator=g,
                                                                                   dtype=torch.float64)
    Xs = X + shift * torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ torch.randn(
        n_in, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5  # the compressed prefix's shifted inputs
    return X, Xs


def _stats(X, Xs, chunks=3):
    s = PairedStats(InputStats(X.shape[1]))
    for a, b in zip(Xs.chunk(chunks), X.chunk(chunks)):
        s.update_pair(a, b)
    return s


def test_anchored_target_is_the_least_squares_fit_of_the_dense_outputs():
    X, Xs = _pair(400, 24, 0)
    W = torch.randn(16, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = _stats(X, Xs)
    torch.testing.assert_close(s.gram, Xs.T @ Xs)
    torch.testing.assert_close(s.cross, Xs.T @ X)
    W_c = anchored_target(W, s.gram, s.cross, damp=0.0)
    ref = np.linalg.lstsq(Xs.numpy(), (X @ W.T).numpy(), rcond=None)[0].T
    np.testing.assert_allclose(W_c.numpy(), ref, rtol=1e-7, atol=1e-9)
    # no shift: the dense weight itself
    torch.testing.assert_close(anchored_target(W, X.T @ X, X.T @ X, damp=0.0), W)


def test_the_ridge_keeps_the_dense_weight_where_the_inputs_are_silent():
    """An input channel the shifted inputs never excite: its column of W_c is W's (the ridge toward W), and
    with damp = 0 the least squares would be singular there."""
    X, Xs = _pair(200, 10, 3)
    Xs[:, 4] = 0
    W = torch.randn(6, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s = _stats(X, Xs)
    W_c = anchored_target(W, s.gram, s.cross, damp=0.01)
    torch.testing.assert_close(W_c[:, 4], W[:, 4])
    lam = 0.01 * float(s.gram.diagonal().mean())
    ref = torch.linalg.solve(s.gram + lam * torch.eye(10, dtype=torch.float64), s.cross @ W.T + lam * W.T).T
    torch.testing.assert_close(W_c, ref)


@pytest.mark.parametrize("rank", [3, 8])
def test_whitened_truncation_of_the_anchored_target_is_the_rank_k_optimum(rank):
    """min_{rank W' <= k} ||X W^T - X~ W'^T||: the reference is X~ = Q R, W'^T = R^-1 [Q^T X W^T]_k (Eckart-Young
    in Q's coordinates); the closed form matches it and beats SVD-LLM's fit on the shifted inputs alone."""
    X, Xs = _pair(300, 20, rank)
    W = torch.randn(12, 20, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    s = _stats(X, Xs)
    W_c = anchored_target(W, s.gram, s.cross, damp=0.0)
    U, _ = scaled_factors(W_c, GramScale(s.gram))
    A, B = factors_from_basis(W_c, U, rank)
    Q, R = np.linalg.qr(Xs.numpy())
    T = Q.T @ (X @ W.T).numpy()
    u, sv, vt = np.linalg.svd(T, full_matrices=False)
    ref = np.linalg.solve(R, (u[:, :rank] * sv[:rank]) @ vt[:rank]).T  # W'_ref (out, in)

    def err(Wp):
        return float(np.linalg.norm((X @ W.T).numpy() - Xs.numpy() @ np.asarray(Wp).T))

    assert err((A @ B).numpy()) == pytest.approx(err(ref), rel=1e-9)
    U0, _ = scaled_factors(W, GramScale(s.gram))  # what --sequential layer fits: W itself on X~
    A0, B0 = factors_from_basis(W, U0, rank)
    assert err((A @ B).numpy()) < err((A0 @ B0).numpy())


def test_anchored_stream_pairs_the_dense_and_the_shifted_inputs(tmp_path):
    """``--sequential anchored`` on a tiny Llama: block 0's first group sees identical dense and shifted
    inputs (nothing is compressed before it), so its cross-Gram equals its Gram; a later group's shifted
    inputs come from the compressed layers and its cross-Gram differs; the dense inputs are those of the
    untouched model (caught by hand)."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_lm import tiny_llama

    from factorlm.decompose.whiten import InputStats as IS
    from factorlm.layers import LowRankLinear
    from factorlm.lm.calibrate import stream
    from factorlm.models.surgery import find_targets, get_module, set_module

    torch.manual_seed(0)
    model = tiny_llama().eval()
    targets = find_targets(model, conv1d=True)
    batches = [{"input_ids": torch.randint(3, 99, (2, 16), generator=torch.Generator().manual_seed(b))}
               for b in range(2)]
    dense_o = {}
    o_name = next(t for t in targets if t.endswith("layers.1.self_attn.o_proj"))
    h = get_module(model, o_name).register_forward_pre_hook(lambda m, a: dense_o.setdefault("x", []).append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    seen = {}

    def on_group(i, names, stats):
        seen[names[0]] = stats
        for n in names:  # compress crudely so that later inputs shift
            W = get_module(model, n).weight.detach()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            set_module(model, n, LowRankLinear.from_factors((U[:, :2] * S[:2]).contiguous(), Vh[:2].contiguous(), None))

    with torch.no_grad():
        stream(model, targets, batches, lambda m: IS(m.weight.shape[1]), on_group, mode="anchored")
    first = seen[targets[0]]
    torch.testing.assert_close(first.cross, first.gram, atol=0, rtol=0)
    # o_proj of block 1 was calibrated after block 0 and block 1's q/k/v were compressed, and nothing it
    # reads changed later: its shifted inputs are those of the final model
    shifted = []
    h = get_module(model, o_name).register_forward_pre_hook(lambda m, a: shifted.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    h.remove()
    Xd = torch.cat([x.reshape(-1, x.shape[-1]) for x in dense_o["x"]]).double()
    Xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in shifted]).double()
    later = seen[o_name]
    torch.testing.assert_close(later.gram, Xs.T @ Xs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(later.cross, Xs.T @ Xd, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(later.cross, later.gram, rtol=1e-3)


def test_sequential_anchored_end_to_end_and_refused_without_a_gram(tmp_path):
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import _lm_cfg

    from factorlm import models
    from factorlm.api import compress
    from factorlm.errors import FactorLMError

    # the ridge of whiten's damping: the first group (nothing compressed before it) is then the layer order's fit
    rep = compress(_lm_cfg(tmp_path, method="whiten", keep=0.6,
                           method_options={"sequential": "anchored", "anchor_damp": 1e-6}), quiet=True)
    assert rep.info["calibration"]["block_forwards"] > 0 and rep.scores["oneshot"]["perplexity"] > 0
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(models.load(tmp_path / "out")(ids).logits, rep.model(ids).logits, atol=0, rtol=0)
    layer = compress(_lm_cfg(tmp_path, method="whiten", keep=0.6, name="l", method_options={"sequential": "layer"}),
                     quiet=True, save=False)
    from factorlm.models.surgery import get_module

    names = list(rep.info["ranks"])
    first_block = [n for n in names if ".layers.0.self_attn.q_proj" in n]  # nothing before it: the same fit
    later = [n for n in names if ".layers.1." in n]
    for n in first_block:
        torch.testing.assert_close(get_module(rep.model, n).to_dense(), get_module(layer.model, n).to_dense())
    assert all(not torch.allclose(get_module(rep.model, n).to_dense(), get_module(layer.model, n).to_dense())
               for n in later)
    q = compress(_lm_cfg(tmp_path, method="gptq-lowrank", keep=0.8, name="q",
                         method_options={"sequential": "anchored", "bits": 3, "group_size": 16, "factor_bits": 16}),
                 quiet=True, save=False)
    assert q.accounting["quantized"]["quantizer"] == "gptq"
    with pytest.raises(FactorLMError, match="--sequential anchored needs the input Gram"):
        compress(_lm_cfg(tmp_path, method="asvd", keep=0.6, name="a", method_options={"sequential": "anchored"}),
                 quiet=True, save=False)
