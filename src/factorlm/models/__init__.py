"""Model surgery, loading (embedded default / local / hub) and factorlm save/load."""

from .io import check_finite, library_versions, load, save
from .loading import default_model_path, read_meta, resolve_model
from .surgery import count_params, densify, factorized_modules, find_targets, get_module, set_module, target_shapes

__all__ = [
    "check_finite",
    "count_params",
    "default_model_path",
    "densify",
    "factorized_modules",
    "find_targets",
    "get_module",
    "library_versions",
    "load",
    "read_meta",
    "resolve_model",
    "save",
    "set_module",
    "target_shapes",
]
