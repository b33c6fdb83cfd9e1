"""``--ranks FILE``: per-matrix ranks as a plan (formats, break-even, exact accounting, errors)."""

import json

import pytest

from factorlm.errors import FactorLMError
from factorlm.methods.common import plan_for, targets_for
from factorlm.models.surgery import target_shapes
from factorlm.ranks.explicit import explicit_plan, read_ranks

from conftest import tiny_bert
from test_speed_check import FakeSession

SHAPES = {"a": (32, 32), "b": (64, 32), "c": (32, 64)}  # break-even ranks 16, 21, 21


def _write(tmp_path, obj, name="r.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


@pytest.mark.parametrize("wrap", [lambda r: r, lambda r: {"ranks": r, "score": 0.8},
                                  lambda r: {"method": "rankdyna", "method_info": {"ranks": r, "dense": []}}])
def test_read_ranks_formats(tmp_path, wrap):
    ranks = {"a": 3, "b": 21, "c": 30}
    assert read_ranks(_write(tmp_path, wrap(ranks))) == ranks


@pytest.mark.parametrize("content,message", [
    ("{", "not readable JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ("{}", "must hold a JSON object"),
    ('{"a": 0}', "a has rank 0 (RankDyna with min_one=false"),
    ('{"a": -1}', "the rank of a must be a positive integer, got -1"),
    ('{"method": "svd", "method_info": {}, "modules": {"a": {"rank": 4}}}', "without an allocation"),
    ('{"task": "stsb", "score": 0.8, "accounting": {}}', "has no 'ranks' field"),  # a run JSON from before ranks
    ('{"a": 2.5}', "the rank of a must be a positive integer, got 2.5"),
    ('{"a": true}', "the rank of a must be a positive integer, got True"),
    ('{"ranks": {"a": "4"}}', "the rank of a must be a positive integer, got '4'"),
])
def test_read_ranks_errors(tmp_path, content, message):
    p = tmp_path / "r.json"
    p.write_text(content)
    with pytest.raises(FactorLMError) as e:
        read_ranks(p)
    assert message in str(e.value)
    with pytest.raises(FactorLMError, match="no such file"):
        read_ranks(tmp_path / "missing.json")


def test_explicit_plan_break_even_and_errors():
    # 16 (32 + 32) = 1024 = 32 x 32: at break-even -> dense; 21 x 96 = 2016 < 2048 -> factorized
    plan, dense = explicit_plan(SHAPES, {"a": 16, "b": 21, "c": 22})
    assert plan == {"b": {"rank": 21}} and dense == ["a", "c"]
    plan, dense = explicit_plan(SHAPES, {"a": 15, "b": 1, "c": 1})
    assert plan == {"a": {"rank": 15}, "b": {"rank": 1}, "c": {"rank": 1}} and dense == []
    with pytest.raises(FactorLMError, match="no rank for 1 target matrices"):
        explicit_plan(SHAPES, {"a": 1, "b": 1})
    with pytest.raises(FactorLMError, match="not targets of this model"):
        explicit_plan(SHAPES, {"a": 1, "b": 1, "c": 1, "d": 1})
    with pytest.raises(FactorLMError, match="rank 33 of a is larger than its 32x32 shape allows"):
        explicit_plan(SHAPES, {"a": 33, "b": 1, "c": 1})
    with pytest.raises(FactorLMError, match="nothing to factorize"):
        explicit_plan(SHAPES, {"a": 32, "b": 32, "c": 32})


def test_plan_for_uses_the_file_and_lists_the_dense(tmp_path):
    model = tiny_bert()
    s0 = FakeSession(latency=False)
    targets = targets_for(s0, model)
    shapes = target_shapes(model, targets)
    ranks = {n: (i % 5) * 5 + 1 for i, n in enumerate(targets)}  # q k v o in out: 1 6 11 16 21 1 | 6 11 16 21 1 6
    s = FakeSession(latency=False, ranks=str(_write(tmp_path, ranks)))
    plan = plan_for(s, model, targets)
    assert s.plan_dense == [n for n in targets if ranks[n] * sum(shapes[n]) >= shapes[n][0] * shapes[n][1]]
    # square 32x32 at rank >= 16 is dense; the 64x32 FFN matrix at 21 (2016 < 2048 weights) is not
    assert s.plan_dense == ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.attention.self.value",
                            "bert.encoder.layer.1.attention.output.dense"]
    assert plan["bert.encoder.layer.0.intermediate.dense"] == {"rank": 21}
    assert plan == {n: {"rank": ranks[n]} for n in targets if n not in s.plan_dense}
    # an unrelated file is refused with the offending name, not silently replaced by a uniform plan
    bad = FakeSession(latency=False, ranks=str(_write(tmp_path, {**ranks, "bert.pooler.dense": 3}, "bad.json")))
    with pytest.raises(FactorLMError, match="bert.pooler.dense"):
        plan_for(bad, model, targets)


def test_config_refuses_conflicting_flags(tmp_path):
    from factorlm import RunConfig

    p = str(_write(tmp_path, {"a": 1}))
    with pytest.raises(FactorLMError, match="give --ranks or --rank, not both"):
        RunConfig(ranks=p, rank=4).validate()
    with pytest.raises(FactorLMError, match="use --structure lowrank"):
        RunConfig(ranks=p, structure="monarch").validate()
    with pytest.raises(FactorLMError, match="drop --rank-policy global"):
        RunConfig(ranks=p, rank_policy="global").validate()
    RunConfig(ranks=str(tmp_path / "nope.json")).validate()  # the file is compress's to read (a recipe may outlive it)
