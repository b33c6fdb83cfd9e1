"""Per-block refinement (``--refine-steps``, issue 31 item 1c; :mod:`factorlm.lm.refine`): the stream hands it
the right tensors, it reaches the rank-k least-squares optimum of an independent closed form, the keep-best
guard restores a block it made worse bit for bit, and end to end it lowers every block's output error."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

from factorlm.errors import FactorLMError  # noqa: E402
from factorlm.layers.lowrank import LowRankLinear  # noqa: E402
from factorlm.lm.calibrate import decoder_blocks, stream, token_batches  # noqa: E402
from factorlm.lm.factorize import factorize  # noqa: E402
from factorlm.lm.methods import get_lm_method  # noqa: E402
from factorlm.lm.refine import RefineSpec, refine_block  # noqa: E402
from factorlm.models.surgery import find_targets, get_module, linear_shape  # noqa: E402


def _ids(n=8, seq=12, seed=0):
    return torch.randint(3, 99, (n, seq), generator=torch.Generator().manual_seed(seed))


class _Call:
    """A stand-in for calibrate.BlockCall: calls a module on one input tensor."""

    def __init__(self, x):
        self.hidden = x

    def __call__(self, block):
        return block(self.hidden)


class _Block(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def test_refinement_reaches_the_rank_k_least_squares_optimum():
    """One low-rank layer fitted to dense outputs on shifted inputs: min_{rank W' <= k} ||X W^T - X~ W'^T||.
    Reference: X~ = Q R, W'^T = R^-1 [Q^T X W^T]_k (Eckart-Young in Q's coordinates, numpy).  Refinement
    starts from the truncated SVD of W (not the optimum) and ends within 1% of the optimum's error."""
    g = torch.Generator().manual_seed(0)
    n_in, n_out, k, tokens = 16, 12, 4, 512
    X = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) / n_in ** 0.5
    Xs = X + 0.3 * torch.randn(tokens, n_in, generator=g)
    W = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    U, S, Vh = torch.linalg.svd(W)
    block = _Block(LowRankLinear.from_factors((U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), None))
    calls, targets = [_Call(Xs)], [X @ W.T]  # one batch: trained on and guarded on (nothing to hold out)

    Xn, Xsn, Wn = X.double().numpy(), Xs.double().numpy(), W.double().numpy()
    Q, R = np.linalg.qr(Xsn)
    u, sv, vt = np.linalg.svd(Q.T @ Xn @ Wn.T, full_matrices=False)
    ref = np.linalg.solve(R, (u[:, :k] * sv[:k]) @ vt[:k]).T

    def err(Wp):
        return float(np.linalg.norm(Xn @ Wn.T - Xsn @ np.asarray(Wp, dtype=np.float64).T))

    start = err((block.lin.A @ block.lin.B).detach())
    r = refine_block(block, ["lin"], calls, targets, RefineSpec(steps=1500, lr=2e-2))
    end = err((block.lin.A @ block.lin.B).detach())
    assert r["kept"] and r["error_after"] < r["error_before"]
    assert start > 1.05 * err(ref)  # the start is measurably off the optimum
    assert end <= 1.01 * err(ref)
    assert end >= err(ref) * (1 - 1e-6)  # the optimum is a lower bound (no test of a wrong reference)


def test_the_guard_measures_on_batches_it_never_trains_on():
    """With several batches the last eighth is held out: a guard batch whose target the one-shot block already
    meets exactly changes nothing in training (the refined factors equal those trained without it), only the verdict."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(8, 32, 8, generator=g)
    W = torch.randn(6, 8, generator=g)
    U, S, Vh = torch.linalg.svd(W)

    def fresh():
        return _Block(LowRankLinear.from_factors((U[:, :3] * S[:3]).contiguous(), Vh[:3].contiguous(), None))

    spec = RefineSpec(steps=30, lr=1e-2)
    assert spec.held_out(8) == 1 and spec.held_out(16) == 2 and spec.held_out(1) == 0
    a, b = fresh(), fresh()
    calls, targets = [_Call(x) for x in X], [x @ W.T for x in X]
    ra = refine_block(a, ["lin"], calls, targets, spec)
    with torch.no_grad():  # the guard's target: the one-shot block's own output, so any change is worse there
        own = fresh()(X[-1])
    rb = refine_block(b, ["lin"], calls, targets[:-1] + [own], spec)
    assert ra["kept"] and not rb["kept"] and ra["guard_batches"] == 1
    torch.testing.assert_close(b.lin.A, fresh().lin.A, atol=0, rtol=0)  # restored
    c = fresh()
    refine_block(c, ["lin"], calls[:-1] + [calls[0]], targets[:-1] + [targets[0]], spec)
    torch.testing.assert_close(c.lin.A, a.lin.A, atol=0, rtol=0)  # the held-out batch never trained a


def test_keep_best_restores_a_block_that_got_worse_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 8, generator=g)
    W = torch.randn(6, 8, generator=g)
    U, S, Vh = torch.linalg.svd(W)
    block = _Block(LowRankLinear.from_factors((U[:, :3] * S[:3]).contiguous(), Vh[:3].contiguous(), None))
    block.lin.B.requires_grad_(False)  # a user's frozen flag: trained during refinement, frozen again after
    before = {k: v.clone() for k, v in block.state_dict().items()}
    r = refine_block(block, ["lin"], [_Call(X)], [X @ W.T], RefineSpec(steps=20, lr=50.0))
    assert not r["kept"] and r["error_after"] == r["error_before"] and r["trained"] == 3 * (6 + 8)
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k])
    assert block.lin.A.requires_grad and not block.lin.B.requires_grad  # the flags are restored too


def test_bf16_factors_refine_through_stochastic_rounding():
    """bf16 weights train through torchao's AdamW with stochastic rounding (whose lr is a tensor that the
    schedule sets in place), stay bf16, and the refinement is kept."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 8, generator=g)
    W = torch.randn(6, 8, generator=g)
    U, S, Vh = torch.linalg.svd(W)
    A, B = (U[:, :3] * S[:3]).contiguous(), Vh[:3].contiguous()
    Xs = (X + 0.3 * torch.randn(64, 8, generator=g)).bfloat16()
    block = _Block(LowRankLinear.from_factors(A.bfloat16(), B.bfloat16(), None))
    r = refine_block(block, ["lin"], [_Call(Xs)], [(X @ W.T).bfloat16()], RefineSpec(steps=40, lr=1e-2))
    assert r["kept"] and r["error_after"] < 0.99 * r["error_before"]
    assert block.lin.A.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["layer", "block", "none", "anchored"])
def test_the_stream_hands_refine_the_shifted_inputs_and_the_dense_outputs(mode):
    """For each block: ``calls`` are the inputs the block gets in the final compressed model (``none``: the
    dense model's), ``dense_outputs`` the dense model's block outputs (independent forwards with hooks);
    a refine that changes nothing leaves the same factors as no refine at all."""
    dense = tiny_llama()
    model, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    targets = find_targets(model, conv1d=True)
    ranks = {n: max(1, min(linear_shape(get_module(model, n))) // 4) for n in targets}
    ids = _ids()
    batches = token_batches(ids, 4)
    method = get_lm_method("whiten", {"sequential": mode})
    seen = {}

    def spy(i, block, local, calls, dense_out):  # and changes the block, as refinement does
        seen[i] = ([c.hidden.clone() for c in calls], [o.clone() for o in dense_out], list(local))
        with torch.no_grad():
            block.get_submodule(local[-1]).A.mul_(0.5)

    from factorlm.decompose.whiten import factors_from_basis, scaled_factors
    from factorlm.models.surgery import linear_weight, set_module

    def on_group(i, names, stats):
        for n in names:
            W = linear_weight(get_module(model, n)).detach()
            U, _ = scaled_factors(W, method.scale(stats))
            A, B = factors_from_basis(W, U, ranks[n])
            set_module(model, n, LowRankLinear.from_factors(A.contiguous(), B.contiguous(), None))

    stream(model, targets, batches, method.make_stats, on_group, mode=mode, refine=spy)
    noop = copy.deepcopy(dense)
    factorize(plain, targets, ranks, method, batches, mode=mode)
    factorize(noop, targets, ranks, method, batches, mode=mode, refine=RefineSpec(steps=0))
    for n in targets:  # refinement with no steps: the same factors as without
        torch.testing.assert_close(get_module(noop, n).A, get_module(plain, n).A, atol=0, rtol=0)

    def block_io(m):
        _, blocks = decoder_blocks(m, targets)
        ins, outs, hooks = {}, {}, []
        for i, b in enumerate(blocks):
            hooks.append(b.register_forward_pre_hook(
                lambda mod, args, kwargs, i=i: ins.setdefault(i, []).append(
                    (kwargs.get("hidden_states") if not args else args[0]).clone()), with_kwargs=True))
            hooks.append(b.register_forward_hook(
                lambda mod, args, out, i=i: outs.setdefault(i, []).append(
                    (out[0] if isinstance(out, tuple) else out).clone())))
        with torch.no_grad():
            for bt in batches:
                m(**bt, use_cache=False)
        for h in hooks:
            h.remove()
        return ins, outs

    _, dense_outs = block_io(dense)
    comp_ins, _ = block_io(model)
    dense_ins, _ = block_io(dense)
    assert sorted(seen) == [0, 1]
    for i, (calls, outs, local) in seen.items():
        assert local == [n.split(f"layers.{i}.", 1)[1] for n in targets if f"layers.{i}." in n]
        expect_in = dense_ins[i] if mode == "none" else comp_ins[i]
        for a, b in zip(calls, expect_in):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        for a, b in zip(outs, dense_outs[i]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_stream_ends_at_the_last_block_with_targets():
    """Targets only in block 0 of 2: after the capture pass (one dense forward per batch) block 1 is never
    called again (here with refinement, which also streams the dense hidden states)."""
    model = tiny_llama()
    targets = [t for t in find_targets(model, conv1d=True) if ".layers.0." in t]
    batches = token_batches(_ids(), 4)
    calls = {1: 0}
    for i in calls:
        model.model.layers[i].register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    info = factorize(model, targets, {n: 2 for n in targets}, get_lm_method("whiten", {}), batches, mode="layer",
                     refine=RefineSpec(4, 1e-3))
    assert calls == {1: len(batches)} and info["calibration"]["blocks"] == 1
    assert len(info["refine"]["blocks"]) == 1


def test_refine_end_to_end_lowers_every_block_error_and_reloads(tmp_path):
    """``compress --task lm --method whiten --refine-steps 30``: every block's relative output error falls
    (or the block is restored), the report records it, the ranks and stored weights are those without
    refinement, and the folder reloads to the same logits."""
    from test_quantize import _lm_cfg

    from factorlm import models
    from factorlm.api import compress

    base = compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, name="base"), quiet=True, save=False)
    rep = compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, refine_steps=30, refine_lr=1e-3), quiet=True)
    r = rep.info["refine"]
    assert r["steps"] == 30 and len(r["blocks"]) == 2 and r["params"] == "factors"
    for b in r["blocks"]:  # kept: strictly better on the held-out batches; not kept: unchanged
        assert (b["error_after"] < b["error_before"]) if b["kept"] else (b["error_after"] == b["error_before"])
    assert r["kept"] >= 1 and any(b["error_after"] < 0.99 * b["error_before"] for b in r["blocks"])
    assert rep.info["ranks"] == base.info["ranks"]
    assert rep.accounting["target_weights_after"] == base.accounting["target_weights_after"]
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(models.load(tmp_path / "out")(ids).logits, rep.model(ids).logits, atol=0, rtol=0)
    # quantized + int8 correction factors: they train as floats and are stored as int8 again (same bytes);
    # the codes and scales stay bit for bit
    opts = {"byte_plan": "global", "bits": 4, "group_size": 16}
    q0 = compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.6, name="q0", method_options=opts), quiet=True,
                  save=False)
    q = compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.6, name="q", refine_steps=20, refine_lr=1e-3,
                         method_options=opts), quiet=True, save=False)
    assert q.info["refine"]["kept"] >= 1
    assert all(b["error_after"] < b["error_before"] for b in q.info["refine"]["blocks"] if b["kept"])
    assert q.accounting["target_bytes_after"] == q0.accounting["target_bytes_after"]
    a = q.accounting  # the codes and int8 factors count as weights (they are buffers, not parameters)
    assert a["model_params_after"] == a["model_params_before"] - a["target_weights_before"] + a["target_weights_after"]
    assert q.info["ranks"] == q0.info["ranks"] and max(q.info["ranks"].values()) > 0
    changed = 0
    for n, k in q.info["ranks"].items():
        if not k:
            continue
        a, b = get_module(q.model, n), get_module(q0.model, n)
        assert a.factor_bits == 8 and a.A is None and "A" not in dict(a.named_parameters())
        assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        changed += not torch.equal(a.A_codes, b.A_codes)
    assert changed > 0


def test_refine_refusals_come_before_any_work(tmp_path, monkeypatch):
    from test_quantize import _lm_cfg

    from factorlm.api import compress

    def no_work(*a, **k):
        raise AssertionError("the dense model was evaluated before the refusal")

    monkeypatch.setattr("factorlm.lm.pipeline.ppl", no_work)
    with pytest.raises(FactorLMError, match="--refine-steps needs the calibration stream"):
        compress(_lm_cfg(tmp_path, method="svd", keep=0.5, refine_steps=5), quiet=True, save=False)
    with pytest.raises(FactorLMError, match="which --method gptq does not have"):
        compress(_lm_cfg(tmp_path, method="gptq", keep=0.3, refine_steps=5,
                         method_options={"bits": 4, "group_size": 16}), quiet=True, save=False)
    with pytest.raises(FactorLMError, match="--refine-lr must be > 0"):
        compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, refine_steps=5, refine_lr=0.0), quiet=True, save=False)


def test_fisher_refinement_reaches_the_weighted_rank_k_optimum():
    """--refine-loss fisher: with a metric M the steps and the guard minimise ||(X W^T - X~ W'^T) M||; reference
    (numpy): Z = R^-1 [Q^T X W^T M]_k with X~ = Q R, W'^T = Z M^-1.  Refinement ends within 1% of that optimum's
    weighted error and below the unweighted (mse) optimum's weighted error."""
    g = torch.Generator().manual_seed(1)
    n_in, n_out, k, tokens = 16, 12, 4, 512
    X = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) / n_in ** 0.5
    Xs = X + 0.3 * torch.randn(tokens, n_in, generator=g)
    W = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
    P = torch.randn(n_out, n_out, generator=g) * torch.linspace(0.1, 2.0, n_out)
    lam, Qm = torch.linalg.eigh(P @ P.T + 0.05 * torch.eye(n_out))
    M = (Qm * lam.sqrt()) @ Qm.T  # symmetric positive definite, far from a multiple of I
    U, S, Vh = torch.linalg.svd(W)
    block = _Block(LowRankLinear.from_factors((U[:, :k] * S[:k]).contiguous(), Vh[:k].contiguous(), None))

    Xn, Xsn, Wn, Mn = (t.double().numpy() for t in (X, Xs, W, M))
    Q, R = np.linalg.qr(Xsn)

    def optimum(Mx):
        u, sv, vt = np.linalg.svd(Q.T @ Xn @ Wn.T @ Mx, full_matrices=False)
        return (np.linalg.solve(R, (u[:, :k] * sv[:k]) @ vt[:k]) @ np.linalg.inv(Mx)).T

    def err(Wp):
        return float(np.linalg.norm((Xn @ Wn.T - Xsn @ np.asarray(Wp, dtype=np.float64).T) @ Mn))

    ref, plain = optimum(Mn), optimum(np.eye(n_out))
    r = refine_block(block, ["lin"], [_Call(Xs)], [X @ W.T], RefineSpec(steps=2000, lr=2e-2), metric=M)
    end = err((block.lin.A @ block.lin.B).detach())
    assert r["kept"] and r["error_after"] < r["error_before"]
    assert err(plain) > 1.02 * err(ref)  # the metric changes the optimum measurably
    assert err(ref) * (1 - 1e-6) <= end <= 1.01 * err(ref)


def test_block_output_metrics_are_roots_of_the_block_output_gradient_grams():
    """M_i^2 = sum_t g_t g_t^T + damp * mean(diag) I, g_t = dL/dh_i from retain_grad on the block outputs."""
    from factorlm.lm.gradients import block_output_metrics

    model = tiny_llama(seed=3)
    targets = find_targets(model, conv1d=True)
    batches = token_batches(_ids(8, 16, seed=4), 4)
    name, blocks = decoder_blocks(model, targets)
    M = block_output_metrics(model, name, len(blocks), batches, max_batches=None, damp=0.01)
    assert all(p.grad is None for p in model.parameters())
    ref = {i: 0.0 for i in range(len(blocks))}
    for b in batches:
        outs, hooks = {}, []
        for i, blk in enumerate(blocks):
            def hook(mod, args, out, i=i):
                o = out[0] if isinstance(out, tuple) else out
                o.retain_grad()
                outs[i] = o
            hooks.append(blk.register_forward_hook(hook))
        model.zero_grad(set_to_none=True)
        model(**b, labels=b["input_ids"]).loss.backward()
        for h in hooks:
            h.remove()
        for i, o in outs.items():
            gr = o.grad.double().reshape(-1, o.shape[-1])
            ref[i] = ref[i] + gr.T @ gr
    model.zero_grad(set_to_none=True)
    for i, G in ref.items():
        want = G + 0.01 * float(G.diagonal().mean()) * torch.eye(G.shape[0], dtype=G.dtype)
        got = M[i].double()
        assert torch.allclose(got, got.T, atol=1e-6 * float(got.abs().max()))
        torch.testing.assert_close(got @ got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_fisher_refinement_end_to_end_and_refusals(tmp_path, monkeypatch):
    """--refine-loss fisher runs, records its loss, refines to other factors than mse at the same ranks and
    bytes; without --refine-steps or under --offload it is refused before any work."""
    from test_quantize import _lm_cfg

    from factorlm.api import compress

    mse = compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, refine_steps=20, refine_lr=1e-3, name="m"),
                   quiet=True, save=False)
    fis = compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, refine_steps=20, refine_lr=1e-3, name="f",
                           refine_loss="fisher"), quiet=True, save=False)
    assert mse.info["refine"]["loss"] == "mse" and fis.info["refine"]["loss"] == "fisher"
    assert fis.info["ranks"] == mse.info["ranks"]
    assert fis.accounting["target_weights_after"] == mse.accounting["target_weights_after"]
    assert all(b["error_after"] <= b["error_before"] for b in fis.info["refine"]["blocks"])
    assert fis.info["refine"]["kept"] >= 1
    assert any(not torch.equal(get_module(fis.model, n).A, get_module(mse.model, n).A) for n in fis.info["ranks"])

    def no_work(*a, **k):
        raise AssertionError("the dense model was evaluated before the refusal")

    monkeypatch.setattr("factorlm.lm.pipeline.ppl", no_work)
    with pytest.raises(FactorLMError, match="it needs --refine-steps > 0"):
        compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, refine_steps=0, refine_loss="fisher"), quiet=True,
                 save=False)
    with pytest.raises(FactorLMError, match="--refine-loss fisher back-propagates"):
        compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, refine_steps=5, refine_loss="fisher", offload="cpu",
                         rank_policy="uniform"), quiet=True, save=False)
    with pytest.raises(FactorLMError, match="--refine-loss must be mse or fisher"):
        compress(_lm_cfg(tmp_path, method="whiten", keep=0.5, refine_steps=5, refine_loss="l1"), quiet=True, save=False)
