"""Task data for factorlm: a task registry, loaders (GLUE, rotten_tomatoes, csv/jsonl) and metrics.

Typical use (what the orchestration does)::

    from factorlm.data import resolve_task, load_task_data, make_dataloader, merge_split_metrics

    task = resolve_task("mnli")                      # or resolve_task("csv", train_file=..., ...)
    data = load_task_data(task, data_dir=..., max_train_samples=..., seed=seed)
    train_dl = make_dataloader(data.train, tok, batch_size=32, shuffle=True, seed=seed)
    per_split = {}
    for split, examples in data.evals.items():
        preds, labels = ...                          # argmax ids (or float scores if task.is_regression)
        per_split[split] = task.compute_metrics(preds, labels)
    metrics = merge_split_metrics(task, per_split)   # MNLI -> matched_accuracy, mismatched_accuracy
    score = metrics[task.main_metric]

Multi-split evaluation: ``task.compute_metrics`` gives one split's metrics;
:func:`merge_split_metrics` returns them unchanged for a single-eval-split task and otherwise
prefixes each key with the split name minus ``dev_`` (MNLI: ``matched_accuracy``,
``mismatched_accuracy``; ``task.main_metric == "matched_accuracy"``). ``task.main_metric`` is always
a key of the merged dict.

Tasks: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli (GLUE, see :mod:`.glue`),
rotten_tomatoes (the default, see :mod:`.rotten_tomatoes`), csv, jsonl (see :mod:`.generic`),
squad, squad_v2 (extractive QA, see :mod:`.squad`, :mod:`.qa` and :mod:`.squad_metrics`).
"""

from . import generic, glue, rotten_tomatoes, squad  # noqa: F401  (register the tasks)
from .glue import DATA_DIR_ENV, GLUE_SPECS
from .loaders import DEFAULT_SELECTION_SIZE, load_task_data, make_dataloader, selection_count, split_off, subsample
from .metrics import accuracy, compute_metric_set, f1_binary, matthews_corrcoef, pearson, spearman
from .rotten_tomatoes import rotten_tomatoes_splits
from .tasks import TASKS, Example, Task, TaskData, get_task, merge_split_metrics, resolve_task, split_prefix

__all__ = [
    "Example",
    "Task",
    "TaskData",
    "TASKS",
    "get_task",
    "resolve_task",
    "merge_split_metrics",
    "split_prefix",
    "load_task_data",
    "make_dataloader",
    "subsample",
    "split_off",
    "selection_count",
    "DEFAULT_SELECTION_SIZE",
    "rotten_tomatoes_splits",
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "compute_metric_set",
    "DATA_DIR_ENV",
    "GLUE_SPECS",
]
