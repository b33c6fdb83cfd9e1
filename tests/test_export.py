"""`factorlm export`: dense / hf / onnx exports of a saved factorized folder reload and match the
factorized model's logits within their stated tolerances; the ONNX graph keeps the factors; failures are
one-line errors that leave nothing behind."""

import argparse
import json
import sys

import pytest
import torch

from conftest import bert_targets, tiny_bert
from factorlm import models
from factorlm.errors import FactorLMError
from factorlm.factorize import factorize

pytestmark = pytest.mark.usefixtures("one_thread")

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from factorlm import export as ex  # noqa: E402

SEQ = 16  # verification batch length (keeps the tests fast)


def tiny_factorized(structure: str = "lowrank", vocab_size: int = 100, seed: int = 0):
    """The conftest tiny BERT (hidden 32, 2 layers), optionally with the real BERT vocabulary size, factorized."""
    model = tiny_bert(seed=seed)
    if vocab_size != model.config.vocab_size:
        from transformers import BertForSequenceClassification

        model.config.vocab_size = vocab_size
        torch.manual_seed(seed)
        model = BertForSequenceClassification(model.config).eval()
    knob = {"rank": 4} if structure == "lowrank" else {"nblocks": 2, "block_rank": 2}
    factorize(model, {n: dict(knob) for n in bert_targets(model)}, structure)
    return model.eval()


def dense_architecture_params(model) -> int:
    from transformers import BertForSequenceClassification

    return models.count_params(BertForSequenceClassification(model.config))


def batch(model, b=3, n=11, seed=7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (b, n), generator=g)
    mask = torch.ones_like(ids)
    mask[0, n // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.randint(0, 2, (b, n), generator=g)}


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def ort_logits(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return torch.from_numpy(sess.run(["logits"], {k: inputs[k].numpy() for k in names})[0])


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory, minilm_path):
    """A factorized tiny BERT with the real MiniLM tokenizer (vocab 30522), saved as a factorlm folder."""
    from transformers import AutoTokenizer

    model = tiny_factorized("lowrank", vocab_size=30522)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    root = tmp_path_factory.mktemp("export")
    src = models.save(model, root / "src", tokenizer=tok, meta={"method": "svd", "task": "sst2"})
    return root, src, model


@pytest.fixture(scope="module")
def exported(lowrank):
    root, src, _ = lowrank
    return {fmt: ex.export(str(src), fmt, str(root / fmt), quantize_int8=fmt == "onnx", seq_len=SEQ)
            for fmt in ("dense", "hf", "onnx")}


# -- dense ----------------------------------------------------------------------------------------------
def test_dense_reloads_with_factorlm_and_transformers(lowrank, exported):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, src, model = lowrank
    rep = exported["dense"]
    out = root / "dense"
    assert rep["format"] == "dense" and rep["output"] == str(out)
    assert rep["max_abs_diff"] <= rep["tolerance"] == pytest.approx(ex.FP32_RTOL)  # tiny logits: 1e-4 absolute
    assert rep["reload_bit_exact"] is True
    inputs = batch(model)
    ref = logits(model, inputs)
    loaded = models.load(out)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert torch.equal(logits(loaded, inputs), logits(hf, inputs))  # the same dense tensors either way
    assert (logits(hf, inputs) - ref).abs().max().item() <= ex.FP32_RTOL * max(1.0, ref.abs().max().item())
    # the dense architecture again: no factorized module, its parameter count
    assert not models.factorized_modules(loaded)
    assert json.loads((out / "factorlm.json").read_text())["modules"] == {}
    assert models.count_params(loaded) == rep["params_dense"] == dense_architecture_params(model)
    assert rep["params_factorized"] == models.count_params(model) < rep["params_dense"]
    assert any("size benefit" in n for n in rep["notes"])
    # tokenizer, provenance, files listed with their sizes
    assert AutoTokenizer.from_pretrained(str(out))("a b c")["input_ids"][0] == 101
    prov = json.loads((out / ex.EXPORT_JSON).read_text())
    assert prov["export"]["format"] == "dense" and prov["source_factorlm_json"]["method"] == "svd"
    assert rep["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert rep["size_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert not list(root.glob(".dense.*"))


# -- hf -------------------------------------------------------------------------------------------------
def test_hf_is_a_plain_transformers_folder(lowrank, exported):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root, _, model = lowrank
    rep, out = exported["hf"], root / "hf"
    assert not (out / "factorlm.json").exists() and (out / "README.md").is_file()
    with pytest.raises(FactorLMError, match="not a factorlm model folder"):
        models.load(out)
    hf = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    inputs = batch(model, b=2, n=9)
    ref = logits(model, inputs)
    diff = (logits(hf, inputs) - ref).abs().max().item()
    assert diff <= ex.FP32_RTOL * max(1.0, ref.abs().max().item())
    assert rep["max_abs_diff"] <= rep["tolerance"]
    assert models.count_params(hf) == dense_architecture_params(model)
    assert AutoTokenizer.from_pretrained(str(out)).vocab_size == 30522
    assert "AutoModelForSequenceClassification.from_pretrained" in (out / "README.md").read_text()
    assert json.loads((out / ex.EXPORT_JSON).read_text())["export"]["source"] == rep["source"]


# -- onnx -----------------------------------------------------------------------------------------------
def test_onnx_matches_torch_with_dynamic_axes(lowrank, exported):
    root, _, model = lowrank
    rep, out = exported["onnx"], root / "onnx"
    assert rep["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert "dynamo=False" in rep["exporter"] and rep["opset"] == ex.DEFAULT_OPSET
    assert rep["max_abs_diff"] <= rep["tolerance"] == pytest.approx(1e-4)
    for b, n in ((1, 5), (3, 11), (4, 23)):  # shapes other than the exported one
        inputs = batch(model, b, n, seed=b * n)
        ref = logits(model, inputs)
        got = ort_logits(out / "model.onnx", inputs)
        assert got.shape == (b, 2)
        assert (got - ref).abs().max().item() <= ex.FP32_RTOL * max(1.0, ref.abs().max().item())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "model.onnx"} <= set(rep["files"])
    assert rep["outputs"] == [o.name for o in onnx.load(str(out / "model.onnx")).graph.output] == ["logits"]


def test_onnx_graph_keeps_the_factors(lowrank, exported, tmp_path):
    root, _, model = lowrank
    n_fact = len(models.factorized_modules(model))
    stats = ex.onnx_graph_stats(root / "onnx" / "model.onnx")
    # the dense model exported the same way: one MatMul per linear where the factorized one has two
    dense = ex.export(str(root / "dense"), "onnx", str(tmp_path / "dense_onnx"), seq_len=SEQ)
    dense_stats = ex.onnx_graph_stats(tmp_path / "dense_onnx" / "model.onnx")
    assert stats["matmul_nodes"] == dense_stats["matmul_nodes"] + n_fact == exported["onnx"]["onnx_matmul_nodes"]
    # factor-shaped initializers (stored transposed: B^T (in, k), A^T (k, out))
    shapes = set(stats["initializer_shapes"])
    for name, m in models.factorized_modules(model).items():
        assert (m.in_features, 4) in shapes and (4, m.out_features) in shapes, name
    assert exported["onnx"]["factor_tensors_in_graph"] == f"{2 * n_fact}/{2 * n_fact}"
    assert stats["weight_elements"] < dense_stats["weight_elements"]
    assert (root / "onnx" / "model.onnx").stat().st_size < (tmp_path / "dense_onnx" / "model.onnx").stat().st_size
    assert dense["factorized_modules"] == 0


def test_onnx_int8_runs_and_reports_its_error(lowrank, exported):
    root, _, model = lowrank
    rep = exported["onnx"]
    q = root / "onnx" / ex.ONNX_INT8_NAME
    assert q.is_file() and ex.ONNX_INT8_NAME in rep["files"]
    assert rep["int8_tolerance"] == pytest.approx(ex.INT8_RTOL)  # tiny logits: the bound is 0.1 absolute
    assert 0 <= rep["int8_max_abs_diff"] < float("inf") and isinstance(rep["int8_within_tolerance"], bool)
    inputs = batch(model)
    assert ort_logits(q, inputs).shape == (3, 2)
    # int8 is a reported approximation: a large error is a note, never a failure
    assert "int8_argmax_agreement" in rep and any(ex.ONNX_INT8_NAME in n for n in rep["notes"])


# -- monarch --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["dense", "onnx"])
def test_monarch_exports(tmp_path, fmt):
    model = tiny_factorized("monarch")
    src = models.save(model, tmp_path / "src")  # no tokenizer: exported without one, with a note
    rep = ex.export(str(src), fmt, str(tmp_path / fmt), seq_len=SEQ)
    assert rep["max_abs_diff"] <= rep["tolerance"]
    assert any("no tokenizer" in n for n in rep["notes"])
    inputs = batch(model, 2, 13)
    ref = logits(model, inputs)
    tol = ex.FP32_RTOL * max(1.0, ref.abs().max().item())
    if fmt == "dense":
        loaded = models.load(tmp_path / fmt)
        assert (logits(loaded, inputs) - ref).abs().max().item() <= tol
        assert models.count_params(loaded) == dense_architecture_params(model)
    else:
        assert (ort_logits(tmp_path / fmt / "model.onnx", inputs) - ref).abs().max().item() <= tol
        # every L and R block tensor is stored as is (Monarch weights, not a dense W)
        assert rep["factor_tensors_in_graph"] == f"{2 * len(bert_targets(tiny_bert()))}/{2 * len(bert_targets(tiny_bert()))}"
        assert rep["onnx_weight_elements"] < rep["params_dense"]


# -- extractive QA (start / end logits) -----------------------------------------------------------------
QA_HEADS = ["start_logits", "end_logits"]


def qa_heads(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return {h: getattr(out, h) for h in QA_HEADS}


def assert_heads_close(got, ref):
    """Both heads, within the fp32 tolerance of the exporter (relative to the largest |logit| of either head)."""
    tol = ex.FP32_RTOL * max(1.0, *(r.abs().max().item() for r in ref.values()))
    for h in QA_HEADS:
        assert got[h].shape == ref[h].shape, h
        assert (torch.as_tensor(got[h]) - ref[h]).abs().max().item() <= tol, h


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    """A factorized tiny random BertForQuestionAnswering (the conftest tiny BERT's config), saved without a
    tokenizer and exported as dense, hf and onnx (+ int8)."""
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    model = BertForQuestionAnswering(tiny_bert().config).eval()
    factorize(model, {n: {"rank": 4} for n in bert_targets(model)}, "lowrank")
    root = tmp_path_factory.mktemp("export_qa")
    src = models.save(model.eval(), root / "src", meta={"method": "svd", "task": "squad"})
    reports = {fmt: ex.export(str(src), fmt, str(root / fmt), quantize_int8=fmt == "onnx", seq_len=SEQ)
               for fmt in ("dense", "hf", "onnx")}
    return root, model, reports


@pytest.mark.parametrize("fmt", ["dense", "hf", "onnx"])
def test_qa_exports_match_start_and_end_logits(qa, fmt):
    from transformers import AutoModelForQuestionAnswering

    root, model, reports = qa
    rep, out = reports[fmt], root / fmt
    assert rep["max_abs_diff"] <= rep["tolerance"] == pytest.approx(ex.FP32_RTOL)
    for b, n in ((1, 5), (3, 11)):  # shapes other than the exported one
        inputs = batch(model, b, n, seed=b + n)
        ref = qa_heads(model, inputs)
        if fmt == "onnx":
            sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
            arrays = sess.run(QA_HEADS, {k: v.numpy() for k, v in inputs.items()})
            got = dict(zip(QA_HEADS, map(torch.from_numpy, arrays)))
        else:
            hf = AutoModelForQuestionAnswering.from_pretrained(str(out)).eval()
            assert type(hf).__name__ == "BertForQuestionAnswering"
            got = qa_heads(hf, inputs)
            if fmt == "dense":  # factorlm.load gives the very same tensors
                loaded = qa_heads(models.load(out), inputs)
                assert all(torch.equal(loaded[h], got[h]) for h in QA_HEADS)
        assert got["start_logits"].shape == (b, n)
        assert_heads_close(got, ref)


def test_qa_onnx_has_start_and_end_outputs(qa):
    root, _, reports = qa
    rep = reports["onnx"]
    graph = onnx.load(str(root / "onnx" / "model.onnx")).graph
    assert [o.name for o in graph.output] == rep["outputs"] == QA_HEADS
    for o in graph.output:  # dynamic batch and sequence axes
        assert [d.dim_param for d in o.type.tensor_type.shape.dim] == ["batch", "sequence"]
    n_fact = len(models.factorized_modules(qa[1]))
    assert n_fact == 12 and rep["factor_tensors_in_graph"] == f"{2 * n_fact}/{2 * n_fact}"
    assert 0 <= rep["int8_max_abs_diff"] < float("inf") and 0 <= rep["int8_argmax_agreement"] <= 1
    readme = (root / "hf" / "README.md").read_text()
    assert "AutoModelForQuestionAnswering.from_pretrained" in readme and "SequenceClassification" not in readme
    assert "max |logits diff|" in ex.format_report(rep)


# -- errors and atomicity -------------------------------------------------------------------------------
def _one_line_error(match, *args, **kw):
    with pytest.raises(FactorLMError, match=match) as e:
        ex.export(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_errors_are_one_line(lowrank, tmp_path, monkeypatch):
    root, src, _ = lowrank
    _one_line_error("unknown export format 'tflite'", str(src), "tflite", str(tmp_path / "x"))
    _one_line_error("does not exist", str(tmp_path / "nope"), "dense", str(tmp_path / "x"))
    _one_line_error("not a factorlm model folder", str(root / "hf"), "dense", str(tmp_path / "x"))
    _one_line_error("--int8 applies to --format onnx only", str(src), "dense", str(tmp_path / "x"), quantize_int8=True)
    _one_line_error("must not be the input folder", str(src), "dense", str(src), overwrite=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    _one_line_error("already exists", str(src), "dense", str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    msg = _one_line_error("onnxruntime", str(src), "onnx", str(tmp_path / "x"))
    assert "pip install 'factorlm[onnx]'" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("fmt", ["dense", "hf", "onnx"])
def test_failed_verification_leaves_nothing(lowrank, tmp_path, monkeypatch, fmt):
    _, src, _ = lowrank

    def fail(what, diff, tol):
        raise FactorLMError(f"{what} logits differ (simulated)")

    monkeypatch.setattr(ex, "_check_within", fail)
    with pytest.raises(FactorLMError, match="simulated"):
        ex.export(str(src), fmt, str(tmp_path / "out"), seq_len=SEQ)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_failed_overwrite_keeps_the_old_folder(lowrank, tmp_path, monkeypatch):
    _, src, _ = lowrank
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    monkeypatch.setattr(ex, "_check_within", lambda *a: (_ for _ in ()).throw(FactorLMError("simulated")))
    with pytest.raises(FactorLMError):
        ex.export(str(src), "hf", str(tmp_path / "out"), overwrite=True, seq_len=SEQ)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "old.txt").read_text() == "old"


# -- CLI ------------------------------------------------------------------------------------------------
def _parser():
    p = argparse.ArgumentParser(prog="factorlm")
    sub = p.add_subparsers(dest="command")
    ex.add_parser(sub)
    return p


def test_cli_subcommand(lowrank, tmp_path, capsys):
    _, src, _ = lowrank
    p = _parser()
    args = p.parse_args(["export", str(src), "--format", "dense", "-o", str(tmp_path / "d"), "--seq-len", str(SEQ)])
    assert args.command == "export" and args.int8 is False and args.opset is None
    ex.run(args)
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "max |logits diff|" in out and "tolerance" in out and "ok" in out
    assert (tmp_path / "d" / "factorlm.json").is_file()
    args = p.parse_args(["export", str(src), "--format", "onnx", "-o", str(tmp_path / "o"), "--int8",
                         "--opset", "18", "--seq-len", "8", "--overwrite"])
    ex.run(args)
    out = capsys.readouterr().out
    assert "model_int8.onnx" in out and "opset 18" in out and "int8 max |logits diff|" in out
    for bad in (["export", str(src), "-o", "x"], ["export", str(src), "--format", "tflite", "-o", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    capsys.readouterr()


@pytest.mark.parametrize("fmt", ["dense", "hf"])
def test_gpt2_conv1d_exports_load_in_transformers(tmp_path, fmt):
    """GPT-2's Conv1D layers (weight stored (in, out)) come back as Conv1D, so the exported folder loads
    in plain ``AutoModelForCausalLM`` with the factorized model's logits (before: a shape error)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from conftest import char_tokenizer, tiny_gpt2
    from factorlm.lm import factorize as lm_factorize, get_lm_method
    from factorlm.models.surgery import find_targets

    model = tiny_gpt2()
    targets = find_targets(model, conv1d=True)
    lm_factorize(model, targets, {n: 4 for n in targets}, get_lm_method("svd"), [], mode="none")
    src = models.save(model, tmp_path / "src", tokenizer=char_tokenizer(), meta={"method": "svd", "task": "lm"})
    rep = ex.export(str(src), fmt, str(tmp_path / fmt), seq_len=SEQ)
    assert rep["max_abs_diff"] <= rep["tolerance"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / fmt)).eval()
    assert isinstance(hf.transformer.h[0].attn.c_attn, Conv1D) and isinstance(hf.transformer.h[1].mlp.c_proj, Conv1D)
    ids = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, hf(input_ids=ids).logits
    assert (got - ref).abs().max().item() <= ex.FP32_RTOL * max(1.0, ref.abs().max().item())
