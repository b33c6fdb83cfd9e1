"""Tests for factorlm.data.squad_metrics: the official SQuAD v1.1 / v2.0 metrics and
choose_null_threshold. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from factorlm.data.squad_metrics import (
    choose_null_threshold,
    exact_score,
    f1_score_v1,
    f1_score_v2,
    find_best_thresh,
    get_tokens,
    normalize_answer,
    squad_v1_scores,
    squad_v2_scores,
)
from factorlm.errors import FactorLMError


# ---------------------------------------------------------------- normalisation


def test_normalize_basic():
    # lower -> 'the  cat!' -> no punctuation 'the  cat' -> article gone '   cat' -> 'cat'
    assert normalize_answer("The  Cat!") == "cat"
    assert normalize_answer("") == ""
    assert normalize_answer("A, an, THE.") == ""


def test_articles_only_as_whole_words():
    assert normalize_answer("theater") == "theater"
    assert normalize_answer("An anthem") == "anthem"
    assert normalize_answer("Panama canal") == "panama canal"  # 'a' inside words stays
    # \b is Unicode-aware: 'é' is a word character, so 'éthe' has no boundary before 'the'
    assert normalize_answer("éthe the café") == "éthe café"


def test_punctuation_inside_words_and_order():
    assert normalize_answer("don't") == "dont"
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("well-known") == "wellknown"
    # punctuation goes before articles: 'the-cat' -> 'thecat' (no article left to remove)
    assert normalize_answer("the-cat") == "thecat"
    assert normalize_answer("(a) cat") == "cat"
    # only ASCII string.punctuation is removed: curly quotes and the em dash stay
    assert normalize_answer("“Cat”—dog") == "“cat”—dog"


def test_unicode_whitespace():
    # NBSP, em space, tab and newline all split; the leading 'a' is an article
    assert normalize_answer("a\u00a0Cat\u2003sat\t on\nmat ") == "cat sat on mat"
    assert get_tokens("a\u00a0Cat\u2003sat") == ["cat", "sat"]


def test_get_tokens():
    assert get_tokens("") == []
    assert get_tokens("The the !") == []
    assert get_tokens("The Big, big cat") == ["big", "big", "cat"]


# ---------------------------------------------------------------- EM / F1


def test_exact_score():
    assert exact_score("The Cat.", "cat") == 1
    assert exact_score("cat", "cats") == 0
    assert exact_score("", "the") == 1  # both normalise to ''
    assert isinstance(exact_score("a", "b"), int)


def test_f1_partial_overlap():
    # pred tokens: cat sat on mat (4); gold: cat on mat (3); common 3
    # P = 3/4, R = 1, F1 = 2 * 3/4 / (7/4) = 6/7
    assert f1_score_v1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert f1_score_v2("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)


def test_f1_repeated_tokens():
    # pred: cat cat cat dog; gold: cat cat mouse; common = min(3, 2) cats = 2
    # P = 2/4, R = 2/3, F1 = 2 * (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert f1_score_v1("cat cat cat dog", "cat cat mouse") == pytest.approx(4 / 7)
    # symmetric: swapping swaps P and R
    assert f1_score_v1("cat cat mouse", "cat cat cat dog") == pytest.approx(4 / 7)
    assert f1_score_v1("cat", "dog") == 0.0


def test_f1_empty_v1_vs_v2():
    assert f1_score_v1("", "") == 0.0  # num_same == 0
    assert f1_score_v2("", "") == 1.0  # both empty -> agree
    assert f1_score_v2("The", "a") == 1.0  # both normalise to ''
    assert f1_score_v1("", "cat") == 0.0
    assert f1_score_v2("", "cat") == 0.0
    assert f1_score_v2("cat", "") == 0.0


# ---------------------------------------------------------------- v1.1


def test_squad_v1_scores_max_over_gold_and_missing_prediction():
    refs = {
        "q1": ["Denver Broncos", "the Broncos"],
        "q2": ["Santa Clara, California"],
        "q3": ["Levi's Stadium"],
    }
    preds = {"q1": "Broncos", "q2": "Santa Clara", "other": "ignored"}
    # q1: EM max(0, 1) = 1; F1 max(P=1 R=1/2 -> 2/3, 1) = 1
    # q2: EM 0; F1: P = 2/2, R = 2/3 -> 2 * 2/3 / (5/3) = 0.8
    # q3: missing -> 0, still counted: total 3
    out = squad_v1_scores(preds, refs)
    assert set(out) == {"exact", "f1"}
    assert out["exact"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * 1.8 / 3)  # 60.0


def test_squad_v1_errors():
    with pytest.raises(FactorLMError):
        squad_v1_scores({}, {})
    with pytest.raises(FactorLMError, match="no gold answers"):
        squad_v1_scores({"q": "x"}, {"q": []})


# ---------------------------------------------------------------- v2.0


def test_v2_unanswerable():
    # gold [] -> the only gold answer is ''
    out = squad_v2_scores({"q": ""}, {"q": []})
    assert out == {"exact": 100.0, "f1": 100.0, "total": 1, "NoAns_exact": 100.0, "NoAns_f1": 100.0, "NoAns_total": 1}
    out = squad_v2_scores({"q": "Paris"}, {"q": []})
    assert (out["exact"], out["f1"]) == (0.0, 0.0)
    assert "HasAns_total" not in out
    # an answer that normalises to '' is correct for an unanswerable question
    assert squad_v2_scores({"q": "The."}, {"q": []})["exact"] == 100.0


def test_v2_gold_answers_normalising_to_empty():
    # 'The' is dropped from the gold list, leaving 'a cat' -> 'cat' == 'cat'
    assert squad_v2_scores({"q": "cat"}, {"q": ["The", "a cat"]})["exact"] == 100.0
    # all gold answers normalise to '': gold becomes [''], but the question is still answerable
    out = squad_v2_scores({"q": ""}, {"q": ["The", "!"]})
    assert (out["exact"], out["f1"], out["HasAns_total"]) == (100.0, 100.0, 1)
    assert "NoAns_total" not in out
    out = squad_v2_scores({"q": "cat"}, {"q": ["The", "!"]})
    assert (out["exact"], out["f1"]) == (0.0, 0.0)


# Mixed fixture: two answerable, two unanswerable questions.
REFS = {"q1": ["Paris"], "q2": [], "q3": ["red fox"], "q4": []}
PREDS = {"q1": "Paris", "q2": "foo", "q3": "red dog", "q4": ""}
NA_PROBS = {"q1": 0.1, "q2": 0.5, "q3": 0.3, "q4": 0.2}
# raw exact: q1 1, q2 0, q3 0, q4 1
# raw f1:    q1 1, q2 0, q3 0.5 (P = R = 1/2), q4 1


def test_v2_breakdown():
    out = squad_v2_scores(PREDS, REFS)
    assert out == {
        "exact": 50.0,  # 2/4
        "f1": 62.5,  # 2.5/4
        "total": 4,
        "HasAns_exact": 50.0,  # q1, q3: 1/2
        "HasAns_f1": 75.0,  # 1.5/2
        "HasAns_total": 2,
        "NoAns_exact": 50.0,  # q2, q4: 1/2
        "NoAns_f1": 50.0,
        "NoAns_total": 2,
    }
    assert isinstance(out["total"], int) and isinstance(out["HasAns_total"], int)
    assert list(out)[:3] == ["exact", "f1", "total"]


def test_v2_na_prob_thresh():
    # thresh 0.4: only q2 (0.5 > 0.4) is null -> unanswerable -> 1
    # exact 1,1,0,1 -> 75; f1 1,1,0.5,1 -> 87.5; NoAns 2/2
    out = squad_v2_scores(PREDS, REFS, na_probs=NA_PROBS, na_prob_thresh=0.4)
    assert (out["exact"], out["f1"]) == (75.0, 87.5)
    assert (out["NoAns_exact"], out["NoAns_f1"], out["HasAns_f1"]) == (100.0, 100.0, 75.0)
    # thresh 0.05: all null -> answerable 0, unanswerable 1 -> 50 / 50
    out = squad_v2_scores(PREDS, REFS, na_probs=NA_PROBS, na_prob_thresh=0.05)
    assert (out["exact"], out["f1"], out["HasAns_f1"], out["NoAns_f1"]) == (50.0, 50.0, 0.0, 100.0)
    # default thresh 1.0: nothing is > 1.0 -> the raw scores
    out = squad_v2_scores(PREDS, REFS, na_probs=NA_PROBS)
    assert (out["exact"], out["f1"]) == (50.0, 62.5)


def test_find_best_thresh_hand_worked():
    has_ans = {q: bool(g) for q, g in REFS.items()}
    # start = 2 (q2, q4 unanswerable); order by na_prob: q1 .1, q4 .2, q3 .3, q2 .5
    # exact: q1 +1 -> 3 (best, .1); q4 +0 (empty pred) -> 3; q3 +0 -> 3; q2 -1 -> 2 => 3/4
    exact_raw = {"q1": 1, "q2": 0, "q3": 0, "q4": 1}
    assert find_best_thresh(PREDS, exact_raw, NA_PROBS, has_ans) == (75.0, 0.1)
    # f1: q1 -> 3 (.1); q4 -> 3; q3 +0.5 -> 3.5 (best, .3); q2 -> 2.5 => 3.5/4
    f1_raw = {"q1": 1.0, "q2": 0.0, "q3": 0.5, "q4": 1.0}
    assert find_best_thresh(PREDS, f1_raw, NA_PROBS, has_ans) == (87.5, 0.3)
    out = squad_v2_scores(PREDS, REFS, na_probs=NA_PROBS)
    best = (out["best_exact"], out["best_exact_thresh"], out["best_f1"], out["best_f1_thresh"])
    assert best == (75.0, 0.1, 87.5, 0.3)
    # applying best_f1_thresh reproduces it: q2 (.5 > .3) null -> 1; the others as raw
    assert squad_v2_scores(PREDS, REFS, na_probs=NA_PROBS, na_prob_thresh=0.3)["f1"] == 87.5
    assert "best_f1" not in squad_v2_scores(PREDS, REFS)


def test_v2_errors():
    with pytest.raises(FactorLMError):
        squad_v2_scores({}, {})
    with pytest.raises(FactorLMError, match="no prediction for 1 of 4"):
        squad_v2_scores({"q1": "Paris", "q2": "", "q3": ""}, REFS)
    with pytest.raises(FactorLMError, match="no na_prob"):
        squad_v2_scores(PREDS, REFS, na_probs={"q1": 0.0})


# ---------------------------------------------------------------- choose_null_threshold


def _apply(non_null, diffs, t):
    return {q: (p if diffs[q] <= t else "") for q, p in non_null.items()}


NON_NULL = {"q1": "Paris", "q2": "foo", "q3": "red dog", "q4": "bar"}
DIFFS = {"q1": 0.1, "q2": 0.5, "q3": 0.3, "q4": 0.4}


def test_choose_null_threshold_round_trip():
    # start all null = 2; order q1 .1, q3 .3, q4 .4, q2 .5
    # f1 gains +1, +0.5, -1, -1 -> 3, 3.5 (best at .3), 2.5, 1.5 => 87.5
    # exact gains +1, 0, -1, -1 -> 3 (best at .1), 3, 2, 1 => 75
    t_f1 = choose_null_threshold(NON_NULL, REFS, DIFFS)
    t_em = choose_null_threshold(NON_NULL, REFS, DIFFS, metric="exact")
    assert (t_f1, t_em) == (0.3, 0.1)
    official = squad_v2_scores(NON_NULL, REFS, na_probs=DIFFS)
    assert (official["best_f1"], official["best_f1_thresh"]) == (87.5, 0.3)
    assert squad_v2_scores(_apply(NON_NULL, DIFFS, t_f1), REFS)["f1"] == official["best_f1"] == 87.5
    assert squad_v2_scores(_apply(NON_NULL, DIFFS, t_em), REFS)["exact"] == official["best_exact"] == 75.0


def test_choose_null_threshold_all_null_when_nothing_helps():
    refs = {"a": ["cat"], "b": []}
    non_null = {"a": "dog", "b": "fish"}  # answering never helps: gains 0 and -1
    diffs = {"a": -2.0, "b": -1.0}
    # official: no strict improvement -> thresh 0.0, which answers both (diffs <= 0): 0/2
    assert squad_v2_scores(non_null, refs, na_probs=diffs)["best_f1_thresh"] == 0.0
    assert squad_v2_scores(_apply(non_null, diffs, 0.0), refs)["f1"] == 0.0
    t = choose_null_threshold(non_null, refs, diffs)
    assert t == -3.0  # min - 1.0: everything null -> b correct -> 50
    assert squad_v2_scores(_apply(non_null, diffs, t), refs)["f1"] == 50.0


def test_choose_null_threshold_tie_groups():
    refs = {"a": ["cat"], "b": []}
    non_null = {"a": "cat", "b": "fish"}
    diffs = {"a": 0.5, "b": 0.5}
    # official scan: start 1; a +1 -> 2 (best, .5); b -1 -> 1 => claims 100% at 0.5 ...
    assert find_best_thresh(non_null, {"a": 1.0, "b": 0.0}, diffs, {"a": True, "b": False}) == (100.0, 0.5)
    # ... but 0.5 applied with <= answers both: a 1, b 0 -> 50%
    assert squad_v2_scores(_apply(non_null, diffs, 0.5), refs)["f1"] == 50.0
    # group end: 1 + 1 - 1 = 1, not > 1 -> stay all null (min - 1.0 = -0.5): a 0, b 1 -> 50%
    assert choose_null_threshold(non_null, refs, diffs) == -0.5
    # a tie group that does help: a, b, c at .5 -> 1 + 1 - 1 + 1 = 2 > 1 -> threshold .5, 2/3
    refs["c"], non_null["c"], diffs["c"] = ["dog"], "dog", 0.5
    t = choose_null_threshold(non_null, refs, diffs)
    assert t == 0.5
    assert squad_v2_scores(_apply(non_null, diffs, t), refs)["f1"] == pytest.approx(200 / 3)


def test_choose_null_threshold_uses_real_null_scores():
    refs = {"a": ["cat"], "b": []}
    non_null = {"a": "cat", "b": "The"}  # 'The' normalises to '': right for unanswerable b
    diffs = {"a": 1.0, "b": 0.0}
    # official scan: start 1; b counted -1 (non-empty text) -> 0; a +1 -> 1, not > 1 => 50% at 0.0
    assert squad_v2_scores(non_null, refs, na_probs=diffs)["best_f1"] == 50.0
    # real gains: b 1 - 1 = 0 -> 1; a +1 -> 2 > 1 => threshold 1.0, both answered, 100%
    t = choose_null_threshold(non_null, refs, diffs)
    assert t == 1.0
    assert squad_v2_scores(_apply(non_null, diffs, t), refs)["f1"] == 100.0


def test_choose_null_threshold_errors():
    with pytest.raises(FactorLMError, match="metric"):
        choose_null_threshold(NON_NULL, REFS, DIFFS, metric="em")
    with pytest.raises(FactorLMError, match="no score diff"):
        choose_null_threshold(NON_NULL, REFS, {"q1": 0.0})
    with pytest.raises(FactorLMError, match="no prediction"):
        choose_null_threshold({"q1": "x"}, REFS, DIFFS)


@pytest.mark.parametrize("metric", ["f1", "exact"])
def test_choose_null_threshold_is_optimal_random(metric):
    rng = np.random.default_rng(0)
    vocab = ["alpha", "beta", "gamma", "delta", "omega", "the", "a"]

    def phrase() -> str:
        return " ".join(rng.choice(vocab, size=int(rng.integers(1, 4))))

    refs, non_null, diffs = {}, {}, {}
    for i in range(200):
        q = f"q{i}"
        refs[q] = [] if rng.random() < 0.4 else [phrase() for _ in range(int(rng.integers(1, 4)))]
        non_null[q] = phrase()
        diffs[q] = float(np.round(rng.normal(), 1))  # rounded: many ties
    t = choose_null_threshold(non_null, refs, diffs, metric=metric)
    chosen = squad_v2_scores(_apply(non_null, diffs, t), refs)[metric]
    candidates = sorted(set(diffs.values())) + [min(diffs.values()) - 1.0]
    brute = [squad_v2_scores(_apply(non_null, diffs, c), refs)[metric] for c in candidates]
    assert len(candidates) > 20 and len(candidates) < 201  # ties were exercised
    assert max(brute) == pytest.approx(chosen, abs=1e-9)
    assert all(b <= chosen + 1e-9 for b in brute)
