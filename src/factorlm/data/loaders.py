"""Loading a task's examples (:func:`load_task_data`) and batching them (:func:`make_dataloader`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import FactorLMError, check
from .tasks import Example, Task, TaskData

__all__ = ["load_task_data", "make_dataloader", "subsample", "split_off", "selection_count",
           "DEFAULT_SELECTION_SIZE", "MAX_DEFAULT_SELECTION", "EXAMPLE_INDEX"]

#: batch key of each example's position in the training set (``make_dataloader(with_index=True)``)
EXAMPLE_INDEX = "example_index"

# model selection holds out this fraction of the training split (at most MAX_DEFAULT_SELECTION examples)
DEFAULT_SELECTION_SIZE = 0.1
MAX_DEFAULT_SELECTION = 2000


def subsample(examples: Sequence[Any], n: int | None, seed: int = 0, stream: int = 0,
              label=lambda e: e.label) -> list[Any]:
    """A seeded random subset of ``n`` examples, kept in their original order.

    Classification (int labels) is stratified: each class keeps its share (largest remainder), so
    class balance holds even for small ``n``. ``stream`` separates the draws of different splits.
    """
    examples = list(examples)
    if n is None or n >= len(examples):
        return examples
    check(n > 0, f"a max-samples limit must be positive, got {n}")
    rng = np.random.default_rng([seed % 2**32, stream])
    labels = [label(e) for e in examples]
    if all(isinstance(y, int) for y in labels):
        y = np.asarray(labels)
        classes, counts = np.unique(y, return_counts=True)
        quota = counts * n / len(examples)
        take = np.floor(quota).astype(int)
        rest = n - int(take.sum())
        if rest:
            order = np.argsort(-(quota - take), kind="stable")
            take[order[:rest]] += 1
        chosen = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c, k in zip(classes, take) if k]
        idx = np.sort(np.concatenate(chosen))
    else:
        idx = np.sort(rng.choice(len(examples), size=n, replace=False))
    return [examples[i] for i in idx]


def selection_count(n_train: int, size: float | int | None, max_train_samples: int | None = None) -> int:
    """How many training examples ``--selection-size`` holds out: a fraction in (0, 1) of the
    training data in use (the split, or ``max_train_samples / (1 - fraction)`` of it when training
    is capped, so a 10% slice stays 10% of what a quick run touches), capped at
    :data:`MAX_DEFAULT_SELECTION`; a count >= 1; or 0 / None for none.  At least one example is
    always left for training."""
    if not size or n_train < 2:
        return 0
    check(size > 0, f"--selection-size must be >= 0, got {size}")
    if size < 1:
        used = n_train if max_train_samples is None else min(n_train, round(max_train_samples / (1 - size)))
        n = min(max(1, round(used * size)), MAX_DEFAULT_SELECTION, n_train - 1)
    else:
        check(float(size).is_integer(), f"--selection-size must be a fraction in (0, 1) or a whole count, got {size}")
        n = int(size)
    check(n < n_train, f"--selection-size {size} leaves no training examples (the train split has {n_train})")
    return n


def split_off(examples: Sequence[Example], n: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """``(rest, held)``: a seeded, stratified random set of ``n`` examples held out, and the others;
    both keep the original order and together are exactly ``examples``."""
    examples = list(examples)
    if n <= 0:
        return examples, []
    held = subsample(list(enumerate(examples)), n, seed, stream=1000, label=lambda p: p[1].label)
    idx = {i for i, _ in held}
    return [e for i, e in enumerate(examples) if i not in idx], [e for _, e in held]


def load_task_data(
    task: Task,
    *,
    data_dir: str | None = None,
    train_file: str | None = None,
    dev_file: str | None = None,
    text_columns: Sequence[str] | str | None = None,
    label_column: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
    eval_splits: Sequence[str] | None = None,
    include_train: bool = True,
    selection_size: float | int | None = None,
    split_by_article: float | None = None,
) -> TaskData:
    """Load ``task``'s train split and its eval splits (default ``task.eval_splits``; e.g.
    ``("test",)`` for rotten_tomatoes). ``max_*_samples``: seeded stratified subsets (None = all).
    ``include_train=False`` returns ``train=[]`` without reading it (evaluation only).
    File/column options only apply to the generic ``csv`` / ``jsonl`` tasks.

    ``selection_size`` (see :func:`selection_count`) holds a seeded, stratified slice of the
    training split out as ``select`` for model selection, *before* ``max_train_samples`` subsamples
    what is left; ``max_eval_samples`` caps it too. The reported eval splits are never used to select.
    QA tasks hold out whole articles (:func:`~.squad.split_off_articles`), and take ``train_file`` /
    ``dev_file`` and ``split_by_article`` (one SQuAD file split into train and dev by article).
    """
    check(task.loader is not None, f"task {task.name!r} has no data loader")
    splits = tuple(eval_splits) if eval_splits is not None else tuple(task.eval_splits)
    check(len(splits) > 0, "eval_splits is empty")
    for s in splits:
        check(
            s in task.available_splits and s != "train",
            f"task {task.name!r} has no eval split {s!r} (available: {', '.join(x for x in task.available_splits if x != 'train')})",
        )
    file_opts = {"train_file": train_file, "dev_file": dev_file, "text_columns": text_columns, "label_column": label_column}
    given = [k for k, v in file_opts.items() if v]
    allowed = ("train_file", "dev_file") if task.is_qa else tuple(file_opts) if task.name in ("csv", "jsonl") else ()
    if [k for k in given if k not in allowed]:
        flags = ", ".join("--" + k.replace("_", "-") for k in given if k not in allowed)
        raise FactorLMError(f"task {task.name!r} is built in and does not take {flags}; use task 'csv' or 'jsonl'")
    if split_by_article and not task.is_qa:
        raise FactorLMError(f"--split-by-article applies to the QA tasks (squad, squad_v2), not {task.name!r}")
    opts: dict[str, Any] = dict(file_opts, data_dir=data_dir, splits=(("train",) if include_train else ()) + splits,
                                split_by_article=split_by_article)
    loaded, label_names = task.loader(task, opts)
    train, select = [], []
    if include_train:
        n_select = selection_count(len(loaded["train"]), selection_size, max_train_samples)
        if task.is_qa:
            from .squad import split_off_articles

            rest, select = split_off_articles(loaded["train"], n_select, seed)
        else:
            rest, select = split_off(loaded["train"], n_select, seed)
        train = subsample(rest, max_train_samples, seed, stream=0)
        select = subsample(select, max_eval_samples, seed, stream=999)
    evals = {s: subsample(loaded[s], max_eval_samples, seed, stream=1 + i) for i, s in enumerate(splits)}
    if include_train:
        check(len(train) > 0, f"task {task.name!r}: the train split has no examples")
    for s, ex in evals.items():
        check(len(ex) > 0, f"task {task.name!r}: the {s} split has no examples")
    return TaskData(train=train, evals=evals, label_names=label_names, select=select)


class _Encoded(Dataset):
    def __init__(self, features: list[dict[str, list[int]]], labels: list[int | float], with_index: bool = False):
        self.features = features
        self.labels = labels
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {**self.features[i], "labels": self.labels[i]}
        if self.with_index:
            item[EXAMPLE_INDEX] = i
        return item


class _Collate:
    """Pads a batch to its longest sequence (DataCollatorWithPadding) and adds typed ``labels``."""

    def __init__(self, tokenizer, regression: bool):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")
        self.dtype = torch.float32 if regression else torch.long

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = [it["labels"] for it in items]
        batch = dict(self.pad([{k: v for k, v in it.items() if k not in ("labels", EXAMPLE_INDEX)} for it in items]))
        batch["labels"] = torch.tensor(labels, dtype=self.dtype)
        if EXAMPLE_INDEX in items[0]:
            batch[EXAMPLE_INDEX] = torch.tensor([it[EXAMPLE_INDEX] for it in items], dtype=torch.long)
        return batch


def _encode(tokenizer, examples: list[Example], max_length: int, chunk: int = 2048) -> list[dict[str, list[int]]]:
    out: list[dict[str, list[int]] | None] = [None] * len(examples)
    singles = [i for i, e in enumerate(examples) if e.text_b is None]
    pairs = [i for i, e in enumerate(examples) if e.text_b is not None]
    for group, is_pair in ((singles, False), (pairs, True)):
        for start in range(0, len(group), chunk):
            idx = group[start : start + chunk]
            a = [examples[i].text_a for i in idx]
            b = [examples[i].text_b for i in idx] if is_pair else None
            enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=False)
            keys = list(enc.keys())
            for j, i in enumerate(idx):
                out[i] = {k: enc[k][j] for k in keys}
    return out  # type: ignore[return-value]


def make_dataloader(
    examples: Sequence[Example],
    tokenizer,
    *,
    batch_size: int,
    max_length: int = 128,
    shuffle: bool = False,
    seed: int = 0,
    is_regression: bool | None = None,
    num_workers: int = 0,
    group_by_length: bool = False,
    with_index: bool = False,
) -> DataLoader:
    """Tokenize ``examples`` once (pairs when ``text_b``; truncated to ``max_length``) and batch them
    with per-batch dynamic padding. Batches are dicts with ``input_ids``, ``attention_mask``,
    ``token_type_ids`` (when the tokenizer makes them) and ``labels`` (long for classification,
    float32 for regression; inferred from the label types unless ``is_regression`` is given).
    ``shuffle=True`` uses a ``torch.Generator`` seeded with ``seed``: the same seed gives the same
    batch order (epoch after epoch, for one loader) on every run.

    ``group_by_length=True`` (with ``shuffle``) draws batches of similar lengths, so dynamic padding
    pads less: transformers' ``LengthGroupedSampler`` (random mega-batches of up to 50 batches,
    each sorted by length, the longest batch first), seeded the same way.  ``with_index=True`` adds
    ``example_index`` (the example's position in ``examples``) to every batch, for per-example
    caches such as the teacher logits of :class:`~factorlm.train.DistillationCallback`; the
    :class:`~factorlm.train.Trainer` does not pass it to the model.
    """
    examples = list(examples)
    check(len(examples) > 0, "make_dataloader got no examples")
    check(batch_size > 0, f"batch_size must be positive, got {batch_size}")
    check(max_length > 1, f"max_length must be > 1, got {max_length}")
    if is_regression is None:
        is_regression = any(isinstance(e.label, float) for e in examples)
    check(not group_by_length or shuffle, "group_by_length needs shuffle=True (it is a training sampler)")
    dataset = _Encoded(_encode(tokenizer, examples, max_length), [e.label for e in examples], with_index=with_index)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    sampler = None
    if group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = LengthGroupedSampler(batch_size, lengths=[len(f["input_ids"]) for f in dataset.features],
                                       generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        collate_fn=_Collate(tokenizer, is_regression),
        num_workers=num_workers,
    )
