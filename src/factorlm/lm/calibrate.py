"""Sequential calibration of a decoder: stream activations through its blocks, one block at a time.

One-shot compressors (:mod:`factorlm.lm.methods`) need statistics of each target layer's
*inputs* (a Gram matrix, a mean absolute activation).  This module gathers them for any Hugging Face
decoder without per-model code:

* the **blocks** are the longest ``nn.ModuleList`` of same-type modules holding the targets
  (``model.layers`` in Llama / Qwen / Mistral, ``transformer.h`` in GPT-2);
* every block's call is caught once per batch (pre-hooks record the positional and keyword
  arguments - hidden states, rotary embeddings, masks - of a dense forward that stops after the last
  block); then block ``i`` is called with the previous (compressed) block's outputs and *its own*
  other arguments (sliding-window layers of Qwen2 / Gemma get other masks than global ones);
* inside a block, the targets fall into **groups that read the same tensor** (q/k/v read the
  normalized hidden state, gate/up the post-attention one; found by probing which tensor each
  target receives), in execution order.  One statistic is accumulated per group, on its first
  member, so q, k and v share one Gram matrix.

Orders (``mode``):

``"layer"`` (default, sequential)
    every group's statistics are taken with everything before it already compressed: the earlier
    blocks *and* the earlier groups of the same block (the forward stops right after the group is
    seen, so a block costs little more than one pass);
``"block"``
    a block's groups all see its input from the compressed earlier blocks, but the block's own
    dense sub-layers;
``"none"``
    every statistic comes from the dense model (one pass; SVD-LLM's released profiling path);
``"anchored"``
    as ``"layer"``, and every group also sees the *dense* model's inputs of the same tokens (a copy of the
    block, taken before it is compressed, runs on the dense hidden states beside it): the statistics are
    :class:`~factorlm.decompose.anchor.PairedStats` (shifted Gram + cross-Gram), for the anchored fit
    (:mod:`factorlm.decompose.anchor`: the compressed layer reproduces the dense outputs).  Twice the
    forwards of ``"layer"``, a second set of hidden states and one block's copy.

Memory beyond the model: one block's statistics plus the calibration hidden states
(``n x seq x hidden``) and the blocks' arguments (shared tensors are held once).  The model stays
where it is, or (``offload_to``) on the CPU with one block at a time on the execution device.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import FactorLMError, check
from .gradients import output_sensitivity  # noqa: F401  (re-exported: it lived here)

MODES = ("layer", "block", "none", "anchored")


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (what was needed has been seen)."""


def decoder_blocks(model: nn.Module, targets: Sequence[str]) -> tuple[str, nn.ModuleList]:
    """``(name, blocks)``: the ``nn.ModuleList`` of same-type blocks that holds the most targets.

    Every target must sit inside it (FactorLMError naming the first that does not)."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or any(type(b) is not type(m[0]) for b in m):
            continue
        n = sum(1 for t in targets if t.startswith(name + "."))
        if n and (best is None or n > best[2]):
            best = (name, m, n)
    check(best is not None, "no decoder blocks (an nn.ModuleList of layers) hold the target layers")
    name, blocks, _ = best
    outside = [t for t in targets if not t.startswith(name + ".")]
    if outside:
        raise FactorLMError(f"target {outside[0]} is outside the decoder blocks ({name}); calibration "
                            "compresses layers inside the blocks only (use --exclude)")
    return name, blocks


def block_of(target: str, blocks_name: str) -> int:
    return int(target[len(blocks_name) + 1:].split(".", 1)[0])


@dataclass
class BlockCall:
    """The arguments one batch calls a block with; ``hidden`` is swapped block after block."""

    args: tuple
    kwargs: dict
    in_kwargs: bool  # hidden states passed as kwargs["hidden_states"] instead of args[0]

    @property
    def hidden(self) -> torch.Tensor:
        return self.kwargs["hidden_states"] if self.in_kwargs else self.args[0]

    def with_hidden(self, h: torch.Tensor) -> "BlockCall":
        if self.in_kwargs:
            return BlockCall(self.args, {**self.kwargs, "hidden_states": h}, True)
        return BlockCall((h, *self.args[1:]), self.kwargs, False)

    def __call__(self, block: nn.Module) -> torch.Tensor:
        out = block(*self.args, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: Iterable[dict]) -> list[list[BlockCall]]:
    """``calls[i][b]``: how block ``i`` is called on batch ``b``, with its hidden states left out
    (``None``) except for block 0.

    One dense forward per batch, stopped after the last block (no LM head).  Every block's own
    arguments are kept because they may differ between blocks: Qwen2 / Gemma-style models give
    sliding-window layers another attention mask (and Gemma 3 other rotary embeddings) than global
    ones.  Arguments shared by all blocks are the same tensor objects, so keeping them costs nothing."""
    calls: list[list[BlockCall]] = [[] for _ in blocks]
    handles = []
    for i, block in enumerate(blocks):
        def pre(module, args, kwargs, i=i):
            in_kwargs = not args
            if in_kwargs:
                check("hidden_states" in kwargs, f"{type(module).__name__} is called without hidden states")
            call = BlockCall(tuple(args), dict(kwargs), in_kwargs)
            calls[i].append(call if i == 0 else call.with_hidden(None))

        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))

    def stop(module, args, output):
        raise _Stop

    handles.append(blocks[len(blocks) - 1].register_forward_hook(stop))
    try:
        for batch in batches:
            try:
                model(**batch, use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return calls


def probe_groups(block: nn.Module, local_names: Sequence[str], call: BlockCall) -> list[list[str]]:
    """The block's targets grouped by the tensor they read, groups in execution order.

    ``local_names`` are names relative to the block; one forward of ``call`` (the first batch) is
    observed.  A target that is never called is an error (it would get no statistics)."""
    seen: dict[str, tuple[int, int]] = {}  # name -> (order, key of its input tensor)
    keys: dict[tuple, int] = {}
    alive: list[torch.Tensor] = []  # held until the probe ends, so no freed input's memory is reused
    handles = []
    for n in local_names:
        def hook(module, args, n=n):
            if n in seen:
                return
            x = args[0]
            alive.append(x)
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype)
            seen[n] = (len(seen), keys.setdefault(key, len(keys)))

        handles.append(block.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call(block)
    finally:
        for h in handles:
            h.remove()
        alive.clear()
    missing = [n for n in local_names if n not in seen]
    if missing:
        raise FactorLMError(f"target {missing[0]} is not called in a forward of its block; cannot calibrate it")
    groups: dict[int, list[str]] = {}
    for n in sorted(seen, key=lambda k: seen[k][0]):
        groups.setdefault(seen[n][1], []).append(n)
    return list(groups.values())


@dataclass
class Progress:
    """What the stream did (for logs and factorlm.json)."""

    blocks: int = 0
    groups: int = 0
    forwards: int = 0  # block forwards, full or stopped early
    tokens: int = 0
    group_names: list[list[str]] = field(default_factory=list)


@torch.no_grad()
def stream(
    model: nn.Module,
    targets: Sequence[str],
    batches: Sequence[dict],
    make_stats: Callable[[nn.Module], object],
    on_group: Callable[[int, list[str], object], None],
    *,
    mode: str = "layer",
    log: Callable[[str], None] | None = None,
    offload_to: torch.device | None = None,
    refine: Callable[[int, nn.Module, list[str], list[BlockCall], list[torch.Tensor]], None] | None = None,
) -> Progress:
    """Walk the decoder's blocks; for each group of targets collect input statistics and hand them over.

    ``make_stats(module)`` returns a fresh accumulator with an ``update(x)`` method for the group
    whose first member is ``module``; ``on_group(block_index, full_names, stats)`` is called once per
    group with the statistics of its input (it may replace the group's modules, e.g. by their
    factorized versions: later statistics then see them, as ``mode`` says).

    ``offload_to``: an execution device for a model kept on the CPU; the blocks visit it one at a time
    (:func:`factorlm.lm.placement.blocks_visit`) and the model is on the CPU afterwards.

    ``refine(block_index, block, local_targets, calls, dense_outputs)``: called once per block with
    targets, after all its groups are handed over and before its outputs feed the next block: ``calls``
    are the block's inputs in the compressed model, ``dense_outputs`` the dense block's outputs on the
    dense model's inputs of the same tokens (:mod:`factorlm.lm.refine`).  It may change the block's
    parameters; the stream then goes on with the changed block's outputs.  Any mode keeps the dense
    hidden states beside the shifted ones for it (``"none"``: they are the same).
    """
    check(mode in MODES, f"calibration order must be one of {', '.join(MODES)}, got {mode!r}")
    check(len(batches) > 0, "no calibration batches")
    blocks_name, blocks = decoder_blocks(model, targets)
    if offload_to is not None:
        from .placement import blocks_visit

        with blocks_visit(model, blocks_name, blocks, offload_to):
            return _stream(model, targets, batches, make_stats, on_group, mode, log, blocks_name, blocks, refine)
    return _stream(model, targets, batches, make_stats, on_group, mode, log, blocks_name, blocks, refine)


def _stream(model, targets, batches, make_stats, on_group, mode, log, blocks_name, blocks, refine=None) -> Progress:
    by_block: dict[int, list[str]] = {}
    for t in targets:
        by_block.setdefault(block_of(t, blocks_name), []).append(t)
    per_block = capture_block_calls(model, blocks, batches)
    check(all(len(c) == len(batches) for c in per_block), "not every decoder block was reached for every batch")
    calls = per_block[0]
    # the dense model's hidden states, beside (--sequential none: the stream itself is dense)
    dense_calls = calls if mode == "anchored" or (refine is not None and mode != "none") else None
    prog = Progress(tokens=sum(int(c.hidden.shape[0] * c.hidden.shape[1]) for c in calls))

    last = max(by_block)  # the blocks after the last target's change nothing: the stream ends there
    for i, block in enumerate(blocks):
        if i > last:
            break
        if i:  # this block's own arguments, with the hidden states the previous (compressed) block produced
            calls = [own.with_hidden(c.hidden) for own, c in zip(per_block[i], calls)]
            if dense_calls is not None:
                dense_calls = [own.with_hidden(c.hidden) for own, c in zip(per_block[i], dense_calls)]
        dense_block = _dense_copy(block, calls[0].hidden.device, by_block.get(i)) if dense_calls is not None else None
        prefix = f"{blocks_name}.{i}."
        local = [t[len(prefix):] for t in by_block.get(i, [])]
        if local:
            groups = probe_groups(block, local, calls[0])
            prog.forwards += 1
            prog.group_names.extend([[prefix + n for n in g] for g in groups])
            if mode == "anchored":
                for g in groups:
                    stats = _collect_paired(block, dense_block, g, calls, dense_calls, make_stats)
                    prog.forwards += 2 * len(calls)
                    on_group(i, [prefix + n for n in g], stats)
            elif mode == "layer":
                for g in groups:
                    stats = _collect(block, [g], calls, make_stats, stop=True)[0]
                    prog.forwards += len(calls)
                    on_group(i, [prefix + n for n in g], stats)
            else:
                all_stats = _collect(block, groups, calls, make_stats, stop=False,
                                     keep_outputs=(mode == "none"))
                prog.forwards += len(calls)
                if mode == "none":  # next inputs from the dense block, then compress it
                    all_stats, outputs = all_stats
                for g, stats in zip(groups, all_stats):
                    on_group(i, [prefix + n for n in g], stats)
                if mode == "none":
                    if refine is not None:  # dense inputs, dense targets (the outputs above)
                        refine(i, block, local, calls, outputs)
                    calls = [c.with_hidden(o) for c, o in zip(calls, outputs)]
                    prog.blocks += 1
                    prog.groups += len(groups)
                    continue
            prog.groups += len(groups)
            if refine is not None:
                dense_out = [c(dense_block) for c in dense_calls]
                prog.forwards += len(calls)
                refine(i, block, local, calls, dense_out)
                if i < last:
                    dense_calls = [c.with_hidden(o) for c, o in zip(dense_calls, dense_out)]
                del dense_out
        if i < last:  # the next block's inputs, from this (compressed) block
            calls = [c.with_hidden(c(block)) for c in calls]
            prog.forwards += len(calls)
            if dense_calls is not None and not (refine is not None and local):
                dense_calls = [c.with_hidden(c(dense_block)) for c in dense_calls]
                prog.forwards += len(calls)
        del dense_block
        prog.blocks += 1
        if log and (i + 1) % max(1, len(blocks) // 5) == 0:
            log(f"  calibrated {i + 1}/{len(blocks)} blocks")
    return prog


def _collect(block: nn.Module, groups: list[list[str]], calls: Sequence[BlockCall], make_stats,
             *, stop: bool, keep_outputs: bool = False):
    """Statistics of each group's input over every batch (one hook on each group's first member).

    ``stop``: end each forward right after the (single) group has been seen."""
    stats, handles = [], []
    for g in groups:
        first = block.get_submodule(g[0])
        s = make_stats(first)
        stats.append(s)

        def hook(module, args, s=s):
            s.update(args[0])
            if stop:
                raise _Stop

        handles.append(first.register_forward_pre_hook(hook))
    outputs = []
    try:
        for c in calls:
            try:
                out = c(block)
                if keep_outputs:
                    outputs.append(out)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    if keep_outputs:
        return stats, outputs
    return stats


def _dense_copy(block: nn.Module, device: torch.device, targets) -> nn.Module:
    """A copy of ``block`` before it is compressed, on ``device``, without accelerate's offload hook (which
    links every block's hook in a cycle: a plain deepcopy would copy the whole decoder); a block without
    targets is never changed, so it is its own dense copy."""
    if not targets:
        return block
    hooks = {k: block.__dict__.pop(k) for k in ("_hf_hook", "forward", "_old_forward") if k in block.__dict__}
    try:
        return copy.deepcopy(block).to(device)
    finally:
        block.__dict__.update(hooks)


def _collect_paired(block, dense_block, group, calls, dense_calls, make_stats):
    """:class:`PairedStats` of one group: per batch, its first member's input in the dense block on the dense
    hidden states and in the (partly compressed) block on the shifted ones, the same tokens."""
    from ..decompose.anchor import PairedStats

    seen = {}

    def catch(key):
        def hook(module, args):
            seen[key] = args[0]
            raise _Stop
        return hook

    first = block.get_submodule(group[0])
    stats = PairedStats(make_stats(first))
    handles = [first.register_forward_pre_hook(catch("shifted")),
               dense_block.get_submodule(group[0]).register_forward_pre_hook(catch("dense"))]
    try:
        for c, d in zip(calls, dense_calls):
            for call, mod, key in ((d, dense_block, "dense"), (c, block, "shifted")):
                try:
                    call(mod)
                except _Stop:
                    pass
                check(key in seen, f"calibration: {group[0]} was not reached")
            stats.update_pair(seen.pop("shifted"), seen.pop("dense"))
    finally:
        for h in handles:
            h.remove()
    return stats


def token_batches(blocks: torch.Tensor, batch_size: int, device=None) -> list[dict]:
    """``(n, seq)`` token windows -> a list of ``{"input_ids": (b, seq)}`` batches on ``device``."""
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise FactorLMError("calibration needs at least one window of tokens")
    return [{"input_ids": blocks[i:i + batch_size].to(device)} for i in range(0, blocks.shape[0], batch_size)]
