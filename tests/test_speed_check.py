"""Per-matrix speed check (factorlm.ranks.speed) and --skip-slow in methods.common.plan_for."""

import pytest
import torch

from conftest import tiny_bert
from factorlm.config import RunConfig
from factorlm.errors import FactorLMError
from factorlm.layers import STRUCTURES, LowRankLinear
from factorlm.methods.common import plan_for, targets_for
from factorlm.models.surgery import target_shapes
from factorlm.ranks import plan_params, uniform_plan
from factorlm.ranks import speed
from factorlm.ranks.speed import skip_slow_plan, time_matmuls

from conftest import encoder_shapes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def minilm_shapes(layers=6, d=384, ff=1536):
    return encoder_shapes(layers, d, ff)


def square(shapes):
    return [n for n, (o, i) in shapes.items() if o == i]


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(speed, "_CACHE", {})


@pytest.fixture
def fake_timer(monkeypatch):
    """measure_group replaced: square matrices are 'slow' (2 ms factorized vs 1 ms dense), others fast."""
    calls = []

    def fake(dense, variants, x, **kw):
        calls.append((dense.out_features, dense.in_features, len(variants), x.shape[0]))
        slow = dense.out_features == dense.in_features
        return 1.0, [2.0 if slow else 0.5 for _ in variants]

    monkeypatch.setattr(speed, "measure_group", fake)
    return calls


# -- skip_slow_plan ---------------------------------------------------------------------------------

FIXED = {"lowrank": {}, "monarch": {"nblocks": 4}, "blockwise": {}}


@pytest.mark.parametrize("structure", ["lowrank", "monarch", "blockwise"])
@pytest.mark.parametrize("keep", [0.5, 0.4, 0.75])
def test_skip_slow_plan_keeps_the_budget_with_the_largest_knob(structure, keep):
    cls, fixed = STRUCTURES.get(structure), FIXED[structure]
    shapes = minilm_shapes()
    plan = uniform_plan(shapes, keep, cls, **fixed)
    slow = square(shapes)
    new, kept = skip_slow_plan(shapes, plan, set(slow), keep, cls, fixed)
    assert kept == slow and not set(slow) & set(new) and set(new) | set(kept) == set(shapes)
    total = sum(o * i for o, i in shapes.values())
    dense = sum(shapes[n][0] * shapes[n][1] for n in kept)
    assert dense + plan_params(shapes, new, cls) <= keep * total
    knob = {p[cls.budget_knob] for p in new.values()}
    assert len(knob) == 1
    k = knob.pop()
    assert all(p == {cls.budget_knob: k, **fixed} for p in new.values())
    if k < max(cls.knob_max(*shapes[n], **fixed) for n in new):  # the largest that fits: k + 1 does not
        bigger = {n: {cls.budget_knob: min(k + 1, cls.knob_max(*shapes[n], **fixed)), **fixed} for n in new}
        assert dense + plan_params(shapes, bigger, cls) > keep * total
    # dense attention costs at least what its factors did, so the FFNs get no more than before (at keep
    # 0.75 the square matrices sit at break-even, rank 192 = 384 * 384 / 768: the same knob)
    assert k <= plan[next(iter(new))][cls.budget_knob]


def test_skip_slow_plan_minilm_numbers():
    shapes = minilm_shapes()
    plan = uniform_plan(shapes, 0.5, LowRankLinear)
    assert {p["rank"] for p in plan.values()} == {128}
    new, kept = skip_slow_plan(shapes, plan, square(shapes), 0.5, LowRankLinear)
    # 0.5 * 10,616,832 - 24 * 384^2 = 1,769,472 left for 12 FFN matrices of 1920 weights per rank
    assert len(kept) == 24 and {p["rank"] for p in new.values()} == {1769472 // (12 * 1920)} == {76}


def test_skip_slow_plan_errors():
    shapes = minilm_shapes()
    plan = uniform_plan(shapes, 0.25, LowRankLinear)
    with pytest.raises(FactorLMError, match=r"--skip-slow: the 24 matrices .* 0\.3333 of the target weights .* --keep 0\.25"):
        skip_slow_plan(shapes, plan, square(shapes), 0.25, LowRankLinear)
    with pytest.raises(FactorLMError, match="all 36 target matrices"):
        skip_slow_plan(shapes, plan, set(shapes), 1.0, LowRankLinear)
    # exactly used up: nothing left for the rest
    with pytest.raises(FactorLMError, match="all of --keep"):
        skip_slow_plan(shapes, plan, square(shapes), 1 / 3, LowRankLinear)


def test_skip_slow_plan_without_budget_or_slow_matrices():
    shapes = minilm_shapes()
    plan = {n: {"rank": 32} for n in shapes}
    new, kept = skip_slow_plan(shapes, plan, square(shapes), None, LowRankLinear)  # --rank: no budget
    assert kept == square(shapes) and new == {n: {"rank": 32} for n in shapes if n not in kept}
    same, none = skip_slow_plan(shapes, plan, set(), 0.25, LowRankLinear)
    assert same == plan and none == []


# -- time_matmuls -----------------------------------------------------------------------------------


@pytest.mark.parametrize("structure,entry", [("lowrank", {"rank": 8}), ("monarch", {"block_rank": 2, "nblocks": 4}),
                                             ("blockwise", {"block_rank": 4}), ("svd_masked", {"rank": 8})])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_time_matmuls_measures_every_structure(structure, entry, dtype):
    shapes = {"a": (32, 32), "b": (32, 32), "c": (64, 32)}
    res = time_matmuls({n: (s, entry) for n, s in shapes.items()}, 16, dtype, STRUCTURES.get(structure), repeats=3)
    assert set(res) == set(shapes)
    for r in res.values():
        assert r["dense_ms"] > 0 and r["factorized_ms"] > 0 and r["speedup"] > 0 and isinstance(r["slow"], bool)
        assert r["slow"] == (r["factorized_ms"] >= r["dense_ms"])
    assert res["a"] == res["b"]  # one timing, shared


def test_time_matmuls_times_each_distinct_shape_and_plan_once(fake_timer):
    shapes = minilm_shapes()
    items = {n: (s, {"rank": 64}) for n, s in shapes.items()}
    res = time_matmuls(items, 8, "fp32", LowRankLinear)
    assert sorted(fake_timer) == sorted([(384, 384, 1, 8), (1536, 384, 1, 8), (384, 1536, 1, 8)])
    assert all(res[n]["slow"] for n in square(shapes)) and not any(res[n]["slow"] for n in shapes if n not in square(shapes))
    assert res["layer.0.q"] == res["layer.5.o"] == {"dense_ms": 1.0, "factorized_ms": 2.0, "speedup": 0.5, "slow": True}
    # cached: the same (shape, plan, rows, dtype) is not timed again; other rows or dtype are
    time_matmuls(items, 8, "fp32", LowRankLinear)
    assert len(fake_timer) == 3
    time_matmuls(items, 8, "bf16", LowRankLinear)
    assert len(fake_timer) == 6
    time_matmuls(items, 8, "fp32", LowRankLinear, cache=False)
    assert len(fake_timer) == 9
    # two plans of one shape: one round-robin group with the dense layer and both variants
    mixed = {"x": ((384, 384), {"rank": 16}), "y": ((384, 384), {"rank": 32}), "z": ((384, 384), {"rank": 16})}
    time_matmuls(mixed, 8, "fp32", LowRankLinear)
    assert fake_timer[-1] == (384, 384, 2, 8) and len(fake_timer) == 10
    # margin: factorized must be below margin x dense to count as fast
    res = time_matmuls(items, 8, "fp32", LowRankLinear, margin=0.4)
    assert all(r["slow"] for r in res.values())


# -- plan_for ---------------------------------------------------------------------------------------


class FakeSession:
    def __init__(self, **cfg):
        cfg = {"keep": 0.75, "latency_batch": 2, "max_length": 8, "progress": False, **cfg}
        self.config = RunConfig(**cfg).validate()
        self.lines = []

    def log(self, msg):
        self.lines.append(msg)


def _split(model):
    shapes = target_shapes(model, targets_for(FakeSession(), model))
    return shapes, [n for n, (o, i) in shapes.items() if o == i]


def test_plan_for_skip_slow_keeps_slow_matrices_dense(fake_timer):
    model = tiny_bert()
    shapes, attn = _split(model)
    s = FakeSession(skip_slow=True)
    plan = plan_for(s, model, targets_for(s, model))
    assert not set(attn) & set(plan) and len(plan) == 4
    # 0.75 * 16384 - 8 * 1024 = 4096 left for 4 FFN matrices of 96 weights per rank
    assert {p["rank"] for p in plan.values()} == {4096 // (4 * 96)}
    assert sum(shapes[n][0] * shapes[n][1] for n in attn) + plan_params(shapes, plan, LowRankLinear) <= 0.75 * 16384
    sc = s.speed_check
    assert sc["slow"] == attn and sc["kept_dense"] == attn and sc["skip_slow"] is True
    assert sc["rows"] == 16 and sc["dtype"] == "fp32" and sc["structure"] == "lowrank"
    assert {tuple(g["shape"]): g["matrices"] for g in sc["groups"]} == {(32, 32): 8, (64, 32): 2, (32, 64): 2}
    assert sc["plan_after"] == [{"plan": {"rank": 10}, "matrices": 4}] and sc["slow_after"] == []
    import json

    json.dumps(sc)  # the report saves it
    assert any("[speed check] 8 matrices (32x32 at rank 13, fp32) would not run faster factorized: 1 ms dense vs 2 ms" in ln
               for ln in s.lines), s.lines
    assert any("--skip-slow: 8 matrices stay dense" in ln and "rank 10 (was rank 13)" in ln for ln in s.lines), s.lines
    # idempotent: api.compress's budget check then the method -> timed and logged once
    n_calls, n_lines = len(fake_timer), len(s.lines)
    assert plan_for(s, model, targets_for(s, model)) == plan
    assert len(fake_timer) == n_calls and len(s.lines) == n_lines


def test_plan_for_reports_without_skip_slow(fake_timer):
    model = tiny_bert()
    _, attn = _split(model)
    s = FakeSession()
    plan = plan_for(s, model, targets_for(s, model))
    assert len(plan) == 12 and {p["rank"] for p in plan.values()} == {13}
    assert s.speed_check["slow"] == attn and "kept_dense" not in s.speed_check
    assert any("--skip-slow keeps them dense" in ln for ln in s.lines)


def test_plan_for_no_latency_times_nothing(fake_timer):
    model = tiny_bert()
    s = FakeSession(latency=False)
    plan = plan_for(s, model, targets_for(s, model))
    assert len(plan) == 12 and fake_timer == [] and not hasattr(s, "speed_check")
    s = FakeSession(skip_slow=True)
    assert len(plan_for(s, model, targets_for(s, model), speed_check=False)) == 12 and fake_timer == []
    s = FakeSession(latency=False, skip_slow=True)  # --skip-slow asks for it anyway
    assert len(plan_for(s, model, targets_for(s, model))) == 4
    assert len(fake_timer) == 3 + 2  # the plan's 3 shapes, then the 2 FFN shapes again at the new rank


def test_plan_for_skip_slow_global_policy_and_explicit_rank(fake_timer):
    model = tiny_bert()
    shapes, attn = _split(model)
    s = FakeSession(skip_slow=True, rank_policy="global")
    plan = plan_for(s, model, targets_for(s, model))
    assert not set(attn) & set(plan) and len(plan) == 4
    assert sum(shapes[n][0] * shapes[n][1] for n in attn) + plan_params(shapes, plan, LowRankLinear) <= 0.75 * 16384
    s = FakeSession(skip_slow=True, rank=5, keep=None)
    plan = plan_for(s, model, targets_for(s, model))
    assert plan == {n: {"rank": 5} for n in shapes if n not in attn}


def test_plan_for_skip_slow_budget_too_small(fake_timer):
    model = tiny_bert()
    s = FakeSession(skip_slow=True, keep=0.25)
    with pytest.raises(FactorLMError, match="--skip-slow: the 8 matrices"):
        plan_for(s, model, targets_for(s, model))


def test_plan_for_real_timing_on_a_tiny_model():
    model = tiny_bert()
    s = FakeSession(dtype="bf16")
    plan = plan_for(s, model, targets_for(s, model))
    assert len(plan) == 12  # without --skip-slow the plan is unchanged
    sc = s.speed_check
    assert sc["dtype"] == "bf16" and sc["rows"] == 16 and len(sc["groups"]) == 3
    assert all(g["dense_ms"] > 0 and g["factorized_ms"] > 0 for g in sc["groups"])
    assert sc["slow"] == [n for n in plan if any(g["slow"] and g["shape"] == list(target_shapes(model, [n])[n])
                                                 for g in sc["groups"])]
    assert torch.get_num_threads() == sc["threads"]
