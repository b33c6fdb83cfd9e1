"""Output-gradient statistics of a decoder's target layers: one backward of the next-token loss.

Two statistics of ``g_t = dL/dy_t``, the gradient of the calibration loss with respect to a target's
output at token ``t`` (the loss is each batch's mean next-token loss, as ``labels=input_ids`` gives):

* :func:`output_sensitivity`: ``lambda = sum_t ||g_t||^2 / out_features``, one number per target (the
  global rank plans' ``--global-score fisher`` and the byte plan weight whitened spectra by it);
* :func:`output_grams`: ``G_out = sum_t g_t g_t^T`` (``out x out``), the output side of the two-sided
  K-FAC fit (:mod:`factorlm.decompose.kfac`; ``--task lm --method kfac``).  ``trace(G_out) / out =
  lambda``.  Memory: ``4 * sum over targets of out^2`` bytes, held on the CPU (SmolLM2-135M: 0.69 GB;
  a Llama-3-8B block 1.85 GB, the whole model 59 GB); each window's ``g^T g`` is formed on the
  gradient's device, one target at a time, and added to its float32 accumulator on the CPU.  With
  ``max_bytes`` the targets are split (in order) into groups of at most that many accumulator bytes, one
  backward pass over the same windows per group, and each group's Grams are written to ``spill_dir``
  (safetensors) before the next starts: peak memory ``max_bytes`` (or the largest single Gram), the cost
  one more backward pass per group, and the Grams come back as a :class:`SpilledGrams` mapping that reads
  one from disk per access (one file per Gram; the same sums in the same order as in memory, so bit-identical
  given a deterministic backward: tested on the CPU; some GPU backward kernels are not deterministic).

Both back-propagate through the whole model at once (no parameter gradient is stored: the graph
starts at the input embeddings' output), one window per backward, so the logits alive at once are
one window's (``seq_len x vocab`` floats: 134 MB at a 262k vocabulary); the first ``max_batches``
batches.  Under ``--offload`` neither is bounded (:mod:`factorlm.lm.placement`) and the callers refuse them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check

__all__ = ["SpilledGrams", "gram_budget", "gram_groups", "block_output_metrics", "method_output_grams", "output_grams", "output_sensitivity"]


def _backward_each_window(model: nn.Module, targets: Sequence[str], batches: Sequence[dict],
                          max_batches: int | None, on_grad: Callable[[str, torch.Tensor], None]) -> None:
    """``on_grad(name, g)`` with ``g`` (tokens, out) the output gradient of every target, one window at a time."""
    from ..models.state import frozen_eval
    from ..models.surgery import get_module

    handles = []

    def start_graph(module, args, out):
        return out.detach().requires_grad_(True)

    handles.append(model.get_input_embeddings().register_forward_hook(start_graph))
    for n in targets:
        def fwd(module, args, out, n=n):
            out = out[0] if isinstance(out, tuple) else out  # a decoder block may return (hidden, ...)
            if out.requires_grad:
                out.register_hook(lambda g, n=n: on_grad(n, g.detach().reshape(-1, g.shape[-1])))

        handles.append(get_module(model, n).register_forward_hook(fwd))
    try:
        with frozen_eval(model), torch.enable_grad():
            for b in batches[: max_batches or len(batches)]:
                ids = b["input_ids"]
                mask = b.get("attention_mask")
                labels = ids[:, 1:] if mask is None else ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                n_tokens = max(1, int((labels != -100).sum()))
                for i in range(ids.shape[0]):  # one window per backward: the logits of one window at a time
                    row = {k: v[i: i + 1] for k, v in b.items() if torch.is_tensor(v)}
                    logits = model(**row, use_cache=False).logits[0, :-1]
                    loss = F.cross_entropy(logits.float(), labels[i], ignore_index=-100, reduction="sum") / n_tokens
                    loss.backward()
                    del logits, loss
    finally:
        for h in handles:
            h.remove()


def output_sensitivity(model: nn.Module, targets: Sequence[str], batches: Sequence[dict],
                       max_batches: int | None = 4) -> dict[str, float]:
    """Per target, ``sum_t ||dL/dy_t||^2 / out_features``: the mean squared gradient of the next-token loss
    with respect to the layer's outputs over the calibration tokens (the diagonal of its empirical
    Fisher, averaged over output channels).  With an isotropic Fisher, an output error ``E`` of the
    layer (summed over the same tokens) costs about ``lambda * ||E||^2 / 2`` of loss, which makes the
    whitened spectra of different layers comparable (:func:`factorlm.lm.plan_ranks`, ``global``)."""
    from ..models.surgery import get_module, linear_shape

    lam = {n: 0.0 for n in targets}

    def add(n, g):
        lam[n] += float(g.double().pow(2).sum())

    _backward_each_window(model, targets, batches, max_batches, add)
    return {n: lam[n] / linear_shape(get_module(model, n))[0] for n in targets}


class SpilledGrams(Mapping):
    """``name -> G_out`` read from the safetensors files :func:`output_grams` wrote (one Gram in memory per access)."""

    def __init__(self, files: dict[str, str], passes: int = 1, peak_bytes: int = 0):
        self.files = dict(files)
        self.passes = passes  #: backward passes that made them
        self.peak_bytes = peak_bytes  #: the most accumulator bytes alive at once while they were made

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name) -> bool:  # (Mapping's default would read the Gram)
        return name in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def gram_budget(need_bytes: int, memory_gb: float = 0.0, available: int | None = None) -> int | None:
    """``max_bytes`` for :func:`output_grams`: ``None`` (all in memory) when ``need_bytes`` fits in ``memory_gb``
    GiB, or with ``memory_gb = 0`` (auto) in half the ``available`` RAM (psutil's, by default); else that budget
    (auto: a quarter of the available RAM)."""
    if memory_gb > 0:
        cap = int(memory_gb * 2**30)
        return None if need_bytes <= cap else cap
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    return None if need_bytes <= available // 2 else max(1, available // 4)


def gram_groups(sizes: dict[str, int], max_bytes: int | None) -> list[list[str]]:
    """The targets in order, cut into consecutive groups of at most ``max_bytes`` (a larger single Gram is a
    group of its own); ``None``: one group."""
    if max_bytes is None:
        return [list(sizes)]
    groups: list[list[str]] = [[]]
    used = 0
    for n, b in sizes.items():
        if groups[-1] and used + b > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += b
    return groups


def _summed_grams(model: nn.Module, names: Sequence[str], batches: Sequence[dict], max_batches: int | None,
                  advice: str) -> dict[str, torch.Tensor]:
    """``{name: sum_t g_t g_t^T}`` (float32, CPU) of the output gradients of ``names``, one backward per window;
    each window's ``g^T g`` is formed on the gradient's device and added to its accumulator on the CPU.  One-line
    errors for non-finite gradients (with ``advice``) and for a module no gradient reached."""
    grams: dict[str, torch.Tensor] = {}

    def add(n, g):  # once per module and window: one out x out product on the gradient's device at a time
        g = g.float()
        G = (g.T @ g).cpu()
        check(bool(torch.isfinite(G).all()), f"the output gradients of {n} are not finite (NaN/Inf on the "
                                             f"calibration text): {advice}")
        grams[n] = G if n not in grams else grams[n].add_(G)

    _backward_each_window(model, names, batches, max_batches, add)
    missing = [n for n in names if n not in grams]
    check(not missing, f"no output gradient reached {missing[0] if missing else ''} (is it used by the forward?)")
    return grams


def output_grams(model: nn.Module, targets: Sequence[str], batches: Sequence[dict],
                 max_batches: int | None = 4, max_bytes: int | None = None,
                 spill_dir: str | None = None) -> Mapping[str, torch.Tensor]:
    """Per target, ``G_out = sum_t g_t g_t^T`` (``out x out``, float32, on the CPU) over the same tokens
    and loss as :func:`output_sensitivity`; with ``max_bytes`` (needs ``spill_dir``) computed in groups
    and returned as a :class:`SpilledGrams` (module docstring: memory)."""
    from ..models.surgery import get_module, linear_shape

    check(max_bytes is None or spill_dir is not None, "output_grams: max_bytes needs a spill_dir for the finished groups")
    check(max_bytes is None or max_bytes > 0, f"output_grams: max_bytes must be > 0, got {max_bytes}")
    outs = {n: linear_shape(get_module(model, n))[0] for n in targets}
    groups = gram_groups({n: 4 * o * o for n, o in outs.items()}, max_bytes)
    files: dict[str, str] = {}
    peak = 0
    for gi, group in enumerate(groups):
        grams = _summed_grams(model, group, batches, max_batches, "use --method whiten / --correction-space input")
        for n in group:
            check(grams[n].shape == (outs[n], outs[n]),
                  f"{n}: output-gradient Gram {tuple(grams[n].shape)}, expected ({outs[n]}, {outs[n]})")
        peak = max(peak, sum(G.numel() * G.element_size() for G in grams.values()))  # all alive at the pass's end
        if max_bytes is None:
            return grams
        from safetensors.torch import save_file

        for k, n in enumerate(group):  # one file per Gram: a writer that copies holds one Gram twice, not a group
            path = os.path.join(spill_dir, f"gram-{gi:05d}-{k:04d}.safetensors")
            save_file({n: grams.pop(n)}, path)
            files[n] = path
    return SpilledGrams(files, len(groups), peak)


def method_output_grams(method, model: nn.Module, targets: Sequence[str], shapes: dict[str, tuple[int, int]],
                        batches: Sequence[dict], log: Callable[[str], None]):
    """The pipeline's Grams stage: sets ``method.output_grams`` (in memory, or spilled under the budget of
    ``--gram-memory-gb`` to a temporary folder, which is returned for the caller to clean up after the fits;
    ``None`` when in memory).  One-line error before any backward when neither memory nor disk can hold them."""
    import shutil
    import tempfile
    import time

    t0 = time.perf_counter()
    need = sum(4 * shapes[n][0] ** 2 for n in targets)
    max_bytes = gram_budget(need, float(method.options.gram_memory_gb))
    if max_bytes is not None:
        free = shutil.disk_usage(tempfile.gettempdir()).free
        check(free > need, f"the output-gradient Grams ({need / 2**30:.1f} GiB) do not fit in memory "
                           f"(--gram-memory-gb) nor in {tempfile.gettempdir()} ({free / 2**30:.1f} GiB free): set "
                           "TMPDIR to a larger disk (not a RAM-backed tmpfs) or use --method whiten")
    gram_dir = tempfile.TemporaryDirectory(prefix="factorlm-grams-") if max_bytes is not None else None
    nb = int(method.options.grad_batches)
    try:
        method.output_grams = output_grams(model, targets, batches, max_batches=nb, max_bytes=max_bytes,
                                           spill_dir=gram_dir.name if gram_dir else None)
    except BaseException:
        if gram_dir is not None:
            gram_dir.cleanup()
        raise
    where = ("on the CPU" if gram_dir is None else f"on disk in {gram_dir.name} ({method.output_grams.passes} "
             f"backward passes of at most {max_bytes / 2**30:.2f} GiB in memory)")
    log(f"  output-gradient Grams of {len(targets)} targets over {min(len(batches), nb)} calibration batches: "
        f"{need / 2**30:.2f} GiB {where}, {time.perf_counter() - t0:.0f}s")
    return gram_dir


def block_output_metrics(model: nn.Module, blocks_name: str, n_blocks: int, batches: Sequence[dict],
                         max_batches: int | None = 4, damp: float = 0.01) -> dict[int, torch.Tensor]:
    """Per decoder block ``i`` (module ``{blocks_name}.{i}``), ``M_i = (G_i + damp * mean(diag G_i) I)^{1/2}``
    (``hidden x hidden``, float32, CPU; symmetric), ``G_i = sum_t g_t g_t^T`` with ``g_t`` the next-token loss's
    gradient with respect to the block's output hidden state on this (dense) model: ``||E M_i||_F^2`` is K-FAC's
    estimate (x2) of the loss increase an output error ``E`` of the block causes (``--refine-loss fisher``,
    :mod:`factorlm.lm.refine`).  Memory ``4 n_blocks hidden^2`` bytes (Llama-3-8B: 2.1 GB)."""
    from ..decompose.kfac import output_root

    names = [f"{blocks_name}.{i}" for i in range(n_blocks)]
    grams = _summed_grams(model, names, batches, max_batches, "use --refine-loss mse")
    return {i: output_root(grams[n].double(), damp)[0].float() for i, n in enumerate(names)}
