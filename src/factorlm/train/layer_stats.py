"""Second-moment statistics of chosen ``nn.Linear`` layers on task batches: the Gram of each layer's
inputs (SVD-LLM whitening) and, optionally, the Gram of the task loss's gradient with respect to its
outputs (K-FAC's output factor).

Tokens are the positions with ``attention_mask == 1`` (padding never enters a Gram).  The output
gradients are those of the *sum* of the examples' losses (the model's mean loss times the batch
size), so each token's ``g = dL_n/dy`` is its own example's gradient, as in the per-example Fisher of
:mod:`factorlm.train.fisher` (examples do not interact in an encoder).  Dropout is off; weights,
``requires_grad`` flags and train/eval mode are left as they were.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..decompose.whiten import InputStats
from ..errors import check
from .evaluate import model_inputs


def layer_grams(
    model: nn.Module,
    loader: Iterable,
    names: list[str],
    *,
    max_batches: int | None = None,
    output_grads: bool = False,
    device: torch.device | None = None,
    progress: bool = False,
) -> tuple[dict[str, InputStats], dict[str, InputStats] | None]:
    """``(inputs, outputs)``: ``{name: InputStats}`` of each layer's inputs and, with ``output_grads``,
    of its output gradients (else None).  ``loader`` yields dicts the model takes as keywords (with
    ``labels`` when ``output_grads``) and an ``attention_mask``."""
    device = device or next(model.parameters()).device
    modules = {n: model.get_submodule(n) for n in names}
    for n, m in modules.items():
        check(isinstance(m, nn.Linear), f"{n} is not an nn.Linear (layer statistics need one)")
    ins = {n: InputStats(m.in_features) for n, m in modules.items()}
    outs = {n: InputStats(m.out_features) for n, m in modules.items()} if output_grads else None
    token_mask: list[torch.Tensor] = []

    def tokens(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if token_mask and t.dim() == 3 and t.shape[:2] == token_mask[0].shape:
            return t[token_mask[0]]
        return t.reshape(-1, t.shape[-1])

    def hook(name):
        def fn(module, inputs, output):
            ins[name].update(tokens(inputs[0]))
            if outs is not None and output.requires_grad:
                output.register_hook(lambda g: outs[name].update(tokens(g)))
        return fn

    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    model.eval()
    if output_grads:  # gradients must reach every layer's output, not any weight's .grad
        for p in model.parameters():
            p.requires_grad_(False)
    total = max_batches if max_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
    try:
        for i, batch in enumerate(tqdm(loader, total=total, desc="layer statistics", disable=not progress, leave=False)):
            if max_batches is not None and i >= max_batches:
                break
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            token_mask[:] = [batch["attention_mask"].bool()] if "attention_mask" in batch else []
            if not output_grads:
                with torch.no_grad():
                    model(**model_inputs(batch))
                continue
            with torch.enable_grad():
                emb = model.get_input_embeddings()
                x = emb(batch["input_ids"]).detach().requires_grad_(True)  # a leaf the graph starts from
                kw = {k: v for k, v in model_inputs(batch, labels=True).items() if k != "input_ids"}
                loss = model(inputs_embeds=x, **kw).loss
                check(loss is not None, "the model returned no loss (output gradients need batches with labels)")
                n_ex = int(batch["labels"].shape[0])
                (loss * n_ex).backward()
    finally:
        for h in handles:
            h.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for n, s in ins.items():
        check(s.tokens > 0, f"no calibration tokens reached {n}")
    return ins, outs
