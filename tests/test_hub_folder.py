"""A saved factorlm folder in plain transformers (issue 32): ``trust_remote_code=True`` gives exactly
``factorlm.load``'s model (causal LMs with ``generate`` and the KV cache, tied embeddings, encoders with
their head), and without it transformers refuses the folder instead of loading random layers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import char_tokenizer, tiny_bert, tiny_gpt2, tiny_llama
from factorlm import models
from factorlm.layers.lowrank import LowRankLinear
from factorlm.models import hub_folder
from factorlm.models.surgery import get_module, set_module

pytestmark = pytest.mark.usefixtures("one_thread")


def _factorize(model, names, rank=3, dtype=None):
    for n in names:
        old = get_module(model, n)
        W = old.weight.detach().T if type(old).__name__ == "Conv1D" else old.weight.detach()
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        A, B = (U[:, :rank] * S[:rank]).to(W.dtype), Vh[:rank].to(W.dtype)
        set_module(model, n, LowRankLinear.from_factors(A, B, old.bias.detach() if old.bias is not None else None))
    return model


def _save(model, tmp_path, name="out", tokenizer=None):
    out = tmp_path / name
    models.save(model, out, tokenizer=tokenizer or char_tokenizer(),
                meta={"task": "lm", "method": "svd", "scores": {"final": {"perplexity": 3.5}}})
    return out


@pytest.mark.parametrize("make, names, dtype", [
    (tiny_llama, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"], torch.bfloat16),
    (tiny_gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"], torch.float32),
])
def test_remote_code_round_trip_is_factorlm_load(tmp_path, make, names, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _factorize(make().to(dtype), names)
    out = _save(model, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "factorlm" and cfg[hub_folder.hf_remote.BASE_KEY] == model.config.model_type
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (out / hub_folder.MODELING_FILE).read_text() == open(hub_folder.hf_remote.__file__).read()
    ours = models.load(out)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(hf) is type(ours) and all(isinstance(get_module(hf, n), torch.nn.Module) for n in names)
    assert type(get_module(hf, names[0])).__name__ == "LowRankLinear"
    assert {p.dtype for p in hf.parameters()} == {dtype}
    sd0, sd1 = ours.state_dict(), hf.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=0, rtol=0)
    g_ours = ours.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=2, use_cache=True)
    g_hf = hf.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=2, use_cache=True)
    assert torch.equal(g_ours, g_hf)
    if make is tiny_gpt2:
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert tok("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]


def test_without_trust_remote_code_the_load_fails_loudly(tmp_path):
    from transformers import AutoModelForCausalLM

    out = _save(_factorize(tiny_llama(), ["model.layers.0.mlp.up_proj"]), tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out)


def test_encoder_folder_loads_with_its_head(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = _factorize(tiny_bert(), ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.output.dense"])
    out = tmp_path / "enc"
    models.save(model, out, meta={"task": "sst2", "method": "svd"})
    cfg = json.loads((out / "config.json").read_text())
    assert "AutoModelForSequenceClassification" in cfg["auto_map"] and "AutoModelForCausalLM" not in cfg["auto_map"]
    hf = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hf(ids).logits, models.load(out)(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(out)


def test_other_structures_are_refused_by_name(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from factorlm.layers.monarch import MonarchLinear

    model = tiny_bert()
    name = "bert.encoder.layer.0.intermediate.dense"
    monarch = MonarchLinear(32, 64, 4, nblocks=4)
    torch.nn.init.zeros_(monarch.bias)
    set_module(model, name, monarch)
    out = tmp_path / "m"
    models.save(model, out, meta={"task": "sst2", "method": "monarch"})
    with pytest.raises(NotImplementedError, match=f"{name} is a factorlm 'monarch' layer"):
        AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    torch.testing.assert_close(models.load(out)(torch.tensor([[5, 6]])).logits, model(torch.tensor([[5, 6]])).logits)


def test_dense_folder_keeps_a_standard_config_and_the_card_names_the_recipe(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = _save(tiny_llama(), tmp_path, "dense")
    assert json.loads((dense / "config.json").read_text())["model_type"] == "llama"
    assert not (dense / hub_folder.MODELING_FILE).exists()
    AutoModelForCausalLM.from_pretrained(dense)  # a plain folder: no remote code needed
    out = _save(_factorize(tiny_llama(), ["model.layers.0.mlp.up_proj"]), tmp_path)
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| final | 3.5 |" in card and "export" in card


def test_factorlm_tokenizer_loads_never_read_the_remote_config(tmp_path, monkeypatch):
    """factorlm's own tokenizer loads pass the base config: transformers never asks to trust the code."""
    import transformers.dynamic_module_utils as dmu
    from transformers import AutoTokenizer

    out = _save(_factorize(tiny_llama(), ["model.layers.0.mlp.up_proj"]), tmp_path)

    def refuse(*a, **k):
        raise AssertionError("asked whether to trust remote code")

    monkeypatch.setattr(dmu, "resolve_trust_remote_code", refuse)
    monkeypatch.setattr("transformers.models.auto.configuration_auto.resolve_trust_remote_code", refuse)
    tok = AutoTokenizer.from_pretrained(out, **hub_folder.tokenizer_kwargs(out))
    assert tok("ab")["input_ids"] == char_tokenizer()("ab")["input_ids"]
    assert hub_folder.read_config(out).model_type == "llama"


def test_resaving_a_remote_loaded_model_keeps_the_folder_safe(tmp_path):
    """``save_pretrained`` of the model plain transformers returned writes a folder that again refuses to
    load without ``trust_remote_code`` and loads with it to the same logits (not a standard folder whose
    factor tensors would be dropped for random dense layers)."""
    from transformers import AutoModelForCausalLM

    out = _save(_factorize(tiny_llama(), ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]), tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    again = tmp_path / "again"
    hf.save_pretrained(again)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(again)
    back = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True)
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=0, rtol=0)
    torch.testing.assert_close(models.load(again)(ids).logits, hf(ids).logits, atol=0, rtol=0)


def test_remote_loader_takes_the_usual_arguments(tmp_path):
    from transformers import AutoModelForCausalLM

    out = _save(_factorize(tiny_llama(), ["model.layers.0.mlp.up_proj"]), tmp_path)
    hf, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, use_cache=False, dtype="bfloat16",
                                                    device_map="auto", attn_implementation="eager",
                                                    output_loading_info=True)
    assert hf.config.use_cache is False and hf.config._attn_implementation == "eager"
    assert hf.dtype == torch.bfloat16 and info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert hf.config.architectures == ["LlamaForCausalLM"]
    assert next(hf.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(NotImplementedError, match="one device"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, device_map={"a": "cpu", "b": "meta"})
    # factorlm.load keeps the saved architectures too (the causal-LM check reads them)
    assert models.load(out).config.architectures == ["LlamaForCausalLM"]
