"""Pure tensor decompositions: no modules, no data, no I/O."""

from .fwsvd import fisher_importance, fisher_weighted_svd
from .svd import compute_dtype_for, eckart_young_error, svd, truncated_svd
from .whiten import GramScale, InputStats, asvd_scale, output_error, scaled_spectrum, scaled_svd, whitening_scale
from .weighted_svd import (
    make_omega,
    normalized_scores,
    row_weighted_svd,
    sparsity_aware_svd,
    weighted_low_rank,
    weighted_svd_als,
    weighted_svd_em,
)

__all__ = [
    "compute_dtype_for", "eckart_young_error", "fisher_importance", "fisher_weighted_svd", "make_omega",
    "normalized_scores", "row_weighted_svd", "sparsity_aware_svd", "svd", "truncated_svd", "weighted_low_rank",
    "weighted_svd_als", "weighted_svd_em",
    "GramScale", "InputStats", "asvd_scale", "output_error", "scaled_spectrum", "scaled_svd", "whitening_scale",
]
