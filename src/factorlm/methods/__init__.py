"""Compression methods. Each module registers its methods in :data:`METHODS` when imported;
a new method is one new file here plus its import below."""

from . import lpaf, prune, rankdyna, svd, whiten  # noqa: F401  (registration)
from .base import METHODS, Method, MethodResult, get_method, register_method

__all__ = ["METHODS", "Method", "MethodResult", "get_method", "register_method"]
