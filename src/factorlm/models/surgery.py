"""Model surgery: find the target linear layers, swap modules in and out.

Targets default to every ``nn.Linear`` of the encoder: attention q/k/v/o and FFN in/out in BERT,
RoBERTa, DistilBERT, MPNet, ELECTRA... found generically by type, with the task head, pooler and any
embedding projection excluded.  Embeddings are ``nn.Embedding`` and are never touched.  Patterns
are regular expressions searched in the dotted module name (``re.search``).
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from ..errors import check
from ..layers.base import FactorizedLinear

#: Module-name patterns excluded by default: task heads, poolers, embedding projections.
DEFAULT_EXCLUDE: tuple[str, ...] = (
    r"(^|\.)classifier(\.|$)",
    r"(^|\.)pre_classifier$",
    r"(^|\.)pooler(\.|$)",
    r"(^|\.)qa_outputs$",
    r"(^|\.)lm_head(\.|$)",
    r"(^|\.)(cls|predictions)(\.|$)",
    r"embed",
    r"(^|\.)score$",
)


def find_targets(
    model: nn.Module,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    *,
    include_factorized: bool = False,
    conv1d: bool = False,
) -> list[str]:
    """Dotted names of the ``nn.Linear`` modules to factorize, in model order.

    ``include``: if given, a name must match at least one of these patterns.
    ``exclude``: patterns that remove a name (added to :data:`DEFAULT_EXCLUDE`).
    ``conv1d``: also transformers' ``Conv1D`` (GPT-2's linear layers, weight stored as (in, out)).
    """
    inc = [re.compile(p) for p in (include or [])]
    exc = [re.compile(p) for p in (*DEFAULT_EXCLUDE, *(exclude or []))]
    kinds = (nn.Linear, FactorizedLinear) if include_factorized else (nn.Linear,)
    if conv1d:
        kinds = (*kinds, _conv1d_class())
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        names.append(name)
    return names


def _conv1d_class() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_weight(module: nn.Module):
    """The ``(out, in)`` weight of an ``nn.Linear`` or a transformers ``Conv1D`` (stored ``(in, out)``)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear``, ``Conv1D`` or factorized layer."""
    if is_conv1d(module):
        return int(module.nf), int(module.weight.shape[0])
    return int(module.out_features), int(module.in_features)


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted ``name`` by ``new``; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def factorized_modules(model: nn.Module) -> dict[str, FactorizedLinear]:
    """Top-level factorized modules (a wrapper's inner module is not listed separately)."""
    out: dict[str, FactorizedLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, FactorizedLinear) and not any(name.startswith(p + ".") for p in out):
            out[name] = module
    return out


def target_shapes(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    shapes = {}
    for n in names:
        m = get_module(model, n)
        check(hasattr(m, "in_features") or is_conv1d(m), f"module {n} is not a linear layer")
        shapes[n] = linear_shape(m)
    return shapes


def count_params(model: nn.Module) -> int:
    """Trainable-or-not parameters (buffers such as training-only dense twins excluded)."""
    return sum(p.numel() for p in model.parameters())


def densify(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The same model with every factorized module multiplied back into a plain ``nn.Linear``
    (``W = to_dense()``, same bias): the dense architecture of the source, with logits equal to the
    factorized model's up to float rounding.  It gives up the size benefit; it is what a stack that
    cannot run factored layers deploys, and the dense reference a saved folder is timed against."""
    import copy

    out = model if inplace else copy.deepcopy(model)
    factored = factorized_modules(out)
    conv1d = _conv1d_slots(out, factored)
    for name, m in factored.items():
        lin = m.to_linear()
        set_module(out, name, _as_conv1d(lin) if name in conv1d else lin)
    return out


def _conv1d_slots(model: nn.Module, names) -> set[str]:
    """The names among ``names`` where the model's own architecture has a transformers ``Conv1D``
    (GPT-2 style, weight stored (in, out)): found on a meta-device skeleton of the same class."""
    config = getattr(model, "config", None)
    if config is None or not names:
        return set()
    try:
        from accelerate import init_empty_weights

        with init_empty_weights():
            ref = type(model)(config)
    except Exception:  # noqa: BLE001 - not a transformers class: no Conv1D slots to restore
        return set()
    out = set()
    for n in names:
        try:
            if type(ref.get_submodule(n)).__name__ == "Conv1D":
                out.add(n)
        except AttributeError:
            pass
    return out


def _as_conv1d(lin: nn.Linear) -> nn.Module:
    """A transformers ``Conv1D`` computing ``lin`` (its weight is ``lin.weight`` transposed)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(lin.out_features, lin.in_features)
    with torch.no_grad():
        conv.weight = nn.Parameter(lin.weight.detach().T.contiguous())
        conv.bias = nn.Parameter(lin.bias.detach().clone() if lin.bias is not None
                                 else torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device))
    return conv
