"""Second-moment statistics of chosen ``nn.Linear`` layers on task batches: the Gram of each layer's
inputs (SVD-LLM whitening) and, optionally, the Gram of the task loss's gradient with respect to its
outputs (K-FAC's output factor).

Tokens are the positions with ``attention_mask == 1`` (padding never enters a Gram).  The output
gradients are those of the *sum* of the examples' losses (the model's mean loss times the batch
size), so each token's ``g = dL_n/dy`` is its own example's gradient, as in the per-example Fisher of
:mod:`factorlm.train.fisher` (examples do not interact in an encoder).  Dropout is off; weights,
``requires_grad`` flags and train/eval mode are left as they were.  The output gradients flow from
``inputs_embeds = embeddings(input_ids)`` (a leaf, so no parameter needs a gradient); on the first batch
the logits through ``inputs_embeds`` are checked against those through ``input_ids`` (a model whose
embedding layer scales, or whose positions depend on ``input_ids``, is refused with one line).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..decompose.whiten import InputStats
from ..errors import check
from ..models.state import frozen_eval
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

    def attach() -> list:
        return [m.register_forward_hook(hook(n)) for n, m in modules.items()]

    handles = attach()
    total = max_batches if max_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
    try:
        with frozen_eval(model, freeze=output_grads):  # output gradients reach every layer's output, no weight's .grad
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
                    out = model(inputs_embeds=x, **kw)
                    check(out.loss is not None, "the model returned no loss (output gradients need batches with labels)")
                    if i == 0:
                        _check_embeds_path(model, handles, attach, batch, out)
                    (out.loss * int(x.shape[0])).backward()  # the sum of the examples' losses
    finally:
        for h in handles:
            h.remove()
    for n, s in ins.items():
        check(s.tokens > 0, f"no calibration tokens reached {n}")
    for n, s in (outs or {}).items():
        check(s.tokens > 0, f"no loss gradient reached the output of {n} (is it used by the loss?)")
    for s in ins.values():  # the input Gram per token: matrices that see different token counts compare
        s.gram /= s.tokens
    return ins, outs


def _check_embeds_path(model: nn.Module, handles: list, attach, batch: dict, out) -> None:
    """``model(input_ids=...)`` and ``model(inputs_embeds=embeddings(input_ids))`` must agree."""
    from .evaluate import output_heads

    for h in handles:  # the reference forward must not enter the statistics
        h.remove()
    try:
        with torch.no_grad():
            ref = output_heads(model(**model_inputs(batch)))
        got = output_heads(out)
        for k, v in ref.items():
            g = got[k].detach()
            check(torch.allclose(g.float(), v.float(), rtol=1e-3, atol=1e-4 * max(1.0, float(v.abs().max()))),
                  "this model's outputs through inputs_embeds differ from those through input_ids (a scaled "
                  "embedding or positions computed from input_ids): output-gradient statistics are not supported")
    finally:
        handles[:] = attach()
