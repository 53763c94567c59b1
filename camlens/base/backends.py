"""Named backends: how a lower layer calls code of a higher layer without importing it.

``Explanation.show()`` must reach the figure code (layer 4, matplotlib) although
:mod:`camlens.api.explanation` (layer 3) may not import it. The package root (the top layer, which
may import anything) declares which module provides each role; the lower layer asks for the role
by name when it is first needed::

    declare("figures", "camlens.viz")          # camlens/__init__.py
    backend("figures").explanation_figure(exp)  # camlens/api/explanation.py

A user may declare their own module for a role (for example a figures module with another style).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from camlens.base.errors import CamlensError

_PROVIDERS: dict[str, str] = {}


def declare(role: str, module: str) -> None:
    """Say that ``module`` (a dotted import path) provides ``role``."""
    _PROVIDERS[role] = module


def backend(role: str) -> ModuleType:
    """The module that provides ``role`` (imported on first use)."""
    try:
        module = _PROVIDERS[role]
    except KeyError:
        raise CamlensError(
            f"no module provides {role!r}; import camlens (it declares the defaults) or call "
            f"camlens.base.backends.declare({role!r}, 'your.module')"
        ) from None
    return importlib.import_module(module)


__all__ = ["backend", "declare"]
