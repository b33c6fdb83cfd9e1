"""Task definitions: :class:`Task`, :class:`Example`, :class:`TaskData`, the :data:`TASKS` registry.

A task factory is registered in :data:`TASKS` under its name and called by :func:`get_task` with
the user's options. Built-in tasks (GLUE nine, ``rotten_tomatoes``) take no options; the generic
``csv`` / ``jsonl`` tasks take file/column options and read the train file to infer
``num_labels`` (see :func:`resolve_task`).

Multi-split evaluation (MNLI): evaluate each split of ``task.eval_splits`` separately with
``task.compute_metrics`` and combine the per-split dicts with :func:`merge_split_metrics`. If the
task has one eval split and one split was evaluated, the metrics come back unchanged; otherwise
each key is prefixed by the split name without its ``dev_`` prefix (MNLI: ``matched_accuracy``,
``mismatched_accuracy``). ``task.main_metric`` is always a key of the merged dict for the task's
default eval splits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..errors import FactorLMError
from ..registry import Registry
from .metrics import compute_metric_set

__all__ = [
    "Example",
    "TaskData",
    "Task",
    "TASKS",
    "get_task",
    "resolve_task",
    "merge_split_metrics",
    "split_prefix",
]


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled example: a sentence (``text_b is None``) or a sentence pair."""

    text_a: str
    text_b: str | None
    label: int | float  # class id (int) for classification, score (float) for regression


@dataclass
class TaskData:
    train: list[Example]
    evals: dict[str, list[Example]]  # split name -> examples (MNLI: dev_matched, dev_mismatched)
    label_names: list[str] | None  # label id -> name (None for regression / unnamed ids)
    # held-out slice of the training split for model selection (keep-best); disjoint from ``train``
    select: list[Example] = field(default_factory=list)


# loader(task, options) -> (splits dict, label_names); see loaders.load_task_data
Loader = Callable[["Task", dict[str, Any]], tuple[dict[str, list[Example]], list[str] | None]]


@dataclass(frozen=True)
class Task:
    name: str
    num_labels: int  # 1 means regression
    text_columns: tuple[str, ...]  # informational
    main_metric: str  # key of compute_metrics' / merge_split_metrics' result to pick the best checkpoint
    eval_splits: tuple[str, ...]  # default evaluation splits
    metrics: tuple[str, ...] = ("accuracy",)  # what compute_metrics computes (see metrics.py)
    label_names: tuple[str, ...] | None = None
    available_splits: tuple[str, ...] = ("train", "dev")  # splits load_task_data can return
    description: str = ""
    loader: Loader | None = field(default=None, compare=False, repr=False)
    options: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    kind: str = "sequence"  # "sequence" (classification / regression of a text or pair) | "qa" (extractive spans)

    @property
    def is_regression(self) -> bool:
        return self.kind == "sequence" and self.num_labels == 1

    @property
    def is_qa(self) -> bool:
        """Extractive question answering (see :mod:`.squad`): examples are :class:`~.squad.QAExample`,
        the model is a span head, scores are SQuAD's exact match and F1."""
        return self.kind == "qa"

    @property
    def version_2(self) -> bool:
        """SQuAD 2.0 rules: questions may have no answer (null predictions, a null threshold)."""
        return bool(self.options.get("version_2"))

    def compute_metrics(self, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics of one eval split. ``preds``: class ids (logits of shape (n, C) are argmax-ed) for
        classification, float scores for regression."""
        p = np.asarray(preds)
        y = np.asarray(labels)
        if self.is_regression:
            p = p.reshape(-1).astype(np.float64)
            y = y.reshape(-1).astype(np.float64)
        else:
            if p.ndim == 2 and p.shape[1] > 1:
                p = p.argmax(axis=1)
            p = p.reshape(-1).astype(np.int64)
            y = y.reshape(-1).astype(np.int64)
        return compute_metric_set(self.metrics, p, y)


TASKS: Registry[Callable[..., Task]] = Registry("task")


def get_task(name: str, **options: Any) -> Task:
    """Build the task registered as ``name``. Unknown name -> FactorLMError listing known tasks."""
    factory = TASKS.get(name)
    return factory(**options)


def resolve_task(
    name: str,
    *,
    train_file: str | None = None,
    dev_file: str | None = None,
    text_columns: tuple[str, ...] | list[str] | str | None = None,
    label_column: str | None = None,
    num_labels: int | None = None,
    label_kind: str | None = None,
    label_names: tuple[str, ...] | list[str] | None = None,
) -> Task:
    """What the CLI should call: like :func:`get_task`, but passes the file/column options to the
    generic ``csv`` / ``jsonl`` tasks (which then read ``train_file`` to infer ``num_labels``,
    ``label_names`` and regression) and rejects them for built-in tasks, where they make no sense.
    """
    opts = {
        "train_file": train_file,
        "dev_file": dev_file,
        "text_columns": text_columns,
        "label_column": label_column,
        "num_labels": num_labels,
        "label_kind": label_kind,
        "label_names": label_names,
    }
    given = {k: v for k, v in opts.items() if v is not None}
    factory = TASKS.get(name)
    if getattr(factory, "qa", False):  # QA tasks read their files in the loader; columns make no sense
        extra = [k for k in given if k not in ("train_file", "dev_file")]
        if extra:
            flags = ", ".join("--" + k.replace("_", "-") for k in extra)
            raise FactorLMError(f"task {name!r} reads SQuAD-format JSON and does not take {flags}")
        return factory()
    if getattr(factory, "accepts_file_options", False):
        return factory(**given)
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise FactorLMError(
            f"task {name!r} is built in and does not take {flags}; use task 'csv' or 'jsonl' for your own files"
        )
    return factory()


def split_prefix(split: str) -> str:
    """``dev_matched`` -> ``matched_``, ``dev`` -> ``dev_``, ``test`` -> ``test_``."""
    return (split[4:] if split.startswith("dev_") else split) + "_"


def merge_split_metrics(task: Task, split_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Combine ``{split: task.compute_metrics(...)}`` into one flat dict.

    One split evaluated and the task has one default eval split -> the metrics unchanged.
    Otherwise every key is prefixed with :func:`split_prefix` (MNLI -> ``matched_accuracy``,
    ``mismatched_accuracy``), so ``task.main_metric`` is a key either way.
    """
    if not split_metrics:
        return {}
    if len(split_metrics) == 1 and len(task.eval_splits) == 1:
        (metrics,) = split_metrics.values()
        return dict(metrics)
    merged: dict[str, float] = {}
    for split, metrics in split_metrics.items():
        pre = split_prefix(split)
        for k, v in metrics.items():
            merged[pre + k] = v
    return merged
