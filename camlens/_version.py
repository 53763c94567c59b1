"""The one place the version is written (``pyproject.toml`` reads it from here), and the one
``versions()`` that every record (model cards, store run records, saved figures' JSON) writes."""

from __future__ import annotations

import importlib
import platform

__version__ = "0.3.0.dev0"

# The numeric stack every record names; optional packages are added when they are installed.
_CORE = ("torch", "torchvision", "numpy")
_OPTIONAL = ("safetensors", "pyarrow", "zarr", "timm", "transformers")


def versions() -> dict[str, str]:
    """Versions of camlens, Python and the packages that decide its numbers.

    ``{"camlens", "python", "torch", "torchvision", "numpy"}`` always, plus each of
    ``safetensors, pyarrow, zarr, timm, transformers`` that is already imported or installed.
    Imports are done here, on call (``import camlens`` imports no torch).
    """
    out = {"camlens": __version__, "python": platform.python_version()}
    for name in (*_CORE, *_OPTIONAL):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            if name in _CORE:
                raise
            continue
        out[name] = str(getattr(mod, "__version__", "unknown"))
    return out
