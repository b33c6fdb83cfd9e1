"""Measured cost of a model: FLOPs (counted by torch, not estimated) and wall-clock latency.

:func:`compare_latency` is what every report carries: a dense model and its compressed version timed
in the same process, round-robin (each round times every model once, so slow drifts of a shared
machine hit both alike), median over rounds, in fp32 and, where the hardware has native bf16 (CUDA
with bf16, or a CPU with AVX-512 BF16 / AMX), in bf16 (the models cast to bf16, as deployed).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any, Mapping

import torch
from torch import nn


def dummy_batch(model: nn.Module, batch_size: int, seq_len: int, device=None) -> dict[str, torch.Tensor]:
    vocab = getattr(model.config, "vocab_size", None)
    try:
        vocab = model.get_input_embeddings().num_embeddings
    except (AttributeError, NotImplementedError):
        vocab = vocab or 1000
    # a multimodal wrapper's image / special tokens sit at the top of its vocabulary: stay below them
    special = [getattr(model.config, k, None) for k in ("image_token_id", "image_token_index", "boi_token_index",
                                                         "video_token_id")]
    vocab = min([vocab] + [t for t in special if isinstance(t, int) and t > 5])
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


#: the dtypes factorlm deploys and times, by the names its options use
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bf16 matmuls natively (else bf16 is emulated and slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return False


def _time_forward(model: nn.Module, batch: Mapping[str, torch.Tensor], repeats: int) -> float:
    cuda = batch["input_ids"].is_cuda
    with torch.inference_mode():
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(**batch)
        if cuda:
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


def compare_latency(
    models: Mapping[str, nn.Module],
    *,
    batch_size: int = 32,
    seq_len: int = 128,
    dtypes: tuple[str, ...] | None = None,
    rounds: int = 5,
    repeats: int = 2,
    warmup: int = 1,
    reference: str = "dense",
) -> dict[str, Any]:
    """Forward latency of each of ``models`` (name -> model, e.g. ``dense`` and ``compressed``) on
    one ``batch_size x seq_len`` batch of random tokens, in inference mode.

    Returns ``{"batch_size", "seq_len", "device", "threads", "rounds", "repeats", "dtypes": {dtype:
    {name: {"median_ms", "min_ms", "sequences_per_s"}, "speedup": {name: reference_ms / name_ms}}}}``.
    ``dtypes`` default: ``("fp32", "bf16")`` where bf16 is native (:func:`bf16_native`), else fp32.
    The models are not modified (bf16 timing uses cast copies).
    """
    last = list(models.values())[-1]
    device = next(last.parameters()).device  # every model is timed here (copies move, originals stay)
    if dtypes is None:
        dtypes = ("fp32", "bf16") if bf16_native(device) else ("fp32",)
    batch = dummy_batch(last, batch_size, seq_len, device)
    out: dict[str, Any] = {"batch_size": batch_size, "seq_len": seq_len, "device": str(device),
                           "threads": torch.get_num_threads() if device.type == "cpu" else None,
                           "rounds": rounds, "repeats": repeats, "dtypes": {}}
    for dt in dtypes:
        cast = DTYPES[dt]
        timed = {}
        for name, m in models.items():
            was_training = m.training
            as_is = all(p.dtype == cast and p.device == device for p in m.parameters())
            mm = m if as_is else copy.deepcopy(m).to(device=device, dtype=cast)
            timed[name] = (mm.eval(), was_training, m)
        times: dict[str, list[float]] = {name: [] for name in models}
        try:
            for name, (mm, _, _) in timed.items():
                _time_forward(mm, batch, warmup)
            for _ in range(rounds):
                for name, (mm, _, _) in timed.items():
                    times[name].append(_time_forward(mm, batch, repeats))
        finally:
            for name, (mm, was_training, orig) in timed.items():
                if mm is orig:
                    orig.train(was_training)
        res: dict[str, Any] = {}
        for name, ts in times.items():
            med = statistics.median(ts)
            res[name] = {"median_ms": round(med, 3), "min_ms": round(min(ts), 3),
                         "sequences_per_s": round(batch_size / med * 1e3, 1)}
        if reference in res:
            res["speedup"] = {name: round(res[reference]["median_ms"] / r["median_ms"], 3)
                              for name, r in res.items() if name != reference and isinstance(r, dict) and "median_ms" in r}
        out["dtypes"][dt] = res
    return out

