import json

import pytest
import torch

from factorlm import models
from factorlm.errors import FactorLMError
from factorlm.factorize import budget_plan, factorize
from factorlm.layers import LowRankLinear
from factorlm.models import find_targets



def test_find_targets_is_encoder_linears_only(tiny_model):
    names = find_targets(tiny_model)
    assert len(names) == 2 * 6
    assert all(".encoder.layer." in n for n in names)
    assert not any("classifier" in n or "pooler" in n or "embed" in n for n in names)
    only_ffn = find_targets(tiny_model, include=[r"intermediate|output\.dense$"], exclude=[r"attention"])
    assert len(only_ffn) == 4


def test_full_rank_factorization_reproduces_logits(tiny_model):
    ids = torch.randint(0, 100, (3, 10))
    ref = tiny_model(input_ids=ids).logits
    targets = find_targets(tiny_model)
    plan = {n: {"rank": min(tiny_model.get_submodule(n).weight.shape)} for n in targets}
    acc = factorize(tiny_model, plan)
    assert all(isinstance(tiny_model.get_submodule(n), LowRankLinear) for n in targets)
    assert torch.allclose(tiny_model(input_ids=ids).logits, ref, atol=1e-5)
    assert acc.target_weights_before == sum(
        o * i for o, i in [(32, 32)] * 8 + [(64, 32), (32, 64)] * 2
    )


def test_accounting_exact(tiny_model):
    before = models.count_params(tiny_model)
    targets = find_targets(tiny_model)
    plan = budget_plan(tiny_model, targets, keep=0.5)
    k = plan[targets[0]]["rank"]
    acc = factorize(tiny_model, plan)
    dense_w = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert acc.target_weights_before == dense_w
    assert acc.target_weights_after == 2 * k * (4 * 64 + 2 * 96) <= 0.5 * dense_w
    assert acc.model_params_before == before
    assert acc.model_params_after == before - dense_w + acc.target_weights_after == models.count_params(tiny_model)


def test_save_load_round_trip_identical_logits(tiny_model, tmp_path):
    targets = find_targets(tiny_model)
    factorize(tiny_model, budget_plan(tiny_model, targets, keep=0.3))
    ids = torch.randint(0, 100, (2, 7))
    ref = tiny_model(input_ids=ids).logits
    out = models.save(tiny_model, tmp_path / "m", meta={"method": "svd"})
    meta = json.loads((out / "factorlm.json").read_text())
    assert set(meta["modules"]) == set(targets)
    spec = meta["modules"][targets[0]]
    assert spec["structure"] == "lowrank" and spec["shape"] == [32, 32] and spec["rank"] >= 1
    assert "torch" in meta["versions"] and meta["method"] == "svd"
    loaded = models.load(out)
    assert torch.equal(loaded(input_ids=ids).logits, ref)
    assert not list(tmp_path.glob(".m.tmp-*"))


def test_save_is_atomic_on_failure(tiny_model, tmp_path):
    def boom(path):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        models.save(tiny_model, tmp_path / "m", extra_files={"x.png": boom})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_existing_folder(tiny_model, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(FactorLMError, match="already exists"):
        models.save(tiny_model, tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


def test_nonfinite_weights_rejected(tiny_model, tmp_path):
    with torch.no_grad():
        tiny_model.classifier.weight[0, 0] = float("nan")
    with pytest.raises(FactorLMError, match="non-finite"):
        models.save(tiny_model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_load_errors(tmp_path):
    with pytest.raises(FactorLMError, match="does not exist"):
        models.load(tmp_path / "nope")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(FactorLMError, match="not a factorlm model folder"):
        models.load(tmp_path / "hf")
    with pytest.raises(FactorLMError, match="not a factorlm or Hugging Face model folder"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(FactorLMError, match="does not exist"):
        models.resolve_model(str(tmp_path / "missing"))


def test_frozen_eval_restores_flags_and_mode_even_on_error():
    from factorlm.models.state import frozen_eval

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    m.train()
    m[2].bias.requires_grad_(False)
    before = [p.requires_grad for p in m.parameters()]
    extra = torch.zeros(2, requires_grad=False)  # a tensor outside the module's parameters
    with frozen_eval(m, trainable=[m[0].weight, extra]):
        assert not m.training and not m[1].training
        assert [p.requires_grad for p in m.parameters()] == [True, False, False, False]
        assert extra.requires_grad
        m(torch.randn(5, 3)).sum().backward()
        assert m[0].weight.grad is not None and m[2].weight.grad is None
    assert m.training and m[1].training and [p.requires_grad for p in m.parameters()] == before
    assert not extra.requires_grad
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_eval(m):
            assert not any(p.requires_grad for p in m.parameters())
            raise RuntimeError("boom")
    assert m.training and [p.requires_grad for p in m.parameters()] == before
    with frozen_eval(m, freeze=False):  # eval mode only
        assert not m.training and [p.requires_grad for p in m.parameters()] == before
