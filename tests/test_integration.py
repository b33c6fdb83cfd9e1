"""Short real runs: the packaged all-MiniLM-L6-v2 on the packaged rotten_tomatoes task (and real
GLUE files when present).  Kept small for 2 CPU cores; every score must clearly beat the majority
class of the evaluation subset."""

import json

import numpy as np
import pytest
import torch

import factorlm
from factorlm import RunConfig
from factorlm.data import get_task, load_task_data

pytestmark = pytest.mark.integration

SMALL = dict(max_train_samples=640, max_eval_samples=300, max_length=40, batch_size=32, learning_rate=1e-4,
             progress=False, seed=0)


def majority(task_name="rotten_tomatoes", **kw):
    data = load_task_data(get_task(task_name), max_train_samples=8, max_eval_samples=SMALL["max_eval_samples"], seed=0, **kw)
    labels = np.array([e.label for e in data.evals["dev"]])
    return max(np.mean(labels == c) for c in np.unique(labels))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """Dense fine-tune of the packaged MiniLM on 640 rotten_tomatoes snippets (2 epochs, 40 steps)."""
    out = tmp_path_factory.mktemp("rt") / "dense"
    report = factorlm.finetune(RunConfig(output=str(out), epochs=2, **SMALL), quiet=True)
    return out, report


def test_dense_finetune_beats_majority(teacher):
    out, report = teacher
    base = majority()
    assert 0.5 < base < 0.65
    assert report.final >= base + 0.08, (report.final, base)
    meta = json.loads((out / "factorlm.json").read_text())
    assert meta["method"] == "dense" and meta["versions"]["torch"] and meta["recipe"]["seed"] == 0


def _compress(teacher_dir, tmp_path, method, **kw):
    cfg = RunConfig(method=method, teacher=str(teacher_dir), output=str(tmp_path / method),
                    cache_dir=str(tmp_path / "cache"), **{"epochs": 1, **SMALL, **kw})
    return factorlm.compress(cfg, quiet=True)


def test_svd_ft_real_run_and_exact_reload(teacher, tmp_path):
    teacher_dir, _ = teacher
    # 2 epochs: keep-best now selects on 71 held-out training examples, not on the dev set it reports
    # (1 epoch scored 0.633 there, +0.056 over the majority class; 2 epochs 0.677)
    report = _compress(teacher_dir, tmp_path, "svd", keep=0.5, epochs=2)
    assert report.final >= majority() + 0.08
    assert report.accounting["target_weights_after"] <= 0.5 * report.accounting["target_weights_before"]
    model = factorlm.load(tmp_path / "svd")
    again = factorlm.load(tmp_path / "svd")
    ids = torch.randint(1000, 20000, (3, 24))
    assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folders left


def test_lpaf_whole_pipeline_real_run(teacher, tmp_path):
    teacher_dir, _ = teacher
    # 20 pruning steps are far from the papers' schedules: movement pruning's learned scores (the default)
    # barely leave their zero init, and the element-wise fit weighted by raw, heavy-tailed PLATON scores
    # collapsed the factorized model here (0.42 accuracy before, majority class after re-training; see the
    # closing note of the faithful-methods issue).  The short run therefore checks the pipeline with the
    # variant the demo uses: factorlm's sensitivity criterion and the closed-form row fit on score quantiles.
    report = _compress(teacher_dir, tmp_path, "lpaf", keep=0.5, method_options={
        "importance": "sensitivity", "decomposition": "row", "omega": "scores_quantile"})
    assert {"prune", "pruned", "factorized", "finetune", "final"} <= set(report.scores)
    assert report.final >= majority() + 0.08
    assert (tmp_path / "lpaf" / "pruning.safetensors").is_file()


def test_kfac_global_real_run_keeps_its_budget_and_reloads(teacher, tmp_path):
    """The demo's recipe end to end: non-uniform ranks within keep (counted exactly), better than the
    majority class right after factorization and after its distilled fine-tune, reloads exactly."""
    teacher_dir, _ = teacher
    report = _compress(teacher_dir, tmp_path, "kfac-global", keep=0.25, method_options={"calib_batches": 4})
    acc = report.accounting
    assert acc["target_weights_after"] <= 0.25 * acc["target_weights_before"]
    modules = json.loads((tmp_path / "kfac-global" / "factorlm.json").read_text())["modules"]
    assert len({s["rank"] for s in modules.values()}) > 1
    assert report.scores["factorized"]["accuracy"] >= majority() + 0.05
    assert report.final >= majority() + 0.08
    a, b = factorlm.load(tmp_path / "kfac-global"), report.model.cpu().eval()
    ids = torch.randint(1000, 20000, (2, 16))
    assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-5)


def test_rankdyna_real_run_from_pretrained(tmp_path):
    report = factorlm.compress(RunConfig(method="rankdyna", keep=0.5, output=str(tmp_path / "rd"), epochs=2,
                                         method_options={"delta_t": 4}, **SMALL), quiet=True)
    assert "dense" not in report.scores
    assert report.final >= majority() + 0.08
    modules = json.loads((tmp_path / "rd" / "factorlm.json").read_text())["modules"]
    assert len({s["rank"] for s in modules.values()}) > 1  # ranks moved between matrices
    factorized = {n: r for n, r in report.info["ranks"].items() if n not in report.info["dense"]}
    assert factorized == {name: s["rank"] for name, s in modules.items()}  # the report says the same


def test_real_glue_mrpc_loads_and_scores(glue_dir, teacher, tmp_path):
    """Evaluating an unrelated-task model on real MRPC dev gives GLUE's F1/accuracy keys."""
    metrics = factorlm.evaluate_model(str(teacher[0]), RunConfig(task="mrpc", data_dir=str(glue_dir), max_eval_samples=64,
                                                                 max_length=64, progress=False), quiet=True)
    assert set(metrics) >= {"f1", "accuracy"} and 0 <= metrics["accuracy"] <= 1
