"""The one small interface every factorized structure implements.

A :class:`FactorizedLinear` is a drop-in replacement for ``nn.Linear`` (same ``in_features``,
``out_features``, optional ``bias``; ``y = x W^T + b``) whose weight is stored in a structured,
cheaper form.  Siblings (low-rank, Monarch, block-wise low-rank, mixed-rank wrappers, rank-masked
SVD) differ only in how they store ``W`` and compute ``x W^T``.

Contract (tested for every registered structure):

* ``forward(x)`` equals ``x @ to_dense().T + bias`` without materialising ``W`` in the hot path;
* ``num_params()`` is the exact number of stored parameters (bias included);
* ``flops()`` is the exact FLOP count for one input row: 2 per multiply-add, 1 per bias add;
* ``spec()`` is a JSON-able dict with at least ``structure`` and ``shape`` = ``[out, in]``;
  ``structure_from_spec(spec)`` rebuilds an (uninitialised) module whose ``state_dict`` keys and
  shapes match, which is how :mod:`factorlm.models.io` loads a saved model without pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import FactorLMError
from ..registry import Registry

#: structure name -> FactorizedLinear subclass
STRUCTURES: Registry[type["FactorizedLinear"]] = Registry("structure")


def register_structure(name: str):
    """Class decorator: register a :class:`FactorizedLinear` subclass under ``name``."""

    return STRUCTURES.register(name, name_attr="structure")


class FactorizedLinear(nn.Module):
    structure: ClassVar[str] = "abstract"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=None, device=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # -- to implement -------------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The (out_features, in_features) weight this module represents."""
        raise NotImplementedError

    def weight_params(self) -> int:
        """Stored parameters excluding the bias."""
        raise NotImplementedError

    def weight_flops(self) -> int:
        """FLOPs of ``x W^T`` for one input row (2 per multiply-add)."""
        raise NotImplementedError

    def extra_spec(self) -> dict[str, Any]:
        """Structure parameters needed to rebuild the module (e.g. ``{"rank": 64}``)."""
        return {}

    @classmethod
    def lift_decompose(cls, decompose):
        """Turn a matrix-level fit ``decompose(W, rank, **kw) -> (A, B)`` (e.g. FWSVD or the sparsity-aware
        SVD, with its weights bound as keywords) into this structure's ``from_linear(decompose=...)``.

        Low rank takes it as it is; block structures fit each block with its share of the weights.
        """
        return decompose

    # -- shared -------------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return next(p for p in self.parameters()).dtype

    def num_params(self) -> int:
        return self.weight_params() + (self.out_features if self.bias is not None else 0)

    def flops(self) -> int:
        return self.weight_flops() + (self.out_features if self.bias is not None else 0)

    def spec(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "shape": [self.out_features, self.in_features],
            "bias": self.bias is not None,
            **self.extra_spec(),
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any], *, dtype=None, device=None) -> "FactorizedLinear":
        """An uninitialised module with the shapes described by ``spec``."""
        raise NotImplementedError

    @torch.no_grad()
    def load_factors(self, bias: torch.Tensor | None = None, **factors: torch.Tensor) -> "FactorizedLinear":
        """Copy ``factors`` (parameter name -> tensor of the same shape) and the bias in; returns self."""
        for name, value in factors.items():
            getattr(self, name).copy_(value)
        if bias is not None:
            self.bias.copy_(bias)
        return self

    def to_linear(self) -> nn.Linear:
        W = self.to_dense()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=W.dtype, device=W.device)
        with torch.no_grad():
            lin.weight.copy_(W)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.extra_spec().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}" + (
            f", {extra}" if extra else ""
        )


def structure_from_spec(spec: dict[str, Any], *, dtype=None, device=None) -> FactorizedLinear:
    """An uninitialised module of ``spec["structure"]`` with the shapes ``spec`` describes.

    A malformed spec (not an object, no ``structure``, an unknown structure, a missing or ill-typed
    entry, a rank out of range) raises a one-line :class:`FactorLMError` about the spec alone; callers
    that know which module it belongs to (:func:`factorlm.models.io.load`) prefix its name.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("structure"), str):
        raise FactorLMError(f"a structure spec must be an object with a 'structure' entry, got {spec!r}")
    name = spec["structure"]
    cls = STRUCTURES.get(name)
    try:
        return cls.from_spec(spec, dtype=dtype, device=device)
    except KeyError as e:
        raise FactorLMError(f"the {name} spec has no {e.args[0]!r} entry") from None
    except (TypeError, ValueError) as e:
        raise FactorLMError(f"invalid {name} spec {json.dumps(spec, default=str)}: {e}") from None


def linear_params(module: nn.Module) -> int:
    """Parameters of an nn.Linear or FactorizedLinear (bias included)."""
    if isinstance(module, FactorizedLinear):
        return module.num_params()
    return module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)


def linear_flops(module: nn.Module) -> int:
    if isinstance(module, FactorizedLinear):
        return module.flops()
    return 2 * module.in_features * module.out_features + (module.out_features if module.bias is not None else 0)
