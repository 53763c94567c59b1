"""Explanation methods, one family per file, all behind :mod:`camlens.methods.registry`."""

from camlens.methods.registry import MethodInfo, MethodOutput, get_method, methods, register

__all__ = ["MethodInfo", "MethodOutput", "get_method", "methods", "register"]
