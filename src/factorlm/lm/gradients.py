"""Output-gradient statistics of a decoder's target layers: one backward of the next-token loss.

Two statistics of ``g_t = dL/dy_t``, the gradient of the calibration loss with respect to a target's
output at token ``t`` (the loss is each batch's mean next-token loss, as ``labels=input_ids`` gives):

* :func:`output_sensitivity`: ``lambda = sum_t ||g_t||^2 / out_features``, one number per target (the
  global rank plans' ``--global-score fisher`` and the byte plan weight whitened spectra by it);
* :func:`output_grams`: ``G_out = sum_t g_t g_t^T`` (``out x out``), the output side of the two-sided
  K-FAC fit (:mod:`factorlm.decompose.kfac`; ``--task lm --method kfac``).  ``trace(G_out) / out =
  lambda``.  Memory: ``4 * sum over targets of out^2`` bytes, held on the CPU (SmolLM2-135M: 0.69 GB;
  a Llama-3-8B block 1.85 GB, the whole model 59 GB); each window's ``g^T g`` is formed on the
  gradient's device, one target at a time, and added to its float32 accumulator on the CPU.

Both back-propagate through the whole model at once (no parameter gradient is stored: the graph
starts at the input embeddings' output), one window per backward, so the logits alive at once are
one window's (``seq_len x vocab`` floats: 134 MB at a 262k vocabulary); the first ``max_batches``
batches.  Under ``--offload`` neither is bounded (:mod:`factorlm.lm.placement`) and the callers refuse them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check

__all__ = ["output_grams", "output_sensitivity"]


def _backward_each_window(model: nn.Module, targets: Sequence[str], batches: Sequence[dict],
                          max_batches: int | None, on_grad: Callable[[str, torch.Tensor], None]) -> None:
    """``on_grad(name, g)`` with ``g`` (tokens, out) the output gradient of every target, one window at a time."""
    from ..models.state import frozen_eval
    from ..models.surgery import get_module

    handles = []

    def start_graph(module, args, out):
        return out.detach().requires_grad_(True)

    handles.append(model.get_input_embeddings().register_forward_hook(start_graph))
    for n in targets:
        def fwd(module, args, out, n=n):
            if out.requires_grad:
                out.register_hook(lambda g, n=n: on_grad(n, g.detach().reshape(-1, g.shape[-1])))

        handles.append(get_module(model, n).register_forward_hook(fwd))
    try:
        with frozen_eval(model), torch.enable_grad():
            for b in batches[: max_batches or len(batches)]:
                ids = b["input_ids"]
                mask = b.get("attention_mask")
                labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                n_tokens = max(1, int((labels != -100).sum()))
                for i in range(ids.shape[0]):  # one window per backward: the logits of one window at a time
                    row = {k: v[i: i + 1] for k, v in b.items() if torch.is_tensor(v)}
                    logits = model(**row, use_cache=False).logits[0, :-1]
                    loss = F.cross_entropy(logits.float(), labels[i], ignore_index=-100, reduction="sum") / n_tokens
                    loss.backward()
                    del logits, loss
    finally:
        for h in handles:
            h.remove()


def output_sensitivity(model: nn.Module, targets: Sequence[str], batches: Sequence[dict],
                       max_batches: int | None = 4) -> dict[str, float]:
    """Per target, ``sum_t ||dL/dy_t||^2 / out_features``: the mean squared gradient of the next-token loss
    with respect to the layer's outputs over the calibration tokens (the diagonal of its empirical
    Fisher, averaged over output channels).  With an isotropic Fisher, an output error ``E`` of the
    layer (summed over the same tokens) costs about ``lambda * ||E||^2 / 2`` of loss, which makes the
    whitened spectra of different layers comparable (:func:`factorlm.lm.plan_ranks`, ``global``)."""
    from ..models.surgery import get_module, linear_shape

    lam = {n: 0.0 for n in targets}

    def add(n, g):
        lam[n] += float(g.double().pow(2).sum())

    _backward_each_window(model, targets, batches, max_batches, add)
    return {n: lam[n] / linear_shape(get_module(model, n))[0] for n in targets}


def output_grams(model: nn.Module, targets: Sequence[str], batches: Sequence[dict],
                 max_batches: int | None = 4) -> dict[str, torch.Tensor]:
    """Per target, ``G_out = sum_t g_t g_t^T`` (``out x out``, float32, on the CPU) over the same tokens
    and loss as :func:`output_sensitivity` (module docstring: memory)."""
    from ..models.surgery import get_module, linear_shape

    grams: dict[str, torch.Tensor] = {}

    def add(n, g):  # once per target and window: one out x out product on the gradient's device at a time
        g = g.float()
        G = (g.T @ g).cpu()
        check(bool(torch.isfinite(G).all()), f"the output gradients of {n} are not finite (NaN/Inf on the calibration "
                                             "text): use --method whiten / --correction-space input")
        grams[n] = G if n not in grams else grams[n].add_(G)

    _backward_each_window(model, targets, batches, max_batches, add)
    missing = [n for n in targets if n not in grams]
    check(not missing, f"no output gradient reached {missing[0] if missing else ''} (is it used by the forward?)")
    for n in targets:
        o = linear_shape(get_module(model, n))[0]
        check(grams[n].shape == (o, o), f"{n}: output-gradient Gram {tuple(grams[n].shape)}, expected ({o}, {o})")
    return grams
