"""Prediction and evaluation over one or several eval loaders.

Works with or without an :class:`accelerate.Accelerator`: with one, batches are moved to
``accelerator.device`` and predictions are collected with ``accelerator.gather_for_metrics`` (so it
is correct under ``accelerate launch`` on many processes, duplicates of the last batch dropped);
without one, batches are moved to the device of the model's first parameter.

``task`` is duck-typed: it needs ``is_regression`` (bool), ``compute_metrics(preds, labels) -> dict``
and ``main_metric`` (str); ``eval_splits`` (optional) gives the preferred order of the splits.
A task with ``is_qa`` is scored by :mod:`.evaluate_qa` (span logits -> answers -> SQuAD scores).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..data.loaders import EXAMPLE_INDEX
from ..errors import FactorLMError

__all__ = ["predict", "evaluate", "main_score", "split_prefix", "prediction_stats", "majority_baseline",
           "output_heads", "LABEL_KEYS", "META_KEYS", "model_inputs"]

#: batch keys that are targets, not model inputs (classification / regression, and QA spans)
LABEL_KEYS = ("labels", "label", "start_positions", "end_positions")
#: batch keys that are bookkeeping, never model inputs (the example's index, for per-example caches)
META_KEYS = (EXAMPLE_INDEX,)


def model_inputs(batch: Mapping[str, Any], labels: bool = False) -> dict[str, Any]:
    """``batch`` without its bookkeeping keys (and without its targets unless ``labels``)."""
    drop = META_KEYS if labels else META_KEYS + LABEL_KEYS
    return {k: v for k, v in batch.items() if k not in drop}


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _logits_of(outputs: Any) -> torch.Tensor:
    if torch.is_tensor(outputs):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if logits is None:
        raise FactorLMError("the model's outputs have no 'logits'; cannot evaluate it")
    return logits


def output_heads(outputs: Any) -> dict[str, torch.Tensor]:
    """The logits a model's outputs carry: ``{"logits": ..}``, or ``start_logits`` + ``end_logits``
    (a span head, extractive QA)."""
    if torch.is_tensor(outputs):
        return {"logits": outputs}
    get = outputs.get if isinstance(outputs, Mapping) else (lambda k: getattr(outputs, k, None))
    if get("logits") is not None:
        return {"logits": get("logits")}
    heads = {k: get(k) for k in ("start_logits", "end_logits") if get(k) is not None}
    if not heads:
        raise FactorLMError("the model's outputs have no 'logits' (nor start/end logits)")
    return heads


@torch.no_grad()
def predict(model: nn.Module, loader, accelerator=None, is_regression: bool = False
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``model`` over ``loader``; return ``(preds, labels, logits)`` as numpy arrays (float32 logits).

    Batches are dicts of tensors (``labels`` under ``"labels"`` or ``"label"``).  Classification
    ``preds`` are ``argmax(logits, -1)``; regression ``preds`` are ``logits.squeeze(-1)``.  The
    model is put in eval mode for the duration and its previous mode restored afterwards.
    """
    device = accelerator.device if accelerator is not None else _model_device(model)
    was_training = model.training
    model.eval()
    all_logits: list[torch.Tensor] = []
    all_labels: list[torch.Tensor] = []
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            if "labels" not in batch and "label" in batch:
                batch["labels"] = batch.pop("label")
            labels = batch.get("labels")
            if labels is None:
                raise FactorLMError("evaluation batches must contain 'labels'")
            logits = _logits_of(model(**model_inputs(batch, labels=True))).detach().float()
            if accelerator is not None:
                logits, labels = accelerator.gather_for_metrics((logits.contiguous(), labels.contiguous()))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    if not all_logits:
        raise FactorLMError("the evaluation data is empty")
    logits_t = torch.cat(all_logits)
    labels_np = torch.cat(all_labels).numpy()
    if is_regression:
        preds_np = logits_t.squeeze(-1).numpy()
    else:
        preds_np = logits_t.argmax(-1).numpy()
    return preds_np, labels_np, logits_t.numpy()


def split_prefix(split: str) -> str:
    """``"dev_matched"`` -> ``"matched"`` (also strips ``validation_`` / ``eval_``)."""
    for p in ("dev_", "validation_", "eval_"):
        if split.startswith(p) and len(split) > len(p):
            return split[len(p):]
    return split


def _ordered_splits(eval_loaders: Mapping[str, Any], task) -> list[str]:
    preferred = [s for s in (getattr(task, "eval_splits", None) or []) if s in eval_loaders]
    return preferred + [s for s in eval_loaders if s not in preferred]


def prediction_stats(preds: np.ndarray, labels: np.ndarray, is_regression: bool) -> dict[str, float]:
    """What a collapse check needs: ``n``; classification: ``top_class_share`` (fraction of the
    predictions in the most predicted class); regression: ``pred_std`` / ``label_std`` (NaN-safe)."""
    p = np.asarray(preds).reshape(-1)
    out: dict[str, float] = {"n": float(p.size)}
    if is_regression:
        finite = np.isfinite(p)
        out["pred_std"] = float(np.std(p[finite])) if finite.any() else 0.0
        out["label_std"] = float(np.std(np.asarray(labels, dtype=np.float64)))
        out["nonfinite"] = float((~finite).sum())
    elif p.size:
        out["top_class_share"] = float(np.bincount(p.astype(np.int64)).max() / p.size)
    return out


def evaluate(model: nn.Module, eval_loaders: Mapping[str, Any], task, accelerator=None,
             stats: dict[str, dict[str, float]] | None = None, null_threshold: float | None = None) -> dict[str, float]:
    """Metrics of ``model`` on every loader of ``eval_loaders`` (split name -> DataLoader).

    One split: ``task.compute_metrics`` as-is (e.g. ``{"accuracy": 0.9}``).  Several splits: each
    metric prefixed with the split name minus ``dev_`` (``matched_accuracy``, ``mismatched_accuracy``).
    Values are python floats.  No loaders -> ``{}``.  ``stats``, when given, receives
    :func:`prediction_stats` per split (classification / regression: plus the per-example ``_preds`` and
    ``_labels`` arrays, which :meth:`factorlm.session.Session.evaluate` pops).  QA tasks: the SQuAD scores (:mod:`.evaluate_qa`);
    ``null_threshold`` is SQuAD 2.0's (None: each split chooses its own, for model selection).

    The global CPU RNG is forked for the call (each DataLoader iterator draws a base seed from it),
    so evaluating leaves the random stream of the training around it (dropout, sampling) unchanged.
    Only the CPU RNG: nothing in eval mode draws from the CUDA one.  :func:`predict` and
    :func:`~.evaluate_qa.evaluate_qa` called directly are not forked.
    """
    if not eval_loaders:
        return {}
    with torch.random.fork_rng(devices=[]):
        return _evaluate_splits(model, eval_loaders, task, accelerator, stats, null_threshold)


def _evaluate_splits(model: nn.Module, eval_loaders: Mapping[str, Any], task, accelerator,
                     stats: dict[str, dict[str, float]] | None, null_threshold: float | None) -> dict[str, float]:
    is_regression = bool(getattr(task, "is_regression", False))
    splits = _ordered_splits(eval_loaders, task)
    if getattr(task, "is_qa", False):
        from .evaluate_qa import evaluate_qa

        per_qa = evaluate_qa(model, {s: eval_loaders[s] for s in splits}, accelerator, stats, null_threshold)
        return _merge(per_qa, splits)
    per_split = {}
    for split in splits:
        preds, labels, _ = predict(model, eval_loaders[split], accelerator, is_regression)
        per_split[split] = task.compute_metrics(preds, labels)
        if stats is not None:
            stats[split] = prediction_stats(preds, labels, is_regression)
            stats[split]["_preds"], stats[split]["_labels"] = preds, labels  # per example (paired bootstraps)
    return _merge(per_split, splits)


def _merge(per_split: Mapping[str, Mapping[str, float]], splits: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in splits:
        for k, v in per_split[split].items():
            key = k if len(splits) == 1 else f"{split_prefix(split)}_{k}"
            out[key] = float(v)
    return out


def majority_baseline(task, eval_labels: Mapping[str, np.ndarray], train_labels=None) -> dict[str, float]:
    """The task's metrics for a model that always predicts the majority class of ``train_labels``
    (or, without them, of each evaluated split), keyed like :func:`evaluate`.  ``{}`` for regression
    (a constant prediction has no correlation)."""
    if getattr(task, "is_regression", False) or not eval_labels:
        return {}
    splits = _ordered_splits(eval_labels, task)
    per_split = {}
    for split in splits:
        y = np.asarray(eval_labels[split], dtype=np.int64)
        ref = np.asarray(train_labels if train_labels is not None and len(train_labels) else y, dtype=np.int64)
        per_split[split] = task.compute_metrics(np.full_like(y, np.bincount(ref).argmax()), y)
    return _merge(per_split, splits)


def main_score(metrics: Mapping[str, float], main_metric: str) -> float:
    """The score used to pick the best checkpoint (higher is better).

    ``metrics[main_metric]`` when present; otherwise (several splits, unprefixed ``main_metric``)
    the mean over every ``<split>_<main_metric>`` key; otherwise (one split scored for a task whose
    main metric is split-prefixed, e.g. MNLI's ``matched_accuracy`` on the selection slice) the
    unprefixed metric it ends with.  NaN is returned as ``-inf``.
    """
    if main_metric in metrics:
        value = float(metrics[main_metric])
    else:
        vals = [float(v) for k, v in metrics.items() if k.endswith("_" + main_metric)]
        if not vals:
            base = [k for k in metrics if main_metric.endswith("_" + k)]
            if not base:
                raise FactorLMError(f"main metric {main_metric!r} is not among the eval metrics {sorted(metrics)}")
            vals = [float(metrics[max(base, key=len)])]
        value = sum(vals) / len(vals)
    return -math.inf if math.isnan(value) else value


def metric_name(metrics: Mapping[str, float], main_metric: str) -> str:
    """The name :func:`main_score` scores ``metrics`` by (``main_metric``, or its unprefixed base)."""
    if main_metric in metrics or any(k.endswith("_" + main_metric) for k in metrics):
        return main_metric
    base = [k for k in metrics if main_metric.endswith("_" + k)]
    return max(base, key=len) if base else main_metric
