"""CLI end to end on a tiny random BERT folder (fast), and every bad input's one-line error."""

import json

import pytest
import torch

from factorlm import load
from factorlm.cli import main

from conftest import tiny_bert


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_path):
    """A tiny random BERT with the real MiniLM tokenizer, saved as a plain HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    d = tmp_path_factory.mktemp("tiny") / "model"
    BertModel(cfg).save_pretrained(d)  # a pre-trained encoder without a task head, like the default
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    return d


@pytest.fixture
def csv_task(tmp_path):
    rows = ["text,label"] + [f"good great fine {i},pos" for i in range(40)] + [f"bad awful poor {i},neg" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:1] + rows[1:11] + rows[41:51]) + "\n")
    return tmp_path


def run(argv, capsys):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.mark.parametrize("method", ["svd", "fwsvd"])
def test_compress_save_info_evaluate(method, tiny_dir, csv_task, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--task", "csv", "--train-file", csv_task / "train.csv", "--dev-file", csv_task / "dev.csv",
              "--text-columns", "text", "--label-column", "label", "--max-length", "16", "--quiet",
              "--cache-dir", tmp_path / "cache"]
    code, stdout, err = run(["compress", "--model", tiny_dir, "--method", method, "--keep", "0.5", "--max-steps", "3",
                             "--output", out, *common, *(["--fisher-batches", "2"] if method == "fwsvd" else [])], capsys)
    assert code == 0, err
    assert "saved to" in stdout
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["method"] == method and meta["task"] == "csv"
    assert len(meta["modules"]) == 12 and {m["rank"] for m in meta["modules"].values()} == {9}  # floor(0.5 * 8192 / 448)
    assert meta["recipe"]["keep"] == 0.5 and meta["recipe"]["seed"] == 0
    assert set(meta["scores"]) >= {"dense", "factorized", "finetune", "final"}
    assert meta["accounting"]["target_weights_after"] <= 0.5 * meta["accounting"]["target_weights_before"]
    # the dense teacher was cached and is reused
    assert len(list((tmp_path / "cache" / "teachers").iterdir())) == 1
    model = load(out)
    ids = torch.randint(0, 30522, (2, 8))
    assert model(input_ids=ids).logits.shape == (2, 2)
    code, stdout, err = run(["info", out], capsys)
    assert code == 0 and "all layers: 9" in stdout and method in stdout and len(stdout.splitlines()) < 45
    # measured latency: dense source vs compressed, same process, in the report and in factorlm.json
    lat = meta["latency"]
    assert lat["batch_size"] == 32 and lat["seq_len"] == 16 and lat["flop_ratio"] > 1
    for res in lat["dtypes"].values():
        assert res["dense"]["median_ms"] > 0 and res["compressed"]["median_ms"] > 0 and res["speedup"]["compressed"] > 0
    assert "latency (batch 32 x 16 tokens" in stdout
    png = (out / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    # evaluate needs no flags: the saved recipe names the files, columns and max length, and the
    # recorded label spec means only the dev file is read (the train file may be gone)
    (csv_task / "train.csv").unlink()
    code, stdout, err = run(["evaluate", out], capsys)
    assert code == 0, err
    assert abs(json.loads(stdout)["accuracy"] - meta["scores"]["final"]["accuracy"]) < 1e-9
    assert "dev 20 examples" in err
    # a flag overrides the recorded setting
    code, stdout, err = run(["evaluate", out, "--max-eval-samples", "4"], capsys)
    assert code == 0 and "dev 4 examples" in err


def test_compress_with_per_matrix_ranks(tiny_dir, csv_task, tmp_path, capsys):
    """--ranks FILE: each matrix gets its own rank (the best rank-k fit of the teacher's, checked
    against an independent SVD), ranks past break-even stay dense and untouched, the accounting is
    exact, and the allocation is recorded; a stale file fails before anything trains."""
    from torch import nn

    from factorlm.models.surgery import get_module

    names = [f"bert.encoder.layer.{l}.{m}" for l in range(2) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")]
    ranks = dict(zip(names, [1, 5, 16, 9, 21, 2, 32, 3, 4, 8, 22, 1]))  # 16/32 square, 22 FFN: past break-even
    dense = [names[2], names[6], names[10]]
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"ranks": ranks, "score": 0.5}))  # a protocol run JSON's layout
    out = tmp_path / "out"
    common = ["--task", "csv", "--train-file", csv_task / "train.csv", "--dev-file", csv_task / "dev.csv",
              "--text-columns", "text", "--label-column", "label", "--max-length", "16", "--quiet",
              "--cache-dir", tmp_path / "cache", "--no-latency"]
    code, stdout, err = run(["compress", "--model", tiny_dir, "--method", "svd", "--ranks", path, "--finetune", "false",
                             "--max-steps", "2", "--output", out, *common], capsys)
    assert code == 0, err
    meta = json.loads((out / "factorlm.json").read_text())
    assert {n: m["rank"] for n, m in meta["modules"].items()} == {n: k for n, k in ranks.items() if n not in dense}
    shapes = {n: (64, 32) if "intermediate" in n else (32, 64) if "output.dense" in n and "attention" not in n
              else (32, 32) for n in names}
    acc = meta["accounting"]
    assert acc["target_weights_before"] == 8 * 1024 + 4 * 2048
    assert acc["target_weights_after"] == sum(o * i if n in dense else ranks[n] * (o + i) for n, (o, i) in shapes.items())
    assert meta["recipe"]["ranks"] == str(path) and meta["method_info"]["ranks"] == ranks
    assert meta["method_info"]["dense"] == dense
    model, (teacher_dir,) = load(out), list((tmp_path / "cache" / "teachers").iterdir())
    teacher = load(teacher_dir)
    for n in names:
        W = get_module(teacher, n).weight.detach().double()
        m = get_module(model, n)
        if n in dense:
            assert type(m) is nn.Linear and torch.equal(m.weight, get_module(teacher, n).weight)
            continue
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        k = ranks[n]
        best = (U[:, :k] * S[:k]) @ Vh[:k]  # Eckart-Young: the optimal rank-k fit
        assert torch.allclose(m.to_dense().double(), best, atol=1e-5), n
    # lpaf: the matrices kept dense get the teacher's unpruned weights back, the others are factorized
    code, _, err = run(["compress", "--model", tiny_dir, "--method", "lpaf", "--ranks", path, "--finetune", "false",
                        "--max-steps", "2", "--output", tmp_path / "lpaf", *common], capsys)
    assert code == 0, err
    lpaf, lmeta = load(tmp_path / "lpaf"), json.loads((tmp_path / "lpaf" / "factorlm.json").read_text())
    assert {n: m["rank"] for n, m in lmeta["modules"].items()} == {n: k for n, k in ranks.items() if n not in dense}
    assert lmeta["accounting"]["target_weights_after"] == acc["target_weights_after"]
    for n in dense:
        assert type(get_module(lpaf, n)) is nn.Linear and torch.equal(get_module(lpaf, n).weight, get_module(teacher, n).weight)
    # the saved model's own factorlm.json is a --ranks file too; a stale name fails before any training
    meta["method_info"]["ranks"]["bert.encoder.layer.9.output.dense"] = 4
    (tmp_path / "stale.json").write_text(json.dumps(meta))
    code, _, err = run(["compress", "--model", tiny_dir, "--method", "svd", "--ranks", tmp_path / "stale.json",
                        "--output", tmp_path / "o2", *common[:-3], "--cache-dir", tmp_path / "cache2"], capsys)
    assert code == 2 and "layer.9.output.dense" in err and err.count("\n") == 1
    assert not (tmp_path / "cache2").exists() and not (tmp_path / "o2").exists()
    code, _, err = run(["compress", "--model", tiny_dir, "--method", "rankdyna", "--ranks", path,
                        "--output", tmp_path / "o3", *common], capsys)
    assert code == 2 and "--ranks applies to methods that factorize with a rank plan" in err


BAD = [
    (["compress", "--keep", "1.5"], "--keep must be in (0, 1]"),
    (["compress", "--keep", "0"], "--keep must be in (0, 1]"),
    (["compress", "--rank", "0"], "--rank must be a positive integer"),
    (["compress", "--ranks", "/no/such.json"], "--ranks: no such file: /no/such.json"),
    (["compress", "--ranks", "/no/such.json", "--rank", "4"], "give --ranks or --rank, not both"),
    (["compress", "--method", "nope"], "unknown method 'nope'"),
    (["compress", "--task", "nope"], "unknown task 'nope'"),
    (["compress", "--structure", "nope"], "unknown structure 'nope'"),
    (["compress", "--model", "/no/such/dir"], "model path does not exist"),
    (["compress", "--task", "csv", "--train-file", "/no/such.csv"], "/no/such.csv"),
    (["compress", "--method", "svd", "--fisher-batches", "2"], "has no option 'fisher_batches'"),
    (["compress", "--recipe", "/no/recipe.yaml"], "recipe file not found"),
    (["compress", "--method", "lpaf", "--schedule", "staged"], "does not support --schedule staged"),
    (["compress", "--method", "lpaf", "--p-init", "2"], "--p-init must be in [0, 1]"),
    (["compress", "--method", "lpaf", "--decomposition", "row", "--solver", "als"], "only apply with --decomposition em"),
    (["compress", "--method", "lpaf", "--decomposition", "svd", "--em-iters", "5"], "only apply with --decomposition em"),
    (["compress", "--method", "prune", "--prune-warmup", "0.7", "--prune-cooldown", "0.5"], "summing to < 1"),
    (["info", "/no/such/dir"], "does not exist"),
    (["evaluate", "/no/such/dir"], "does not exist"),
]


@pytest.mark.parametrize("argv,message", BAD)
def test_bad_input_one_line_error(argv, message, tmp_path, capsys):
    code, stdout, err = run([*argv, *(["--output", tmp_path / "o"] if argv[0] == "compress" else [])], capsys)
    assert code == 2
    assert message in err
    assert err.startswith("factorlm: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_rank_too_large_fails_before_training(tiny_dir, tmp_path, csv_task, capsys):
    code, _, err = run(["compress", "--model", tiny_dir, "--rank", "33", "--task", "csv", "--train-file",
                        csv_task / "train.csv", "--text-columns", "text", "--label-column", "label",
                        "--cache-dir", tmp_path / "cache", "--output", tmp_path / "o", "--quiet"], capsys)
    assert code == 2 and "larger than the maximum 32" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("hi")
    code, _, err = run(["compress", "--model", tmp_path / "junk", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "not a factorlm or Hugging Face model folder" in err


def test_existing_output_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "mine.txt").write_text("keep me")
    code, _, err = run(["compress", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "already exists" in err
    assert (tmp_path / "o" / "mine.txt").read_text() == "keep me"


def test_nonfinite_model_rejected(tmp_path, capsys, minilm_path):
    from transformers import AutoTokenizer

    m = tiny_bert()
    with torch.no_grad():
        m.bert.encoder.layer[0].attention.self.query.weight[0, 0] = float("inf")
    m.config.vocab_size = 100
    m.save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path / "m")
    code, _, err = run(["compress", "--model", tmp_path / "m", "--output", tmp_path / "o"], capsys)
    assert code == 2 and "non-finite" in err


VARIANTS = [
    ("lpaf", []),
    ("lpaf", ["--prune", "false"]),
    ("lpaf", ["--decomposition", "svd", "--mixed-rank", "false"]),
    ("lpaf", ["--importance", "magnitude", "--consistency", "0", "--omega", "mask", "--decomposition", "row"]),
    ("lpaf", ["--finetune", "false"]),
    ("prune", ["--density", "0.3"]),  # the default criterion, PLATON: one global threshold
    ("prune", ["--density", "0.3", "--importance", "movement"]),  # top-k per matrix
    ("rankdyna", []),
    ("rankdyna", ["--budget-unit", "weights", "--masking", "mask"]),
    ("svd", ["--structure", "monarch", "--nblocks", "4"]),
    ("svd", ["--structure", "blockwise", "--schedule", "staged"]),
    ("fwsvd", ["--schedule", "staged", "--stages", "1", "--rank-policy", "global", "--fisher-batches", "2"]),
]


@pytest.mark.parametrize("method,extra", VARIANTS, ids=[f"{m}{''.join(e)}" for m, e in VARIANTS])
def test_every_method_runs_and_reloads(method, extra, tiny_dir, csv_task, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = run(["compress", "--model", tiny_dir, "--method", method, "--keep", "0.5", "--max-steps", "3",
                             "--task", "csv", "--train-file", csv_task / "train.csv", "--dev-file", csv_task / "dev.csv",
                             "--text-columns", "text", "--label-column", "label", "--max-length", "16", "--quiet",
                             "--cache-dir", tmp_path / "cache", "--output", out, *extra], capsys)
    assert code == 0, err
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["method"] == method
    model = load(out)
    ids = torch.randint(0, 30522, (2, 8))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    acc = meta["accounting"]
    if method == "rankdyna" and "weights" not in extra:  # AdaLoRA's budget: triplets, not weights
        assert sum(meta["method_info"]["ranks"].values()) == 12 * 9  # the uniform plan's rank total at keep 0.5
    else:
        assert acc["target_weights_after"] <= 0.5 * acc["target_weights_before"] + 1
    if method == "prune":
        assert (out / "pruning.safetensors").is_file() and not meta["modules"]
        nz = sum(int((p != 0).sum()) for n, p in model.named_parameters() if n.endswith("weight") and ".encoder." in n
                 and "LayerNorm" not in n)
        if "movement" in extra:
            want = 2 * (4 * round(0.3 * 32 * 32) + 2 * round(0.3 * 32 * 64))  # exact top-k per matrix
        else:
            want = round(0.3 * 2 * (4 * 32 * 32 + 2 * 32 * 64))  # exact top-k over all targets at once
        assert nz == acc["target_weights_after"] == want
    elif method == "rankdyna":  # a matrix that kept a rank past break-even is stored dense
        dense = meta["method_info"]["dense"]
        assert len(meta["modules"]) + len(dense) == 12 and not set(dense) & set(meta["modules"])
    else:
        assert len(meta["modules"]) == 12
    if "--schedule" in extra:
        assert any(k.startswith("stage") for k in meta["scores"])
    if method == "rankdyna":
        assert (out / "rankdyna" / "ranks.png").stat().st_size > 0
        assert "dense" not in meta["scores"]  # starts from the pre-trained model: no teacher
    if "--rank-policy" in extra:
        assert len({m["rank"] for m in meta["modules"].values()}) > 1  # non-uniform


def test_lpaf_reuses_a_saved_pruned_model(tiny_dir, csv_task, tmp_path, capsys):
    common = ["--model", tiny_dir, "--max-steps", "3", "--task", "csv", "--train-file", csv_task / "train.csv",
              "--text-columns", "text", "--label-column", "label", "--max-length", "16", "--quiet",
              "--cache-dir", tmp_path / "cache"]
    code, _, err = run(["compress", "--method", "lpaf", "--keep", "0.5", "--save-pruned", tmp_path / "pruned",
                        "--output", tmp_path / "a", *common], capsys)
    assert code == 0, err
    assert (tmp_path / "pruned" / "pruning.safetensors").is_file()
    for keep in ("0.5", "0.25"):
        code, _, err = run(["compress", "--method", "lpaf", "--keep", keep, "--pruned-model", tmp_path / "pruned",
                            "--output", tmp_path / f"b{keep}", *common], capsys)
        assert code == 0, err
        meta = json.loads((tmp_path / f"b{keep}" / "factorlm.json").read_text())
        assert "prune" not in meta["scores"] and "pruned" in meta["scores"]
    code, _, err = run(["compress", "--method", "lpaf", "--pruned-model", tiny_dir, "--output", tmp_path / "c", *common], capsys)
    assert code == 2 and "not a factorlm model folder" in err


@pytest.mark.parametrize("structure,schedule", [("monarch", "oneshot"), ("blockwise", "staged")])
def test_weighted_decomposition_with_block_structures(structure, schedule, tiny_dir, csv_task, tmp_path, capsys):
    """FWSVD with a block structure: each block gets its Fisher-weighted fit; the saved model reloads."""
    from factorlm import models
    from factorlm.layers import STRUCTURES

    out = tmp_path / "o"
    code, _, err = run(["compress", "--model", tiny_dir, "--method", "fwsvd", "--structure", structure, "--max-steps", "2",
                        "--keep", "0.5", "--task", "csv", "--train-file", csv_task / "train.csv", "--text-columns", "text",
                        "--label-column", "label", "--quiet", "--cache-dir", tmp_path / "cache", "--output", out,
                        "--fisher-batches", "1", "--schedule", schedule, "--stages", "2"], capsys)
    assert code == 0, err
    model = models.load(out)
    kinds = {type(m) for m in model.modules()}
    assert STRUCTURES.get(structure) in kinds


def _csv_args(csv_task, tmp_path, cache="cache"):
    return ["--task", "csv", "--train-file", csv_task / "train.csv", "--dev-file", csv_task / "dev.csv",
            "--text-columns", "text", "--label-column", "label", "--max-length", "16", "--quiet",
            "--cache-dir", tmp_path / cache]


def test_seed_controls_every_source_of_randomness(tiny_dir, csv_task, tmp_path, capsys):
    """Same seed -> bit-identical scores and weights (head init, data order, dropout, pruning, mixed-rank
    draws); another seed -> different.  Fresh caches, so the dense teacher (and its head) is rebuilt."""
    from safetensors.torch import load_file

    def once(seed, name):
        out = tmp_path / name
        code, _, err = run(["compress", "--model", tiny_dir, "--method", "lpaf", "--keep", "0.5", "--max-steps", "4",
                            "--seed", seed, "--output", out, *_csv_args(csv_task, tmp_path, f"cache-{name}")], capsys)
        assert code == 0, err
        meta = json.loads((out / "factorlm.json").read_text())
        return meta["scores"], load_file(str(out / "model.safetensors"))

    (s1, w1), (s2, w2), (s3, w3) = once(0, "a"), once(0, "b"), once(1, "c")
    assert s1 == s2 and w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)
    assert not torch.equal(w1["classifier.weight"], w3["classifier.weight"])


def test_lpaf_factors_depend_on_the_given_masks_and_scores(tiny_dir, csv_task, tmp_path, capsys):
    """Step 2 really uses the pruning result: same file -> identical factors; changed scores (w/ S) or an
    enlarged mask (w/ M) -> different factors."""
    import shutil

    from safetensors.torch import load_file, save_file

    common = ["--model", tiny_dir, "--keep", "0.5", "--max-steps", "3", *_csv_args(csv_task, tmp_path)]
    code, _, err = run(["compress", "--method", "prune", "--output", tmp_path / "pruned", *common], capsys)
    assert code == 0, err

    def factors(pruned, name, *extra):
        out = tmp_path / name
        code, _, err = run(["compress", "--method", "lpaf", "--pruned-model", pruned, "--finetune", "false",
                            "--output", out, *common, *extra], capsys)
        assert code == 0, err
        return load_file(str(out / "model.safetensors"))

    def edited(name, fn):
        d = tmp_path / name
        shutil.copytree(tmp_path / "pruned", d)
        t = load_file(str(d / "pruning.safetensors"))
        fn(t)
        save_file(t, str(d / "pruning.safetensors"), metadata={"format": "factorlm-pruning", "density": "0.5"})
        return d

    def differ(a, b):
        return any(not torch.equal(a[k], b[k]) for k in a if ".encoder." in k)

    base = factors(tmp_path / "pruned", "f0")
    assert not differ(base, factors(tmp_path / "pruned", "f1"))
    key = next(k for k in load_file(str(tmp_path / "pruned" / "pruning.safetensors")) if k.startswith("score/"))
    shuffled = edited("p_scores", lambda t: t.__setitem__(key, t[key].flip(0).contiguous()))
    assert differ(base, factors(shuffled, "f2"))
    mkey = "mask/" + key[len("score/"):]
    grown = edited("p_mask", lambda t: t.__setitem__(mkey, torch.ones_like(t[mkey])))
    assert differ(factors(tmp_path / "pruned", "f3", "--omega", "mask"), factors(grown, "f4", "--omega", "mask"))


def _spy_distillation(monkeypatch) -> dict:
    """phase -> the DistillationCallbacks of its last ``Session.finetune`` call (the run still happens)."""
    from factorlm.session import Session
    from factorlm.train import DistillationCallback

    seen: dict[str, list] = {}
    orig = Session.finetune

    def spy(self, model, *, phase, callbacks=(), **kw):
        out = orig(self, model, phase=phase, callbacks=callbacks, **kw)
        seen[phase] = [c for c in callbacks if isinstance(c, DistillationCallback)]
        return out

    monkeypatch.setattr(Session, "finetune", spy)
    return seen


@pytest.mark.parametrize("method", ["svd", "fwsvd", "lpaf"])
def test_finetune_distill_reads_the_dense_teacher(method, tiny_dir, csv_task, tmp_path, capsys, monkeypatch):
    """--finetune-distill A: the fine-tune of the factorized model gets one distillation term whose
    teacher is the dense teacher (no factorized layer, its exact weights, unpruned for LPAF) and which
    really runs; without the flag that phase has none (LPAF's step-1 distillation is separate)."""
    from factorlm import models
    from factorlm.layers.base import FactorizedLinear

    seen = _spy_distillation(monkeypatch)
    common = ["--model", tiny_dir, "--method", method, "--keep", "0.5", "--max-steps", "2", "--no-latency",
              *_csv_args(csv_task, tmp_path), *(["--fisher-batches", "1"] if method == "fwsvd" else [])]
    code, _, err = run(["compress", *common, "--output", tmp_path / "plain"], capsys)
    assert code == 0, err
    assert seen["finetune"] == []
    code, _, err = run(["compress", *common, "--finetune-distill", "0.5", "--output", tmp_path / "kd"], capsys)
    assert code == 0, err
    (kd,) = seen["finetune"]
    assert kd.alpha == 0.5 and kd.teacher_examples + kd.cached_examples > 0
    assert not any(isinstance(m, FactorizedLinear) for m in kd.teacher.modules())
    (cache,) = (tmp_path / "cache" / "teachers").iterdir()
    dense = models.load(cache).state_dict()
    got = kd.teacher.state_dict()
    assert got.keys() == dense.keys() and all(torch.equal(got[k], dense[k]) for k in dense)
    code, _, err = run(["compress", *common, "--finetune-distill", "-1", "--output", tmp_path / "bad"], capsys)
    assert code == 2 and "--finetune-distill must be >= 0" in err and not (tmp_path / "bad").exists()


def test_lpaf_finetune_distill_from_a_saved_pruning_reads_the_unpruned_teacher(tiny_dir, csv_task, tmp_path, capsys,
                                                                               monkeypatch):
    """With --pruned-model the model is overwritten by the pruned weights before step 2: the step-3
    teacher must still be the dense teacher (no zeroed entries), not the pruned model."""
    from factorlm import models

    seen = _spy_distillation(monkeypatch)
    common = ["--model", tiny_dir, "--method", "lpaf", "--keep", "0.5", "--max-steps", "2", "--no-latency",
              *_csv_args(csv_task, tmp_path)]
    code, _, err = run(["compress", *common, "--save-pruned", tmp_path / "pruned", "--output", tmp_path / "a"], capsys)
    assert code == 0, err
    code, _, err = run(["compress", *common, "--pruned-model", tmp_path / "pruned", "--finetune-distill", "1",
                        "--output", tmp_path / "b"], capsys)
    assert code == 0, err
    (kd,) = seen["finetune"]
    (cache,) = (tmp_path / "cache" / "teachers").iterdir()
    dense, pruned = models.load(cache).state_dict(), models.load(tmp_path / "pruned").state_dict()
    got = kd.teacher.state_dict()
    key = next(k for k in dense if k.endswith("attention.self.query.weight"))
    assert (pruned[key] == 0).float().mean() > 0.3  # the saved pruning really zeroed entries
    assert all(torch.equal(got[k], dense[k]) for k in dense)
