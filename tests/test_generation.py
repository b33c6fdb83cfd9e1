"""lm.generation: the repetition measures on hand-made token sequences (exact values), and the report's
loop warning."""

from __future__ import annotations

import pytest

from factorlm.lm.generation import distinct_n, longest_repeat, loop_warning, score


def test_distinct_2_and_longest_repeat_exact():
    assert distinct_n([1, 2, 3, 4, 5]) == 1.0
    assert distinct_n([7, 7, 7, 7, 7]) == 0.25  # 4 bigrams, all (7, 7)
    assert distinct_n([1, 2, 1, 2, 1, 2]) == pytest.approx(2 / 5)
    assert longest_repeat([1, 2, 3, 4]) == 0
    assert longest_repeat([1, 2, 3, 1, 2, 4]) == 2
    assert longest_repeat([5, 5, 5, 5]) == 3  # overlapping occurrences count
    assert longest_repeat([9, 1, 2, 3, 4, 8, 1, 2, 3, 4]) == 4


def test_loops_flags_a_repeated_phrase_and_a_stuck_token_only():
    prose = list(range(100, 148))
    assert not score(prose)["loops"]
    phrase = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert score(list(range(200, 228)) + phrase + phrase)["loops"]  # an 8+-token phrase twice
    assert score([3] * 48)["loops"]


def test_loop_warning_only_when_compressed_loops_more():
    d = {"loops": 1, "of": 4, "distinct_2": 0.9}
    assert loop_warning(d, {"loops": 1, "of": 4, "distinct_2": 0.8}) is None
    w = loop_warning(d, {"loops": 3, "of": 4, "distinct_2": 0.4})
    assert "loop on 3 of 4 prompts (dense: 1" in w
