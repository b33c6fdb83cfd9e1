"""Paired statistics for method comparisons (issue 30, item 1): runs of two methods pair by seed
(same teacher, data split and selection slice), so the test is on the per-seed differences.

- :func:`paired_t`: two-sided paired t-test over seeds (``scipy.stats.ttest_rel``): training-seed noise.
- :func:`paired_bootstrap`: a paired bootstrap over the *dev examples* (the same resampled examples for
  both methods, every seed): dev-set sampling noise, which the seed test does not see.  Needs the runs'
  per-example dev predictions (``dev_predictions``, recorded from issue 30 on).
- "significant" only for p < 0.05 (:func:`verdict`).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

ALPHA = 0.05


def paired_t(a: list[float], b: list[float]) -> tuple[float, float]:
    """``(t, p)`` of the two-sided paired t-test of ``a - b`` (NaN for fewer than 2 pairs or no spread)."""
    from scipy import stats

    if len(a) < 2:
        return math.nan, math.nan
    d = [x - y for x, y in zip(a, b)]
    if statistics.pstdev(d) == 0:  # no spread: the t statistic is undefined, not infinitely significant
        return math.nan, math.nan
    r = stats.ttest_rel(a, b)
    return float(r.statistic), float(r.pvalue)


def _metric(task: str, metric: str):
    from factorlm.data import resolve_task

    t = resolve_task(task)

    def f(preds: np.ndarray, labels: np.ndarray) -> float:
        return float(t.compute_metrics(preds, labels)[metric])
    return f


def paired_bootstrap(task: str, metric: str, a: list[dict], b: list[dict], n: int = 1000, seed: int = 0) -> float | None:
    """Two-sided p-value of the mean over seeds of ``metric(a) - metric(b)`` under a paired bootstrap
    over dev examples (``n`` resamples, the same indices for every run of a resample); ``a``/``b``:
    runs of the same seeds in the same order.  None when a run has no per-example predictions."""
    pa, pb = [r.get("dev_predictions") for r in a], [r.get("dev_predictions") for r in b]
    if not a or any(not p for p in pa + pb):  # None, or {} (QA: no per-example classes recorded)
        return None
    split = next(iter(pa[0]))
    if len(pa[0]) > 1:  # several dev splits: the main metric is split-prefixed ("matched_accuracy")
        from factorlm.train.evaluate import split_prefix

        split = next((sp for sp in pa[0] if metric.startswith(split_prefix(sp) + "_")), split)
        metric = metric[len(split_prefix(split)) + 1:] if metric.startswith(split_prefix(split) + "_") else metric
    f = _metric(task, metric)
    ys = [np.asarray(p[split]["labels"]) for p in pa]
    xa = [np.asarray(p[split]["preds"]) for p in pa]
    xb = [np.asarray(p[split]["preds"]) for p in pb]
    m = len(ys[0])
    if any(len(y) != m for y in ys) or any(not np.array_equal(p[split]["labels"], q[split]["labels"]) for p, q in zip(pa, pb)):
        return None
    g = np.random.default_rng(seed)
    obs = np.mean([f(u, y) - f(v, y) for u, v, y in zip(xa, xb, ys)])
    diffs = np.empty(n)
    for i in range(n):
        idx = g.integers(0, m, m)
        diffs[i] = np.mean([f(u[idx], y[idx]) - f(v[idx], y[idx]) for u, v, y in zip(xa, xb, ys)])
    # the share of resamples on the other side of zero from the observed difference, two-sided
    p = 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)) if obs != 0 else 1.0
    return float(min(1.0, max(p, 1.0 / n)))


def verdict(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "untested"
    return "significant" if p < ALPHA else "not significant"


def fmt_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else "<0.001"
