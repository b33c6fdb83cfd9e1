"""Evaluation metrics for classification / regression tasks (numpy + scipy only, no sklearn).

Every function takes ``preds`` and ``labels`` as 1-D array-likes of equal length and returns a
plain ``float``. Degenerate inputs give ``0.0`` instead of ``nan`` (constant predictions for a
correlation, an empty confusion row for MCC, no positives for F1), so a best-checkpoint comparison
never sees a ``nan``. :func:`compute_metric_set` runs a named selection of them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from ..errors import FactorLMError

__all__ = [
    "accuracy",
    "f1_binary",
    "matthews_corrcoef",
    "pearson",
    "spearman",
    "compute_metric_set",
    "METRIC_FUNCTIONS",
]


def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise FactorLMError(f"metrics got {p.shape[0]} predictions for {y.shape[0]} labels")
    return p, y


def accuracy(preds, labels) -> float:
    p, y = _pair(preds, labels)
    if p.size == 0:
        return 0.0
    return float(np.mean(p == y))


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of the ``positive`` class (GLUE convention for MRPC / QQP: positive = 1)."""
    p, y = _pair(preds, labels)
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews_corrcoef(preds, labels) -> float:
    """Multi-class Matthews correlation coefficient (same formula as sklearn's)."""
    p, y = _pair(preds, labels)
    if p.size == 0:
        return 0.0
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inv[: y.size], inv[y.size :]
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (yi, pi), 1.0)
    t_sum = cm.sum(axis=1)  # true occurrences per class
    p_sum = cm.sum(axis=0)  # predicted occurrences per class
    n_correct = np.trace(cm)
    n = cm.sum()
    cov_ytyp = n_correct * n - np.dot(t_sum, p_sum)
    cov_ypyp = n * n - np.dot(p_sum, p_sum)
    cov_ytyt = n * n - np.dot(t_sum, t_sum)
    denom = cov_ytyt * cov_ypyp
    if denom == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(denom))


def _degenerate(p: np.ndarray, y: np.ndarray) -> bool:
    return p.size < 2 or np.all(p == p[0]) or np.all(y == y[0])


def _correlation(stat, preds, labels) -> float:
    """A scipy correlation of two float vectors; 0.0 (never NaN) when either side is constant."""
    p, y = _pair(preds, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    return 0.0 if _degenerate(p, y) else float(stat(p, y)[0])


def pearson(preds, labels) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, labels)


def spearman(preds, labels) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, labels)


METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearmanr": spearman,
}


def compute_metric_set(names: Iterable[str], preds, labels) -> dict[str, float]:
    """Compute the metrics in ``names`` (keys of :data:`METRIC_FUNCTIONS`, plus ``"combined"`` =
    mean of the others, as in HF ``run_glue``) and return ``{name: value}`` in the given order."""
    out: dict[str, float] = {}
    names = list(names)
    for name in names:
        if name == "combined":
            continue
        try:
            fn = METRIC_FUNCTIONS[name]
        except KeyError:
            known = ", ".join(sorted(METRIC_FUNCTIONS))
            raise FactorLMError(f"unknown metric {name!r} (known: {known}, combined)") from None
        out[name] = fn(preds, labels)
    if "combined" in names:
        out["combined"] = float(np.mean(list(out.values()))) if out else 0.0
    return out
