"""Quantized weight plus a low-rank correction: ``W ~ Q(W) + A B``.

``Q(W)``: group-wise symmetric round-to-nearest codes (:func:`factorlm.decompose.quantize.rtn`), stored
bit-packed (``qweight``: ``ceil(out * in * bits / 8)`` uint8) with one bf16 scale per group of
``group_size`` input channels (``scales``: (out, in / group_size)); ``A`` (out, k), ``B`` (k, in) the
correction (:func:`factorlm.decompose.quantize.error_correction`; ``k = 0``: quantization alone).  Only
``A``, ``B`` and the bias are parameters (they can heal); the codes and scales are buffers.

No integer kernels: ``forward`` unpacks and dequantizes ``W`` on every call (correct, not fast; export
``--format dense`` for a runtime, or serve with a quantization library).  ``weight_params`` counts the
codes as weights (out * in) plus the factors; :meth:`weight_bytes` is what the layer stores.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check
from .base import FactorizedLinear, register_structure


@register_structure("quant_lowrank")
class QuantLowRankLinear(FactorizedLinear):
    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, rank: int = 0,
                 bias: bool = True, *, dtype=None, device=None):
        super().__init__(in_features, out_features, bias, dtype=dtype, device=device)
        check(2 <= int(bits) <= 8, f"bits must be in [2, 8], got {bits}")
        check(int(group_size) > 0 and in_features % int(group_size) == 0,
              f"the group size {group_size} must divide the input width {in_features}")
        check(0 <= int(rank) <= min(in_features, out_features), f"rank {rank} out of range for {out_features}x{in_features}")
        self.bits, self.group_size, self.rank = int(bits), int(group_size), int(rank)
        n = out_features * in_features
        self.register_buffer("qweight", torch.zeros((n * self.bits + 7) // 8, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, in_features // self.group_size, dtype=torch.bfloat16,
                                                  device=device))
        self._dtype = dtype or torch.get_default_dtype()
        if self.rank:
            self.A = nn.Parameter(torch.zeros(out_features, self.rank, dtype=dtype, device=device))
            self.B = nn.Parameter(torch.zeros(self.rank, in_features, dtype=dtype, device=device))
        else:
            self.register_parameter("A", None)
            self.register_parameter("B", None)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.A.dtype if self.A is not None else (self.bias.dtype if self.bias is not None else self._dtype)

    def _apply(self, fn, recurse=True):  # .to(dtype) casts the factors, never the codes or the bf16 scales
        codes, scales = self.qweight, self.scales
        out = super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=self._dtype, device=codes.device))
        self._dtype = probe.dtype
        self.qweight = codes.to(probe.device)
        self.scales = scales.to(probe.device)
        return out

    def quantized(self) -> torch.Tensor:
        """``Q(W)`` (out, in) in the layer's dtype."""
        from ..decompose.quantize import unpack_bits

        n = self.out_features * self.in_features
        codes = unpack_bits(self.qweight, self.bits, n).reshape(self.out_features, -1, self.group_size)
        W = codes.float() * self.scales.float()[:, :, None]
        return W.reshape(self.out_features, self.in_features).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.quantized().to(x.dtype), self.bias)
        if self.rank:
            y = y + F.linear(F.linear(x, self.B), self.A)
        return y

    def to_dense(self) -> torch.Tensor:
        W = self.quantized()
        return W + self.A @ self.B if self.rank else W

    def weight_params(self) -> int:
        return self.out_features * self.in_features + self.rank * (self.in_features + self.out_features)

    def weight_flops(self) -> int:
        return 2 * self.out_features * self.in_features + 2 * self.rank * (self.in_features + self.out_features)

    def weight_bytes(self) -> int:
        """Stored bytes of the weight: packed codes, scales, factors (the bias excluded)."""
        n = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()
        if self.rank:
            n += (self.A.numel() + self.B.numel()) * self.A.element_size()
        return n

    def extra_spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "rank": self.rank}

    @classmethod
    def from_spec(cls, spec, *, dtype=None, device=None):
        out_f, in_f = spec["shape"]
        return cls(in_f, out_f, spec["bits"], spec["group_size"], spec.get("rank", 0), bias=spec.get("bias", True),
                   dtype=dtype, device=device)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, W: torch.Tensor, bits: int, group_size: int, rank: int = 0, scale=None,
                    bias: torch.Tensor | None = None) -> "QuantLowRankLinear":
        """Quantize ``W`` (out, in) and fit the rank-``rank`` correction of its error under ``scale``
        (a :mod:`factorlm.decompose.whiten` input scaling; None = plain Frobenius)."""
        from ..decompose.quantize import error_correction, pack_bits, rtn

        out_f, in_f = W.shape
        m = cls(in_f, out_f, bits, group_size, rank, bias=bias is not None, dtype=W.dtype, device=W.device)
        codes, scales, _ = rtn(W, bits, group_size)
        m.qweight.copy_(pack_bits(codes, bits).to(W.device))
        m.scales.copy_(scales)
        if rank:
            # the error of what the layer will compute: the stored codes times the stored bf16 scales
            A, B = error_correction(W, m.quantized().to(W.dtype), rank, scale)
            m.A.copy_(A)
            m.B.copy_(B)
        if bias is not None:
            m.bias.copy_(bias)
        return m
