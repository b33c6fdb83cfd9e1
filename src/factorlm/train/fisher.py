"""Diagonal empirical Fisher information of the task loss, one value per weight of chosen ``nn.Linear``s.

Two estimates (``per_example`` picks one):

* **per example** (default; what FWSVD's paper defines, Hsu et al., ICLR 2022):
  ``F = sum over examples d of (dL(d)/dW)^2`` - the square of each *example's* gradient.
* **batch** (``per_example=False``; cheaper, what many re-implementations compute):
  ``F = sum over batches b of (d mean_{d in b} L(d) / dW)^2`` - the square of each *batch-mean*
  gradient.  It is a different quantity: the batch-mean gradient averages the examples' gradients
  before squaring, so at a converged model (mean gradient ~ 0) it measures mostly sampling noise and
  scales like ``1/batch size``, while the per-example sum measures how strongly each weight moves each
  example's loss.

How the per-example estimate is computed (exact, one backward per batch): for an ``nn.Linear``
``y = x W^T + b`` the gradient of example ``n``'s loss is ``dL_n/dW = sum_t g[n, t]^T x[n, t]`` with
``x`` the layer's input and ``g = dL_n/dy`` its output gradient at the example's positions ``t``.
A forward hook keeps ``x`` and ``y``; one ``torch.autograd.grad`` of the *sum* of per-example
losses (the model's mean loss times the batch size) gives every ``g`` (examples do not interact in an
encoder without batch statistics, so ``d sum_m L_m / dy[n] = dL_n / dy[n]``); the per-example
gradients ``(B, out, in)`` are formed by a batched matrix product in chunks of examples, squared and
summed.  Padding positions need no masking: the sum over positions is exact whatever reaches the
loss.  For a classifier the attention mask stops them from influencing the pooled position, so their
``g`` is exactly zero; a span head (extractive QA) does not mask them out of its start / end
softmax, so an example's loss, and its Fisher, depend slightly on the padded length of its batch
(as in its training).

Requirement: the model's ``loss`` is the **mean over the batch's examples** of a per-example loss
(Hugging Face sequence classification: cross-entropy, MSE for regression, BCE for multi-label are
all means over the batch; question answering: the mean of the start and end cross-entropies).  A loss averaged over tokens (token classification, language modelling)
would weight the examples by their token counts.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import check
from ..models.state import frozen_eval
from .evaluate import model_inputs

#: per-example gradients are formed for at most this many (example x weight) elements at a time
#: (2**26 fp32 = 256 MiB; MiniLM's 1536 x 384 FFN matrices -> chunks of 113 examples)
CHUNK_ELEMENTS = 2**26


def accumulate_fisher(
    model: nn.Module,
    loader: Iterable,
    names: list[str],
    *,
    max_batches: int | None = None,
    per_example: bool = True,
    device: torch.device | None = None,
    progress: bool = True,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> dict[str, torch.Tensor]:
    """``{module name: F}`` with ``F`` (out, in, float32) the diagonal empirical Fisher of each module's weight.

    ``names`` are modules with an (out, in) ``weight`` applied as ``nn.Linear`` is (``x W^T``, batch
    first).  ``per_example=True`` (default) sums the squared gradients of the examples' losses;
    ``per_example=False`` sums the squared gradients of the batches' mean losses (see the module
    docstring).  ``max_batches`` stops after that many batches of ``loader`` (dicts of tensors that
    the model takes as keywords, with ``labels``).

    Dropout is off (eval mode) so the gradients are those of the deterministic model; the model's
    weights, ``requires_grad`` flags and train/eval mode are left as they were, and no ``.grad`` is
    written.
    """
    device = device or next(model.parameters()).device
    modules = {n: model.get_submodule(n) for n in names}
    for n, m in modules.items():
        check(isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2,
              f"{n} has no 2-D weight (Fisher information needs an nn.Linear-like module)")
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}

    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    handles = []
    if per_example:
        def keep(name):
            def hook(module, inputs, output):
                captured[name].append((inputs[0].detach(), output))
            return hook

        handles = [m.register_forward_hook(keep(n)) for n, m in modules.items()]

    total = max_batches if max_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
    try:
        with frozen_eval(model, trainable=[m.weight for m in modules.values()]), torch.enable_grad():
            for i, batch in enumerate(tqdm(loader, total=total, desc="fisher", disable=not progress, leave=False)):
                if max_batches is not None and i >= max_batches:
                    break
                batch = {k: v.to(device) for k, v in batch.items()}
                for c in captured.values():
                    c.clear()
                loss = model(**model_inputs(batch, labels=True)).loss
                check(loss is not None, "the model returned no loss (the Fisher information needs batches with labels)")
                if per_example:
                    _add_per_example(fisher, modules, captured, loss * _batch_size(batch), chunk_elements)
                else:
                    grads = torch.autograd.grad(loss, [m.weight for m in modules.values()], allow_unused=True)
                    for n, g in zip(modules, grads):
                        if g is not None:
                            fisher[n] += g.detach().float().pow(2)
    finally:
        for h in handles:
            h.remove()
        for c in captured.values():
            c.clear()
    return fisher


def _batch_size(batch: dict[str, torch.Tensor]) -> int:
    t = batch.get("labels", batch.get("input_ids"))
    check(t is not None, "Fisher batches need 'labels' (or 'input_ids') to count their examples")
    return int(t.shape[0])


def _add_per_example(fisher, modules, captured, loss_sum, chunk_elements) -> None:
    """``fisher[n] += sum_n (sum_t g[n,t]^T x[n,t])^2`` from one backward of the summed loss."""
    calls = [(n, x, y) for n in modules for x, y in captured[n]]
    if not calls:  # none of the modules ran in this forward
        return
    grads = torch.autograd.grad(loss_sum, [y for _, _, y in calls], allow_unused=True)
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in modules}
    for (n, x, _), g in zip(calls, grads):
        if g is not None:  # None: this output does not reach the loss, its Fisher is zero
            pairs[n].append((x, g.detach()))
    for n, ps in pairs.items():
        if not ps:
            continue
        out_f, in_f = fisher[n].shape
        B = ps[0][0].shape[0]
        step = max(1, chunk_elements // (out_f * in_f))
        for a in range(0, B, step):
            G = None  # (chunk, out, in) per-example gradients; a module called twice adds both calls
            for x, g in ps:
                xs = x[a:a + step]
                xs = xs.reshape(xs.shape[0], -1, in_f).float()  # (chunk, positions, in); 2-D input -> 1 position
                gs = g[a:a + step].reshape(xs.shape[0], -1, out_f).float()
                Gi = torch.bmm(gs.transpose(1, 2), xs)
                G = Gi if G is None else G + Gi
            fisher[n] += G.pow(2).sum(0)
