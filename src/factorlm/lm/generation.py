"""Stage (part of evaluation): is the compressed model still writing, or looping?

Perplexity can stay moderate while greedy decoding falls into a loop ("the the the ...", a phrase over
and over), which users see at once.  Every run continues :data:`PROMPTS` greedily for
:data:`NEW_TOKENS` tokens with the dense model (before compression) and the compressed one, and scores
each continuation's token ids:

* ``distinct_2``: distinct bigrams / bigrams (1.0: no bigram repeats; a loop of period p tends to p / n);
* ``longest_repeat``: the longest n-gram that occurs at least twice (occurrences may overlap);
* ``loops``: ``distinct_2 < 0.5`` or ``longest_repeat >= 8`` (a repeated phrase of 8+ tokens in 48).

The report warns when the compressed model loops on more prompts than the dense model.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

PROMPTS = (
    "The history of the United States",
    "Once upon a time, in a small village,",
    "The most important thing about science is",
    "To make a good cup of tea, you",
)
NEW_TOKENS = 48
LOOP_DISTINCT_2, LOOP_REPEAT = 0.5, 8


def distinct_n(ids: Sequence[int], n: int = 2) -> float:
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def longest_repeat(ids: Sequence[int]) -> int:
    """Length of the longest n-gram that occurs at least twice in ``ids`` (0 if no token repeats)."""
    ids = list(ids)
    best = 0
    for n in range(1, len(ids)):
        seen, found = set(), False
        for i in range(len(ids) - n + 1):
            g = tuple(ids[i:i + n])
            if g in seen:
                found = True
                break
            seen.add(g)
        if not found:
            break
        best = n
    return best


def score(ids: Sequence[int]) -> dict[str, Any]:
    d2, rep = distinct_n(ids, 2), longest_repeat(ids)
    return {"distinct_2": round(d2, 4), "longest_repeat": rep, "loops": bool(d2 < LOOP_DISTINCT_2 or rep >= LOOP_REPEAT)}


@torch.no_grad()
def continuations(model: nn.Module, tokenizer, prompts: Sequence[str] = PROMPTS, new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Greedy continuations of ``prompts`` with their scores, and a summary
    (``loops``: how many loop, ``distinct_2``: the mean)."""
    from .placement import input_device

    device = input_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        ids = {k: enc[k].to(device) for k in ("input_ids", "attention_mask") if k in enc}
        out = model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        rows.append({"prompt": prompt, "text": tokenizer.decode(new, skip_special_tokens=True), **score(new)})
    return {"prompts": rows, "loops": sum(r["loops"] for r in rows), "of": len(rows),
            "distinct_2": round(sum(r["distinct_2"] for r in rows) / len(rows), 4), "new_tokens": new_tokens}


def loop_warning(dense: dict[str, Any], final: dict[str, Any]) -> str | None:
    if final["loops"] > dense["loops"]:
        return (f"greedy continuations of the compressed model loop on {final['loops']} of {final['of']} prompts "
                f"(dense: {dense['loops']}; distinct bigrams {dense['distinct_2']:.2f} -> {final['distinct_2']:.2f})")
    return None
