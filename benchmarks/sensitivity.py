"""Which matrices can a task's fine-tuned model afford to factorize?  (CPU-sized, uses quality.py's teachers)

1. Sweep (no training): the score right after truncated-SVD factorization of only the attention
   matrices, only the FFN matrices, or all of them, at several budgets (each group at ``--keep`` of
   its own weights).  For regression tasks the spread of the predictions (std of predictions / std of
   labels) is reported too: a collapsed model predicts a near constant.
2. ``--retrain``: controls that tell a bug from an information loss.  The same fine-tuning (1 epoch,
   the quality benchmark's settings) of (a) the dense teacher, (b) the teacher factorized at *full*
   rank (the same function, in factors: the training code path of every factorized model), and
   (c) the teacher factorized at ``--retrain-keep`` for ``--retrain-epochs`` epochs, scored after
   every epoch.  If (b) tracks (a), re-training factorized models is sound, and a low (c) is what the
   truncation removed.

    python benchmarks/sensitivity.py --tasks stsb sst2 --retrain stsb
Writes benchmarks/results/sensitivity.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import COMMON, RESULTS, TASKS  # noqa: E402

GROUPS = {  # name -> (include, exclude) patterns of find_targets
    "attention": ([r"\.attention\."], []),
    "ffn": ([r"\.intermediate\.dense$", r"\.output\.dense$"], [r"\.attention\."]),
    "all": ([], []),
}


def session_for(task: str, **over):
    from factorlm import RunConfig
    from factorlm.session import Session

    config = RunConfig(task=task, method="svd", keep=0.5, progress=False, cache_dir=str(RESULTS / "cache"),
                       **{**COMMON, **TASKS[task], **over})
    return Session(config, quiet=True)


def score(session, model) -> dict:
    from factorlm.train.evaluate import predict

    task = session.task
    out = {}
    for loader in session.eval_loaders.values():
        preds, labels, _ = predict(model, loader, None, task.is_regression)
        out = {"score": float(task.compute_metrics(preds, labels)[task.main_metric])}
        if task.is_regression:
            out["spread"] = float(np.std(preds) / max(np.std(labels), 1e-12))
        break  # the first (main) dev split
    return out


def factorized(teacher, group: str, keep: float | None = None):
    """A copy of ``teacher`` with ``group``'s matrices factorized by truncated SVD at ``keep`` (None = each at
    its full rank: the same function, stored as factors)."""
    from factorlm.factorize import budget_plan, factorize
    from factorlm.models.surgery import find_targets, target_shapes

    model = copy.deepcopy(teacher)
    inc, exc = GROUPS[group]
    targets = find_targets(model, include=inc or None, exclude=exc)
    plan = budget_plan(model, targets, keep=keep) if keep is not None else \
        {n: {"rank": min(shape)} for n, shape in target_shapes(model, targets).items()}
    factorize(model, plan)
    return model


def retrain(session, model, epochs: float) -> list[float]:
    """Fine-tune with the benchmark's settings; the score after every epoch."""
    from factorlm.train import Trainer

    cfg = session.train_config(epochs=epochs, keep_best=False)
    trainer = Trainer(model, session.train_loader(), session.eval_loaders, session.task, cfg,
                      accelerator=session.accelerator)
    trainer.fit()
    return [h[session.task.main_metric] for h in trainer.state.history if h["kind"] == "eval"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["stsb"], choices=sorted(TASKS))
    p.add_argument("--keeps", nargs="+", type=float, default=[0.9, 0.75, 0.5, 0.25])
    p.add_argument("--retrain", nargs="*", metavar="TASK",
                   help="also run the re-training controls (minutes per task): for these tasks, or all if none named")
    p.add_argument("--retrain-keep", type=float, default=0.5)
    p.add_argument("--retrain-epochs", type=float, default=3.0)
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    import torch

    from factorlm.api import ensure_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    results, lines = [], []
    for task in args.tasks:
        session = session_for(task)
        teacher = ensure_teacher(session)  # quality.py's cached dense teacher (trained now if absent)
        dense = score(session, teacher)
        metric = session.task.main_metric
        reg = session.task.is_regression
        lines += [f"\n### {task}: {metric} x100 right after factorization, no re-training (dense {100 * dense['score']:.1f})",
                  "| factorized | " + " | ".join(f"keep {k:g}" for k in args.keeps) + " |",
                  "|---|" + "---|" * len(args.keeps)]
        for group in GROUPS:
            cells = []
            for keep in args.keeps:
                t0 = time.time()
                r = score(session, factorized(teacher, group, keep=keep))
                results.append({"task": task, "kind": "sweep", "group": group, "keep": keep, **r,
                                "wall_s": round(time.time() - t0, 1)})
                cells.append(f"{100 * r['score']:.1f}" + (f" (spread {r['spread']:.2f})" if reg else ""))
                print(f"{task} {group} keep={keep:g}: {cells[-1]}", flush=True)
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        if args.retrain is None or (args.retrain and task not in args.retrain):
            continue
        h = session.config.max_train_samples
        lines += [f"\n{task}: re-training controls ({metric} x100 after each epoch, {h} training examples, "
                  f"lr {session.config.learning_rate:g})", "| model | before | after each epoch |", "|---|---|---|"]
        full = "/".join(map(str, sorted({m.rank for m in factorized(teacher, "all").modules() if hasattr(m, "rank")})))
        controls = [("dense teacher", lambda: copy.deepcopy(teacher), 1.0),
                    (f"all factorized at full rank ({full})", lambda: factorized(teacher, "all"), 1.0),
                    (f"all factorized at keep {args.retrain_keep:g}",
                     lambda: factorized(teacher, "all", keep=args.retrain_keep), args.retrain_epochs)]
        for name, build, epochs in controls:
            model = build()
            before = score(session, model)["score"]
            curve = retrain(session, model, epochs)
            results.append({"task": task, "kind": "retrain", "model": name, "before": before, "after_epochs": curve})
            lines.append(f"| {name} | {100 * before:.1f} | " + " / ".join(f"{100 * s:.1f}" for s in curve) + " |")
            print(lines[-1], flush=True)
    md = "\n".join(lines)
    print(md)
    (RESULTS / "sensitivity.md").write_text(md + "\n")
    (RESULTS / "sensitivity.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
