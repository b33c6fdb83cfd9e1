"""Stage: score a causal LM: perplexity, a greedy sample, parameter groups, FLOPs and generation speed.

Every dense measurement runs on the model itself before it is compressed (no second copy is ever
held); the compressed model is measured the same way after it has been saved.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..errors import check

SAMPLE_PROMPT = "The history of the United States"
SAMPLE_TOKENS = 24
#: generation-speed settings of --task lm when --latency-batch / --latency-seq are not given
LATENCY_BATCH, LATENCY_PROMPT, LATENCY_NEW_TOKENS = 1, 128, 32


class Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)


EVAL_SEQ_LEN = 2048  # the default perplexity window (SVD-LLM, ASVD, lm-evaluation-harness: 2048), or the context


def eval_window(c: RunConfig, context: int | None) -> int:
    """``--eval-seq-len``, or min(2048, the model's context)."""
    if c.eval_seq_len:
        check(context is None or c.eval_seq_len <= context,
              f"--eval-seq-len {c.eval_seq_len} is longer than the model's {context} positions")
        return c.eval_seq_len
    return min(EVAL_SEQ_LEN, context or EVAL_SEQ_LEN)


def min_eval_tokens(c: RunConfig) -> int:
    """Tokens an evaluation text needs: one full window of ``--eval-seq-len`` plus the first target."""
    return (c.eval_seq_len or c.seq_len) + 1


def check_eval_tokens(ids: torch.Tensor, c: RunConfig, name: str) -> None:
    need = min_eval_tokens(c)
    check(len(ids) >= need, f"evaluation text {name} has {len(ids):,} tokens; perplexity with --eval-seq-len "
                            f"{c.eval_seq_len or c.seq_len} needs at least {need:,} (give a longer --eval-text or a "
                            "smaller --eval-seq-len)")


def param_groups(model: nn.Module, targets: list[str]) -> dict[str, int]:
    """Exact parameter counts: the targets' weights (factors once factorized; their biases are not
    targets and count as "other"), embeddings, LM head (0 when tied to the embeddings), the rest."""
    seen: set[int] = set()
    counts = {"targets": 0, "embeddings": 0, "lm_head": 0, "other": 0}
    tset = set(targets)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        mod, _, leaf = name.rpartition(".")
        if mod in tset and leaf != "bias":
            counts["targets"] += p.numel()
        elif "embed" in name or "wte" in name or "wpe" in name:
            counts["embeddings"] += p.numel()
        elif "lm_head" in name:
            counts["lm_head"] += p.numel()
        else:
            counts["other"] += p.numel()
    return counts


def flops_per_token(model: nn.Module, seq_len: int) -> int:
    from ..profiling import count_flops

    return int(round(count_flops(model, 1, seq_len) / seq_len))


@torch.no_grad()
def greedy_sample(model: nn.Module, tokenizer, prompt: str = SAMPLE_PROMPT, new_tokens: int = SAMPLE_TOKENS) -> str:
    """``new_tokens`` greedy tokens after ``prompt`` (only ``input_ids`` / ``attention_mask`` reach
    ``generate``: a tokenizer's ``token_type_ids`` would be rejected by decoder models)."""
    from .placement import input_device

    device = input_device(model)
    enc = tokenizer(prompt, return_tensors="pt")
    ids = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}
    out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def ppl(model, ids, c: RunConfig, log, what: str, bos: int | None = None) -> dict[str, Any]:
    from .perplexity import perplexity

    t0 = time.perf_counter()
    window = c.eval_seq_len or c.seq_len
    # about 8 windows of 256 tokens' worth of logits per batch, whatever the window
    batch = max(1, (c.eval_batch_size // 16) * 256 // window)
    r = perplexity(model, ids, seq_len=window, stride=c.eval_stride, batch_size=batch, bos_id=bos)
    r = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    log(f"  {what}: perplexity {r['perplexity']:.3f} ({r['tokens_scored']:,} tokens, windows of {r['seq_len']}"
        f"{' from a BOS' if r['bos'] else ''}, stride {r['stride']}; {time.perf_counter() - t0:.0f}s)")
    return r


def speed(model: nn.Module, c: RunConfig, name: str) -> dict[str, Any]:
    """Prefill and decode speed of one model in its own dtype (``--latency-batch`` x ``--latency-seq``
    prompt tokens, default 1 x 128, 32 new tokens)."""
    from .speed import generation_speed

    return generation_speed({name: model}, batch_size=c.latency_batch or LATENCY_BATCH,
                            prompt_len=c.latency_seq or LATENCY_PROMPT, new_tokens=LATENCY_NEW_TOKENS)


def speed_report(dense: dict[str, Any], compressed: dict[str, Any], dtype: str, log) -> dict[str, Any]:
    """``{dtype: {settings..., "dense": ..., "compressed": ...}}`` from two :func:`speed` results."""
    from .speed import SETTINGS

    r = {**{k: dense[k] for k in SETTINGS}, "dense": dense["dense"], "compressed": compressed["compressed"],
         "order": "dense before compression, compressed after saving (one model in memory)"}
    dn, cp = r["dense"], r["compressed"]
    log(f"  {dtype}: prefill {dn['prefill_tokens_per_s']:,.0f} -> {cp['prefill_tokens_per_s']:,.0f} tokens/s "
        f"({cp['prefill_tokens_per_s'] / dn['prefill_tokens_per_s']:.2f}x), decode "
        f"{dn['decode_tokens_per_s']:,.1f} -> {cp['decode_tokens_per_s']:,.1f} tokens/s "
        f"({cp['decode_tokens_per_s'] / dn['decode_tokens_per_s']:.2f}x)")
    return {dtype: r}
