"""GLUE tasks: local TSV folders in the standard GLUE layout, with a Hugging Face hub fallback.

Layout (``<dir>`` = ``data_dir`` argument, else ``$FACTORLM_DATA_DIR``; ``<dir>/glue/`` also works)::

    <dir>/CoLA/{train,dev}.tsv     no header: source, label, original-label, sentence
    <dir>/SST-2/{train,dev}.tsv    sentence, label
    <dir>/MRPC/{train,dev}.tsv     Quality, #1 ID, #2 ID, #1 String, #2 String
    <dir>/STS-B/{train,dev}.tsv    index .. sentence1, sentence2, score (0-5 float)
    <dir>/QQP/{train,dev}.tsv      id, qid1, qid2, question1, question2, is_duplicate
    <dir>/MNLI/train.tsv, dev_matched.tsv, dev_mismatched.tsv   .. sentence1, sentence2, .., gold_label
    <dir>/QNLI/{train,dev}.tsv     index, question, sentence, label (entailment / not_entailment)
    <dir>/RTE/{train,dev}.tsv      index, sentence1, sentence2, label (entailment / not_entailment)
    <dir>/WNLI/{train,dev}.tsv     index, sentence1, sentence2, label (0/1)

Each ``X.tsv`` may also be ``X.tsv.gz``. A split whose file is not there is loaded from the hub
(``datasets.load_dataset("nyu-mll/glue", config, split=...)``, imported lazily; ``datasets`` is the
optional extra ``pip install 'factorlm[hub]'``); if that fails too (offline, or ``datasets`` not
installed) a one-line :class:`FactorLMError` names the missing file and the fix, and the hub
libraries' retry warnings are kept off stderr.

Label ids follow the hub's ``nyu-mll/glue`` features, so local and hub data agree:
MNLI entailment=0, neutral=1, contradiction=2; QNLI / RTE entailment=0, not_entailment=1;
WNLI / MRPC / QQP / SST-2 / CoLA as in the files (1 = entailment / equivalent / duplicate /
positive / acceptable). STS-B is regression (float score). Rows without a usable label are skipped.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ..errors import FactorLMError
from ._io import iter_tsv
from .tasks import TASKS, Example, Task

__all__ = ["GLUE_SPECS", "GlueSpec", "find_glue_file", "read_glue_file", "DATA_DIR_ENV"]

DATA_DIR_ENV = "FACTORLM_DATA_DIR"
HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueSpec:
    name: str  # task name and hub config
    dir_name: str  # folder in the GLUE layout
    text_cols: tuple[str | int, ...]  # tsv header names (or indices when header=False)
    label_col: str | int
    label_kind: str  # "int" (ids), "float" (regression), "map" (strings in label_names)
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    hub_text_cols: tuple[str, ...]
    eval_splits: tuple[str, ...] = ("dev",)
    header: bool = True

    @property
    def num_labels(self) -> int:
        return 1 if self.label_kind == "float" else len(self.label_names or ())


_NLI2 = ("entailment", "not_entailment")

GLUE_SPECS: dict[str, GlueSpec] = {
    s.name: s
    for s in [
        GlueSpec("cola", "CoLA", (3,), 1, "int", ("unacceptable", "acceptable"),
                 ("matthews_correlation", "accuracy"), "matthews_correlation", ("sentence",), header=False),
        GlueSpec("sst2", "SST-2", ("sentence",), "label", "int", ("negative", "positive"),
                 ("accuracy",), "accuracy", ("sentence",)),
        GlueSpec("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", "int", ("not_equivalent", "equivalent"),
                 ("f1", "accuracy", "combined"), "f1", ("sentence1", "sentence2")),
        GlueSpec("stsb", "STS-B", ("sentence1", "sentence2"), "score", "float", None,
                 ("pearson", "spearmanr", "combined"), "pearson", ("sentence1", "sentence2")),
        GlueSpec("qqp", "QQP", ("question1", "question2"), "is_duplicate", "int", ("not_duplicate", "duplicate"),
                 ("f1", "accuracy", "combined"), "f1", ("question1", "question2")),
        GlueSpec("mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", "map",
                 ("entailment", "neutral", "contradiction"), ("accuracy",), "matched_accuracy",
                 ("premise", "hypothesis"), eval_splits=("dev_matched", "dev_mismatched")),
        GlueSpec("qnli", "QNLI", ("question", "sentence"), "label", "map", _NLI2,
                 ("accuracy",), "accuracy", ("question", "sentence")),
        GlueSpec("rte", "RTE", ("sentence1", "sentence2"), "label", "map", _NLI2,
                 ("accuracy",), "accuracy", ("sentence1", "sentence2")),
        GlueSpec("wnli", "WNLI", ("sentence1", "sentence2"), "label", "int", ("not_entailment", "entailment"),
                 ("accuracy",), "accuracy", ("sentence1", "sentence2")),
    ]
}

_HUB_SPLIT = {"train": "train", "dev": "validation", "dev_matched": "validation_matched",
              "dev_mismatched": "validation_mismatched"}


def glue_data_dir(data_dir: str | None) -> str | None:
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def find_glue_file(data_dir: str | None, spec: GlueSpec, split: str) -> str | None:
    """The local file for ``split`` (``<dir>/<DIR>/<split>.tsv[.gz]``, also under ``<dir>/glue/``)."""
    if not data_dir:
        return None
    for base in (data_dir, os.path.join(data_dir, "glue")):
        for sub in dict.fromkeys((spec.dir_name, spec.name, spec.dir_name.lower())):
            for ext in (".tsv", ".tsv.gz"):
                path = os.path.join(base, sub, split + ext)
                if os.path.isfile(path):
                    return path
    return None


def _parse_label(spec: GlueSpec, raw: Any) -> int | float | None:
    """Label id / score, or None for an unlabeled / unusable row."""
    if raw is None:
        return None
    if spec.label_kind == "float":
        try:
            v = float(raw)
        except (TypeError, ValueError):
            return None
        return v if v == v else None
    if spec.label_kind == "map" and isinstance(raw, str):
        raw = raw.strip()
        if raw in spec.label_names:  # type: ignore[operator]
            return spec.label_names.index(raw)  # type: ignore[union-attr]
    try:
        v = int(str(raw).strip())
    except ValueError:
        return None
    return v if 0 <= v < spec.num_labels else None  # -1 = unlabeled (hub test splits)


def read_glue_file(path: str, spec: GlueSpec) -> list[Example]:
    rows = iter_tsv(path)
    if spec.header:
        try:
            header = [h.strip() for h in next(rows)]
        except StopIteration:
            return []
        idx = []
        for col in (*spec.text_cols, spec.label_col):
            if col not in header:
                raise FactorLMError(
                    f"{path}: no column {col!r} in the header (found: {', '.join(header)}); is this GLUE {spec.dir_name}?"
                )
            idx.append(header.index(col))
    else:
        idx = [int(c) for c in (*spec.text_cols, spec.label_col)]
    *text_idx, label_idx = idx
    need = max(idx)
    out: list[Example] = []
    for row in rows:
        if len(row) <= need:  # malformed line (a few in QQP train)
            continue
        label = _parse_label(spec, row[label_idx])
        if label is None:
            continue
        texts = [row[i].strip() for i in text_idx]
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    return out


HUB_EXTRA_HINT = "the optional 'datasets' package: pip install 'factorlm[hub]'"
_HUB_LOGGERS = ("huggingface_hub", "datasets", "fsspec")


@contextmanager
def _quiet_hub_logs():
    """Keep the hub libraries' warnings (offline: "'...' thrown while requesting HEAD ...",
    "Retrying in 1s") off stderr; a failure becomes our one-line error instead."""
    loggers = [logging.getLogger(n) for n in _HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _load_from_hub(config: str, split: str):
    """Tests monkeypatch this; returns an iterable of row dicts."""
    import datasets  # lazy: slow import, optional (extra 'hub'), only needed without local files

    with _quiet_hub_logs():  # after the import: importing configures (resets) these loggers
        return datasets.load_dataset(HUB_DATASET, config, split=split)


def _hub_examples(spec: GlueSpec, split: str, local_hint: str) -> list[Example]:
    hub_split = _HUB_SPLIT[split]
    try:
        rows = _load_from_hub(spec.name, hub_split)
        out = []
        for row in rows:
            label = _parse_label(spec, row["label"])
            if label is None:
                continue
            texts = [str(row[c]).strip() for c in spec.hub_text_cols]
            out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
        return out
    except ImportError as e:
        if e.name != "datasets":  # datasets is installed but one of its own imports failed
            raise _hub_error(spec, split, hub_split, local_hint, e) from None
        raise FactorLMError(
            f"GLUE {spec.name} {split} data not found: {local_hint}; loading it from the hub "
            f"({HUB_DATASET}) needs {HUB_EXTRA_HINT}; or download GLUE and pass --data-dir DIR "
            f"or set {DATA_DIR_ENV}=DIR with DIR/{spec.dir_name}/{split}.tsv"
        ) from None
    except Exception as e:  # offline, schema change ...
        raise _hub_error(spec, split, hub_split, local_hint, e) from None


def _hub_error(spec: GlueSpec, split: str, hub_split: str, local_hint: str, e: BaseException) -> FactorLMError:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return FactorLMError(
        f"GLUE {spec.name} {split} data not found: {local_hint}, and the hub copy "
        f"({HUB_DATASET} {spec.name}/{hub_split}) could not be loaded ({type(e).__name__}: {reason}); "
        f"download GLUE and pass --data-dir DIR or set {DATA_DIR_ENV}=DIR "
        f"with DIR/{spec.dir_name}/{split}.tsv"
    )


def _glue_loader(task: Task, opts: dict[str, Any]):
    spec = GLUE_SPECS[task.name]
    data_dir = glue_data_dir(opts.get("data_dir"))
    out: dict[str, list[Example]] = {}
    for split in opts["splits"]:
        path = find_glue_file(data_dir, spec, split)
        if path is not None:
            out[split] = read_glue_file(path, spec)
            continue
        if data_dir:
            hint = f"no {os.path.join(data_dir, spec.dir_name, split + '.tsv')}[.gz]"
        else:
            hint = f"no data dir given (--data-dir / {DATA_DIR_ENV})"
        out[split] = _hub_examples(spec, split, hint)
    return out, (list(spec.label_names) if spec.label_names else None)


def _make_factory(spec: GlueSpec):
    def factory(**options: Any) -> Task:
        if options:
            raise FactorLMError(f"task {spec.name!r} takes no options (got {', '.join(sorted(options))})")
        return Task(
            name=spec.name,
            num_labels=spec.num_labels,
            text_columns=spec.hub_text_cols,
            main_metric=spec.main_metric,
            eval_splits=spec.eval_splits,
            metrics=spec.metrics,
            label_names=spec.label_names,
            available_splits=("train", *spec.eval_splits),
            description=f"GLUE {spec.dir_name}",
            loader=_glue_loader,
        )

    factory.__name__ = f"{spec.name}_task"
    return factory


for _spec in GLUE_SPECS.values():
    TASKS.add(_spec.name, _make_factory(_spec))
