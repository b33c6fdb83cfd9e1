"""ranks.byte_plan (one byte budget over grids and correction ranks) against an exact multiple-choice
knapsack (dynamic programming over integer bytes), its exact case (one grid, equal rank prices, convex
losses), and its limits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factorlm.errors import FactorLMError
from factorlm.ranks.byte_plan import GridOption, byte_plan, plan_loss


def _instance(seed, grids, ranks, n, per_rank=None):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in range(n):
        opts = []
        for _ in range(grids):
            base = int(torch.randint(20, 60, (1,), generator=g))
            per = float(per_rank or torch.randint(3, 12, (1,), generator=g))
            drops = torch.rand(ranks, generator=g).sort(descending=True).values * (1 + 10 * float(torch.rand(1, generator=g)))
            loss = torch.cat([drops.flip(0).cumsum(0).flip(0), torch.zeros(1)])  # non-increasing, convex
            opts.append(GridOption(base, per, loss))
        out[f"m{m}"] = opts
    return out


def _exact(options, budget):
    """The optimum by dynamic programming over integer bytes (every base and rank price is an integer)."""
    B = int(budget)
    f = np.zeros(B + 1)
    for opts in options.values():
        g = np.full(B + 1, np.inf)
        for o in opts:
            for r in range(len(o.loss)):
                c = int(o.base + r * o.per_rank)
                if c <= B:
                    cand = np.full(B + 1, np.inf)
                    cand[c:] = f[: B + 1 - c] + float(o.loss[r])
                    g = np.minimum(g, cand)
        f = g
    return float(f[B])


def _spent(options, plan):
    return sum(options[n][q].base + r * options[n][q].per_rank for n, (q, r) in plan.items())


def _budget(options, frac):
    floor = sum(min(o.base for o in v) for v in options.values())
    top = sum(max(o.base + (len(o.loss) - 1) * o.per_rank for o in v) for v in options.values())
    return int(floor + frac * (top - floor))


def test_the_plan_fits_and_is_within_a_few_percent_of_the_exact_knapsack():
    gaps = []
    for s in range(8):
        opts = _instance(100 + s, grids=3, ranks=20, n=30)
        budget = _budget(opts, 0.05 + 0.06 * s)
        plan = byte_plan(opts, budget)
        assert _spent(opts, plan) <= budget
        opt = _exact(opts, budget)
        gaps.append((plan_loss(opts, plan) - opt) / opt)
    assert min(gaps) >= -1e-9  # never better than the optimum (the reference is exact)
    assert max(gaps) < 0.03 and sum(gaps) / len(gaps) < 0.01, gaps


def test_one_grid_with_equal_rank_prices_is_exactly_optimal():
    """Convex losses and one price per rank: the best ranks are the largest loss drops overall, which the
    relaxation and its fill find exactly."""
    for s in range(5):
        opts = _instance(7 + s, grids=1, ranks=15, n=12, per_rank=5)
        budget = _budget(opts, 0.1 + 0.2 * s)
        plan = byte_plan(opts, budget)
        assert _spent(opts, plan) <= budget
        assert plan_loss(opts, plan) == pytest.approx(_exact(opts, budget), rel=1e-9, abs=1e-9)


def test_limits_of_the_budget():
    opts = _instance(3, grids=2, ranks=6, n=4)
    floor = sum(min(o.base for o in v) for v in opts.values())
    with pytest.raises(FactorLMError, match="below the cheapest grid"):
        byte_plan(opts, floor - 1)
    plan = byte_plan(opts, 10 ** 9)  # room for everything: the least loss of every matrix
    assert plan_loss(opts, plan) == pytest.approx(sum(min(float(o.loss.min()) for o in v) for v in opts.values()))
    at_floor = byte_plan(opts, floor)  # only the cheapest grids, no rank
    assert all(r == 0 and opts[n][q].base == min(o.base for o in opts[n]) for n, (q, r) in at_floor.items())


# ------------------------------------------------------------------ --method rtn-lowrank --byte-plan global
def test_global_byte_plan_end_to_end_mixes_grids_within_the_budget_and_reloads(tmp_path):
    """A tiny Llama at keep 0.3 of the targets' bf16 bytes: every target stores the grid and rank the plan
    gave it (int8 / int4 / int3 candidates), the report counts them, the stored bytes are within the budget,
    and the folder reloads exactly."""
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import _lm_cfg

    from factorlm import models
    from factorlm.api import compress
    from factorlm.layers import QuantLowRankLinear
    from factorlm.models.surgery import get_module

    rep = compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.3, method_options={"byte_plan": "global"}),
                   quiet=True)
    acc, ranks = rep.accounting, rep.info["ranks"]
    mods = {n: get_module(rep.model, n) for n in ranks}
    assert all(isinstance(m, QuantLowRankLinear) for m in mods.values())
    grids = {}
    for m in mods.values():
        k = f"int{m.bits}-g{m.group_size}" + ("-zp" if m.zero_point else "")
        grids[k] = grids.get(k, 0) + 1
    assert acc["quantized"]["grids"] == dict(sorted(grids.items())) and acc["quantized"]["byte_plan"] == "global"
    assert {m.bits for m in mods.values()} <= {8, 4, 3}
    assert all(m.zero_point == (m.bits <= 4) for m in mods.values())
    assert acc["target_bytes_after"] == sum(m.weight_bytes() for m in mods.values())
    assert acc["target_bytes_after"] <= 0.3 * 2 * acc["target_weights_before"]
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(models.load(tmp_path / "out")(ids).logits, rep.model(ids).logits, atol=0, rtol=0)
    # the saved recipe re-runs the same plan (the grids offered are the user's, not the first run's)
    import json
    from dataclasses import replace

    from factorlm.config import RunConfig, load_recipe

    recipe = load_recipe(tmp_path / "out" / "factorlm.json")
    assert "bits" not in recipe["method_options"] and recipe["method_options"]["byte_plan"] == "global"
    again = compress(replace(RunConfig(**recipe), output=str(tmp_path / "again")), quiet=True, save=False)
    assert again.info["ranks"] == ranks and again.accounting["quantized"]["grids"] == acc["quantized"]["grids"]
    assert json.loads((tmp_path / "out" / "factorlm.json").read_text())["accounting"]["quantized"]["bits"] == "per target"
    # one grid given (--bits 4): the plan only moves correction rank between matrices, within the same bytes
    one = compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.3, name="one",
                           method_options={"byte_plan": "global", "bits": 4}), quiet=True, save=False)
    assert {get_module(one.model, n).bits for n in ranks} == {4}
    assert one.accounting["target_bytes_after"] <= 0.3 * 2 * acc["target_weights_before"]
    # gptq-lowrank: the grids are priced and stored with GPTQ's codes (act-order here)
    g = compress(_lm_cfg(tmp_path, method="gptq-lowrank", keep=0.3, name="g",
                         method_options={"byte_plan": "global", "gptq_act_order": True}), quiet=True, save=False)
    q = g.accounting["quantized"]
    assert q["quantizer"] == "gptq" and q["gptq_act_order"] is True and q["byte_plan"] == "global"
    assert g.accounting["target_bytes_after"] <= 0.3 * 2 * acc["target_weights_before"]


def test_global_byte_plan_refusals(tmp_path, monkeypatch):
    """One-line errors, before the dense evaluation (which here would fail the test)."""
    import sys

    def no_work(*a, **k):
        raise AssertionError("the dense model was evaluated before the refusal")

    monkeypatch.setattr("factorlm.lm.pipeline.ppl", no_work)

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_quantize import _lm_cfg

    from factorlm.api import compress

    with pytest.raises(FactorLMError, match=r"below what the cheapest grid \(int8 in groups of 32, .*\) stores alone"):
        compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.15, method_options={"byte_plan": "global"}),
                 quiet=True, save=False)
    with pytest.raises(FactorLMError, match="--offload cannot bound"):
        compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.3, offload="cpu", method_options={"byte_plan": "global"}),
                 quiet=True, save=False)
    with pytest.raises(FactorLMError, match=r"\(int3 in groups of 16 with zero points\) stores alone"):
        compress(_lm_cfg(tmp_path, method="rtn-lowrank", keep=0.1, method_options={"bits": 3, "group_size": 16}),
                 quiet=True, save=False)  # --byte-plan auto = global: the same refusal, before any work


def test_grid_candidates_follow_the_widths_and_the_given_options():
    from factorlm.lm.methods import get_lm_method
    from factorlm.lm.plan import grid_candidates

    def names(method_name, opts, shapes, keep=0.25):
        m = get_lm_method(method_name, {"byte_plan": "global", **opts})
        m.resolve(keep, shapes)
        return [f"int{q.bits}-g{q.group_size}" + ("-zp" if q.zero_point else "") + ("-gptq" if q.gptq else "")
                for q in grid_candidates(m, shapes)]

    smol = {"q": (576, 576), "down": (576, 1536)}  # SmolLM2-135M's input widths: 128 does not divide 576
    assert names("rtn-lowrank", {}, smol) == ["int8-g192", "int4-g192-zp", "int4-g64-zp", "int4-g32-zp",
                                              "int3-g192-zp", "int3-g64-zp", "int3-g32-zp"]
    llama = {"q": (4096, 4096), "down": (4096, 14336)}  # Llama-3-8B's: 192 does not divide 4096
    assert names("rtn-lowrank", {"bits": 4}, llama) == ["int4-g128-zp", "int4-g64-zp", "int4-g32-zp"]
    assert names("rtn-lowrank", {"group_size": 64, "zero_point": False}, smol) == ["int8-g64", "int4-g64", "int3-g64"]
    assert names("gptq-lowrank", {"bits": 3, "group_size": 32}, smol) == ["int3-g32-zp-gptq"]
