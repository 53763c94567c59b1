"""Explanation methods, one family per file, all behind :mod:`camlens.attribution.registry`."""

from camlens.attribution.registry import MethodInfo, MethodOutput, get_method, methods, register

__all__ = ["MethodInfo", "MethodOutput", "get_method", "methods", "register"]
