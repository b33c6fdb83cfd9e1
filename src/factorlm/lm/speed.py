"""Measured generation speed of causal LMs: a dense model and its compressed version, same process.

:func:`generation_speed` times, for each model, on one ``batch_size x prompt_len`` batch of random
tokens (seeded, the same batch for every model):

* prefill: one forward over the prompt with a KV cache built (``use_cache=True``; only the last
  position's logits where the model's ``forward`` takes ``logits_to_keep``, as ``generate`` does);
* generation: ``model.generate`` greedy (``do_sample=False``, one beam), exactly ``new_tokens`` new
  tokens (``min_new_tokens = max_new_tokens = new_tokens``, so EOS never stops it early), KV cache on.

Decode time per token = (generation of ``new_tokens`` - generation of 1 token) / (``new_tokens`` - 1):
``generate`` runs one prefill, which already yields the first new token, then ``new_tokens - 1``
single-token decode steps (the usual time-per-output-token definition); differencing two ``generate``
calls cancels both the prefill and ``generate``'s fixed set-up cost, which would otherwise pull the
decode speed-up toward 1x. Like :func:`factorlm.profiling.compare_latency`: a warm-up
round first, then ``rounds`` rounds that each time every model once (round-robin, so slow drifts of a
shared machine hit all models alike), the median over rounds; ``torch.inference_mode``, CUDA
synchronised around every timing. Models stay on their device and in their dtype; eval mode during
the measurement, their training flag restored after.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import FactorLMError

__all__ = ["generation_speed", "SETTINGS"]

#: the keys of :func:`generation_speed`'s result that are settings, not model names
SETTINGS = ("batch_size", "prompt_len", "new_tokens", "rounds", "device", "threads")


def _device(model: nn.Module) -> torch.device:
    from .placement import input_device

    return input_device(model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _takes(model: nn.Module, arg: str) -> bool:
    try:
        return arg in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _token_id(model: nn.Module, name: str) -> int | None:
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(src, name, None) if src is not None else None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


class _Timed:
    """One model's inputs, generation config and timings."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, new_tokens: int):
        from transformers import GenerationConfig

        self.model = model
        self.was_training = model.training
        self.device = _device(model)
        self.ids = ids.to(self.device)
        self.mask = torch.ones_like(self.ids)
        self.prefill_kwargs: dict[str, Any] = {"attention_mask": self.mask, "use_cache": True}
        if _takes(model, "logits_to_keep"):
            self.prefill_kwargs["logits_to_keep"] = 1
        eos = _token_id(model, "eos_token_id")
        pad = _token_id(model, "pad_token_id")
        pad = pad if pad is not None else (eos if eos is not None else 0)
        # a fresh config: the model's own sampling defaults (temperature, top_p, ...) play no part
        self.gen_config, self.gen_config_one = (GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=n,
            use_cache=True, pad_token_id=pad, eos_token_id=eos,
        ) for n in (new_tokens, 1))
        self.prefill_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.generated = 0

    def prefill(self) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        self.model(input_ids=self.ids, **self.prefill_kwargs)
        _sync(self.device)
        return (time.perf_counter() - t0) * 1e3

    def generate(self, one: bool = False) -> float:
        _sync(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(input_ids=self.ids, attention_mask=self.mask,
                                  generation_config=self.gen_config_one if one else self.gen_config)
        _sync(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        if not one:
            self.generated = out.shape[1] - self.ids.shape[1]
        return ms


def generation_speed(
    models: Mapping[str, nn.Module],
    *,
    batch_size: int = 1,
    prompt_len: int = 128,
    new_tokens: int = 32,
    rounds: int = 3,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """Prefill and decode speed of each causal LM in ``models`` (name -> model).

    Returns ``{name: {"prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token",
    "decode_tokens_per_s"}}`` for every model, plus the settings ``"batch_size", "prompt_len",
    "new_tokens", "rounds", "device", "threads"`` (a model may not be named like a setting).
    ``*_tokens_per_s`` count the whole batch (``batch_size * prompt_len`` tokens per prefill,
    ``batch_size`` per decode step); times are medians over ``rounds``. ``vocab_size``: range of the random prompt tokens (default: the smallest
    ``config.vocab_size`` of the models).
    """
    if not models:
        raise FactorLMError("generation_speed needs at least one model")
    clash = sorted(set(models) & set(SETTINGS))
    if clash:
        raise FactorLMError(f"generation speed: a model may not be named {clash[0]!r} (a key of the settings)")
    for what, value, low in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1),
                             ("new_tokens", new_tokens, 2), ("rounds", rounds, 1)):
        if int(value) < low:
            raise FactorLMError(f"generation speed: {what} must be >= {low}, got {value}")
    if vocab_size is None:
        sizes = [getattr(getattr(m, "config", None), "vocab_size", None) for m in models.values()]
        sizes = [s for s in sizes if isinstance(s, int)]
        if not sizes:
            raise FactorLMError("generation speed: pass vocab_size (the models have no config.vocab_size)")
        vocab_size = min(sizes)
    for name, m in models.items():
        limit = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if isinstance(limit, int) and prompt_len + new_tokens > limit:
            raise FactorLMError(
                f"generation speed: prompt_len + new_tokens = {prompt_len + new_tokens} "
                f"exceeds {name}'s {limit} positions"
            )
    g = torch.Generator().manual_seed(0)
    low = min(5, int(vocab_size) - 1)
    ids = torch.randint(low, int(vocab_size), (int(batch_size), int(prompt_len)), generator=g)
    timed = {name: _Timed(m, ids, int(new_tokens)) for name, m in models.items()}
    try:
        with torch.inference_mode():
            for t in timed.values():
                t.model.eval()
                t.prefill()
                t.generate(one=True)
                t.generate()  # warm-up
                if t.generated != new_tokens:
                    raise FactorLMError(f"generation speed: model generated {t.generated} tokens, not {new_tokens}")
            for _ in range(int(rounds)):
                for t in timed.values():
                    pre = t.prefill()
                    first = t.generate(one=True)
                    gen = t.generate()
                    t.prefill_ms.append(pre)
                    t.decode_ms.append(max(gen - first, 0.0) / (new_tokens - 1))
    finally:
        for t in timed.values():
            t.model.train(t.was_training)
    medians = {name: (statistics.median(t.prefill_ms), statistics.median(t.decode_ms)) for name, t in timed.items()}
    res: dict[str, dict[str, float]] = {}
    for name, (pre, dec) in medians.items():
        res[name] = {
            "prefill_ms": round(pre, 4),
            "prefill_tokens_per_s": round(batch_size * prompt_len / pre * 1e3, 1) if pre > 0 else float("inf"),
            "decode_ms_per_token": round(dec, 4),
            "decode_tokens_per_s": round(batch_size / dec * 1e3, 1) if dec > 0 else float("inf"),
        }
    devices = sorted({str(t.device) for t in timed.values()})
    return {
        "batch_size": int(batch_size), "prompt_len": int(prompt_len), "new_tokens": int(new_tokens),
        "rounds": int(rounds), "device": ", ".join(devices),
        "threads": torch.get_num_threads() if devices == ["cpu"] else None,
        **res,
    }
