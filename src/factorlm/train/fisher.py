"""Empirical Fisher information of the task loss: sum over batches of (dL/dW)^2, per weight."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def accumulate_fisher(
    model: nn.Module,
    loader: Iterable,
    names: list[str],
    *,
    max_batches: int | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """``{module name: F}`` with ``F`` the (out, in) sum of squared weight gradients over batches.

    Dropout is off (eval mode) so the gradients are those of the deterministic model; the model's
    weights and ``requires_grad`` flags are left as they were.
    """
    device = device or next(model.parameters()).device
    modules = {n: model.get_submodule(n) for n in names}
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules.values():
        m.weight.requires_grad_(True)
    model.eval()
    total = max_batches if max_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
    try:
        for i, batch in enumerate(tqdm(loader, total=total, desc="fisher", disable=not progress, leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, [m.weight for m in modules.values()])
            for n, g in zip(modules, grads):
                fisher[n] += g.detach().float().pow(2)
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return fisher
