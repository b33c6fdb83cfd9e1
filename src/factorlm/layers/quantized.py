"""Quantized weight plus a low-rank correction: ``W ~ Q(W) + A B``.

``Q(W)``: group-wise symmetric round-to-nearest codes (:func:`factorlm.decompose.quantize.rtn`), stored
bit-packed (``qweight``: ``ceil(out * in * bits / 8)`` uint8) with one bf16 scale per group of
``group_size`` input channels (``scales``: (out, in / group_size)); ``A`` (out, k), ``B`` (k, in) the
correction (:func:`factorlm.decompose.quantize.error_correction`; ``k = 0``: quantization alone).  Only
``A``, ``B`` and the bias are parameters (they can heal); the codes and scales are buffers.
``factor_bits=8``: the factors are stored as int8 RTN codes too (``B`` in groups of 32 input channels,
``A`` in groups of 32 output channels; bf16 scales), half the bytes of bf16 factors, so twice the rank
fits a budget; they are then buffers (frozen: healing does not reach them).  ``zero_point=True``: one
integer zero point per group too, in the codes' range and bit-packed like them (``qzeros``:
``ceil(out * groups * bits / 8)`` uint8; :attr:`zeros` unpacks them), ``W ~ (codes - zero) * scale``.
Folders saved before the zero points were packed (an int8 ``zeros`` buffer) load unchanged.  The codes come from RTN or, given the
layer's input Gram, from GPTQ (:mod:`factorlm.decompose.gptq`, same grid and format).

No integer kernels: the first ``forward`` unpacks and dequantizes ``Q(W)`` and keeps it (a dense copy in
the layer's dtype, not saved; dropped by :meth:`clear_cache`, by ``.to()`` and by ``load_state_dict``), so
generation costs a dense model's time and memory (export ``--format dense`` for a runtime, or serve with a
quantization library).  ``weight_params`` counts the
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
    FACTOR_GROUP = 32

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, rank: int = 0,
                 bias: bool = True, *, factor_bits: int | None = None, zero_point: bool = False, dtype=None,
                 device=None):
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
        self.zero_point = bool(zero_point)
        if self.zero_point:
            groups = out_features * (in_features // self.group_size)
            self.register_buffer("qzeros", torch.zeros((groups * self.bits + 7) // 8, dtype=torch.uint8, device=device))
        self._dtype = dtype or torch.get_default_dtype()
        check(factor_bits in (None, 8), f"factor_bits must be None (the model's dtype) or 8, got {factor_bits}")
        self.factor_bits = factor_bits
        if self.rank and factor_bits:
            g = self.FACTOR_GROUP
            check(in_features % g == 0 and out_features % g == 0,
                  f"int8 factors need widths divisible by {g}, got {out_features}x{in_features}")
            self.register_parameter("A", None)
            self.register_parameter("B", None)
            self.register_buffer("A_codes", torch.zeros(self.rank, out_features, dtype=torch.int8, device=device))
            self.register_buffer("A_scales", torch.ones(self.rank, out_features // g, dtype=torch.bfloat16, device=device))
            self.register_buffer("B_codes", torch.zeros(self.rank, in_features, dtype=torch.int8, device=device))
            self.register_buffer("B_scales", torch.ones(self.rank, in_features // g, dtype=torch.bfloat16, device=device))
        elif self.rank:
            self.A = nn.Parameter(torch.zeros(out_features, self.rank, dtype=dtype, device=device))
            self.B = nn.Parameter(torch.zeros(self.rank, in_features, dtype=dtype, device=device))
        else:
            self.register_parameter("A", None)
            self.register_parameter("B", None)

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._dtype

    _STORED = ("qweight", "scales", "qzeros", "A_codes", "A_scales", "B_codes", "B_scales")
    #: tensors an earlier format stored under another name (converted by :meth:`_load_from_state_dict`)
    LEGACY_STATE = {"qzeros": "zeros"}

    def _apply(self, fn, recurse=True):  # .to(dtype) casts the factors, never the codes or the bf16 scales
        kept = {k: self._buffers[k] for k in self._STORED if self._buffers.get(k) is not None}
        self.clear_cache()
        out = super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=self._dtype, device=self.qweight.device))
        self._dtype = probe.dtype
        for k, t in kept.items():
            self._buffers[k] = t.to(probe.device)
        return out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` in the layer's dtype (dequantized when stored as int8, unless thawed)."""
        if not self.factor_bits or self.A is not None:
            return self.A, self.B
        g = self.FACTOR_GROUP

        def deq(codes, scales):
            return (codes.float().reshape(codes.shape[0], -1, g) * scales.float()[:, :, None]).reshape(codes.shape)

        return deq(self.A_codes, self.A_scales).T.to(self._dtype), deq(self.B_codes, self.B_scales).to(self._dtype)

    def thaw_factors(self) -> None:
        """int8 factors: make them trainable float parameters ``A``, ``B`` (their dequantized values) until
        :meth:`freeze_factors`; a no-op for float factors or rank 0."""
        if self.rank and self.factor_bits and self.A is None:
            A, B = self.factors()
            self.A, self.B = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())

    @torch.no_grad()
    def freeze_factors(self) -> None:
        """Store thawed factors back as int8 codes (RTN in groups of 32, as :meth:`from_weight` does) and
        drop the float parameters."""
        if not (self.rank and self.factor_bits and self.A is not None):
            return
        from ..decompose.quantize import rtn

        for name, F_ in (("A", self.A.detach().T.contiguous()), ("B", self.B.detach())):
            codes, scales, _ = rtn(F_, 8, self.FACTOR_GROUP)
            getattr(self, f"{name}_codes").copy_(codes)
            getattr(self, f"{name}_scales").copy_(scales)
        self.register_parameter("A", None)
        self.register_parameter("B", None)

    def clear_cache(self) -> None:
        self.__dict__["_cached"] = None

    @property
    def zeros(self) -> torch.Tensor | None:
        """The zero points, int8 (out, in / group_size), unpacked from ``qzeros`` (None without zero points)."""
        if not self.zero_point:
            return None
        from ..decompose.quantize import unpack_bits

        groups = self.in_features // self.group_size
        return unpack_bits(self.qzeros, self.bits, self.out_features * groups).reshape(self.out_features, groups)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.clear_cache()
        old = state_dict.get(prefix + "zeros")
        if self.zero_point and old is not None and prefix + "qzeros" not in state_dict:  # saved before packing
            from ..decompose.quantize import pack_bits

            state_dict = dict(state_dict)  # (the caller's dict is not ours to change)
            state_dict[prefix + "qzeros"] = pack_bits(state_dict.pop(prefix + "zeros"), self.bits)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantized(self) -> torch.Tensor:
        """``Q(W)`` (out, in) in the layer's dtype (cached after the first call)."""
        cached = self.__dict__.get("_cached")
        stale = cached is not None and cached.is_inference() and not torch.is_inference_mode_enabled()
        if cached is not None and not stale and cached.dtype == self._dtype and cached.device == self.qweight.device:
            return cached  # (a copy made under inference_mode cannot serve autograd: rebuilt outside it)
        W = self._dequantize()
        self.__dict__["_cached"] = W
        return W

    def _dequantize(self) -> torch.Tensor:
        from ..decompose.quantize import unpack_bits

        n = self.out_features * self.in_features
        codes = unpack_bits(self.qweight, self.bits, n).reshape(self.out_features, -1, self.group_size)
        if self.zero_point:
            codes = codes.float() - self.zeros.float()[:, :, None]
        W = codes.float() * self.scales.float()[:, :, None]
        return W.reshape(self.out_features, self.in_features).to(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.quantized().to(x.dtype), self.bias)
        if self.rank:
            A, B = self.factors()
            y = y + F.linear(F.linear(x, B.to(x.dtype)), A.to(x.dtype))
        return y

    def to_dense(self) -> torch.Tensor:
        W = self.quantized()
        if not self.rank:
            return W
        A, B = self.factors()
        return W + A @ B

    def weight_params(self) -> int:
        return self.out_features * self.in_features + self.rank * (self.in_features + self.out_features)

    def buffered_weights(self) -> int:
        """Weights stored as buffers, not parameters (the codes, and int8 factors): what a parameter count
        misses of :meth:`weight_params`."""
        return self.weight_params() - sum(p.numel() for k, p in self.named_parameters() if k != "bias")

    def weight_flops(self) -> int:
        return 2 * self.out_features * self.in_features + 2 * self.rank * (self.in_features + self.out_features)

    def weight_bytes(self) -> int:
        """Stored bytes of the weight: packed codes, scales, factors (the bias excluded)."""
        parts = [self.qweight, self.scales] + ([self.qzeros] if self.zero_point else [])
        if self.rank:
            parts += [self.A_codes, self.A_scales, self.B_codes, self.B_scales] if self.factor_bits else [self.A, self.B]
        return sum(t.numel() * t.element_size() for t in parts)

    def extra_spec(self) -> dict[str, Any]:
        spec = {"bits": self.bits, "group_size": self.group_size, "rank": self.rank}
        if self.factor_bits:
            spec["factor_bits"] = self.factor_bits
        if self.zero_point:
            spec["zero_point"] = True
        return spec

    @classmethod
    def from_spec(cls, spec, *, dtype=None, device=None):
        out_f, in_f = spec["shape"]
        return cls(in_f, out_f, spec["bits"], spec["group_size"], spec.get("rank", 0), bias=spec.get("bias", True),
                   factor_bits=spec.get("factor_bits"), zero_point=spec.get("zero_point", False), dtype=dtype,
                   device=device)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, W: torch.Tensor, bits: int, group_size: int, rank: int = 0, scale=None,
                    bias: torch.Tensor | None = None, factor_bits: int | None = None, zero_point: bool = False,
                    gram: torch.Tensor | None = None, percdamp: float = 0.01,
                    act_order: bool = False, gram_out: torch.Tensor | None = None,
                    damp_out: float = 0.01) -> "QuantLowRankLinear":
        """Quantize ``W`` (out, in) and fit the rank-``rank`` correction of its error under ``scale``
        (a :mod:`factorlm.decompose.whiten` input scaling; None = plain Frobenius); ``factor_bits=8``:
        the fitted factors are then stored as int8 codes (RTN of the fit, not refitted).  ``gram``: the
        layer's input Gram, then the codes are GPTQ's (damping ``percdamp``; ``act_order``: columns by descending
        Gram diagonal, static groups) instead of RTN's.  ``gram_out``: the correction is two-sided
        (:func:`factorlm.decompose.quantize.error_correction`)."""
        from ..decompose.gptq import gptq
        from ..decompose.quantize import error_correction, pack_bits, quantize_groups, rtn

        out_f, in_f = W.shape
        m = cls(in_f, out_f, bits, group_size, rank, bias=bias is not None, factor_bits=factor_bits if rank else None,
                zero_point=zero_point, dtype=W.dtype, device=W.device)
        if gram is not None:
            codes, scales, zeros, _ = gptq(W, gram, bits, group_size, zero_point=zero_point, percdamp=percdamp,
                                         act_order=act_order)
        else:
            codes, scales, zeros, _ = quantize_groups(W, bits, group_size, zero_point)
        m.qweight.copy_(pack_bits(codes, bits).to(W.device))
        m.scales.copy_(scales)
        if zero_point:
            m.qzeros.copy_(pack_bits(zeros, bits).to(W.device))
        m.clear_cache()
        if rank:
            # the error of what the layer will compute: the stored codes times the stored bf16 scales
            A, B = error_correction(W, m.quantized().to(W.dtype), rank, scale, gram_out, damp_out)
            if m.factor_bits:
                g = cls.FACTOR_GROUP
                for name, F_ in (("A", A.T.contiguous()), ("B", B)):
                    codes, scales, _ = rtn(F_, 8, g)
                    getattr(m, f"{name}_codes").copy_(codes)
                    getattr(m, f"{name}_scales").copy_(scales)
            else:
                m.A.copy_(A)
                m.B.copy_(B)
        if bias is not None:
            m.bias.copy_(bias)
        return m
