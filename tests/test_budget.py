import pytest

from factorlm.errors import FactorLMError
from factorlm.layers import LowRankLinear
from factorlm.ranks import break_even_rank, fixed_plan, past_break_even, plan_params, stored_weights, uniform_plan


from conftest import encoder_shapes  # noqa: E402


@pytest.mark.parametrize(
    "layers,d,ff,expected",
    [(12, 768, 3072, {0.5: 256, 0.25: 128, 0.16: 81}), (6, 384, 1536, {0.5: 128, 0.25: 64, 0.16: 40})],
)
def test_uniform_rank_matches_lpaf_convention(layers, d, ff, expected):
    shapes = encoder_shapes(layers, d, ff)
    dense = sum(o * i for o, i in shapes.values())
    for keep, k in expected.items():
        plan = uniform_plan(shapes, keep, LowRankLinear)
        assert {p["rank"] for p in plan.values()} == {k}
        assert plan_params(shapes, plan, LowRankLinear) <= keep * dense
        bigger = {n: {"rank": k + 1} for n in shapes}
        assert plan_params(shapes, bigger, LowRankLinear) > keep * dense


def test_keep_out_of_range():
    shapes = encoder_shapes(1, 8, 16)
    for keep in (0, -0.1, 1.5, "abc"):
        with pytest.raises(FactorLMError, match="keep"):
            uniform_plan(shapes, keep, LowRankLinear)


def test_keep_too_small():
    with pytest.raises(FactorLMError, match="too small"):
        uniform_plan(encoder_shapes(1, 8, 16), 0.01, LowRankLinear)


def test_fixed_rank_checks_range():
    shapes = encoder_shapes(1, 8, 16)
    assert set(p["rank"] for p in fixed_plan(shapes, LowRankLinear, 4).values()) == {4}
    with pytest.raises(FactorLMError, match="larger than"):
        fixed_plan(shapes, LowRankLinear, 9)
    with pytest.raises(FactorLMError, match="positive"):
        fixed_plan(shapes, LowRankLinear, 0)


@pytest.mark.parametrize("shape", [(384, 384), (1536, 384), (384, 1536), (32, 96), (7, 5), (1, 10)])
def test_break_even_rank_is_where_dense_becomes_cheaper(shape):
    o, i = shape
    k = break_even_rank(o, i)
    assert k * (o + i) <= o * i < (k + 1) * (o + i)  # the largest rank whose factors are no larger
    for r in range(1, min(o, i) + 1):
        assert past_break_even(o, i, r) == (r * (o + i) >= o * i)
        assert stored_weights(o, i, r) == (o * i if past_break_even(o, i, r) else r * (o + i))
    assert break_even_rank(384, 384) == 192 and break_even_rank(1536, 384) == 307
