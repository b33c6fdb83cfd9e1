"""Where the model lives while it is compressed: one device, or the CPU with blocks visiting the device.

``--device auto | cpu | cuda | cuda:N`` picks the execution device (``auto``: the first GPU when there
is one).  Without ``--offload`` the whole model moves there once, as before.  With ``--offload cpu``
the model's home is the CPU, and accelerate's big-model utilities place it for each stage:

* **calibration and factorization** (:func:`blocks_visit`): everything outside the decoder blocks
  (embeddings, final norm, rotary tables, LM head) goes to the device; every block gets
  :func:`accelerate.cpu_offload_with_hook`, chained so that calling block ``i + 1`` sends block ``i``
  back to the CPU (llm-compressor's sequential pipeline works the same way).  At most one block's
  weights, its factors and its statistics are on the device at a time, beside the calibration hidden
  states (``windows x seq x hidden``);
* **evaluation and healing** (:func:`dispatched`): :func:`accelerate.infer_auto_device_map` over every
  visible GPU (balanced, decoder blocks never split) with the CPU for what does not fit, then
  :func:`accelerate.dispatch_model`; afterwards the hooks are removed and the weights return to the CPU.
  Healing refuses a map that puts weights on the CPU (offloaded weights cannot train).

Everything runs on CPU-only machines too (the device is then the CPU and nothing moves).  What needs a
full backward through the model at once (``--global-score fisher``) is refused with ``--offload``:
autograd would keep every block's weights alive on the device until the backward.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import check

OFFLOAD = ("none", "cpu")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a named GPU must exist (one-line error)."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        check(False, f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        check(torch.cuda.is_available(), f"--device {name}: no CUDA GPU is visible on this machine")
        check(dev.index is None or dev.index < torch.cuda.device_count(),
              f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    else:
        check(dev.type == "cpu", f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return dev


def input_device(model: nn.Module) -> torch.device:
    """Where a batch of token ids goes: the input embeddings' device (the CPU for weights offloaded to
    the meta device by accelerate: its hooks move the inputs)."""
    try:
        dev = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        try:
            dev = next(model.parameters()).device
        except StopIteration:
            return torch.device("cpu")
    return torch.device("cpu") if dev.type == "meta" else dev


def _move_outside(model: nn.Module, blocks_name: str, device: torch.device) -> None:
    """Move the parameters and buffers outside ``blocks_name`` to ``device`` (in place: ``p.data``,
    so a tied LM head stays tied to its embeddings)."""
    inside = blocks_name + "."
    for name, mod in model.named_modules():
        if name == blocks_name or name.startswith(inside):
            continue
        for p in mod.parameters(recurse=False):
            p.data = p.data.to(device)
        for k, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[k] = b.to(device)


@contextlib.contextmanager
def blocks_visit(model: nn.Module, blocks_name: str, blocks: nn.ModuleList, device: torch.device) -> Iterator[None]:
    """During the context: the non-block modules on ``device``, the blocks on the CPU, each moved to
    ``device`` when it is called and back when the next one is (accelerate ``cpu_offload_with_hook``).
    On exit every hook is removed and the whole model is on the CPU."""
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    _move_outside(model, blocks_name, device)
    hooks = []
    prev = None
    try:
        for block in blocks:
            block.to("cpu")
            _, prev = cpu_offload_with_hook(block, execution_device=device, prev_module_hook=prev)
            hooks.append(prev)
        # a cycle: the capture pass runs every block once per batch, so calling block 0 again must send
        # the last block back (else two blocks would sit on the device)
        hooks[0].hook.prev_module_hook = hooks[-1]
        yield
    finally:
        for block in blocks:
            remove_hook_from_module(block)
            block.to("cpu")
        _move_outside(model, blocks_name, torch.device("cpu"))
        if device.type == "cuda":
            torch.cuda.empty_cache()


#: share of each GPU's free memory the weights may take (the rest: logits, activations, and for
#: healing gradients and optimizer state)
GPU_SHARE = {"eval": 0.85, "train": 0.5}


def gpu_budget(device: torch.device, what: str = "eval") -> dict[int, int]:
    """``{gpu index: bytes}`` the weights may use: every visible GPU for ``cuda``, only GPU N for ``cuda:N``."""
    if device.type != "cuda":
        return {}
    gpus = [device.index] if device.index is not None else list(range(torch.cuda.device_count()))
    return {i: int(torch.cuda.mem_get_info(i)[0] * GPU_SHARE[what]) for i in gpus}


def device_map(model: nn.Module, device: torch.device, what: str = "eval") -> dict[str, str | int]:
    """accelerate's device map of ``model`` over :func:`gpu_budget`'s GPUs, with the CPU (its whole RAM:
    the model already sits there, and accelerate's offload map aliases those tensors) for the rest,
    decoder blocks never split; ``{"": "cpu"}`` on a CPU execution device.  Never the disk."""
    if device.type != "cuda":
        return {"": "cpu"}
    import psutil
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    dtype = next(model.parameters()).dtype
    memory = {**gpu_budget(device, what), "cpu": int(psutil.virtual_memory().total)}
    if len(memory) > 2:  # several GPUs: spread the blocks evenly rather than filling GPU 0 first
        memory = get_balanced_memory(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    dmap = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    disk = [k for k, v in dmap.items() if v == "disk"]
    check(not disk, f"the model does not fit the GPUs and the CPU's RAM ({disk[0]} would go to the disk)")
    return dmap


def offloaded(dmap: dict) -> list[str]:
    """The entries of a device map that do not sit on a GPU."""
    if all(v == "cpu" for v in dmap.values()):  # a CPU-only machine: the CPU is the device
        return []
    return [k for k, v in dmap.items() if v in ("cpu", "disk")]


@contextlib.contextmanager
def dispatched(model: nn.Module, device: torch.device, offload: str, *, train: bool = False,
               dmap: dict | None = None, offload_dir: str | None = None) -> Iterator[dict]:
    """Place ``model`` for evaluation (or healing, ``train``) and yield the device map used.

    ``offload="none"``: the model is already on ``device`` (nothing happens).  ``"cpu"``: dispatched
    with :func:`device_map` (or the given ``dmap``; ``"disk"`` entries need ``offload_dir``; accelerate
    hooks move activations between devices), then, on exit, the hooks removed, every weight back on
    the CPU and tied embeddings tied again."""
    if offload == "none":
        yield {"": str(device)}
        return
    from accelerate import dispatch_model
    from accelerate.hooks import remove_hook_from_module

    dmap = device_map(model, device, "train" if train else "eval") if dmap is None else dmap
    off = offloaded(dmap)
    if train:
        check(not off, f"healing needs every weight on a GPU, but the model does not fit the visible GPUs "
                       f"({len(off)} modules would sit on the CPU, e.g. {off[0] if off else ''}): use more GPUs "
                       "or --heal-steps 0")
    if dmap != {"": "cpu"}:
        dispatch_model(model, dmap, main_device=device, offload_dir=offload_dir)
    try:
        yield dmap
    finally:
        if dmap != {"": "cpu"}:
            remove_hook_from_module(model, recurse=True)  # restores offloaded weights from accelerate's map
            model.__dict__.pop("hf_device_map", None)  # stale now (accelerate and save_pretrained read it)
            if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
                model.tie_weights()
        model.to("cpu")  # the model's home with --offload cpu, whatever moved it (healing's accelerator)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def heal_fits(model: nn.Module, shapes: dict, ranks: dict, device: torch.device) -> tuple[bool, int, int]:
    """``(fits, compressed weight bytes, GPU budget)``: whether the model factorized with ``ranks`` fits
    :func:`gpu_budget` (``train``) of ``device`` - checked before factorizing, so a healing run that could
    not place its model fails before the long work.  Always True on a CPU device."""
    if device.type != "cuda":
        return True, 0, 0
    elem = next(model.parameters()).element_size()
    total = sum(p.numel() for p in model.parameters()) * elem
    saved = sum((o * i - ranks[n] * (o + i)) * elem for n, (o, i) in shapes.items())
    budget = sum(gpu_budget(device, "train").values())
    return total - saved <= budget, total - saved, budget
