"""A tool you can trust on a long run: fail fast, honest summaries, selection on held-out data.

Each test forces the fault it is about (an unwritable output, a collapsed or diverging run, a phase
that makes the model worse) and checks that it is caught early or reported, not passed off as an
ordinary score.
"""

import json

import numpy as np
import pytest
import torch

from factorlm import RunConfig
from factorlm.cli import main
from factorlm.data import get_task, load_task_data, selection_count, split_off
from factorlm.session import Session
from factorlm.train import Callback

pytestmark = pytest.mark.usefixtures("one_thread")


def run(argv, capsys):
    capsys.readouterr()  # drop what fixtures printed (e.g. transformers' progress bars)
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


@pytest.fixture(scope="module")
def tok_path(minilm_path):
    return minilm_path


def _classifier_dir(root, minilm_path, bias=(0.0, 0.0), name="clf"):
    """A tiny BERT classifier (MiniLM tokenizer) whose head ignores the input: zero weights, ``bias``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(bias))
    d = root / name
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    return d


@pytest.fixture
def csv_task(tmp_path):
    """60 'pos' / 40 'neg' training rows, a balanced dev file."""
    rows = ["text,label"] + [f"good great fine {i},pos" for i in range(60)] + [f"bad awful poor {i},neg" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    dev = ["text,label"] + [f"good nice {i},pos" for i in range(10)] + [f"bad awful {i},neg" for i in range(10)]
    (tmp_path / "dev.csv").write_text("\n".join(dev) + "\n")
    return ["--task", "csv", "--train-file", tmp_path / "train.csv", "--dev-file", tmp_path / "dev.csv",
            "--text-columns", "text", "--label-column", "label", "--max-length", "16"]


# -- fail fast ------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["under_a_file", "virtual_fs"])
def test_unwritable_output_fails_before_any_training(where, tmp_path, minilm_path, csv_task, capsys, monkeypatch):
    import factorlm.api

    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run" if where == "under_a_file" else "/proc/factorlm-test/run"
    model = _classifier_dir(tmp_path, minilm_path)
    loaded = []  # the check comes before the model is even loaded (so before any training)
    monkeypatch.setattr(factorlm.api, "load_model_for_task", lambda *a, **k: loaded.append(a) or 1 / 0)
    code, _, err = run(["compress", "--model", model, "--method", "svd",
                        "--max-steps", "50", "--output", out, *csv_task], capsys)
    assert not loaded
    assert code == 2
    assert err.startswith("factorlm: error: cannot write the output folder") and err.count("\n") == 1
    assert "training" not in err and "Traceback" not in err


@pytest.mark.parametrize("exc,line", [
    (OSError(28, "No space left on device", "/data/run/model.safetensors"),
     "No space left on device: /data/run/model.safetensors"),
    (FileNotFoundError("Couldn't find\n a file"), "Couldn't find a file"),  # no strerror: the message itself
])
def test_os_error_anywhere_is_one_line(exc, line, monkeypatch, capsys):
    from factorlm import api

    def fail(*a, **k):
        raise exc

    monkeypatch.setattr(api, "compress", fail)
    code, out, err = run(["compress", "--method", "svd"], capsys)
    assert code == 1
    assert err == f"factorlm: error: {line}\n"


# -- held-out selection ---------------------------------------------------------------------------
def test_selection_slice_is_held_out_seeded_and_stratified():
    task = get_task("rotten_tomatoes")
    full = load_task_data(task, selection_size=0)
    d = load_task_data(task, selection_size=0.1, seed=3)
    n = len(full.train)
    assert len(d.select) == selection_count(n, 0.1) == round(0.1 * n)
    assert len(d.train) + len(d.select) == n
    key = lambda e: (e.text_a, e.label)  # noqa: E731
    assert not {key(e) for e in d.select} & {key(e) for e in d.train}
    assert not {key(e) for e in d.select} & {key(e) for e in d.evals["dev"]}
    # stratified: the class shares of the slice are those of the training split (largest remainder)
    share = np.mean([e.label for e in full.train])
    assert abs(np.mean([e.label for e in d.select]) - share) < 1 / len(d.select) + 1e-9
    # seeded: same seed, same slice; another seed, another slice
    assert load_task_data(task, selection_size=0.1, seed=3).select == d.select
    assert load_task_data(task, selection_size=0.1, seed=4).select != d.select
    # a count, the cap on fractions, and max_train_samples applied to what is left
    assert len(load_task_data(task, selection_size=300).select) == 300
    assert selection_count(100_000, 0.5) == 2000 and selection_count(50, 0.99) == 49
    # a capped run holds out 10% of the data it uses: 900 trained on -> 100 held out
    small = load_task_data(task, selection_size=0.1, seed=3, max_train_samples=900)
    assert len(small.select) == 100 and len(small.train) == 900
    assert not {key(e) for e in small.select} & {key(e) for e in small.train}


def test_split_off_partitions_exactly():
    from factorlm.data import Example

    ex = [Example(f"t{i}", None, i % 3) for i in range(31)]
    rest, held = split_off(ex, 7, seed=1)
    assert len(held) == 7 and sorted(rest + held, key=lambda e: e.text_a) == sorted(ex, key=lambda e: e.text_a)
    assert [e for e in ex if e in rest] == rest  # original order kept


def test_keep_best_selects_on_held_out_training_data_not_dev(tmp_path, minilm_path, csv_task):
    cfg = RunConfig(model=str(_classifier_dir(tmp_path, minilm_path)), task="csv", train_file=str(tmp_path / "train.csv"),
                    dev_file=str(tmp_path / "dev.csv"), text_columns=["text"], label_column="label", max_length=16,
                    max_steps=4, eval_every=2, selection_size=20, progress=False)
    s = Session(cfg, quiet=True)
    from factorlm.api import load_model_for_task

    model, s.tokenizer, _ = load_model_for_task(cfg.model, s.task)
    seen = []

    class Spy(Callback):
        def on_evaluate(self, trainer, metrics):
            seen.append((sorted(trainer.eval_loaders), len(trainer.eval_loaders["select"].dataset)))

    s.finetune(model, phase="ft", callbacks=[Spy()])
    assert seen == [(["select"], 20), (["select"], 20)]
    rec = s.phases["ft"]
    assert rec["steps"] == 4 and "select_accuracy" in rec and rec["best_step"] in (2, 4)
    assert {"accuracy", "f1"} <= set(rec)  # the reported scores are dev's, computed after selection
    assert len(s.data.train) == 80 and len(s.data.select) == 20


# -- honest summaries -----------------------------------------------------------------------------
def test_collapsed_run_is_flagged_in_summary_and_json(tmp_path, minilm_path, csv_task, capsys):
    teacher = _classifier_dir(tmp_path, minilm_path, bias=(0.0, 8.0))  # always class 1 ("pos")
    out = tmp_path / "out"
    code, stdout, err = run(["compress", "--model", teacher, "--method", "svd", "--keep", "0.5", "--max-steps", "1",
                             "--learning-rate", "1e-12", "--output", out, "--quiet", *csv_task], capsys)
    assert code == 0, err
    meta = json.loads((out / "factorlm.json").read_text())
    assert "final" in meta["health"]["collapsed"] and meta["health"]["below_baseline"]
    assert any("collapsed" in w and "[final]" in w for w in meta["warnings"])
    assert "WARNING:" in stdout and "collapsed" in stdout
    # the summary shows every metric of the task and the majority-class baseline beside them
    assert "majority" in stdout and "f1" in stdout and "accuracy" in stdout
    assert meta["baseline"] == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    # the teacher it started from is recorded
    assert meta["teacher"]["source"] == str(teacher) and meta["teacher"]["trained_here"] is False


class NanAt(Callback):
    def __init__(self, step):
        self.step = step

    def compute_loss(self, trainer, batch, outputs, loss):
        return loss * float("nan") if trainer.state.step + 1 == self.step else loss


def test_nan_loss_stops_the_phase_and_is_flagged(tmp_path, minilm_path, csv_task):
    cfg = RunConfig(model=str(_classifier_dir(tmp_path, minilm_path)), task="csv", train_file=str(tmp_path / "train.csv"),
                    dev_file=str(tmp_path / "dev.csv"), text_columns=["text"], label_column="label", max_length=16,
                    max_steps=10, eval_every=2, progress=False)
    lines = []
    s = Session(cfg, quiet=True)
    s.log = lines.append
    from factorlm.api import load_model_for_task

    model, s.tokenizer, _ = load_model_for_task(cfg.model, s.task)
    s.finetune(model, phase="ft", callbacks=[NanAt(5)])
    assert s.phases["ft"]["steps"] == 4  # stopped before step 5 touched the weights
    assert s.health["diverged"] == ["ft"]
    assert any("training stopped early" in w and "nan" in w and "step 5/10" in w for w in s.warnings)
    assert any(line.startswith("[ft] stopped: the training loss became non-finite at step 5/10 (nan)")
               for line in lines)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_phase_that_ends_worse_than_it_started_is_flagged(tmp_path, minilm_path, csv_task):
    # starts predicting the majority class of the selection slice; every step then flips the head to
    # the minority class, so whatever keep-best picks is worse than the start
    cfg = RunConfig(model=str(_classifier_dir(tmp_path, minilm_path, bias=(0.0, 8.0))), task="csv",
                    train_file=str(tmp_path / "train.csv"), dev_file=str(tmp_path / "dev.csv"), text_columns=["text"],
                    label_column="label", max_length=16, max_steps=2, eval_every=1, progress=False, selection_size=20)
    s = Session(cfg, quiet=True)
    from factorlm.api import load_model_for_task

    model, s.tokenizer, _ = load_model_for_task(cfg.model, s.task)

    class Flip(Callback):
        def on_step_end(self, trainer):
            with torch.no_grad():
                trainer.unwrapped_model.classifier.weight.zero_()
                trainer.unwrapped_model.classifier.bias.copy_(torch.tensor([8.0, 0.0]))

    s.finetune(model, phase="ft", callbacks=[Flip()])
    assert s.health["worse_than_start"] == ["ft"]
    assert any("ended worse than it started" in w for w in s.warnings)


def test_healthy_run_has_no_warnings(tmp_path, minilm_path, csv_task, capsys):
    out = tmp_path / "ok"
    code, stdout, err = run(["finetune", "--model", _classifier_dir(tmp_path, minilm_path), "--max-steps", "30",
                             "--learning-rate", "3e-3", "--output", out, "--quiet", *csv_task], capsys)
    assert code == 0, err
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["warnings"] == [] and meta["health"] == {"collapsed": [], "diverged": [], "worse_than_start": [],
                                                         "below_baseline": False, "teacher_below_baseline": False}
    assert meta["scores"]["final"]["accuracy"] > 0.9


def test_training_logs_name_their_phase_and_estimate_time(tmp_path, minilm_path, csv_task):
    cfg = RunConfig(model=str(_classifier_dir(tmp_path, minilm_path)), task="csv", train_file=str(tmp_path / "train.csv"),
                    dev_file=str(tmp_path / "dev.csv"), text_columns=["text"], label_column="label", max_length=16,
                    max_steps=12, eval_every=6, batch_size=8, progress=False)
    lines = []
    s = Session(cfg, quiet=True)
    s.log = lines.append
    from factorlm.api import load_model_for_task

    model, s.tokenizer, _ = load_model_for_task(cfg.model, s.task)
    s.finetune(model, phase="teach")
    assert any(line.startswith("[teach] training:") and "12 steps" in line for line in lines)
    est = [line for line in lines if "s/step" in line]
    assert len(est) == 1 and est[0].startswith("[teach] 12 steps at ") and "left" in est[0]
    evals = [line for line in lines if "selection:" in line]
    assert [e.split()[:3] for e in evals] == [["[teach]", "step", "6/12"], ["[teach]", "step", "12/12"]]
    assert s.phases["teach"]["seconds_per_step"] > 0


# -- evaluate -------------------------------------------------------------------------------------
def test_evaluate_test_split_and_bad_split(tmp_path, minilm_path, capsys):
    d = _classifier_dir(tmp_path, minilm_path)
    code, out, err = run(["evaluate", d, "--task", "rotten_tomatoes", "--split", "test", "--max-eval-samples", "40"], capsys)
    assert code == 0, err
    assert "rotten_tomatoes: test 40 examples" in err and "accuracy" in json.loads(out)
    code, out, err = run(["evaluate", d, "--task", "sst2", "--split", "test"], capsys)
    assert code == 2 and "has no 'test' split" in err and err.count("\n") == 1


def test_decoder_without_pad_token_gets_eos_as_pad(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from factorlm.api import load_model_for_task

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i + 2 for i in range(60)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    d = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=62, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, pad_token_id=None)).save_pretrained(d)
    tok.save_pretrained(d)
    model, tokenizer, _ = load_model_for_task(str(d), get_task("rotten_tomatoes"), seed=0)
    assert tokenizer.pad_token == "</s>" and model.config.pad_token_id == 1
    batch = tokenizer(["w1 w2 w3", "w4"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 2)


def test_selection_on_a_two_dev_split_task(tmp_path, minilm_path):
    """MNLI's main metric is split-prefixed (matched_accuracy); the one-split selection slice scores
    by its base (accuracy)."""
    d = tmp_path / "glue" / "MNLI"
    d.mkdir(parents=True)
    head = "index\tpromptID\tpairID\tgenre\ts1bp\ts2bp\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label"
    labels = ["entailment", "neutral", "contradiction"]

    def rows(n, off):
        return [head] + [f"{i}\t0\t0\tg\tx\tx\tx\tx\ta{i + off} b\tc{i} d\t-\t{labels[i % 3]}" for i in range(n)]

    (d / "train.tsv").write_text("\n".join(rows(60, 0)) + "\n")
    (d / "dev_matched.tsv").write_text("\n".join(rows(18, 100)) + "\n")
    (d / "dev_mismatched.tsv").write_text("\n".join(rows(18, 200)) + "\n")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    m = tmp_path / "m"
    BertForSequenceClassification(cfg).save_pretrained(m)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(m)
    s = Session(RunConfig(model=str(m), task="mnli", data_dir=str(tmp_path / "glue"), max_length=16, max_steps=2,
                          eval_every=1, selection_size=12, progress=False), quiet=True)
    from factorlm.api import load_model_for_task

    model, s.tokenizer, _ = load_model_for_task(str(m), s.task)
    out = s.finetune(model, phase="ft")
    assert set(out) == {"matched_accuracy", "mismatched_accuracy"}
    assert "select_accuracy" in s.phases["ft"] and s.phases["ft"]["best_step"] in (1, 2)


def test_evaluate_reuses_the_seed_and_a_new_task_drops_the_recorded_files(tmp_path, minilm_path, csv_task, capsys):
    from factorlm.api import evaluate_config

    out = tmp_path / "seeded"
    code, _, err = run(["finetune", "--model", _classifier_dir(tmp_path, minilm_path), "--max-steps", "2", "--seed", "7",
                        "--max-eval-samples", "16", "--output", out, "--quiet", *csv_task], capsys)
    assert code == 0, err
    meta = json.loads((out / "factorlm.json").read_text())
    code, stdout, err = run(["evaluate", out], capsys)
    assert code == 0 and json.loads(stdout)["accuracy"] == meta["scores"]["final"]["accuracy"]
    c = evaluate_config(str(out))
    assert (c.seed, c.max_eval_samples, c.task, c.max_length) == (7, 16, "csv", 16)
    c = evaluate_config(str(out), {"task": "rotten_tomatoes"})
    assert c.task == "rotten_tomatoes" and c.train_file is None and c.dev_file is None and c.text_columns is None


def test_unhealthy_teacher_warns_again_when_reused(tmp_path, minilm_path, csv_task, capsys):
    # a bare encoder gets a teacher trained here; a learning rate of ~0 leaves it at chance level
    from transformers import AutoTokenizer, BertConfig, BertModel

    enc = tmp_path / "enc"
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(enc)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(enc)
    metas = []
    for out in ("o1", "o2"):
        code, stdout, err = run(["compress", "--model", enc, "--method", "svd", "--max-steps", "1",
                                 "--teacher-learning-rate", "1e-12", "--cache-dir", tmp_path / "cache",
                                 "--output", tmp_path / out, *csv_task], capsys)
        assert code == 0, err
        metas.append(json.loads((tmp_path / out / "factorlm.json").read_text()))
    first, second = metas
    assert first["teacher"]["trained_here"] and not second["teacher"]["trained_here"]
    assert first["teacher"]["cache"] == second["teacher"]["cache"]
    for m in metas:
        assert m["health"]["teacher_below_baseline"]
        # said once per run: the reused teacher's baseline check is redone, not also replayed
        assert sum("dense teacher's accuracy" in w for w in m["warnings"]) == 1, m["warnings"]
    steps = first["scores"]["dense"]["steps"]
    assert type(steps) is int and second["scores"]["dense"]["steps"] == steps  # a count stays an integer
    assert "dense" in first["health"]["collapsed"] and "dense" in second["health"]["collapsed"]
    assert any(w.startswith("(cached teacher) [dense] collapsed") for w in second["warnings"])
