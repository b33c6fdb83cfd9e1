"""The optimizers a training phase can use (``TrainConfig.optimizer``).

``adamw``
    :class:`torch.optim.AdamW`; its moments are kept in each parameter's dtype.  With bf16 weights an
    update smaller than half a bf16 step of the weight is rounded away: at a learning rate of 5e-5 on
    weights of size ~0.02 (bf16 step ~1.2e-4) about half of every step's update is lost (measured:
    ``tests/test_optim.py``).
``adamw-sr``
    torchao's AdamW with stochastic rounding of bf16 weights (the update survives in expectation);
    moments in the parameter's dtype.  For fp32 weights it is plain AdamW.
``adamw8bit``
    torchao's :class:`~torchao.optim.AdamW8bit`: both moments block-wise quantized to 8 bits (2 bytes
    per parameter instead of 8 for fp32 moments; Dettmers et al., 2022), stochastic rounding of bf16
    weights.  torchao applies it to tensors of at least 4096 elements; smaller ones keep full moments.

torchao is imported only when one of its optimizers is asked for.  Its step is ``torch.compile``d once
per distinct parameter shape (~2 s each on this CPU, the first step only): a global rank plan with
hundreds of distinct factor shapes pays minutes once; it needs inductor's toolchain (a C++ compiler on
CPU, Triton on GPU).
"""

from __future__ import annotations

import warnings

import torch

from ..errors import check

OPTIMIZERS = ("adamw", "adamw-sr", "adamw8bit")


def _torchao():
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)  # its optional CUDA kernels fail to load on CPU builds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torchao.optim as ao
    return ao


def make_optimizer(groups: list[dict], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    check(name in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    bf16 = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
    ao = _torchao()
    cls = ao._AdamW if name == "adamw-sr" else ao.AdamW8bit
    return cls(groups, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=bf16)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors (8-bit states counted by their codes and scales)."""
    n = 0
    for st in optimizer.state.values():
        for v in st.values():
            if not torch.is_tensor(v):
                continue
            inner = [getattr(v, a) for a in ("codes", "scale", "qmap") if torch.is_tensor(getattr(v, a, None))]
            for t in inner or [v]:
                n += t.numel() * t.element_size()
    return n
