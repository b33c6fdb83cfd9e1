"""Low-rank linear layer: W ~ A B with A (out, k), B (k, in)."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check
from .base import FactorizedLinear, register_structure


@register_structure("lowrank")
class LowRankLinear(FactorizedLinear):
    """``y = (x B^T) A^T + b``: two thin matmuls, ``k (in + out)`` weights instead of ``in * out``."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device)
        check(1 <= rank <= min(in_features, out_features),
              f"rank must be in [1, {min(in_features, out_features)}] for a {out_features}x{in_features} matrix, got {rank}")
        self.rank = int(rank)
        self.A = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=5**0.5)
        nn.init.kaiming_uniform_(self.B, a=5**0.5)

    # -- budget interface (see factorlm.ranks.budget) -------------------------------------------
    budget_knob = "rank"

    @staticmethod
    def weight_params_for(out_features: int, in_features: int, rank: int) -> int:
        return rank * (in_features + out_features)

    @staticmethod
    def knob_max(out_features: int, in_features: int) -> int:
        return min(out_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def to_dense(self) -> torch.Tensor:
        return self.A @ self.B

    def weight_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    def weight_flops(self) -> int:
        return 2 * self.rank * (self.in_features + self.out_features)

    def extra_spec(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def from_spec(cls, spec, *, dtype=None, device=None):
        out_f, in_f = spec["shape"]
        return cls(in_f, out_f, spec["rank"], bias=spec.get("bias", True), dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> "LowRankLinear":
        m = cls(B.shape[1], A.shape[0], A.shape[1], bias=bias is not None, dtype=A.dtype, device=A.device)
        return m.load_factors(bias, A=A, B=B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        decompose: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        **decompose_kwargs,
    ) -> "LowRankLinear":
        """Factorize ``linear`` at ``rank``; ``decompose(W, rank, **kw) -> (A, B)`` defaults to truncated SVD."""
        from ..decompose.svd import truncated_svd

        decompose = decompose or truncated_svd
        W = linear.weight.detach()
        check(1 <= rank <= min(W.shape), f"rank must be in [1, {min(W.shape)}] for a {W.shape[0]}x{W.shape[1]} matrix, got {rank}")
        A, B = decompose(W, rank, **decompose_kwargs)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_factors(A.to(W.dtype), B.to(W.dtype), bias)
