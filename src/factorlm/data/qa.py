"""Extractive QA pre- and post-processing: windows over long contexts, span labels, n-best answers.

As in Hugging Face's ``run_qa.py`` (the standard recipe for BERT-style span heads on SQuAD):

* **Pre-processing** (:func:`encode_qa`): question + context, truncating only the context to
  ``max_length`` tokens; a context that does not fit becomes several overlapping windows
  (``doc_stride`` tokens shared by consecutive windows), each a *feature*.  The question's leading
  white space is stripped.  Training features are labelled with the token span of the **first**
  gold answer, or with the ``[CLS]`` position when the window does not contain the whole answer (or
  the question has none, SQuAD 2.0).  Evaluation features keep their example and the character
  offsets of their context tokens.  Tokenizers that pad on the left are refused (the labels and the
  per-window logits assume padding on the right, as BERT-style encoders do).
* **Post-processing** (:func:`postprocess_qa`): for every example, over all of its windows, the
  ``n_best`` highest start and end logits are paired; pairs outside the context, with end < start or
  longer than ``max_answer_length`` tokens are dropped; the best pair's score is
  ``start_logit + end_logit`` and its answer the context's characters between their offsets.  For
  SQuAD 2.0 the null score is the smallest ``start[CLS] + end[CLS]`` over the windows, and the answer
  is empty when ``null - best > threshold`` (:func:`apply_null_threshold`; the threshold is chosen
  on the selection slice, see :func:`factorlm.data.squad_metrics.choose_null_threshold`).

Differs from ``run_qa.py``: one code path for both SQuAD versions; SQuAD 2.0's score difference is
returned per example so the threshold can be chosen on held-out training data instead of fixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import FactorLMError, check
from .squad import QAExample

__all__ = ["QAFeatures", "encode_qa", "make_qa_dataloader", "postprocess_qa", "apply_null_threshold",
           "QA_DEFAULTS", "LABEL_KEYS"]

QA_DEFAULTS = {"max_length": 384, "doc_stride": 128, "max_answer_length": 30, "n_best": 20}
LABEL_KEYS = ("start_positions", "end_positions")


@dataclass
class QAFeatures:
    """The windows of a list of examples: model inputs per feature, and for evaluation the example
    each feature came from and its context tokens' character offsets (``None`` elsewhere)."""

    inputs: list[dict[str, list[int]]]
    example_index: list[int]
    offsets: list[list[tuple[int, int] | None]]
    cls_index: list[int]  # where the [CLS] token is (the null answer's position)
    start_positions: list[int] | None = None
    end_positions: list[int] | None = None

    def __len__(self) -> int:
        return len(self.inputs)


def _check_tokenizer(tokenizer) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise FactorLMError("extractive QA needs a fast tokenizer (offset mappings); this model's tokenizer is "
                            f"{type(tokenizer).__name__}")
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise FactorLMError("extractive QA needs a tokenizer that pads on the right (encoders do); this one pads on "
                            f"the {tokenizer.padding_side}")


def encode_qa(examples: Sequence[QAExample], tokenizer, *, max_length: int = 384, doc_stride: int = 128,
              train: bool, chunk: int = 1024) -> QAFeatures:
    """Tokenize ``examples`` into windows (see the module docstring); ``train`` adds span labels."""
    _check_tokenizer(tokenizer)
    check(0 < doc_stride < max_length, f"--doc-stride must be in (0, --max-length {max_length}), got {doc_stride}")
    ctx_id = 1  # question first, then the context (right padding, checked above)
    feats = QAFeatures([], [], [], [], [] if train else None, [] if train else None)
    for lo in range(0, len(examples), chunk):
        part = examples[lo:lo + chunk]
        qs = [e.question.lstrip() for e in part]
        cs = [e.context for e in part]
        try:
            enc = tokenizer(qs, cs, truncation="only_second", max_length=max_length,
                            stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                            padding=False)
        except Exception as e:  # noqa: BLE001 - e.g. a question longer than max_length
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise FactorLMError(f"cannot window the QA examples at --max-length {max_length} / --doc-stride "
                                f"{doc_stride}: {msg}") from None
        keys = [k for k in enc.keys() if k not in ("offset_mapping", "overflow_to_sample_mapping")]
        cls_id = tokenizer.cls_token_id
        for i, offsets in enumerate(enc["offset_mapping"]):
            j = enc["overflow_to_sample_mapping"][i]
            ex = part[j]
            seq_ids = enc.sequence_ids(i)
            feats.inputs.append({k: enc[k][i] for k in keys})
            feats.example_index.append(lo + j)
            ids = enc["input_ids"][i]
            cls = ids.index(cls_id) if cls_id is not None and cls_id in ids else 0
            feats.cls_index.append(cls)
            if train:
                start = end = cls
                if ex.answers:
                    s_char = ex.answer_starts[0]
                    e_char = s_char + len(ex.answers[0])
                    ctx = [t for t, s in enumerate(seq_ids) if s == ctx_id]
                    ts, te = ctx[0], ctx[-1]
                    if offsets[ts][0] <= s_char and offsets[te][1] >= e_char:
                        while ts <= te and offsets[ts][0] <= s_char:
                            ts += 1
                        while te >= ctx[0] and offsets[te][1] >= e_char:
                            te -= 1
                        start, end = ts - 1, te + 1
                feats.start_positions.append(start)  # type: ignore[union-attr]
                feats.end_positions.append(end)  # type: ignore[union-attr]
                feats.offsets.append([])
            else:
                feats.offsets.append([tuple(o) if s == ctx_id else None for o, s in zip(offsets, seq_ids)])
    return feats


class _QADataset(Dataset):
    """Windows as model inputs; keeps what post-processing needs (``examples``, ``feats``,
    ``settings``) on the dataset, where it survives ``accelerator.prepare`` of the loader."""

    def __init__(self, feats: QAFeatures, examples: list[QAExample], settings: dict[str, Any]):
        self.feats = feats
        self.examples = examples
        self.settings = settings

    def __len__(self) -> int:
        return len(self.feats)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = dict(self.feats.inputs[i])
        if self.feats.start_positions is not None:
            item["start_positions"] = self.feats.start_positions[i]
            item["end_positions"] = self.feats.end_positions[i]  # type: ignore[index]
        return item


class _QACollate:
    def __init__(self, tokenizer):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer, padding="longest", return_tensors="pt")

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        labels = {k: torch.tensor([it.pop(k) for it in items], dtype=torch.long) for k in LABEL_KEYS if k in items[0]}
        return {**dict(self.pad(items)), **labels}


def make_qa_dataloader(examples: Sequence[QAExample], tokenizer, *, batch_size: int, max_length: int = 384,
                       doc_stride: int = 128, train: bool = False, shuffle: bool = False, seed: int = 0,
                       n_best: int = 20, max_answer_length: int = 30, version_2: bool = False) -> DataLoader:
    """Batches of windows with dynamic padding.  Training batches carry ``start_positions`` /
    ``end_positions``; ``loader.dataset`` keeps ``examples``, ``feats`` (in loader order) and the
    post-processing ``settings`` (``n_best``, ``max_answer_length``, ``version_2``) for
    :func:`postprocess_qa`."""
    examples = list(examples)
    check(len(examples) > 0, "make_qa_dataloader got no examples")
    check(batch_size > 0, f"batch_size must be positive, got {batch_size}")
    feats = encode_qa(examples, tokenizer, max_length=max_length, doc_stride=doc_stride, train=train)
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    check(n_best > 0 and max_answer_length > 0, "--n-best and --max-answer-length must be > 0")
    settings = {"n_best": n_best, "max_answer_length": max_answer_length, "version_2": version_2}
    return DataLoader(_QADataset(feats, examples, settings), batch_size=batch_size, shuffle=shuffle,
                      generator=generator, collate_fn=_QACollate(tokenizer))


def postprocess_qa(examples: Sequence[QAExample], features: QAFeatures, start_logits: Sequence[np.ndarray],
                   end_logits: Sequence[np.ndarray], *, n_best: int = 20, max_answer_length: int = 30,
                   version_2: bool = False) -> tuple[dict[str, str], dict[str, float]]:
    """``(answers, score_diffs)``: every example's best non-null answer text (``""`` when no valid span
    exists in any window) and, for SQuAD 2.0, ``null score - best span score`` (``{}`` for v1.1).

    ``start_logits[f]`` / ``end_logits[f]``: feature ``f``'s logits over its own tokens (any padding
    beyond its length is ignored: its offsets are not context)."""
    check(len(start_logits) == len(features) == len(end_logits),
          f"postprocess_qa got logits for {len(start_logits)} features, expected {len(features)}")
    by_example: list[list[int]] = [[] for _ in examples]
    for f, i in enumerate(features.example_index):
        by_example[i].append(f)
    answers: dict[str, str] = {}
    diffs: dict[str, float] = {}
    for i, ex in enumerate(examples):
        best_score, best_text = -np.inf, ""
        null = np.inf
        for f in by_example[i]:
            offsets = features.offsets[f]
            s = np.asarray(start_logits[f], dtype=np.float64)[: len(offsets)]
            e = np.asarray(end_logits[f], dtype=np.float64)[: len(offsets)]
            c = features.cls_index[f]
            null = min(null, s[c] + e[c])
            starts = np.argsort(s)[::-1][:n_best]
            ends = np.argsort(e)[::-1][:n_best]
            for a in starts:
                if offsets[a] is None:
                    continue
                for b in ends:
                    if offsets[b] is None or b < a or b - a + 1 > max_answer_length:
                        continue
                    score = s[a] + e[b]
                    if score > best_score:
                        best_score = score
                        best_text = ex.context[offsets[a][0]: offsets[b][1]]
        answers[ex.id] = best_text
        if version_2:
            diffs[ex.id] = float(null - best_score) if np.isfinite(best_score) else float("inf")
    return answers, diffs


def apply_null_threshold(answers: dict[str, str], score_diffs: dict[str, float], threshold: float) -> dict[str, str]:
    """SQuAD 2.0 predictions: ``""`` where ``null - best > threshold``, else the best span."""
    return {q: ("" if score_diffs.get(q, -np.inf) > threshold else a) for q, a in answers.items()}
