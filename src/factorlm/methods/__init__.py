"""Compression methods. Each file registers its methods in :data:`METHODS` when imported."""

import importlib as _importlib

from .base import METHODS, Method, MethodResult, get_method, register_method

for _name in ("svd", "lpaf", "prune", "rankdyna"):
    try:
        _importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _e:  # a method file not written yet
        if _e.name != f"{__name__}.{_name}":
            raise

__all__ = ["METHODS", "Method", "MethodResult", "get_method", "register_method"]
