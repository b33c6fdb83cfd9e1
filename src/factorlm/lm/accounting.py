"""Byte accounting of ``--task lm`` runs: the source's weight bytes, a model's stored tensor bytes, one
target's stored weight bytes, and the report's description of a quantized storage format."""

from __future__ import annotations

from pathlib import Path

from torch import nn

__all__ = ["describe_quant", "source_bytes", "target_bytes", "tensor_bytes"]


def source_bytes(resolved: str, model: nn.Module) -> tuple[int, str]:
    """Bytes of the source's weight files (``*.safetensors`` / ``*.bin`` of a local folder), else the
    loaded parameters' bytes; and which of the two it is."""
    from .save import weight_bytes

    p = Path(resolved)
    if p.is_dir():
        n = weight_bytes(p) or sum(f.stat().st_size for f in p.glob("*.bin"))
        if n:
            return n, "source weight files"
    seen, n = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n, "loaded parameters"


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the state dict's distinct tensors (what safetensors stores, without its header)."""
    seen, n = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def target_bytes(module: nn.Module) -> int:
    """Stored bytes of one target's weight (its bias excluded): a quantized layer's packed codes, scales and
    factors, else its weight tensors."""
    if hasattr(module, "weight_bytes"):
        return module.weight_bytes()
    return sum(t.numel() * t.element_size() for k, t in module.state_dict().items() if not k.endswith("bias"))


def describe_quant(quant, dtype_name: str) -> dict:
    """The report's ``accounting.quantized``: the grid (one :class:`~factorlm.lm.quant_methods.QuantSpec`), or for
    ``--byte-plan global`` (``{target: QuantSpec}``) how many targets each grid stores."""
    specs = list(quant.values()) if isinstance(quant, dict) else [quant]
    zp = any(q.zero_point for q in specs)
    out = {**specs[0].describe(), "factor_bits": specs[0].factor_bits or dtype_name,
           "format": "quant_lowrank: bit-packed codes, bf16 scales" + (", zero points packed to the codes' bits" if zp else "") + ", factors"}
    if isinstance(quant, dict):
        grids: dict[str, int] = {}
        for q in specs:
            k = f"int{q.bits}-g{q.group_size}" + ("-zp" if q.zero_point else "")
            grids[k] = grids.get(k, 0) + 1
        out.update(byte_plan="global", grids=dict(sorted(grids.items())))
        for k in ("bits", "group_size", "zero_point"):  # one value when every target has the same
            if len({getattr(q, k) for q in specs}) > 1:
                out[k] = "per target"
    return out
