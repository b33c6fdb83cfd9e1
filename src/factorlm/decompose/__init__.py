"""Pure tensor decompositions: no modules, no data, no I/O."""

from .fwsvd import fisher_importance, fisher_weighted_svd
from .svd import eckart_young_error, svd, truncated_svd

__all__ = ["eckart_young_error", "fisher_importance", "fisher_weighted_svd", "svd", "truncated_svd"]
