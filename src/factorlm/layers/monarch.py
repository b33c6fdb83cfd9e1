"""Monarch linear layer (Dao et al. 2022), generalised to rectangular weights and block rank ``r``.

``W ~ L P^T R`` with block-diagonal ``L``, ``R`` and the reshape-transpose permutation ``P`` (Dao
et al.'s ``P L P^T R`` less its final fixed relabelling of output rows, which only changes which
rows are grouped together; see :mod:`factorlm.decompose.monarch`).  With ``b = nblocks`` (``in`` and ``out`` must both be divisible by ``b``; ``n_in = in/b``,
``n_out = out/b``):

* ``R``: ``(b, b*r, n_in)``  - input group ``j`` -> ``b*r`` values (``r`` per output group);
* permutation: value ``(j, i, t)`` -> ``(i, j, t)`` (each output group gathers its ``r`` values
  from every input group);
* ``L``: ``(b, n_out, b*r)`` - the ``b*r`` gathered values -> output group ``i``.

Block ``(i, j)`` of ``W`` is ``L[i][:, j*r:(j+1)*r] @ R[j][i*r:(i+1)*r, :]`` (rank ``r``) and every
slice of ``L``/``R`` belongs to exactly one block, so Monarch(b, r) = {matrices whose ``b x b`` grid
blocks all have rank <= r}; the projection of a dense matrix is an independent truncated SVD per
block (:func:`factorlm.decompose.monarch.monarch_project`, exact optimum).

Parameters (and keep): ``b*n_in*b*r + b*n_out*b*r = r * b * (in + out)``, i.e. the parameter count
of a **low-rank layer of rank ``r*b``**, spread as ``b^2`` rank-``r`` blocks; the kept fraction of a
matrix is ``r*b*(in + out) / (in*out)``.  Under ``uniform_plan`` the budget therefore gives
``block_rank = floor(k / nblocks)`` where ``k`` is the low-rank rank for the same ``--keep``
(MiniLM-L6, nblocks=4: keep 0.5 -> 32, keep 0.25 -> 16; BERT-base: 0.5 -> 64, 0.25 -> 32).  A
matrix of rank ``<= r`` is exactly representable by Monarch with ``block_rank = r`` (any ``b``),
which costs ``b`` times the low-rank parameters: Monarch spends its budget on local (per-block)
structure instead of global rank.

This is the same function class as ``blockwise`` with an ``nblocks x nblocks`` grid and the same
uniform rank (see :mod:`factorlm.layers.blockwise`); only the storage layout and the kernel differ.

Forward: two batched matmuls (``torch.bmm``) and one permutation copy, never the dense ``W``.
FLOPs per row: ``2 * r * b * (in + out)`` (+ ``out`` for the bias).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..decompose.lift import lift_per_block
from ..decompose.monarch import check_monarch, monarch_project, monarch_to_dense, monarch_weighted
from ..errors import check
from .base import FactorizedLinear, register_structure


def _default_decompose(W: torch.Tensor, block_rank: int, nblocks: int, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    return monarch_project(W, nblocks, block_rank, **kw)


@register_structure("monarch")
class MonarchLinear(FactorizedLinear):
    """``y = L P^T R x + b`` with ``R``: ``(nblocks, nblocks*block_rank, in/nblocks)``, ``L``: ``(nblocks, out/nblocks, nblocks*block_rank)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block_rank: int,
        bias: bool = True,
        *,
        nblocks: int = 4,
        dtype=None,
        device=None,
    ):
        n_out, n_in = check_monarch(out_features, in_features, nblocks, block_rank)
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device)
        self.nblocks = int(nblocks)
        self.block_rank = int(block_rank)
        b, r = self.nblocks, self.block_rank
        self.R = nn.Parameter(torch.empty(b, b * r, n_in, dtype=dtype, device=device))
        self.L = nn.Parameter(torch.empty(b, n_out, b * r, dtype=dtype, device=device))
        # nn.Linear-style init per block (bound 1/sqrt(fan_in)); overwritten by from_linear / load_state_dict
        with torch.no_grad():
            self.R.uniform_(-(n_in ** -0.5), n_in ** -0.5)
            self.L.uniform_(-((b * r) ** -0.5), (b * r) ** -0.5)

    # -- budget interface (see factorlm.ranks.budget) -------------------------------------------
    budget_knob = "block_rank"

    @staticmethod
    def weight_params_for(out_features: int, in_features: int, block_rank: int, nblocks: int = 4) -> int:
        """``block_rank * nblocks * (in + out)`` - the count of a low-rank layer of rank ``block_rank * nblocks``."""
        check_monarch(out_features, in_features, nblocks)
        return int(block_rank) * nblocks * (in_features + out_features)

    @staticmethod
    def knob_max(out_features: int, in_features: int, nblocks: int = 4) -> int:
        """``min(out, in) // nblocks`` (= the smaller block side: full rank per block = exact)."""
        n_out, n_in = check_monarch(out_features, in_features, nblocks)
        return min(n_out, n_in)

    # -- FactorizedLinear -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, r = self.nblocks, self.block_rank
        lead = x.shape[:-1]
        xg = x.reshape(-1, b, self.in_features // b).transpose(0, 1)  # (b_j, N, n_in)
        h = torch.bmm(xg, self.R.transpose(1, 2))  # (b_j, N, b*r): [j, :, i*r + t]
        n = h.shape[1]
        h = h.view(b, n, b, r).permute(2, 1, 0, 3).reshape(b, n, b * r)  # (b_i, N, b*r): [i, :, j*r + t]
        y = torch.bmm(h, self.L.transpose(1, 2))  # (b_i, N, n_out)
        y = y.transpose(0, 1).reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def to_dense(self) -> torch.Tensor:
        return monarch_to_dense(self.L, self.R)

    def weight_params(self) -> int:
        return self.block_rank * self.nblocks * (self.in_features + self.out_features)

    def weight_flops(self) -> int:
        return 2 * self.block_rank * self.nblocks * (self.in_features + self.out_features)

    def extra_spec(self) -> dict[str, Any]:
        return {"nblocks": self.nblocks, "block_rank": self.block_rank}

    @classmethod
    def from_spec(cls, spec, *, dtype=None, device=None):
        out_f, in_f = spec["shape"]
        return cls(in_f, out_f, spec["block_rank"], bias=spec.get("bias", True), nblocks=spec.get("nblocks", 4),
                   dtype=dtype, device=device)

    @classmethod
    def from_factors(cls, L: torch.Tensor, R: torch.Tensor, bias: torch.Tensor | None) -> "MonarchLinear":
        """Wrap ``L (b, out/b, b*r)``, ``R (b, b*r, in/b)`` (e.g. from :func:`monarch_project`)."""
        check(L.dim() == 3 and R.dim() == 3 and L.shape[0] == R.shape[0] and L.shape[2] == R.shape[1]
              and L.shape[2] % L.shape[0] == 0, f"incompatible Monarch factors L {tuple(L.shape)}, R {tuple(R.shape)}")
        b, n_out, br = L.shape
        m = cls(b * R.shape[2], b * n_out, br // b, bias=bias is not None, nblocks=b, dtype=L.dtype, device=L.device)
        return m.load_factors(bias, L=L, R=R)

    @classmethod
    def lift_decompose(cls, decompose):
        """A matrix-level fit ``decompose(W, rank, **kw)`` applied to every grid block (see :func:`monarch_weighted`)."""
        return lift_per_block(monarch_weighted, decompose)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        block_rank: int,
        nblocks: int = 4,
        decompose: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
        **decompose_kwargs,
    ) -> "MonarchLinear":
        """Project ``linear`` onto Monarch; ``decompose(W, block_rank, nblocks=nblocks, **kw) -> (L, R)``
        defaults to the exact per-block truncated SVD (:func:`monarch_project`)."""
        W = linear.weight.detach()
        check_monarch(W.shape[0], W.shape[1], nblocks, block_rank)
        L, R = (decompose or _default_decompose)(W, block_rank, nblocks=nblocks, **decompose_kwargs)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_factors(L.to(W.dtype), R.to(W.dtype), bias)
