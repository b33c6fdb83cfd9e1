"""Evaluation of extractive QA models: span logits -> answers -> the official SQuAD scores.

:func:`predict_spans` runs a span head (``start_logits`` / ``end_logits``) over a QA loader made by
:func:`factorlm.data.qa.make_qa_dataloader` and keeps each window's logits over its own tokens;
:func:`score_qa` post-processes them (:func:`factorlm.data.qa.postprocess_qa`) and scores the
answers exactly as the official SQuAD v1.1 / v2.0 scripts (:mod:`factorlm.data.squad_metrics`);
scores are percentages, as there.

SQuAD 2.0's null threshold: a split scored with ``null_threshold=None`` chooses its own (the
threshold maximising its F1: what model selection on the held-out training slice does) and reports
it as ``null_threshold``; the reported dev split is scored with the threshold chosen on the
selection slice (:meth:`factorlm.session.Session.evaluate`), never with its own.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import FactorLMError
from .evaluate import _model_device, _to_device, output_heads

__all__ = ["predict_spans", "score_qa", "evaluate_qa", "qa_baseline"]


@torch.no_grad()
def predict_spans(model: nn.Module, loader, accelerator=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per window (in loader order): its start and end logits (float32) over its non-padding tokens."""
    device = accelerator.device if accelerator is not None else _model_device(model)
    was_training = model.training
    model.eval()
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            inputs = {k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")}
            heads = output_heads(model(**inputs))
            if "start_logits" not in heads:
                raise FactorLMError("a QA task needs a span head (start_logits / end_logits); the model gives "
                                    f"{', '.join(heads)}")
            s, e = heads["start_logits"].float(), heads["end_logits"].float()
            lengths = inputs["attention_mask"].sum(-1)
            if accelerator is not None and accelerator.num_processes > 1:
                s = accelerator.pad_across_processes(s, dim=1, pad_index=-1e4)
                e = accelerator.pad_across_processes(e, dim=1, pad_index=-1e4)
                s, e, lengths = accelerator.gather_for_metrics((s.contiguous(), e.contiguous(), lengths))
            s, e, lengths = s.cpu().numpy(), e.cpu().numpy(), lengths.cpu().numpy()
            for i, n in enumerate(lengths):
                starts.append(s[i, :n].copy())
                ends.append(e[i, :n].copy())
    finally:
        model.train(was_training)
    return starts, ends


def _references(examples) -> dict[str, list[str]]:
    return {e.id: list(e.answers) for e in examples}


def score_qa(dataset, starts, ends, null_threshold: float | None = None,
             stats: dict[str, float] | None = None) -> dict[str, float]:
    """SQuAD scores of one split from its windows' logits (``dataset``: the QA loader's dataset)."""
    from ..data.qa import apply_null_threshold, postprocess_qa
    from ..data.squad_metrics import choose_null_threshold, squad_v1_scores, squad_v2_scores

    st = dataset.settings
    answers, diffs = postprocess_qa(dataset.examples, dataset.feats, starts, ends, n_best=st["n_best"],
                                    max_answer_length=st["max_answer_length"], version_2=st["version_2"])
    refs = _references(dataset.examples)
    if st["version_2"]:
        thr = choose_null_threshold(answers, refs, diffs, metric="f1") if null_threshold is None else null_threshold
        preds = apply_null_threshold(answers, diffs, thr)
        metrics = {k: float(v) for k, v in squad_v2_scores(preds, refs).items() if not k.endswith("_total") and k != "total"}
        metrics["null_threshold"] = float(thr)
    else:
        preds = answers
        metrics = {k: float(v) for k, v in squad_v1_scores(preds, refs).items()}
    if stats is not None:
        top = Counter(preds.values()).most_common(1)
        stats.update(n=float(len(preds)), top_class_share=(top[0][1] / len(preds)) if top else 0.0,
                     empty_share=sum(1 for p in preds.values() if not p) / max(len(preds), 1))
    return metrics


def evaluate_qa(model: nn.Module, eval_loaders: Mapping[str, Any], accelerator=None,
                stats: dict[str, dict[str, float]] | None = None,
                null_threshold: float | None = None) -> dict[str, dict[str, float]]:
    """``{split: metrics}`` for every QA loader (see :func:`score_qa`)."""
    out = {}
    for split, loader in eval_loaders.items():
        starts, ends = predict_spans(model, loader, accelerator)
        st: dict[str, float] = {}
        out[split] = score_qa(loader.dataset, starts, ends, null_threshold, st)
        if stats is not None:
            stats[split] = st
    return out


def qa_baseline(examples, version_2: bool, train_examples=(), select_examples=()) -> dict[str, float]:
    """A trivial reader's scores on ``examples``: the first ``k`` words of the context, ``k`` the median
    gold answer length in words of ``train_examples`` (else, evaluating a saved model without its
    training data, of ``examples``).  SQuAD 2.0: that reader or one that never answers, whichever
    scores the better F1 on ``select_examples`` (else on ``examples``)."""
    from ..data.squad_metrics import squad_v1_scores, squad_v2_scores

    examples = list(examples)
    if not examples:
        return {}
    source = [e for e in (list(train_examples) or examples) if e.answers]
    k = max(1, int(np.median([len(e.answers[0].split()) for e in source]))) if source else 1

    def scores(exs, never_answer: bool) -> dict[str, float]:
        refs = _references(exs)
        preds = {e.id: "" if never_answer else " ".join(e.context.split()[:k]) for e in exs}
        if not version_2:
            return {m: float(v) for m, v in squad_v1_scores(preds, refs).items()}
        return {m: float(v) for m, v in squad_v2_scores(preds, refs).items() if not m.endswith("_total") and m != "total"}

    if not version_2:
        return scores(examples, False)
    choose_on = list(select_examples) or examples
    never = scores(choose_on, True)["f1"] > scores(choose_on, False)["f1"]
    return scores(examples, never)
