"""Weight files of a saved folder: sharded safetensors in, checked, and loaded without a second copy.

:func:`write` stores a state dict as ``save_pretrained`` does (``huggingface_hub.save_torch_state_dict``:
``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards with a
``model.safetensors.index.json`` past ``max_shard_size``; tied tensors once).  :func:`files` finds them
again, :func:`check_match` compares the headers with a model's state dict (one-line errors naming the
tensor and both shapes), and :func:`load_into` assigns the tensors to a model built on the meta device
(``accelerate.init_empty_weights``), cast per tensor to the wanted dtype, so the model's weights exist
once, in their final dtype.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import FactorLMError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_SHARD_SIZE = "5GB"


def write(model: nn.Module, folder: str | os.PathLike, *, max_shard_size: int | str = MAX_SHARD_SIZE) -> list[Path]:
    """Write ``model.state_dict()`` into ``folder``; returns the weight files written."""
    from huggingface_hub import save_torch_state_dict
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet_before = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        save_torch_state_dict(model.state_dict(), str(folder), max_shard_size=max_shard_size, metadata={"format": "pt"})
    finally:
        if not quiet_before:
            enable_progress_bars()
    return files(folder)


def files(folder: str | os.PathLike) -> list[Path]:
    """The folder's weight files: the shards its index names, else ``model.safetensors``; [] if none."""
    p = Path(folder)
    if (p / INDEX).is_file():
        try:
            index = json.loads((p / INDEX).read_text())
            names = sorted(set(index["weight_map"].values()))
        except Exception as e:  # noqa: BLE001 - a damaged index is the user's folder
            raise FactorLMError(f"cannot read {p / INDEX}: {' '.join(str(e).split()) or type(e).__name__}") from None
        missing = [n for n in names if not (p / n).is_file()]
        if missing:
            raise FactorLMError(f"{p / INDEX} names {missing[0]}, which is missing from {p}")
        return [p / n for n in names]
    return [p / SINGLE] if (p / SINGLE).is_file() else []


def shown(weights: list[Path]) -> str:
    return str(weights[0]) if len(weights) == 1 else f"{weights[0].parent / INDEX} ({len(weights)} shards)"


def headers(weights: list[Path]) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` over every file (read from the headers only)."""
    from safetensors import safe_open

    found: dict[str, tuple[int, ...]] = {}
    for w in weights:
        try:
            with safe_open(str(w), "pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file is the user's folder
            msg = " ".join(str(e).split()) or type(e).__name__
            raise FactorLMError(f"cannot read {w}: {msg}") from None
    return found


def _first_and_count(items: list[str]) -> str:
    return items[0] + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")


def _shape(shape) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """Names of the same tensor (tied weights): by object identity, and the ties transformers declares
    (``all_tied_weights_keys``), which a model built on the meta device has not made yet."""
    parent = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    by_id: dict[int, str] = {}
    names = list(model.state_dict(keep_vars=True).items())
    for k, t in names:
        first = by_id.setdefault(id(t), k)
        parent[find(k)] = find(first)
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    for a, b in dict(declared).items():
        parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for k, _ in names:
        groups.setdefault(find(k), []).append(k)
    return {k: g for g in groups.values() for k in g}


def check_match(model: nn.Module, weights: list[Path], factorized: set[str] = frozenset(), *,
                spec_file: str = "factorlm.json") -> None:
    """Compare the tensor names and shapes in the files' headers with ``model.state_dict()``.

    Raises a one-line :class:`FactorLMError` naming the first mismatched tensor with its expected and
    found shapes, and the first missing / unexpected tensor, each with a count (``(+N more)``).
    Tied weights (one tensor under several names, saved once) count as present when any of their
    names is in the files.  ``factorized``: module names whose structures came from ``spec_file``
    (the message blames that file when every offending tensor is under one of them)."""
    found = headers(weights)
    expected = model.state_dict(keep_vars=True)
    group = _alias_groups(model)
    renamed = _legacy_names(model, found)
    mismatched, missing = [], []
    for k, t in expected.items():
        if k in renamed:  # stored under an earlier format's name: the module converts it as it loads
            continue
        if k in found:
            if found[k] != tuple(t.shape):
                mismatched.append(k)
        elif not any(a in found and found[a] == tuple(t.shape) for a in group.get(k, ())):
            missing.append(k)
    unexpected = [k for k in found if k not in expected and k not in renamed.values()]
    if not (mismatched or missing or unexpected):
        return
    parts = []
    if mismatched:
        k = mismatched[0]
        parts.append(f"{k} expected {_shape(expected[k].shape)}, found {_shape(found[k])}"
                     + (f" (+{len(mismatched) - 1} more)" if len(mismatched) > 1 else ""))
    if missing:
        parts.append(f"missing {_first_and_count(missing)}")
    if unexpected:
        parts.append(f"unexpected {_first_and_count(unexpected)}")
    in_specs = all(any(k.startswith(m + ".") for m in factorized) for k in mismatched + missing + unexpected)
    against = spec_file if in_specs else f"config.json and {spec_file}"
    raise FactorLMError(f"{shown(weights)} does not match {against}: " + "; ".join(parts))


def _legacy_names(model: nn.Module, found: dict) -> dict[str, str]:
    """``{current key: stored key}`` for the tensors the files hold under an earlier format's name, as the
    modules declare in ``LEGACY_STATE`` (``{current name: earlier name}``; the module's
    ``_load_from_state_dict`` converts them)."""
    out = {}
    for name, mod in model.named_modules():
        for new, old in getattr(type(mod), "LEGACY_STATE", {}).items():
            pre = f"{name}." if name else ""
            if pre + new not in found and pre + old in found:
                out[pre + new] = pre + old
    return out


@torch.no_grad()
def load_into(model: nn.Module, weights: list[Path], *, dtype: torch.dtype | None = None,
              device: str | torch.device | None = None) -> nn.Module:
    """Assign the files' tensors to ``model`` (built on the meta device or not), floating-point ones
    cast to ``dtype`` (None: as stored), on ``device`` (default CPU); ties tied weights again and
    refuses a model with any tensor left on the meta device."""
    from safetensors import safe_open

    dev = str(torch.device(device)) if device is not None else "cpu"
    state: dict[str, torch.Tensor] = {}
    for w in weights:
        try:
            with safe_open(str(w), "pt", device=dev) as f:
                for k in f.keys():
                    t = f.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    state[k] = t
        except Exception as e:  # noqa: BLE001
            raise FactorLMError(f"cannot load {w}: {' '.join(str(e).split()) or type(e).__name__}") from None
    for k, names in _alias_groups(model).items():  # a tied tensor is stored under one of its names
        if k not in state:
            have = next((n for n in names if n in state), None)
            if have is not None:
                state[k] = state[have]
    model.load_state_dict(state, strict=False, assign=True)
    del state
    tie = getattr(model, "tie_weights", None)
    if callable(tie):  # the declared ties, made now that the tensors are real
        tie()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise FactorLMError(f"{shown(weights)} does not hold {_first_and_count(left)}")
    if device is not None:
        model.to(device)  # the non-persistent buffers (built on the CPU)
    return model

