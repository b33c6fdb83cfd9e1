"""nn.Modules for factorized weights. Importing this package registers every structure."""

from .base import STRUCTURES, FactorizedLinear, linear_flops, linear_params, register_structure, structure_from_spec
from .blockwise import BlockLowRankLinear
from .lowrank import LowRankLinear
from .mixed_rank import MixedRankLinear
from .monarch import MonarchLinear
from .quantized import QuantLowRankLinear
from .svd_masked import SVDLinear

__all__ = [
    "STRUCTURES",
    "BlockLowRankLinear",
    "FactorizedLinear",
    "LowRankLinear",
    "MixedRankLinear",
    "MonarchLinear",
    "QuantLowRankLinear",
    "SVDLinear",
    "linear_flops",
    "linear_params",
    "register_structure",
    "structure_from_spec",
]
