"""nn.Modules for factorized weights. Importing this package registers every structure."""

from .base import STRUCTURES, FactorizedLinear, linear_flops, linear_params, register_structure, structure_from_spec
from .lowrank import LowRankLinear

__all__ = [
    "STRUCTURES",
    "FactorizedLinear",
    "LowRankLinear",
    "linear_flops",
    "linear_params",
    "register_structure",
    "structure_from_spec",
]

# Optional siblings register themselves when their module exists.
import importlib as _importlib

for _name in ("monarch", "blockwise", "mixed_rank", "svd_masked"):
    try:
        _importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # pragma: no cover - only while a sibling is not written yet
        if _e.name != f"{__name__}.{_name}":
            raise
