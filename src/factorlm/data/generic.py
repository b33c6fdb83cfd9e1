"""Generic ``csv`` / ``jsonl`` tasks: your own labelled files.

Usage::

    task = resolve_task("csv", train_file="train.csv", dev_file="dev.csv",
                        text_columns=("question", "answer"), label_column="label")
    data = load_task_data(task)          # file/column options are remembered by the task

The file format comes from the extension (``.csv``; ``.tsv`` = tab separated CSV; ``.jsonl`` /
``.ndjson`` / ``.json`` = one JSON object per line; ``.gz`` / ``.bz2`` decompressed), else from
the task name. ``text_columns``: one column (single sentence) or two (sentence pair); if not
given, ``sentence1``+``sentence2``, ``text`` or ``sentence`` is used when present.
``label_column`` defaults to ``label``.

Labels, inferred from the train file when the task is built with ``train_file``:

* all integers >= 0 -> class ids, ``num_labels = max + 1`` (no label names);
* any non-numeric string (or negative integers) -> classes named by the sorted unique train
  values, ids in that order (``label_names``);
* numbers with a fraction (or ``num_labels=1``) -> regression (``num_labels = 1``).

Metrics: regression -> pearson (main) + spearmanr; binary -> accuracy (main) + f1 of class 1;
more classes -> accuracy. Without ``dev_file`` a fixed 10% of train (by a salted hash of the
text, independent of the run seed) is held out as ``dev``.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
from typing import Any, Sequence

from ..errors import FactorLMError
from ._io import open_text, stable_key
from .tasks import TASKS, Example, Task

__all__ = ["read_records", "infer_label_spec", "csv_task", "jsonl_task"]

HOLDOUT_SALT = "factorlm/generic/holdout-v1"
HOLDOUT_FRACTION = 0.1
_DEFAULT_TEXT = (("sentence1", "sentence2"), ("text",), ("sentence",))


def _format_of(path: str, default: str) -> str:
    base = path.lower()
    for comp in (".gz", ".bz2"):
        if base.endswith(comp):
            base = base[: -len(comp)]
    if base.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if base.endswith(".tsv"):
        return "tsv"
    if base.endswith(".csv"):
        return "csv"
    return default


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, fmt: str, mtime_ns: int, size: int):
    columns: dict[str, None] = {}
    records: list[dict[str, Any]] = []
    with open_text(path) as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FactorLMError(f"{path} line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise FactorLMError(f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}")
                columns.update(dict.fromkeys(rec))
                records.append(rec)
        else:
            reader = csv.DictReader(f, delimiter="\t" if fmt == "tsv" else ",")
            columns.update(dict.fromkeys(reader.fieldnames or []))
            records.extend(reader)
    return tuple(columns), tuple(records)


def read_records(path: str, fmt: str = "csv") -> tuple[tuple[str, ...], tuple[dict[str, Any], ...]]:
    """``(columns, records)`` of a CSV/TSV/JSONL file (cached on path + mtime)."""
    if not os.path.isfile(path):
        raise FactorLMError(f"file not found: {path}")
    st = os.stat(path)
    return _read_cached(os.path.abspath(path), _format_of(path, fmt), st.st_mtime_ns, st.st_size)


def _resolve_columns(path: str, columns: Sequence[str], text_columns, label_column) -> tuple[tuple[str, ...], str]:
    avail = ", ".join(columns) or "none"
    if isinstance(text_columns, str):
        text_columns = tuple(c.strip() for c in text_columns.split(",") if c.strip())
    if text_columns:
        text_columns = tuple(text_columns)
        if len(text_columns) > 2:
            raise FactorLMError(f"text_columns takes 1 or 2 columns, got {len(text_columns)}: {', '.join(text_columns)}")
        for c in text_columns:
            if c not in columns:
                raise FactorLMError(f"{path}: no text column {c!r} (available columns: {avail})")
    else:
        for cand in _DEFAULT_TEXT:
            if all(c in columns for c in cand):
                text_columns = cand
                break
        else:
            raise FactorLMError(f"{path}: give the text columns with --text-columns (available columns: {avail})")
    label_column = label_column or "label"
    if label_column not in columns:
        raise FactorLMError(f"{path}: no label column {label_column!r} (available columns: {avail})")
    return text_columns, label_column


def _parse(v: Any) -> int | float | str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v if not (isinstance(v, float) and not math.isfinite(v)) else None
    s = str(v).strip()
    if not s:
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
        if math.isfinite(f):
            return f
    except ValueError:
        pass
    return s


def infer_label_spec(values: Sequence[Any], num_labels: int | None, where: str) -> dict[str, Any]:
    """``{"kind": "ids"|"names"|"regression", "num_labels": int, "label_names": tuple|None}``."""
    parsed = [_parse(v) for v in values]
    for i, p in enumerate(parsed):
        if p is None:
            raise FactorLMError(f"{where}: record {i + 1} has an empty label")
    if not parsed:
        raise FactorLMError(f"{where}: no records")
    if any(isinstance(p, str) for p in parsed):
        kind = "str"
    elif any(isinstance(p, float) for p in parsed):
        kind = "float"
    else:
        kind = "int"
    if num_labels == 1 or (kind == "float" and num_labels is None):
        if kind == "str":
            bad = next(p for p in parsed if isinstance(p, str))
            raise FactorLMError(f"{where}: regression (num_labels=1) needs numeric labels, found {bad!r}")
        return {"kind": "regression", "num_labels": 1, "label_names": None}
    if kind == "float":
        raise FactorLMError(f"{where}: labels have fractions but num_labels={num_labels}; use num_labels=1 for regression")
    if kind == "int" and min(parsed) >= 0:
        n = max(parsed) + 1
        if num_labels is not None:
            if n > num_labels:
                raise FactorLMError(f"{where}: label id {n - 1} does not fit num_labels={num_labels}")
            n = num_labels
        return {"kind": "ids", "num_labels": n, "label_names": None}
    if kind == "int":
        names = tuple(str(v) for v in sorted(set(parsed)))
    else:
        names = tuple(sorted({_key(p) for p in parsed}))
    if len(names) < 2:
        raise FactorLMError(f"{where}: only one label value ({names[0]!r}); need at least two classes")
    if num_labels is not None and num_labels != len(names):
        raise FactorLMError(f"{where}: {len(names)} label values ({', '.join(names)}) but num_labels={num_labels}")
    return {"kind": "names", "num_labels": len(names), "label_names": names}


def _key(p: Any) -> str:
    return str(p)


def _to_examples(path, records, text_columns, label_column, spec) -> list[Example]:
    out = []
    index = {n: i for i, n in enumerate(spec["label_names"] or ())}
    for i, rec in enumerate(records):
        texts = []
        for c in text_columns:
            t = rec.get(c)
            if t is None:
                raise FactorLMError(f"{path}: record {i + 1} has no value for text column {c!r}")
            texts.append(str(t).strip())
        p = _parse(rec.get(label_column))
        if p is None:
            raise FactorLMError(f"{path}: record {i + 1} has an empty label")
        if spec["kind"] == "regression":
            if isinstance(p, str):
                raise FactorLMError(f"{path}: record {i + 1}: label {p!r} is not a number (regression task)")
            label: int | float = float(p)
        elif spec["kind"] == "ids":
            if not isinstance(p, int) or not 0 <= p < spec["num_labels"]:
                raise FactorLMError(f"{path}: record {i + 1}: label {p!r} is not a class id in 0..{spec['num_labels'] - 1}")
            label = p
        else:
            k = _key(p)
            if k not in index:
                raise FactorLMError(
                    f"{path}: record {i + 1}: label {k!r} not among the train labels ({', '.join(index)})"
                )
            label = index[k]
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    return out


def _generic_loader(task: Task, opts: dict[str, Any]):
    o = dict(task.options)
    o.update({k: opts[k] for k in ("train_file", "dev_file", "text_columns", "label_column") if opts.get(k)})
    fmt = o["format"]
    train_file, dev_file = o.get("train_file"), o.get("dev_file")
    if "train" not in opts["splits"] and dev_file and o.get("label_kind"):
        # evaluation only, labels known (e.g. from a saved model's factorlm.json): the dev file alone
        spec = {"kind": o["label_kind"], "num_labels": task.num_labels, "label_names": task.label_names}
        columns, dev_records = read_records(dev_file, fmt)
        text_columns, label_column = _resolve_columns(dev_file, columns, o.get("text_columns"), o.get("label_column"))
        dev = _to_examples(dev_file, dev_records, text_columns, label_column, spec)
        return {s: {"dev": dev}[s] for s in opts["splits"]}, (list(task.label_names) if task.label_names else None)
    if not train_file:
        raise FactorLMError(f"task {task.name!r} needs a train file (--train-file)"
                            + ("" if dev_file else " or, for evaluation, a dev file (--dev-file)"))
    columns, train_records = read_records(train_file, fmt)
    text_columns, label_column = _resolve_columns(train_file, columns, o.get("text_columns"), o.get("label_column"))
    if task.options.get("label_kind"):
        spec = {"kind": task.options["label_kind"], "num_labels": task.num_labels, "label_names": task.label_names}
    else:
        spec = infer_label_spec([r.get(label_column) for r in train_records], task.num_labels, train_file)
        if spec["num_labels"] != task.num_labels:
            raise FactorLMError(
                f"{train_file}: labels give {spec['num_labels']} classes but the task has num_labels={task.num_labels}"
            )
    train = _to_examples(train_file, train_records, text_columns, label_column, spec)
    if dev_file:
        dcols, dev_records = read_records(dev_file, fmt)
        _resolve_columns(dev_file, dcols, text_columns, label_column)
        dev = _to_examples(dev_file, dev_records, text_columns, label_column, spec)
    else:  # fixed hold-out of train
        order = sorted(range(len(train)), key=lambda i: stable_key(f"{i}\x00{train[i].text_a}\x00{train[i].text_b}", HOLDOUT_SALT))
        n_dev = max(1, int(round(len(train) * HOLDOUT_FRACTION))) if len(train) > 1 else 0
        held = set(order[:n_dev])
        dev = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
    splits = {"train": train, "dev": dev}
    names = list(spec["label_names"]) if spec["label_names"] else None
    return {s: splits[s] for s in opts["splits"]}, names


def _make_generic(fmt: str):
    def factory(
        train_file: str | None = None,
        dev_file: str | None = None,
        text_columns: Sequence[str] | str | None = None,
        label_column: str | None = None,
        num_labels: int | None = None,
        main_metric: str | None = None,
        label_kind: str | None = None,
        label_names: Sequence[str] | None = None,
    ) -> Task:
        """``label_kind`` (ids | names | regression) + ``num_labels`` (+ ``label_names``) describe the
        labels without reading ``train_file``, as a saved model's ``factorlm.json`` records them."""
        options: dict[str, Any] = {"format": fmt, "train_file": train_file, "dev_file": dev_file,
                                   "label_column": label_column, "text_columns": text_columns}
        if num_labels is not None and num_labels < 1:
            raise FactorLMError(f"num_labels must be >= 1, got {num_labels}")
        given_names, label_names = label_names, None
        if isinstance(text_columns, str):
            text_columns = tuple(c.strip() for c in text_columns.split(",") if c.strip())
        cols: tuple[str, ...] = tuple(text_columns or ())
        if train_file:
            columns, records = read_records(train_file, fmt)
            cols, label_column = _resolve_columns(train_file, columns, text_columns, label_column)
            if dev_file and not os.path.isfile(dev_file):
                raise FactorLMError(f"file not found: {dev_file}")
            spec = infer_label_spec([r.get(label_column) for r in records], num_labels, train_file)
            num_labels, label_names = spec["num_labels"], spec["label_names"]
            options.update(text_columns=cols, label_column=label_column, label_kind=spec["kind"])
        elif label_kind is not None and num_labels is not None:
            if label_kind not in ("ids", "names", "regression"):
                raise FactorLMError(f"label_kind must be ids, names or regression, got {label_kind!r}")
            label_names = tuple(given_names) if given_names else None
            options.update(text_columns=cols or None, label_kind=label_kind)
        elif num_labels is None:
            raise FactorLMError(f"task {fmt!r} needs --train-file (to infer the labels) or num_labels")
        if num_labels == 1:
            metrics: tuple[str, ...] = ("pearson", "spearmanr")
        elif num_labels == 2:
            metrics = ("accuracy", "f1")
        else:
            metrics = ("accuracy",)
        main = main_metric or metrics[0]
        if main not in metrics:
            raise FactorLMError(f"main_metric {main!r} is not one of {', '.join(metrics)}")
        return Task(
            name=fmt,
            num_labels=num_labels,
            text_columns=cols,
            main_metric=main,
            eval_splits=("dev",),
            metrics=metrics,
            label_names=label_names,
            available_splits=("train", "dev"),
            description=f"your own {fmt} files",
            loader=_generic_loader,
            options=options,
        )

    factory.__name__ = f"{fmt}_task"
    factory.accepts_file_options = True  # type: ignore[attr-defined]
    return factory


csv_task = TASKS.add("csv", _make_generic("csv"))
jsonl_task = TASKS.add("jsonl", _make_generic("jsonl"))
