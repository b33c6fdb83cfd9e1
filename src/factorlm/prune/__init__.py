"""Unstructured pruning: schedules, importance criteria, exact top-k masks and the Pruner callback.

LPAF step 1 (Ren & Zhu, LREC-COLING 2024): first-order (movement) pruning of all encoder linear
weights to density ``v`` yields sparse matrices with low-rank structure, ready for factorization.
"""

from .importance import (
    IMPORTANCES,
    Importance,
    MagnitudeImportance,
    MovementImportance,
    SensitivityImportance,
    get_importance,
    register_importance,
)
from .masks import DEFAULT_DENSITY_FACTOR, compute_masks, default_density, kept_count, mask_density, topk_mask
from .pruner import Pruner, load_pruning_state, prune_once, resolve_targets, save_pruning_state
from .schedule import cubic_density, cubic_sparsity

__all__ = [
    "DEFAULT_DENSITY_FACTOR",
    "IMPORTANCES",
    "Importance",
    "MagnitudeImportance",
    "MovementImportance",
    "Pruner",
    "SensitivityImportance",
    "compute_masks",
    "cubic_density",
    "cubic_sparsity",
    "default_density",
    "get_importance",
    "kept_count",
    "load_pruning_state",
    "mask_density",
    "prune_once",
    "register_importance",
    "resolve_targets",
    "save_pruning_state",
    "topk_mask",
]
