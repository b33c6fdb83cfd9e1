"""RankDyna building blocks: SVDLinear, budget schedule, global allocation, the callback, plots."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from factorlm.errors import FactorLMError
from factorlm.layers import LowRankLinear, structure_from_spec
from factorlm.layers.svd_masked import SVDLinear
from factorlm.ranks.allocator import (
    SensitivityTracker,
    global_allocation,
    global_rank_plan,
    kept_cost,
    linear_spectra,
    triplet_score,
)
from factorlm.ranks.rankdyna import RankDynaCallback, plot_budget, plot_ranks, svd_modules, to_svd_linear
from factorlm.ranks.schedule import budget_at, phase_steps

torch.set_num_threads(1)


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(cfg)
    model.eval()
    return model


def bert_targets(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in n]


# -- schedule -----------------------------------------------------------------------------------
def test_budget_schedule_values_and_monotone():
    args = dict(total_steps=100, initial=1000, target=100, warmup_steps=10, final_steps=20)
    assert budget_at(0, **args) == 1000
    assert budget_at(10, **args) == 1000          # last warm-up step
    assert 100 < budget_at(11, **args) < 1000     # first decreasing step
    assert budget_at(45, **args) == 212           # halfway: 900 * 0.5^3 + 100 = 212.5 -> 212
    assert budget_at(80, **args) == 100           # final phase starts exactly at the target
    assert budget_at(100, **args) == 100
    vals = [budget_at(t, **args) for t in range(0, 101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    # overlapping phases: warm-up wins, then straight to the target
    assert budget_at(50, 100, 1000, 100, 50, 60) == 1000
    assert budget_at(51, 100, 1000, 100, 50, 60) == 100
    assert phase_steps(100, 0.1, 0.2) == (10, 20)
    assert phase_steps(100, 5, 7) == (5, 7)
    assert phase_steps(10, 50, 0.0) == (10, 0)


# -- global allocation --------------------------------------------------------------------------
def _check_prefix(scores, costs, budget, masks, min_one):
    kept = kept_cost(masks, costs)
    assert kept <= budget
    names = list(scores)
    flat = [(float(scores[n][i]), k, i) for k, n in enumerate(names) for i in range(scores[n].numel())]
    order = sorted(flat, key=lambda x: (-x[0], x[1], x[2]))
    forced = set()
    if min_one:
        for k, n in enumerate(names):
            assert masks[n].sum() >= 1
            forced.add(next((k, i) for s, kk, i in order if kk == k))
    rest = [(k, i) for _, k, i in order if (k, i) not in forced]
    kept_flags = [bool(masks[names[k]][i]) for k, i in rest]
    n_kept = sum(kept_flags)
    assert kept_flags == [True] * n_kept + [False] * (len(rest) - n_kept)  # a prefix: one threshold
    if n_kept < len(rest):  # maximal: the next best does not fit
        k, i = rest[n_kept]
        assert kept + costs[names[k]] > budget


@pytest.mark.parametrize("min_one", [False, True])
def test_global_allocation_fits_budget_and_is_top_set(min_one):
    g = torch.Generator().manual_seed(0)
    scores = {"a": torch.rand(8, generator=g), "b": torch.rand(5, generator=g) * 0.1,
              "c": torch.rand(12, generator=g), "d": torch.rand(3, generator=g)}
    costs = {"a": 10, "b": 25, "c": 40, "d": 7}
    full = sum(scores[n].numel() * costs[n] for n in scores)
    for budget in [82, 100, 137, 250, 400, 777, full - 1, full, full + 50]:
        masks = global_allocation(scores, costs, budget, min_one=min_one)
        assert {n: m.shape for n, m in masks.items()} == {n: s.shape for n, s in scores.items()}
        assert all(m.dtype == torch.bool for m in masks.values())
        _check_prefix(scores, costs, budget, masks, min_one)
    assert all(m.all() for m in global_allocation(scores, costs, full, min_one=min_one).values())
    if min_one:
        with pytest.raises(FactorLMError):
            global_allocation(scores, costs, 81, min_one=True)
    else:
        assert sum(m.sum() for m in global_allocation(scores, costs, 0, min_one=False).values()) == 0


def test_global_allocation_tie_break_is_deterministic():
    scores = {"x": torch.ones(3), "y": torch.ones(3)}
    masks = global_allocation(scores, {"x": 1, "y": 1}, 4, min_one=False)
    assert masks["x"].tolist() == [True, True, True] and masks["y"].tolist() == [True, False, False]


def test_sensitivity_tracker_ema_and_triplet_score():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    tr = SensitivityTracker(beta1=0.5, beta2=0.5)
    p.grad = torch.tensor([3.0, 1.0])
    assert tr.update([("p", p)])
    # I = [3, 2]; I_bar = 0.5 I; U_bar = 0.5 |I - I_bar| = 0.25 I
    assert torch.allclose(tr.ipt_avg["p"], torch.tensor([1.5, 1.0]))
    assert torch.allclose(tr.score("p"), torch.tensor([1.5 * 0.75, 1.0 * 0.5]))
    p.grad = torch.tensor([float("inf"), 0.0])
    assert not tr.update([("p", p)]) and tr.num_updates == 1  # non-finite step skipped
    s, U, V = torch.tensor([1.0, 2.0]), torch.ones(4, 2), torch.arange(6.0).reshape(2, 3)
    assert torch.allclose(triplet_score(s, U, V), torch.tensor([1 + 1 + 1.0, 2 + 1 + 4.0]))


# -- SVDLinear ----------------------------------------------------------------------------------
def test_svd_linear_full_rank_equals_linear_and_contract():
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    m = SVDLinear.from_linear(lin)
    x = torch.randn(5, 24)
    assert m.rank == 16 and m.kept_rank() == 16
    assert torch.allclose(m(x), lin(x), atol=1e-5)
    assert torch.allclose(m(x), x @ m.to_dense().T + m.bias, atol=1e-5)
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert m.kept_weight_params() == 16 * (24 + 16)
    # truncated init equals the truncated-SVD LowRankLinear
    m8 = SVDLinear.from_linear(lin, rank=8)
    assert torch.allclose(m8(x), LowRankLinear.from_linear(lin, 8)(x), atol=1e-5)
    # spec round trip (mask is a persistent buffer)
    mask = torch.zeros(16, dtype=torch.bool)
    mask[[0, 3, 7]] = True
    m.set_mask(mask)
    spec = m.spec()
    assert spec["structure"] == "svd_masked" and spec["rank"] == 16 and spec["kept_rank"] == 3
    m2 = structure_from_spec(spec)
    assert m2.kept_rank() == 3
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x), m(x))
    pen = SVDLinear.from_linear(lin).orth_penalty()
    assert float(pen.detach()) < 1e-8


@pytest.mark.parametrize("balanced", [True, False])
def test_truncate_equals_masked_layer(balanced):
    torch.manual_seed(1)
    m = SVDLinear.from_linear(nn.Linear(20, 12))
    m.set_mask(torch.rand(12) > 0.5)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(7, 20)
    m(x).pow(2).mean().backward()
    opt.step()
    low = m.truncate(balanced=balanced)
    assert isinstance(low, LowRankLinear) and low.rank == m.kept_rank()
    assert torch.allclose(low(x), m(x), atol=1e-5)


def test_truncated_bert_reproduces_masked_logits():
    model = tiny_bert()
    ids = torch.randint(0, 100, (4, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    to_svd_linear(model, bert_targets(model))
    mods = svd_modules(model)
    assert len(mods) == 12
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    for m in mods.values():
        mask = torch.rand(m.rank, generator=g) < 0.4
        mask[0] = True
        m.set_mask(mask)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    want = {n: m.kept_rank() for n, m in mods.items()}
    cb = RankDynaCallback(keep=1.0, total_steps=1, densify=False)
    ranks = cb.finalize(model)
    assert ranks == want
    assert not svd_modules(model)
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in ranks)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, masked, atol=1e-5)


# -- the callback in a hand-written loop --------------------------------------------------------
def test_rankdyna_training_loop_meets_budget_with_nonuniform_ranks(tmp_path):
    model = tiny_bert()
    to_svd_linear(model, bert_targets(model))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (256, 8), generator=g)
    labels = (ids[:, 0] < 52).long()  # learnable: the class is a property of the first token

    T = 60
    cb = RankDynaCallback(keep=0.3, warmup=0.1, final=0.2, delta_t=3)
    trainer = SimpleNamespace(model=model, state=SimpleNamespace(step=0, total_steps=T, best_metric=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    cb.on_train_begin(trainer)
    assert cb.warmup_steps == 6 and cb.final_steps == 12
    assert cb.target_budget == int(0.3 * 2 * (4 * 32 * 32 + 2 * 32 * 64))
    losses = []
    for step in range(T):
        idx = torch.randint(0, 256, (32,), generator=g)
        cb.on_step_begin(trainer)
        out = model(input_ids=ids[idx], labels=labels[idx])
        loss = cb.compute_loss(trainer, {}, out, out.loss)
        assert loss > out.loss or cb.orth_reg == 0 or torch.isclose(loss, out.loss)
        loss.backward()
        cb.on_after_backward(trainer)
        opt.step()
        opt.zero_grad()
        trainer.state.step += 1
        cb.on_step_end(trainer)
        losses.append(out.loss.item())
        if trainer.state.step <= cb.warmup_steps:
            assert cb.kept_params() == cb.initial_budget
        else:
            assert cb.kept_params() <= cb.budget(trainer.state.step) or trainer.state.step % cb.delta_t
    assert cb.frozen and trainer.state.best_metric is None  # keep-best reset at the freeze
    assert cb.kept_params() <= cb.target_budget
    budgets = [h["budget"] for h in cb.history]
    assert budgets[0] == cb.initial_budget and budgets[-1] == cb.target_budget
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    assert all(h["kept_params"] <= h["budget"] for h in cb.history)
    assert sum(losses[:10]) / 10 > 0.6 and sum(losses[-10:]) / 10 < 0.3  # learned while compressing

    model.eval()
    x = ids[:16]
    with torch.no_grad():
        masked = model(input_ids=x).logits
    cb.on_train_end(trainer)
    ranks = cb.final_ranks
    assert ranks is not None and len(ranks) == 12 and len(set(ranks.values())) > 1
    total = sum(model.get_submodule(n).weight_params() for n in ranks)
    assert total <= cb.target_budget
    assert total > cb.target_budget - 96  # maximal: the costliest triplet would not fit
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, masked, atol=1e-5)

    st = cb.state_dict()
    torch.save(st, tmp_path / "cb.pt")
    cb2 = RankDynaCallback(keep=0.3)
    cb2.load_state_dict(torch.load(tmp_path / "cb.pt"))
    assert cb2.final_ranks == ranks and cb2.frozen

    png = plot_ranks(ranks, tmp_path / "ranks.png")
    png2 = plot_budget(cb.history, tmp_path / "budget.png", target=cb.target_budget)
    for p in (png, png2):
        data = open(p, "rb").read()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_finalize_stores_ranks_past_break_even_dense():
    model = tiny_bert()
    ids = torch.randint(5, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    to_svd_linear(model, bert_targets(model))
    mods = svd_modules(model)
    full = "bert.encoder.layer.0.intermediate.dense"  # 64 x 32: break-even rank 64*32/96 = 21.3
    for n, m in mods.items():
        mask = torch.zeros(m.rank, dtype=torch.bool)
        mask[: (22 if n == full else 4)] = True
        m.set_mask(mask)
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    cb = RankDynaCallback(keep=1.0, total_steps=1)
    ranks = cb.finalize(model)
    assert cb.dense_modules == [full] and ranks[full] == 22
    assert type(model.get_submodule(full)) is nn.Linear
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in ranks if n != full)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, masked, atol=1e-5)


def test_finalize_enforces_budget_when_training_stops_early():
    model = tiny_bert()
    to_svd_linear(model, bert_targets(model))
    cb = RankDynaCallback(keep=0.25, total_steps=100)
    cb.setup(model)
    with pytest.warns(UserWarning, match="before the final allocation"):
        ranks = cb.finalize()
    assert sum(model.get_submodule(n).weight_params() for n in ranks) <= cb.target_budget


# -- one-shot global rank plan ------------------------------------------------------------------
def test_global_rank_plan_stops_at_break_even_rank():
    spectra = {"flat": torch.ones(32), "steep": 0.5 ** torch.arange(32.0)}
    shapes = {"flat": (32, 96), "steep": (32, 96)}  # break-even rank 32 * 96 / 128 = 24 < 32
    plan = global_rank_plan(spectra, shapes, keep=0.9)
    assert plan["flat"] == 24 and 1 <= plan["steep"] <= 24


def test_global_rank_plan_fits_budget_and_favours_flat_spectra():
    spectra = {"steep": 0.5 ** torch.arange(32.0), "flat": torch.ones(32)}
    shapes = {"steep": (32, 32), "flat": (32, 32)}
    plan = global_rank_plan(spectra, shapes, keep=0.5)
    assert plan["flat"] > plan["steep"] >= 1
    budget = int(0.5 * 2 * 32 * 32)
    used = sum(k * 64 for k in plan.values())
    assert used <= budget and used + 64 > budget
    # raw energies: the large-norm matrix wins instead
    big = {"steep": 100 * spectra["steep"], "flat": spectra["flat"]}
    assert global_rank_plan(big, shapes, keep=0.5, normalize="none")["steep"] > plan["steep"]
    with pytest.raises(FactorLMError):
        global_rank_plan(spectra, shapes, keep=0.01)
    # from a model's own weights (rectangular FFN matrices included)
    model = tiny_bert()
    sp, sh = linear_spectra(model, bert_targets(model))
    plan = global_rank_plan(sp, sh, keep=0.3)
    dense = sum(o * i for o, i in sh.values())
    assert sum(plan[n] * sum(sh[n]) for n in plan) <= 0.3 * dense
    assert all(1 <= plan[n] <= min(sh[n]) for n in plan)
