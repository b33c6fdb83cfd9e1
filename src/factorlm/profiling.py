"""Measured cost of a model: FLOPs (counted by torch, not estimated) and wall-clock latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn


def dummy_batch(model: nn.Module, batch_size: int, seq_len: int, device=None) -> dict[str, torch.Tensor]:
    vocab = getattr(model.config, "vocab_size", 1000)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    device = device or next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def count_flops(model: nn.Module, batch_size: int = 1, seq_len: int = 128) -> int:
    """Forward FLOPs of the whole model on one batch, counted op by op by torch's FlopCounterMode
    (matmuls including attention scores; elementwise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = dummy_batch(model, batch_size, seq_len)
    # Fused SDPA kernels on CPU are invisible to the counter: count with eager attention (same maths).
    impl = getattr(model.config, "_attn_implementation", None)
    switch = impl not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(**batch)
    finally:
        if switch:
            model.set_attn_implementation(impl)
    return int(counter.get_total_flops())


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    batch_size: int
    seq_len: int

    def to_dict(self):
        return asdict(self)


def measure_latency(
    model: nn.Module, batch_size: int = 32, seq_len: int = 128, repeats: int = 20, warmup: int = 3
) -> Latency:
    """Median wall-clock forward latency (inference mode, eval) over ``repeats`` runs."""
    model.eval()
    batch = dummy_batch(model, batch_size, seq_len)
    cuda = batch["input_ids"].is_cuda
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(**batch)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Latency(statistics.median(times), q[0], q[-1], repeats, batch_size, seq_len)
