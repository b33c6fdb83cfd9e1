"""Temporarily change a module's training state: eval mode and chosen ``requires_grad`` flags, restored on exit.

Statistics passes (output gradients, Fisher information) and per-block refinement all need the same
guard: the model in eval mode (no dropout), gradients only where asked, and the caller's flags and
train/eval mode back afterwards -- also when the pass raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

__all__ = ["frozen_eval"]


@contextmanager
def frozen_eval(module: nn.Module, trainable: Iterable[torch.Tensor] = (), freeze: bool = True) -> Iterator[nn.Module]:
    """``module.eval()``; with ``freeze`` every parameter's ``requires_grad`` is False except those in
    ``trainable`` (set True).  On exit each parameter's flag and the module's train/eval mode are restored."""
    keep = list(trainable)
    flags = {p: p.requires_grad for p in [*module.parameters(), *keep]}
    was_training = module.training
    try:
        if freeze:
            for p in module.parameters():
                p.requires_grad_(False)
            for p in keep:
                p.requires_grad_(True)
        module.eval()
        yield module
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        module.train(was_training)
