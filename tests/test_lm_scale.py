"""--task lm at the sizes users have (issue 32): the checkpoint's dtype end to end, saved bytes against
the source's, sharded weights that round-trip bit-exactly onto a meta-device skeleton, the dense teacher
without a second copy, and regression tests for the bugs the review found."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import char_tokenizer, tiny_llama
from factorlm import models
from factorlm.config import RunConfig
from factorlm.errors import FactorLMError
from factorlm.models import weights

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ("The committee met on Tuesday to discuss the new budget. Members argued about schools, roads and taxes. "
        "After a long debate the proposal passed with a narrow majority. ") * 12


@pytest.fixture
def texts(tmp_path):
    cal, ev = tmp_path / "cal.txt", tmp_path / "eval.txt"
    cal.write_text(TEXT)
    ev.write_text(TEXT[::-1])
    return cal, ev


def _src(tmp_path, dtype=torch.float32, make=tiny_llama, name="src"):
    model = make().to(dtype)
    model.config.pad_token_id = 2
    path = tmp_path / name
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _cfg(src, cal, ev, out, **kw):
    base = dict(task="lm", model=str(src), method="whiten", keep=0.8, calibration=str(cal), eval_text=str(ev),
                seq_len=32, calibration_samples=8, latency=False, output=str(out), progress=False)
    base.update(kw)
    return RunConfig(**base)


# ------------------------------------------------------------------------ dtype end to end, saved bytes
def test_auto_dtype_keeps_a_bf16_checkpoint_bf16_and_saves_fewer_bytes(tmp_path, texts):
    """``--dtype auto`` (the default) compresses a bf16 checkpoint in bf16: no fp32 copy, and at keep 0.8
    the saved weights are at most 0.95x the source's bytes (before: loaded in fp32, saved 1.8x)."""
    from factorlm.api import compress

    src = _src(tmp_path, torch.bfloat16)
    out = tmp_path / "out"
    rep = compress(_cfg(src, *texts, out), quiet=True)
    assert {p.dtype for p in rep.model.parameters()} == {torch.bfloat16}
    acc = rep.accounting
    src_bytes = (src / "model.safetensors").stat().st_size
    assert acc["dtype"] == "bf16" and acc["bytes_before"] == src_bytes and acc["bytes_before_is"]
    assert acc["bytes_on_disk"] == (out / "model.safetensors").stat().st_size
    # the tiny model's embeddings are half of it, so 0.8 of the targets gives ~0.9 of the file
    assert acc["bytes_on_disk"] <= 0.95 * src_bytes, (acc["bytes_on_disk"], src_bytes)
    loaded = models.load(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded(ids).logits, rep.model(ids).logits, atol=0, rtol=0)


def test_explicit_dtype_overrides_the_checkpoint(tmp_path, texts):
    from factorlm.api import compress

    src = _src(tmp_path, torch.bfloat16)
    rep = compress(_cfg(src, *texts, tmp_path / "o", dtype="fp32"), quiet=True, save=False)
    assert {p.dtype for p in rep.model.parameters()} == {torch.float32}
    assert rep.accounting["dtype"] == "fp32"
    gen = rep.info["generation"]  # greedy continuations of dense and compressed, scored for loops
    assert gen["dense"]["of"] == gen["final"]["of"] == 4 and rep.health["loops"] == (gen["final"]["loops"] > gen["dense"]["loops"])
    assert all(len(p["text"]) > 0 and 0 < p["distinct_2"] <= 1 for p in gen["final"]["prompts"])


# ------------------------------------------------------------------------ sharded weights, meta loading
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_save_loads_bit_exact_onto_meta(tmp_path, dtype):
    """Past ``max_shard_size`` the folder holds shards + an index (as ``save_pretrained`` writes); loading
    builds the skeleton on the meta device and fills every tensor bit-exactly, tied weights tied."""
    from factorlm.layers.lowrank import LowRankLinear
    from factorlm.models.surgery import set_module

    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)).eval().to(dtype)
    set_module(model, "transformer.h.0.mlp.c_fc", LowRankLinear(32, 128, 8, bias=True, dtype=dtype))
    tok = char_tokenizer()
    out = tmp_path / "sharded"
    models.save(model, out, tokenizer=tok, meta={"task": "lm", "method": "whiten"}, max_shard_size=20_000)
    shards = weights.files(out)
    assert len(shards) > 2 and (out / weights.INDEX).is_file() and not (out / weights.SINGLE).exists()
    index = json.loads((out / weights.INDEX).read_text())
    # the tied embedding / LM head is stored once, under one of its two names
    assert len({"transformer.wte.weight", "lm_head.weight"} & set(index["weight_map"])) == 1
    loaded = models.load(out)
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert sd1[k].dtype == dtype and torch.equal(sd0[k], sd1[k]), k
    assert not any(p.is_meta for p in loaded.parameters()) and not any(b.is_meta for b in loaded.buffers())
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    # a lost shard is one line naming it, before any tensor is read
    shards[-1].unlink()
    with pytest.raises(FactorLMError, match=shards[-1].name):
        models.load(out)


def test_load_casts_per_tensor_to_the_asked_dtype(tmp_path):
    from factorlm.layers.lowrank import LowRankLinear
    from factorlm.models.surgery import set_module

    model = tiny_llama()
    set_module(model, "model.layers.0.mlp.up_proj", LowRankLinear(32, 64, 4))
    out = tmp_path / "o"
    models.save(model, out, tokenizer=char_tokenizer(), meta={"task": "lm", "method": "svd"})
    loaded = models.load(out, dtype="bf16")
    sd0 = model.state_dict()
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, sd0[k].to(torch.bfloat16)), k


# ------------------------------------------------------------------------ the dense teacher, streamed
def test_dense_teacher_gives_the_dense_models_logits_and_restores_the_student():
    from factorlm.lm import get_lm_method
    from factorlm.lm.calibrate import token_batches
    from factorlm.lm.factorize import factorize
    from factorlm.lm.heal import DenseTeacher
    from factorlm.models.surgery import find_targets, get_module

    model = tiny_llama()
    ids = torch.randint(3, 99, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = model(input_ids=ids).logits
    targets = find_targets(model, conv1d=True)
    kept: dict = {}
    factorize(model, targets, {n: 2 for n in targets}, get_lm_method("svd"), token_batches(ids, 4), mode="none",
              keep_dense=kept)
    assert set(kept) == set(targets)
    student_modules = {n: get_module(model, n) for n in targets}
    with torch.no_grad():
        student_logits = model(input_ids=ids).logits
    teacher = DenseTeacher(model, kept)
    t_logits = teacher(input_ids=ids).logits
    torch.testing.assert_close(t_logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(student_logits, dense_logits, atol=1e-3)
    assert all(get_module(model, n) is m for n, m in student_modules.items())  # the factors are back
    # the teacher holds no parameters of its own: the model's weights exist once
    assert list(teacher.parameters()) == []


# ------------------------------------------------------------------------ bugs the review found
def test_too_short_eval_text_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from factorlm.api import compress
    from factorlm.lm import load as lm_load

    src = _src(tmp_path)
    cal, ev = tmp_path / "cal.txt", tmp_path / "short.txt"
    cal.write_text(TEXT)
    ev.write_text("too short")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the text was checked")

    monkeypatch.setattr(lm_load, "load_causal_lm", no_load)
    with pytest.raises(FactorLMError, match=r"needs at least 257 "):
        compress(_cfg(src, cal, ev, tmp_path / "o"), quiet=True)
    assert not (tmp_path / "o").exists()


def test_global_fisher_plan_for_plain_svd_gets_calibration_batches(tmp_path, texts):
    """``--method svd --rank-policy global --global-score fisher`` needs gradients on calibration text;
    before, svd loaded none and the Fisher plan collapsed every matrix to rank 1."""
    from factorlm.api import compress

    src = _src(tmp_path)
    rep = compress(_cfg(src, *texts, tmp_path / "o", method="svd", keep=0.5, rank_policy="global",
                        global_score="fisher"), quiet=True, save=False)
    ranks = rep.info["ranks"]
    assert len(set(ranks.values())) > 1 and max(ranks.values()) > 1
    assert "calibration" in rep.info["text"]


def test_fisher_plan_refuses_without_batches():
    from factorlm.lm.plan import spectra

    model = tiny_llama()
    with pytest.raises(FactorLMError, match="calibration"):
        spectra(model, ["model.layers.0.mlp.up_proj"], None, [], lambda m: None, "fisher")


def test_greedy_sample_drops_token_type_ids():
    """A tokenizer that returns ``token_type_ids`` (BERT-style) must not break the sample: decoder
    models' ``generate`` rejects them."""
    from factorlm.lm.evaluate import greedy_sample

    class Tok:
        pad_token_id, eos_token_id = 2, 2

        def __call__(self, text, return_tensors):
            ids = torch.tensor([[5, 6, 7]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

        def decode(self, ids, skip_special_tokens):
            return " ".join(str(int(i)) for i in ids)

    text = greedy_sample(tiny_llama(), Tok(), new_tokens=3)
    assert len(text.split()) == 3


def test_fused_expert_weights_are_refused():
    """A 3-D fused MoE weight (experts x out x in) is not a Linear: refused by name, not silently skipped."""
    from torch import nn

    from factorlm.lm.pipeline import check_targets

    model = tiny_llama()
    model.model.layers[0].mlp.register_parameter("gate_up_proj", nn.Parameter(torch.zeros(4, 8, 32)))
    with pytest.raises(FactorLMError, match="gate_up_proj"):
        check_targets(model, ["model.layers.0.self_attn.q_proj"])


def test_latency_batch_and_seq_are_honoured(monkeypatch):
    from factorlm.lm import evaluate, speed as speedmod

    seen = {}

    def fake(models_, *, batch_size, prompt_len, new_tokens):
        seen.update(batch=batch_size, prompt=prompt_len)
        return {}

    monkeypatch.setattr(speedmod, "generation_speed", fake)
    evaluate.speed(None, RunConfig(task="lm", latency_batch=4, latency_seq=64), "dense")
    assert seen == {"batch": 4, "prompt": 64}
    evaluate.speed(None, RunConfig(task="lm"), "dense")
    assert seen == {"batch": 1, "prompt": 128}


def test_a_factorized_encoder_folder_is_not_taken_for_a_causal_lm(tmp_path):
    """The saved ``architectures`` survive the remote-code config, so --task lm still refuses a
    factorized classifier by its class (its model type alone, bert, has a causal-LM class)."""
    from conftest import tiny_bert
    from factorlm.layers.lowrank import LowRankLinear
    from factorlm.lm.load import load_causal_lm
    from factorlm.models.surgery import set_module

    model = tiny_bert()
    set_module(model, "bert.encoder.layer.0.attention.self.query", LowRankLinear(32, 32, 4))
    torch.nn.init.zeros_(model.bert.encoder.layer[0].attention.self.query.bias)
    out = tmp_path / "enc"
    models.save(model, out, tokenizer=char_tokenizer(), meta={"task": "sst2", "method": "svd"})
    with pytest.raises(FactorLMError, match="not a causal LM"):
        load_causal_lm(str(out))


# ------------------------------------------------------------------------ multimodal wrappers
def test_a_multimodal_wrapper_compresses_its_language_model_only(tmp_path, texts):
    """A ``...ForConditionalGeneration`` wrapper (Gemma-3 >= 4B, Llama-4, Qwen-VL) is compressed through its
    ``language_model``: every target sits in its decoder blocks, the vision tower and projector stay
    bit-identical, and the folder loads in plain transformers (trust_remote_code) to the same logits."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_gemma3_wrapper
    from factorlm.api import compress

    src = _src(tmp_path, make=tiny_gemma3_wrapper)
    (src / "preprocessor_config.json").write_text('{"image_processor_type": "SiglipImageProcessor"}\n')
    dense = tiny_gemma3_wrapper()
    out = tmp_path / "out"
    rep = compress(_cfg(src, *texts, out), quiet=True)
    # the processor's files travel with the folder (AutoProcessor needs them besides the tokenizer)
    assert (out / "preprocessor_config.json").read_text() == (src / "preprocessor_config.json").read_text()
    ranks = rep.info["ranks"]
    assert ranks and all(n.startswith("model.language_model.layers.") for n in ranks)
    assert len(ranks) == 2 * 7  # q k v o gate up down in both blocks
    sd, ref = rep.model.state_dict(), dense.state_dict()
    for k, v in ref.items():
        if not k.startswith("model.language_model.layers."):
            assert torch.equal(sd[k], v), k
    ids = torch.randint(3, 90, (1, 12), generator=torch.Generator().manual_seed(0))
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "Gemma3ForConditionalGeneration"
    torch.testing.assert_close(remote(input_ids=ids).logits, models.load(out)(input_ids=ids).logits, atol=0, rtol=0)
