"""--task lm --method kfac: the output-gradient Grams and the two-sided fit, against independent references."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny_llama
from factorlm.errors import FactorLMError
from factorlm.layers.lowrank import LowRankLinear
from factorlm.lm import factorize, plan_ranks
from factorlm.lm.calibrate import token_batches
from factorlm.lm.gradients import output_grams, output_sensitivity
from factorlm.lm.methods import get_lm_method
from factorlm.models.surgery import find_targets, get_module, linear_shape, linear_weight
from factorlm.config import RunConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(n=8, seq=16, seed=4):
    return torch.randint(3, 99, (n, seq), generator=torch.Generator().manual_seed(seed))


def _reference_grams(model, targets, batches):
    """sum over tokens of g g^T with g = dL/dy from retain_grad on an independent forward (batch-mean loss)."""
    ref = {n: 0.0 for n in targets}
    for b in batches:
        outs, hooks = {}, []
        for n in targets:
            def hook(mod, args, out, n=n):
                out.retain_grad()
                outs[n] = out
            hooks.append(get_module(model, n).register_forward_hook(hook))
        model.zero_grad(set_to_none=True)
        model(**b, labels=b["input_ids"]).loss.backward()
        for h in hooks:
            h.remove()
        for n in targets:
            g = outs[n].grad.double().reshape(-1, outs[n].shape[-1])
            ref[n] = ref[n] + g.T @ g
    model.zero_grad(set_to_none=True)
    return ref


def test_output_grams_are_the_summed_outer_products_of_the_output_gradients():
    model = tiny_llama(seed=2)
    targets = find_targets(model, conv1d=True)
    batches = token_batches(_ids(), 4)
    G = output_grams(model, targets, batches, max_batches=None)
    assert all(p.grad is None for p in model.parameters())
    ref = _reference_grams(model, targets, batches)
    lam = output_sensitivity(model, targets, batches, max_batches=None)
    for n in targets:
        o = linear_shape(get_module(model, n))[0]
        assert G[n].shape == (o, o) and G[n].dtype == torch.float32 and G[n].device.type == "cpu"
        scale = float(ref[n].abs().max())
        assert torch.allclose(G[n].double(), ref[n], rtol=1e-4, atol=1e-5 * scale), n
        assert float(G[n].double().trace()) / o == pytest.approx(lam[n], rel=1e-5)  # trace / out = lambda
    # max_batches: only the first batch
    G1 = output_grams(model, targets, batches, max_batches=1)
    ref1 = _reference_grams(model, targets, batches[:1])
    n = targets[0]
    assert torch.allclose(G1[n].double(), ref1[n], rtol=1e-4, atol=1e-5 * float(ref1[n].abs().max()))


def test_output_grams_in_groups_on_disk_are_bit_identical(tmp_path):
    """max_bytes: the targets in consecutive groups of at most that many accumulator bytes, one backward pass
    each, written to safetensors; every Gram equal to the one-pass in-memory Gram, bit for bit."""
    from factorlm.lm.gradients import SpilledGrams, gram_budget, gram_groups

    model = tiny_llama(seed=2)
    targets = find_targets(model, conv1d=True)
    batches = token_batches(_ids(), 4)
    G = output_grams(model, targets, batches, max_batches=None)
    sizes = {n: 4 * linear_shape(get_module(model, n))[0] ** 2 for n in targets}
    cap = 2 * max(sizes.values())
    groups = gram_groups(sizes, cap)
    assert [n for g in groups for n in g] == list(targets) and len(groups) > 1
    assert all(sum(sizes[n] for n in g) <= cap for g in groups)
    assert all(sum(sizes[n] for n in a) + sizes[b[0]] > cap for a, b in zip(groups, groups[1:]))  # greedy: full
    assert gram_groups({"a": 10, "b": 3}, 5) == [["a"], ["b"]] and gram_groups(sizes, None) == [list(targets)]
    S = output_grams(model, targets, batches, max_batches=None, max_bytes=cap, spill_dir=str(tmp_path))
    assert isinstance(S, SpilledGrams) and S.passes == len(groups) and set(S) == set(targets)
    assert max(sizes.values()) <= S.peak_bytes <= cap  # the accumulators alive at once stay within the budget
    assert len(list(tmp_path.glob("gram-*.safetensors"))) == len(targets)
    for n in targets:
        assert torch.equal(S[n], G[n])
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(FactorLMError, match="needs a spill_dir"):
        output_grams(model, targets, batches, max_bytes=cap)
    # the budget: explicit GiB, else half the available RAM decides and a quarter is the pass size
    assert gram_budget(2**30, 1.0) is None and gram_budget(2**30 + 1, 1.0) == 2**30
    assert gram_budget(100, 0.0, available=200) is None and gram_budget(101, 0.0, available=200) == 50


def _dense_input_grams(model, targets, batches):
    """Per-token mean x x^T of every target's input on the dense model (hooks; float64)."""
    acc = {n: [0.0, 0] for n in targets}
    hooks = []
    for n in targets:
        def hook(mod, args, n=n):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            acc[n][0] = acc[n][0] + x.T @ x
            acc[n][1] += x.shape[0]
        hooks.append(get_module(model, n).register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return {n: s / c for n, (s, c) in acc.items()}


def _reference_fit(W, Gin, Gout, rank, damp_in, damp_out):
    """argmin ||L (W - W') R||_F over rank-k W' by numpy: Cholesky roots (kfac uses eigh), R^{-1}."""
    Gi = Gin + damp_in * np.mean(np.diag(Gin)) * np.eye(len(Gin))
    Go = Gout + damp_out * np.mean(np.diag(Gout)) * np.eye(len(Gout))
    L = np.linalg.cholesky(Go).T  # L^T L = Go: ||L D R|| with R R^T = Gi is the K-FAC norm
    R = np.linalg.cholesky(Gi)
    U, s, Vt = np.linalg.svd(L @ W @ R)
    Mk = (U[:, :rank] * s[:rank]) @ Vt[:rank]
    return np.linalg.solve(L, Mk) @ np.linalg.inv(R), s


def test_kfac_fit_equals_the_independent_two_sided_optimum_and_beats_whitening():
    """On the dense model's statistics (--sequential none) every factorized target equals the numpy
    optimum of the K-FAC objective, and its K-FAC loss estimate is below whitening's (one-sided) fit's."""
    from factorlm.decompose.kfac import kfac_loss_estimate

    model = tiny_llama(seed=3)
    targets = find_targets(model, conv1d=True)
    batches = token_batches(_ids(seed=5), 4)
    Gout = output_grams(model, targets, batches, max_batches=None)
    Gin = _dense_input_grams(model, targets, batches)
    W0 = {n: linear_weight(get_module(model, n)).detach().double().clone() for n in targets}
    ranks = {n: max(1, min(linear_shape(get_module(model, n))) // 3) for n in targets}
    whiten = tiny_llama(seed=3)
    factorize(whiten, targets, ranks, get_lm_method("whiten", {"sequential": "none"}), batches, mode="none")
    m = get_lm_method("kfac", {"sequential": "none", "damp_out": 0.01})
    m.output_grams = Gout
    factorize(model, targets, ranks, m, batches, mode="none")
    better = 0
    for n in targets:
        lr = get_module(model, n)
        assert isinstance(lr, LowRankLinear) and lr.rank == ranks[n]
        got = lr.to_dense().detach().double()
        ref, _ = _reference_fit(W0[n].numpy(), Gin[n].numpy(), Gout[n].double().numpy(), ranks[n], 1e-6, 0.01)
        assert np.allclose(got.numpy(), ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max()), n
        wl = get_module(whiten, n)
        w_fit = wl.to_dense().detach().double()
        e_k = kfac_loss_estimate(W0[n], got, Gin[n], Gout[n], 1e-6, 0.01)
        e_w = kfac_loss_estimate(W0[n], w_fit, Gin[n], Gout[n], 1e-6, 0.01)
        assert e_k <= e_w * (1 + 1e-6), n
        better += e_k < 0.99 * e_w
    assert better >= len(targets) // 2  # the output side changes the fit for most targets


def test_kfac_global_plan_compares_loss_estimates_and_end_to_end(tmp_path, monkeypatch):
    """The global plan uses sigma^2 of L W S as they are (no --global-score weighting), the run saves and
    reloads with identical logits, and bad settings are one-line errors before any work."""
    from factorlm import load
    from factorlm.api import compress
    from factorlm.lm.plan import spectra

    model = tiny_llama(seed=1)
    targets = find_targets(model, conv1d=True)
    batches = token_batches(_ids(seed=6), 4)
    m = get_lm_method("kfac", {"sequential": "none"})
    m.output_grams = output_grams(model, targets, batches, max_batches=None)
    sp = spectra(model, targets, m, batches, None, "fisher")
    from factorlm.decompose.kfac import kfac_spectrum

    Gin = _dense_input_grams(model, targets, batches)
    n = targets[-1]
    # the stream's input Gram is summed over the 128 tokens (every target sees all of them: one factor for all)
    ref = kfac_spectrum(linear_weight(get_module(model, n)).detach(), 128 * Gin[n], m.output_grams[n], 1e-6, 0.01)
    assert torch.allclose(sp[n].double(), ref.cpu(), rtol=1e-4, atol=1e-8 * float(ref[0]))
    shapes = {t: linear_shape(get_module(model, t)) for t in targets}
    ranks = plan_ranks(RunConfig(task="lm", method="kfac", keep=0.5, rank_policy="global"), shapes, sp, loss_units=True)
    assert sum(k * sum(shapes[t]) for t, k in ranks.items()) <= 0.5 * sum(o * i for o, i in shapes.values())
    # loss units: the spectra compared as they are, not each normalised by its own energy
    normalised = plan_ranks(RunConfig(task="lm", method="kfac", keep=0.5, rank_policy="global", global_score="energy"),
                            shapes, sp)
    assert ranks != normalised

    from test_lm import TEXT_A, TEXT_B, _save_tiny

    src = _save_tiny(tiny_llama, tmp_path / "src")
    cal, ev = tmp_path / "cal.txt", tmp_path / "eval.txt"
    cal.write_text(TEXT_A)
    ev.write_text(TEXT_B)
    out = tmp_path / "out"
    cfg = dict(task="lm", model=str(src), method="kfac", keep=0.5, rank_policy="global", calibration=str(cal),
               eval_text=str(ev), seq_len=32, calibration_samples=8, latency=False, progress=False)
    rep = compress(RunConfig(output=str(out), **cfg), quiet=True)
    assert rep.accounting["target_weights_after"] <= 0.5 * rep.accounting["target_weights_before"]
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["method"] == "kfac" and len({s["rank"] for s in meta["modules"].values()}) > 1
    ids = _ids(2, 12, seed=7)
    assert torch.equal(load(out)(ids).logits, rep.model(ids).logits)
    # Grams computed one target per backward pass and kept on disk: the same model, bit for bit
    import tempfile

    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    made = []

    class Recorded(tempfile.TemporaryDirectory):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self.name)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", Recorded)
    spilled = compress(RunConfig(output=str(tmp_path / "spilled"), **{**cfg, "method_options": {"gram_memory_gb": 1e-9}}),
                       quiet=True)
    assert torch.equal(spilled.model(ids).logits, rep.model(ids).logits)
    assert len(made) == 1 and made[0].startswith(str(spill)) and not list(spill.iterdir())  # spilled, then removed
    for bad, msg in ((dict(global_score="energy"), "--global-score energy does not apply"),
                     (dict(offload="cpu", rank_policy="uniform"), "--method kfac back-propagates"),
                     (dict(method_options={"damp_out": 0.0}), "--damp-out must be > 0"),
                     (dict(method_options={"gram_memory_gb": -1.0}), "--gram-memory-gb must be >= 0")):
        with pytest.raises(FactorLMError, match=msg):
            compress(RunConfig(output=str(tmp_path / "bad"), **{**cfg, **bad}), quiet=True)
        assert not (tmp_path / "bad").exists()


def test_two_sided_quantization_correction_is_the_kfac_optimum_of_the_error():
    """error_correction with an output-gradient Gram: the numpy two-sided optimum of the quantization error,
    and a K-FAC loss estimate no larger than the input-space (EoRA) correction's."""
    from factorlm.decompose.kfac import kfac_loss_estimate
    from factorlm.decompose.quantize import error_correction, quantize_groups
    from factorlm.decompose.whiten import GramScale

    g = torch.Generator().manual_seed(11)
    W = torch.randn(24, 64, generator=g, dtype=torch.float64)
    X = torch.randn(300, 64, generator=g, dtype=torch.float64) @ torch.randn(64, 64, generator=g, dtype=torch.float64)
    Gy = torch.randn(200, 24, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 24, dtype=torch.float64)
    Gin, Gout = X.T @ X, Gy.T @ Gy
    Q = quantize_groups(W, 3, 32, True)[3].double()
    A, B = error_correction(W, Q, 5, GramScale(Gin, 1e-6), Gout, 0.01)
    ref, _ = _reference_fit((W - Q).numpy(), Gin.numpy(), Gout.numpy(), 5, 1e-6, 0.01)
    assert np.allclose((A @ B).numpy(), ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())
    A1, B1 = error_correction(W, Q, 5, GramScale(Gin, 1e-6))
    e2 = kfac_loss_estimate(W, Q + A @ B, Gin, Gout, 1e-6, 0.01)
    e1 = kfac_loss_estimate(W, Q + A1 @ B1, Gin, Gout, 1e-6, 0.01)
    assert e2 < 0.98 * e1


@pytest.mark.parametrize("byte_plan", ["uniform", "global"])
def test_rtn_lowrank_kfac_correction_end_to_end(tmp_path, byte_plan):
    """--correction-space kfac: within the byte budget, the saved folder reloads to identical logits, and the
    recipe records the option (so `factorlm evaluate` / a re-run reproduce it)."""
    from factorlm import load
    from factorlm.api import compress
    from test_lm import TEXT_A, TEXT_B, _save_tiny

    src = _save_tiny(lambda: tiny_llama(seed=2), tmp_path / "src")
    cal, ev = tmp_path / "cal.txt", tmp_path / "eval.txt"
    cal.write_text(TEXT_A)
    ev.write_text(TEXT_B)
    out = tmp_path / "out"
    opts = {"correction_space": "kfac", "byte_plan": byte_plan, "bits": 3, "group_size": 16, "factor_bits": 16}
    rep = compress(RunConfig(task="lm", model=str(src), method="rtn-lowrank", keep=0.5, calibration=str(cal),
                             eval_text=str(ev), seq_len=32, calibration_samples=8, latency=False, progress=False,
                             refine_steps=0, output=str(out), method_options=opts), quiet=True)
    acc = rep.accounting
    assert 0 < acc["target_bytes_after"] <= 0.5 * 2 * acc["target_weights_before"]
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["recipe"]["method_options"]["correction_space"] == "kfac"
    assert any(s.get("rank", 0) > 0 for s in meta["modules"].values())
    ids = _ids(2, 12, seed=7)
    assert torch.equal(load(out)(ids).logits, rep.model(ids).logits)
    # the option is used: the input-space correction (the default) of the same run differs
    plain = compress(RunConfig(task="lm", model=str(src), method="rtn-lowrank", keep=0.5, calibration=str(cal),
                               eval_text=str(ev), seq_len=32, calibration_samples=8, latency=False, progress=False,
                               refine_steps=0, method_options={**opts, "correction_space": "input"}), quiet=True, save=False)
    n = next(n for n, s_ in meta["modules"].items() if s_.get("rank", 0) > 0)
    a, b = get_module(rep.model, n), get_module(plain.model, n)
    # uniform: the same ranks, other factors; global: the plan prices other errors too (ranks may move)
    assert (a.rank == b.rank or byte_plan == "global") and (a.rank != b.rank or
                                                            not torch.allclose(a.A @ a.B, b.A @ b.B, rtol=1e-2, atol=1e-6))


def test_byte_plan_prices_the_two_sided_error_spectrum():
    """grid_options with gram_out: the loss at rank r is 1/2 the tail sum of squared singular values of
    L (W - Q(W)) R (numpy, Cholesky roots), lam = 1."""
    from factorlm.decompose.quantize import quantize_groups
    from factorlm.decompose.whiten import GramScale
    from factorlm.lm.methods import QuantSpec
    from factorlm.lm.plan import grid_options

    g = torch.Generator().manual_seed(12)
    W = torch.randn(16, 64, generator=g, dtype=torch.float64)
    X = torch.randn(200, 64, generator=g, dtype=torch.float64)
    Gy = torch.randn(100, 16, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, 16, dtype=torch.float64)
    Gin, Gout = X.T @ X, Gy.T @ Gy
    q = QuantSpec(3, 32, 16, True)
    (opt,) = grid_options(W, GramScale(Gin, 1e-6), 1.0, [q], 2, gram_out=Gout, damp_out=0.01)
    E = (W - quantize_groups(W, 3, 32, True)[3].double()).numpy()
    _, s = _reference_fit(E, Gin.numpy(), Gout.numpy(), 1, 1e-6, 0.01)
    tail = np.concatenate([np.cumsum((s ** 2)[::-1])[::-1], [0.0]]) / 2
    assert np.allclose(opt.loss.numpy(), tail, rtol=1e-6, atol=1e-12 * tail[0])
