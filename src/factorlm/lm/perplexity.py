"""Perplexity of a causal LM on a token stream: Hugging Face's documented sliding-window recipe.

Windows of ``seq_len`` tokens start every ``stride`` tokens (``stride`` defaults to ``seq_len``:
non-overlapping windows). The first window scores all of its tokens but the first; every later
window scores only its last ``stride`` tokens (the others are context, masked like ``labels=-100``),
so no token is scored twice and each one is predicted with up to ``seq_len - 1`` tokens of context.
The final, partial window is included. With ``stride == seq_len`` the first token of every window
has no context and is not scored (exactly what ``model(input_ids, labels=input_ids)`` does per
window); with ``stride < seq_len`` every token but the very first is scored exactly once.

The loss is computed here from the logits in float32 (``cross_entropy`` of the shifted logits), so
bf16 / fp16 models are scored without half-precision log-softmax error; the model runs under
``torch.inference_mode`` in eval mode (its training flag is restored afterwards), on whatever device
its parameters are. Windows of equal length are batched ``batch_size`` at a time; where the model's
``forward`` takes ``logits_to_keep`` only the logits that are scored are computed.

``perplexity = exp(nll)`` where ``nll`` is the mean negative log-likelihood (nats) per scored token.

``bos_id``: every window starts with this token (a model trained with a BOS token at the start of
every sequence, as lm-evaluation-harness scores rolling windows): windows then hold ``seq_len - 1``
text tokens after the BOS, and the first text token of every window is scored too, predicted from
the BOS alone.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FactorLMError

__all__ = ["perplexity", "windows"]


def windows(n_tokens: int, seq_len: int, stride: int, *, first_scored: bool = False) -> list[tuple[int, int, int]]:
    """The recipe's windows over ``n_tokens`` tokens: ``(begin, end, n_scored)``, the scored tokens
    being the last ``n_scored`` of ``[begin, end)`` (a window that would score nothing is dropped).
    ``first_scored``: a window's first token is predicted too (from a BOS put before it)."""
    out = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        # without a BOS the window's first token is never predicted
        n_scored = min(end - prev_end, end - begin - (0 if first_scored else 1))
        if n_scored > 0:
            out.append((begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _takes_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _device(model: nn.Module) -> torch.device:
    from .placement import input_device

    return input_device(model)


def perplexity(
    model: nn.Module,
    ids_1d: torch.Tensor,
    *,
    seq_len: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    progress: bool = False,
    bos_id: int | None = None,
) -> dict[str, Any]:
    """Perplexity of causal LM ``model`` on the 1-D token stream ``ids_1d`` (first ``max_tokens``
    tokens when given). Returns ``{"perplexity", "nll", "tokens_scored", "seq_len", "stride",
    "windows"}``; see the module docstring for the windows and what is scored."""
    ids = torch.as_tensor(ids_1d)
    if ids.dim() != 1:
        raise FactorLMError(f"perplexity needs a 1-D token stream, got shape {tuple(ids.shape)}")
    if max_tokens is not None:
        if int(max_tokens) < 2:
            raise FactorLMError(f"max_tokens must be at least 2, got {max_tokens}")
        ids = ids[: int(max_tokens)]
    seq_len = int(seq_len)
    if seq_len < 2:
        raise FactorLMError(f"the perplexity window (seq_len) must be at least 2 tokens, got {seq_len}")
    stride = seq_len if stride is None else int(stride)
    if not 1 <= stride <= seq_len:
        raise FactorLMError(f"the perplexity stride must be in [1, seq_len={seq_len}], got {stride}")
    if int(batch_size) < 1:
        raise FactorLMError(f"batch_size must be >= 1, got {batch_size}")
    if ids.numel() < 2:
        raise FactorLMError(f"perplexity needs at least 2 tokens, got {ids.numel()}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise FactorLMError(f"the perplexity window ({seq_len}) is longer than the model's {limit} positions")

    span = seq_len - (bos_id is not None)  # text tokens per window
    if bos_id is not None:
        if stride == seq_len:
            stride = span
        if span < 1 or stride > span:
            raise FactorLMError(f"with a BOS token the stride must be in [1, seq_len - 1 = {span}], got {stride}")
    wins = windows(ids.numel(), span, stride, first_scored=bos_id is not None)
    device = _device(model)
    ids = ids.long().to(device)
    bos = None if bos_id is None else torch.tensor([int(bos_id)], device=device)
    keep_arg = _takes_logits_to_keep(model)

    # consecutive windows of the same (length, n_scored) go in one batch
    batches: list[list[tuple[int, int, int]]] = []
    for w in wins:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and (last[0][1] - last[0][0], last[0][2]) == (w[1] - w[0], w[2]):
            last.append(w)
        else:
            batches.append([w])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(wins), desc="perplexity", leave=False, file=sys.stderr)
    was_training = model.training
    model.eval()
    nll_sum = 0.0
    scored = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                length, n = batch[0][1] - batch[0][0], batch[0][2]
                x = torch.stack([ids[b:e] if bos is None else torch.cat([bos, ids[b:e]]) for b, e, _ in batch])
                length = x.shape[1]
                kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(x), "use_cache": False}
                if keep_arg and n + 1 < length:
                    kwargs["logits_to_keep"] = n + 1  # positions length-n-1 .. length-1
                out = model(input_ids=x, **kwargs)
                logits = out.logits if hasattr(out, "logits") else out[0]
                logits = logits[:, -(n + 1) : -1]  # these predict the last n tokens
                targets = x[:, -n:]
                for row in range(x.shape[0]):  # one row at a time keeps the float32 copy small
                    nll_sum += F.cross_entropy(logits[row].float(), targets[row].to(logits.device),
                                               reduction="sum").item()
                scored += n * x.shape[0]
                if bar is not None:
                    bar.update(len(batch))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    nll = nll_sum / scored
    return {
        "perplexity": math.exp(nll) if nll < 700 else float("inf"),
        "nll": nll,
        "tokens_scored": scored,
        "seq_len": seq_len,
        "stride": stride,
        "windows": len(wins),
        "bos": bos_id is not None,
    }
