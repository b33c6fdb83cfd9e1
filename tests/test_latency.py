"""Measured latency in reports: dense source vs compressed, same process, fp32 and native bf16."""

import copy
import json

import pytest
import torch

from factorlm.cli import main
from factorlm.factorize import factorize
from factorlm.models import densify
from factorlm.profiling import bf16_native, compare_latency

from conftest import bert_targets, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_latency_record_is_complete_and_consistent():
    dense = tiny_bert()
    comp = copy.deepcopy(dense)
    factorize(comp, {n: {"rank": 4} for n in bert_targets(comp)}, "lowrank")
    before = {k: v.clone() for k, v in comp.state_dict().items()}
    comp.train()
    lat = compare_latency({"dense": dense, "compressed": comp}, batch_size=3, seq_len=8, rounds=3, repeats=1)
    assert (lat["batch_size"], lat["seq_len"], lat["rounds"], lat["device"]) == (3, 8, 3, "cpu")
    assert list(lat["dtypes"]) == (["fp32", "bf16"] if bf16_native("cpu") else ["fp32"])
    for res in lat["dtypes"].values():
        for name in ("dense", "compressed"):
            r = res[name]
            assert 0 < r["min_ms"] <= r["median_ms"]
            assert r["sequences_per_s"] == pytest.approx(3 / r["median_ms"] * 1e3, rel=1e-2)
        assert res["speedup"]["compressed"] == pytest.approx(res["dense"]["median_ms"] / res["compressed"]["median_ms"], rel=1e-2)
    # the models are left as they were: weights, dtype and training mode
    assert comp.training and all(torch.equal(v, comp.state_dict()[k]) for k, v in before.items())
    assert all(p.dtype == torch.float32 for p in comp.parameters())


def test_densify_matches_the_factorized_logits():
    m = tiny_bert()
    factorize(m, {n: {"rank": 4} for n in bert_targets(m)}, "lowrank")
    d = densify(m)
    ids = torch.randint(0, 100, (2, 9))
    assert torch.allclose(m(input_ids=ids).logits, d(input_ids=ids).logits, atol=1e-6)
    assert all(type(mod) is torch.nn.Linear for n, mod in d.named_modules() if n in bert_targets(m))
    assert type(m.bert.encoder.layer[0].attention.self.query) is not torch.nn.Linear  # the original is untouched


@pytest.fixture
def csv_args(tmp_path, minilm_path):
    from transformers import AutoTokenizer, BertConfig, BertModel

    enc = tmp_path / "enc"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(enc)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(enc)
    rows = ["text,label"] + [f"good {i},pos" for i in range(20)] + [f"bad {i},neg" for i in range(20)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    return ["--model", enc, "--task", "csv", "--train-file", tmp_path / "train.csv", "--text-columns", "text",
            "--max-length", "16", "--max-steps", "1", "--cache-dir", tmp_path / "cache", "--method", "svd", "--keep", "0.5"]


def test_no_latency_skips_it_and_evaluate_measures_it(tmp_path, csv_args, capsys):
    assert main([str(a) for a in ["compress", *csv_args, "--no-latency", "--output", tmp_path / "a", "--quiet"]]) == 0
    assert json.loads((tmp_path / "a" / "factorlm.json").read_text())["latency"] == {}
    assert "latency (" not in capsys.readouterr().out
    assert main([str(a) for a in ["evaluate", tmp_path / "a", "--latency-batch", "4", "--latency-seq", "8"]]) == 0
    err = capsys.readouterr().err
    assert "latency (batch 4 x 8 tokens" in err and "fp32 " in err and "-> " in err


@pytest.mark.parametrize("with_latency", [True, False])
def test_report_png_draws_every_panel_it_has_data_for(with_latency, tmp_path):
    from matplotlib.image import imread

    from factorlm.plots import report_png

    meta = {"method": "svd", "task": "sst2", "recipe": {"keep": 0.25}, "task_spec": {"main_metric": "accuracy"},
            "scores": {"dense": {"accuracy": 0.9, "steps": 10}, "factorized": {"accuracy": 0.5}, "final": {"accuracy": 0.85}},
            "baseline": {"accuracy": 0.51}, "warnings": ["x"],
            "accounting": {"target_weights_before": 100, "target_weights_after": 25, "model_params_before": 200,
                           "model_params_after": 125},
            "flops_per_sequence": {"dense": 10, "final": 4}}
    if with_latency:
        meta["latency"] = {"batch_size": 32, "seq_len": 64, "flop_ratio": 2.5, "dtypes": {
            "fp32": {"dense": {"median_ms": 300.0}, "compressed": {"median_ms": 150.0}},
            "bf16": {"dense": {"median_ms": 80.0}, "compressed": {"median_ms": 60.0}}}}
    img = imread(report_png(meta, tmp_path / "r.png"))
    width = img.shape[1]
    assert width == pytest.approx((3 if with_latency else 2) * 4.6 * 110, abs=2)


def test_bf16_save_is_half_the_size_and_reloads_bit_exact(tmp_path, csv_args, capsys):
    import factorlm

    for dt, out in (("fp32", "f32"), ("bf16", "b16")):
        assert main([str(a) for a in ["compress", *csv_args, "--dtype", dt, "--no-latency", "--output",
                                      tmp_path / out, "--quiet"]]) == 0
    size = {o: (tmp_path / o / "model.safetensors").stat().st_size for o in ("f32", "b16")}
    assert size["b16"] == pytest.approx(size["f32"] / 2, rel=0.01)
    meta = json.loads((tmp_path / "b16" / "factorlm.json").read_text())
    assert meta["dtype"] == "bf16" and {"final_fp32", "final"} <= set(meta["scores"])
    m = factorlm.load(tmp_path / "b16")
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    ids = torch.randint(1000, 2000, (2, 8))
    again = factorlm.load(tmp_path / "b16")
    assert torch.equal(m(input_ids=ids).logits, again(input_ids=ids).logits)
    up = factorlm.load(tmp_path / "b16", dtype="fp32")
    assert all(p.dtype == torch.float32 for p in up.parameters())
    assert all(torch.equal(a.float(), b) for a, b in zip(m.state_dict().values(), up.state_dict().values()))
    # evaluate runs in the saved dtype unless told otherwise
    assert main(["evaluate", str(tmp_path / "b16"), "--no-latency"]) == 0
    assert "(bf16)" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "b16"), "--no-latency", "--dtype", "fp32"]) == 0
    assert "(fp32)" in capsys.readouterr().err


def test_skip_slow_from_the_cli_keeps_slow_matrices_dense_within_the_budget(tmp_path, csv_args, monkeypatch, capsys):
    from factorlm.ranks import speed

    monkeypatch.setattr(speed, "_CACHE", {})
    # square (attention) matrices 'slow': 2 ms factorized vs 1 ms dense; the FFN ones fast
    monkeypatch.setattr(speed, "measure_group", lambda dense, variants, x, **kw: (
        1.0, [2.0 if dense.out_features == dense.in_features else 0.5 for _ in variants]))
    out = tmp_path / "skip"
    # 1 layer: q,k,v,o 32x32 (4,096 weights) + FFN 64x32, 32x64 (4,096): keep 0.7 leaves the FFN 1,638
    assert main([str(a) for a in ["compress", *csv_args, "--keep", "0.7", "--skip-slow", "--no-latency",
                                  "--output", out]]) == 0
    err = capsys.readouterr().err
    assert "would not run faster factorized" in err and "--skip-slow" in err
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["modules"] and all(".attention." not in n for n in meta["modules"])  # attention kept dense
    assert meta["speed_check"]["skip_slow"] and len(meta["speed_check"]["kept_dense"]) == 4  # 1 layer x q,k,v,o
    acc = meta["accounting"]  # the matrices kept dense are still targets: counted on both sides
    assert acc["target_weights_before"] == 8192
    assert acc["target_weights_after"] == 4096 + 2 * 96 * 8 <= 0.7 * 8192  # rank floor(1638 / 192) = 8
    assert {m["rank"] for m in meta["modules"].values()} == {8}


def _slow_attention(monkeypatch):
    from factorlm.ranks import speed

    monkeypatch.setattr(speed, "_CACHE", {})
    monkeypatch.setattr(speed, "measure_group", lambda dense, variants, x, **kw: (
        1.0, [2.0 if dense.out_features == dense.in_features else 0.5 for _ in variants]))


def test_lpaf_skip_slow_keeps_the_unpruned_teacher_matrices(tmp_path, csv_args, monkeypatch, capsys):
    import factorlm

    _slow_attention(monkeypatch)
    out = tmp_path / "lpaf"
    args = [a if a != "svd" else "lpaf" for a in csv_args]
    assert main([str(a) for a in ["compress", *args, "--keep", "0.7", "--skip-slow", "--no-latency",
                                  "--importance", "magnitude", "--output", out, "--quiet"]]) == 0, capsys.readouterr().err
    m = factorlm.load(out)
    att = m.bert.encoder.layer[0].attention.self.query
    assert type(att) is torch.nn.Linear and (att.weight == 0).float().mean() < 0.01  # pruned to ~30% zeros otherwise
    assert json.loads((out / "factorlm.json").read_text())["speed_check"]["kept_dense"]


def test_skip_slow_refused_for_methods_without_a_plan(tmp_path, csv_args, capsys):
    args = [a if a != "svd" else "rankdyna" for a in csv_args]
    assert main([str(a) for a in ["compress", *args, "--skip-slow", "--output", tmp_path / "r"]]) == 2
    assert "--skip-slow applies to methods that factorize" in capsys.readouterr().err


def test_evaluate_json_carries_latency_and_bf16_saves_export(tmp_path, csv_args, capsys):
    from factorlm.export import export

    out = tmp_path / "b16"
    assert main([str(a) for a in ["compress", *csv_args, "--dtype", "bf16", "--no-latency", "--output", out, "--quiet"]]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--latency-batch", "2", "--latency-seq", "8"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["latency"]["batch_size"] == 2 and rep["latency"]["dtypes"]["fp32"]["compressed"]["median_ms"] > 0
    for fmt in ("dense", "onnx"):  # the reference is the fp32 cast of the bf16 weights
        r = export(str(out), fmt, str(tmp_path / fmt), seq_len=8)
        assert r["max_abs_diff"] <= r["tolerance"]
