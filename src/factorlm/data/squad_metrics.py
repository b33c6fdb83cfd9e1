"""SQuAD v1.1 / v2.0 metrics: exact match and token F1, computed as the official evaluation scripts do.

As in the official ``evaluate-v1.1.py`` and ``evaluate-v2.0.py``: the answer normalisation (lower
case -> drop ASCII ``string.punctuation`` -> drop the articles a/an/the as whole words -> collapse
whitespace; the same in both versions); EM and token F1 (v1.1's F1 is 0 whenever the two token
lists share nothing, so empty vs empty is 0; v2.0's is 1 when both are empty and 0 when only one
is); the max over a question's gold answers; v2.0's gold filtering (gold answers that normalise to
'' are dropped, none left -> the only gold answer is ''; a question is answerable when its gold
list is non-empty); the no-answer threshold (``na_prob > na_prob_thresh`` -> the question is scored
as answered null); the HasAns / NoAns breakdown; :func:`find_best_thresh`. Scores are summed in the
same order, so the floats are identical.

What differs: inputs are dicts, not files -- ``predictions`` maps question id -> answer text,
``references`` maps question id -> list of gold answer texts (in v2 an empty list marks an
unanswerable question) and ``na_probs`` question id -> no-answer probability; nothing is printed;
v1's keys are ``exact`` / ``f1`` (the script says ``exact_match``); a question v1 has no prediction
for scores 0, silently. Raising :class:`FactorLMError` instead of crashing: empty ``references``, a
v1 question without gold answers, a v2 question without a prediction (the v2 script fails with a
KeyError there) or without an ``na_probs`` entry.

Not in the official scripts: :func:`choose_null_threshold`, which picks the null-score threshold
of SQuAD v2 post-processing.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Mapping, Sequence

from ..errors import FactorLMError

__all__ = [
    "normalize_answer",
    "get_tokens",
    "exact_score",
    "f1_score_v1",
    "f1_score_v2",
    "squad_v1_scores",
    "squad_v2_scores",
    "find_best_thresh",
    "choose_null_threshold",
]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower case, drop ASCII punctuation, drop whole-word a/an/the, collapse whitespace (that order)."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def get_tokens(s: str) -> list[str]:
    """The tokens of the normalised answer (``''`` -> ``[]``)."""
    return normalize_answer(s).split()


def exact_score(prediction: str, gold: str) -> int:
    """1 if the normalised answers are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def _overlap_f1(pred_toks: list[str], gold_toks: list[str]) -> float:
    num_same = sum((Counter(gold_toks) & Counter(pred_toks)).values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def f1_score_v1(prediction: str, gold: str) -> float:
    """v1.1's token F1: 0 when no token is shared (so also when either answer is empty)."""
    return _overlap_f1(get_tokens(prediction), get_tokens(gold))


def f1_score_v2(prediction: str, gold: str) -> float:
    """v2.0's token F1: if either answer normalises to empty, 1 when both do, else 0; otherwise as v1.1."""
    pred_toks, gold_toks = get_tokens(prediction), get_tokens(gold)
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    return _overlap_f1(pred_toks, gold_toks)


def _check_references(references: Mapping[str, Sequence[str]]) -> None:
    if not references:
        raise FactorLMError("SQuAD metrics need at least one reference question")


def squad_v1_scores(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """``{"exact", "f1"}`` in percent over all reference questions (max over each one's gold answers).

    A question without a prediction scores 0 and still counts in the total.
    """
    _check_references(references)
    exact = f1 = 0.0
    for qid, golds in references.items():
        if not golds:
            raise FactorLMError(f"SQuAD v1.1 question {qid!r} has no gold answers (use squad_v2_scores)")
        if qid not in predictions:
            continue
        pred = predictions[qid]
        exact += max(exact_score(pred, g) for g in golds)
        f1 += max(f1_score_v1(pred, g) for g in golds)
    total = len(references)
    return {"exact": 100.0 * exact / total, "f1": 100.0 * f1 / total}


def _v2_gold(golds: Sequence[str]) -> list[str]:
    return [g for g in golds if normalize_answer(g)] or [""]


def _v2_raw(prediction: str, gold: list[str]) -> tuple[int, float]:
    return max(exact_score(prediction, g) for g in gold), max(f1_score_v2(prediction, g) for g in gold)


def _require(what: str, keys: Mapping[str, object], references: Mapping[str, object]) -> None:
    missing = [q for q in references if q not in keys]
    if missing:
        raise FactorLMError(f"no {what} for {len(missing)} of {len(references)} questions (first: {missing[0]!r})")


def _eval_dict(exact: Mapping[str, float], f1: Mapping[str, float], qids: list[str]) -> dict[str, float]:
    total = len(qids)
    return {
        "exact": 100.0 * sum(exact[q] for q in qids) / total,
        "f1": 100.0 * sum(f1[q] for q in qids) / total,
        "total": total,
    }


def squad_v2_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """The official v2.0 evaluation: ``exact``, ``f1`` (percent), ``total`` and the breakdowns.

    ``HasAns_exact`` / ``HasAns_f1`` / ``HasAns_total`` when some question is answerable,
    ``NoAns_*`` when some is not. A question with ``na_probs[qid] > na_prob_thresh`` scores 1 if it
    is unanswerable, else 0 (``na_probs=None``: all 0.0). With ``na_probs`` also ``best_exact``,
    ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh`` from :func:`find_best_thresh`.
    """
    _check_references(references)
    _require("prediction", predictions, references)
    probs = {q: 0.0 for q in predictions} if na_probs is None else na_probs
    _require("na_prob", probs, references)
    has_ans = {q: bool(golds) for q, golds in references.items()}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, golds in references.items():
        exact_raw[qid], f1_raw[qid] = _v2_raw(predictions[qid], _v2_gold(golds))

    def thresholded(raw: dict[str, float]) -> dict[str, float]:
        return {q: float(not has_ans[q]) if probs[q] > na_prob_thresh else s for q, s in raw.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    out = _eval_dict(exact, f1, list(references))
    for prefix, flag in (("HasAns", True), ("NoAns", False)):
        qids = [q for q, h in has_ans.items() if h is flag]
        if qids:
            out.update({f"{prefix}_{k}": v for k, v in _eval_dict(exact, f1, qids).items()})
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(predictions, exact_raw, na_probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, na_probs, has_ans)
    return out


def find_best_thresh(
    preds: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> tuple[float, float]:
    """The official v2.0 ``find_best_thresh``: ``(best score in percent, its na_prob threshold)``.

    Starts from "every question null" (score = number of unanswerable questions), walks the
    questions by increasing ``na_probs`` (stable sort; ids missing from ``scores`` skipped) adding
    the raw score of an answerable one, -1 for an unanswerable one with a non-empty prediction
    (raw text, not normalised) and 0 otherwise; the threshold moves on strict improvement only
    (0.0 if none). As in the official script, with tied ``na_probs`` the threshold may come from
    the middle of a tie group, where applying it does not give the score returned; see
    :func:`choose_null_threshold` for a threshold that does.
    """
    if not scores:
        raise FactorLMError("find_best_thresh needs at least one scored question")
    cur_score = best_score = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score, best_thresh = cur_score, na_probs[qid]
    return 100.0 * best_score / len(scores), float(best_thresh)


def choose_null_threshold(
    non_null_predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    score_diffs: Mapping[str, float],
    metric: str = "f1",
) -> float:
    """The null-score threshold maximising the SQuAD v2 ``metric`` (``"f1"`` or ``"exact"``).

    ``non_null_predictions[qid]``: the question's best non-empty answer; ``score_diffs[qid]``: null
    score minus best non-null score (higher = more likely unanswerable). The final prediction is
    ``''`` when ``score_diff > threshold``, else the non-null answer; applying the returned
    threshold that way gives the best score reachable by any threshold.

    The scan is :func:`find_best_thresh`'s with ``na_probs = score_diffs`` (start all null, move on
    strict improvement), with two deviations that make the threshold reproduce the score:

    * thresholds are taken only at the end of a group of equal ``score_diffs`` (applied with
      ``<=`` a threshold answers the whole group);
    * the gain of answering a question is its answered score minus its null score, both actually
      computed (the official scan assumes null scores 1 / 0 for unanswerable / answerable questions
      and -1 for any non-empty answer to an unanswerable one; the two agree unless an answer or
      every gold answer normalises to '').

    When no threshold beats "all null", a threshold below every score diff is returned
    (``min - 1.0``), so every prediction becomes '' (the official scan would return 0.0, which
    answers the questions whose diff is <= 0).
    """
    if metric not in ("f1", "exact"):
        raise FactorLMError(f"metric must be 'f1' or 'exact', got {metric!r}")
    _check_references(references)
    _require("prediction", non_null_predictions, references)
    _require("score diff", score_diffs, references)
    if any(math.isnan(score_diffs[q]) for q in references):
        raise FactorLMError("score_diffs contains NaN")
    which = 1 if metric == "f1" else 0
    cur = 0.0
    gain: dict[str, float] = {}
    for qid, golds in references.items():
        gold = _v2_gold(golds)
        null = _v2_raw("", gold)[which]
        gain[qid] = _v2_raw(non_null_predictions[qid], gold)[which] - null
        cur += null
    order = sorted(references, key=lambda q: score_diffs[q])
    lowest = float(score_diffs[order[0]])
    best, best_thresh = cur, lowest - 1.0 if lowest - 1.0 < lowest else math.nextafter(lowest, -math.inf)
    for i, qid in enumerate(order):
        cur += gain[qid]
        if i + 1 < len(order) and score_diffs[order[i + 1]] == score_diffs[qid]:
            continue  # not the end of a tie group
        if cur > best:
            best, best_thresh = cur, float(score_diffs[qid])
    return best_thresh
