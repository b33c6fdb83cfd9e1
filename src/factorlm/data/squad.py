"""Extractive question answering tasks: ``squad`` (SQuAD v1.1) and ``squad_v2`` (SQuAD 2.0).

Data in the SQuAD JSON format (``{"version": .., "data": [{"title", "paragraphs": [{"context",
"qas": [{"id", "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``), from

* a folder (``--data-dir DIR``, else ``$FACTORLM_DATA_DIR``): ``DIR/train-v1.1.json`` and
  ``DIR/dev-v1.1.json`` (``-v2.0`` for ``squad_v2``), also under ``DIR/squad/`` or ``DIR/SQuAD/``,
  ``.gz`` allowed;
* explicit files (``--train-file`` / ``--dev-file``): any JSON in SQuAD format, e.g. your own QA data;
* the Hugging Face hub (``rajpurkar/squad`` / ``rajpurkar/squad_v2``) when neither is there and the
  optional ``datasets`` package can reach it.

**One file, split by article** (``--split-by-article F``): with a dev file and no train file (this
machine has only ``dev-v1.1.json``), a fraction ``F`` of the file's *articles* (titles) is held out
for evaluation and the rest is the training split; no article is on both sides, so no context is
seen in training and scored in evaluation.  The articles are ordered by a stable hash of their
title (the same on every machine and every Python), *independently of* ``--seed``: runs with
different seeds and different methods are scored on the same articles.  The held-out articles are
recorded in the saved ``factorlm.json``.

Model selection (keep-best, the SQuAD 2.0 null threshold) uses a held-out slice of the training
split that is also whole articles (:func:`split_off_articles`).  Examples carry their ``title``
so any split can be checked for leaks.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import FactorLMError, check
from ._io import open_text, stable_key
from .glue import DATA_DIR_ENV, _quiet_hub_logs
from .tasks import TASKS, Task

__all__ = ["QAExample", "read_squad_file", "split_by_article", "split_off_articles", "find_squad_file",
           "SQUAD_FILES", "ARTICLE_SALT"]

SQUAD_FILES = {"squad": ("train-v1.1.json", "dev-v1.1.json"), "squad_v2": ("train-v2.0.json", "dev-v2.0.json")}
HUB_DATASETS = {"squad": "rajpurkar/squad", "squad_v2": "rajpurkar/squad_v2"}
ARTICLE_SALT = "factorlm-squad-articles-v1"


@dataclass(frozen=True, slots=True)
class QAExample:
    """One question on one context.  ``answers``: every annotator's answer text, with its character
    offset in ``context`` in ``answer_starts``; no answers = unanswerable (SQuAD 2.0)."""

    id: str
    title: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]

    @property
    def answerable(self) -> bool:
        return bool(self.answers)

    @property
    def label(self) -> int:
        """0 answerable, 1 unanswerable: what stratified subsampling keeps in proportion."""
        return 0 if self.answers else 1


def _parse_squad(obj: Any, where: str, allow_impossible: bool) -> list[QAExample]:
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise FactorLMError(f"{where} is not in SQuAD format (expected an object with a 'data' list of articles)")
    out: list[QAExample] = []
    seen: set[str] = set()
    for a, article in enumerate(obj["data"]):
        title = str(article.get("title", f"article-{a}"))
        for p, para in enumerate(article.get("paragraphs") or []):
            context = para.get("context")
            if not isinstance(context, str):
                raise FactorLMError(f"{where}: article {title!r} paragraph {p} has no 'context' text")
            for qa in para.get("qas") or []:
                qid = str(qa.get("id", ""))
                if not qid or qid in seen:
                    raise FactorLMError(f"{where}: article {title!r}: a question has a missing or repeated id {qid!r}")
                seen.add(qid)
                answers = [] if qa.get("is_impossible") else list(qa.get("answers") or [])
                texts, starts = [], []
                for ans in answers:
                    text, start = ans.get("text"), ans.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int):
                        raise FactorLMError(f"{where}: question {qid}: an answer needs 'text' and an integer 'answer_start'")
                    if context[start:start + len(text)] != text:
                        raise FactorLMError(f"{where}: question {qid}: answer {text!r} is not at character {start} "
                                            "of its context")
                    texts.append(text)
                    starts.append(start)
                if not texts and not allow_impossible:
                    raise FactorLMError(f"{where}: question {qid} has no answer; SQuAD v1.1 needs one for every "
                                        "question (use task squad_v2 for unanswerable questions)")
                out.append(QAExample(qid, title, str(qa.get("question", "")), context, tuple(texts), tuple(starts)))
    return out


def read_squad_file(path: str, allow_impossible: bool = True) -> list[QAExample]:
    """Every question of a SQuAD-format JSON file (``.gz`` / ``.bz2`` allowed), in file order."""
    with open_text(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise FactorLMError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    examples = _parse_squad(obj, path, allow_impossible)
    if not examples:
        raise FactorLMError(f"{path} has no questions")
    return examples


def split_by_article(examples: Sequence[QAExample], fraction: float) -> tuple[list[QAExample], list[QAExample]]:
    """``(train, held)``: ``round(fraction * articles)`` whole articles held out (at least one, and
    at least one left), chosen by a stable hash of the title; both keep file order."""
    check(0 < fraction < 1, f"--split-by-article must be a fraction in (0, 1), got {fraction}")
    titles = list(dict.fromkeys(e.title for e in examples))
    check(len(titles) >= 2, f"--split-by-article needs at least two articles, the file has {len(titles)}")
    n_held = min(max(1, round(fraction * len(titles))), len(titles) - 1)
    held = set(sorted(titles, key=lambda t: stable_key(t, ARTICLE_SALT))[:n_held])
    return [e for e in examples if e.title not in held], [e for e in examples if e.title in held]


def split_off_articles(examples: Sequence[QAExample], n: int, seed: int = 0) -> tuple[list[QAExample], list[QAExample]]:
    """``(rest, held)``: whole articles, in a seeded random order, held out until they hold at least
    ``n`` questions (never every article).  A single article is split by questions instead (there
    is no other way to hold anything out)."""
    import numpy as np

    examples = list(examples)
    if n <= 0:
        return examples, []
    titles = list(dict.fromkeys(e.title for e in examples))
    if len(titles) < 2:
        from .loaders import split_off

        return split_off(examples, n, seed)
    sizes = {t: 0 for t in titles}
    for e in examples:
        sizes[e.title] += 1
    order = np.random.default_rng([seed % 2**32, 4242]).permutation(len(titles))
    held: set[str] = set()
    count = 0
    for i in order[:-1]:
        if count >= n:
            break
        held.add(titles[i])
        count += sizes[titles[i]]
    return [e for e in examples if e.title not in held], [e for e in examples if e.title in held]


def squad_data_dir(data_dir: str | None) -> str | None:
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def find_squad_file(data_dir: str | None, name: str) -> str | None:
    """``DIR/name`` (or ``DIR/squad/name``, ``DIR/SQuAD/name``; ``.gz`` too), or None."""
    if not data_dir:
        return None
    for sub in ("", "squad", "SQuAD"):
        for ext in ("", ".gz"):
            path = os.path.join(data_dir, sub, name + ext)
            if os.path.isfile(path):
                return path
    return None


def _load_from_hub(dataset: str, split: str):
    """Tests monkeypatch this; returns an iterable of row dicts (id, title, context, question, answers)."""
    import datasets

    with _quiet_hub_logs():
        return datasets.load_dataset(dataset, split=split)


def _hub_examples(task: Task, split: str, hint: str) -> list[QAExample]:
    dataset = HUB_DATASETS[task.name]
    hub_split = {"train": "train", "dev": "validation"}[split]
    try:
        rows = _load_from_hub(dataset, hub_split)
        out = []
        for r in rows:
            ans = r["answers"]
            out.append(QAExample(str(r["id"]), str(r["title"]), r["question"], r["context"],
                                 tuple(ans["text"]), tuple(int(s) for s in ans["answer_start"])))
        return out
    except Exception as e:  # noqa: BLE001 - offline, datasets missing, schema change
        reason = "the optional 'datasets' package is not installed" if isinstance(e, ImportError) \
            else f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
        raise FactorLMError(
            f"{task.name} {split} data not found: {hint}, and the hub copy ({dataset}) could not be loaded "
            f"({reason}); pass --data-dir DIR with DIR/{SQUAD_FILES[task.name][split == 'dev']}, "
            "or --train-file / --dev-file, or --dev-file alone with --split-by-article 0.2"
        ) from None


def _squad_loader(task: Task, opts: dict[str, Any]):
    name = task.name
    v2 = name == "squad_v2"
    train_file, dev_file = opts.get("train_file"), opts.get("dev_file")
    fraction = opts.get("split_by_article")
    if fraction:
        check(dev_file is not None or train_file is not None,
              "--split-by-article splits one file: give it with --dev-file (or --train-file)")
        check(not (train_file and dev_file), "--split-by-article splits one file; give --dev-file or --train-file, not both")
        examples = read_squad_file(dev_file or train_file, allow_impossible=v2)
        train, dev = split_by_article(examples, float(fraction))
        out = {"train": train, "dev": dev}
        return {s: out[s] for s in opts["splits"]}, None
    data_dir = squad_data_dir(opts.get("data_dir"))
    out = {}
    for split in opts["splits"]:
        path = train_file if split == "train" else dev_file
        fname = SQUAD_FILES[name][split == "dev"]
        path = path or find_squad_file(data_dir, fname)
        if path is not None:
            out[split] = read_squad_file(path, allow_impossible=v2)
            continue
        hint = f"no {os.path.join(data_dir, fname)}" if data_dir else f"no data dir given (--data-dir / {DATA_DIR_ENV})"
        out[split] = _hub_examples(task, split, hint)
    return out, None


def _make_factory(name: str, v2: bool):
    def factory(**options: Any) -> Task:
        return Task(
            name=name,
            num_labels=2,  # start and end: the span head's two outputs per token
            text_columns=("question", "context"),
            main_metric="f1",
            eval_splits=("dev",),
            metrics=("exact", "f1"),
            available_splits=("train", "dev"),
            description=f"extractive QA, SQuAD {'2.0 (with unanswerable questions)' if v2 else 'v1.1'} JSON",
            loader=_squad_loader,
            kind="qa",
            options={"version_2": v2, **options},
        )

    factory.__name__ = f"{name}_task"
    factory.accepts_file_options = True  # type: ignore[attr-defined]
    factory.qa = True  # type: ignore[attr-defined]
    return factory


TASKS.add("squad", _make_factory("squad", False))
TASKS.add("squad_v2", _make_factory("squad_v2", True))
