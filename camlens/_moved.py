"""Module paths of camlens 0.2 that moved in 0.3, kept importable for one minor version.

0.3 put the flat modules into folders that show the layers (``base/``, ``core/``, ``attribution/``,
``api/``…). ``import camlens.engine`` (or ``from camlens.io import load_image``) still works and
returns the module at its new path, with a :class:`DeprecationWarning` naming that path; the
aliases go in 0.4. Standard library only: installed by ``import camlens``, which imports no torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

#: old dotted path -> new dotted path (modules; their submodules follow)
MOVED: dict[str, str] = {
    **{f"camlens.{m}": f"camlens.base.{m}" for m in ("errors", "io", "ops", "fsio", "progress", "localization")},
    **{f"camlens.{m}": f"camlens.base.{m}" for m in ("concurrency", "classnames", "devices")},
    **{
        f"camlens.{m}": f"camlens.core.{m}"
        for m in ("capture", "layers", "rules", "outputs", "layout", "attention", "resolve", "inputs", "engine")
    },
    "camlens.explanation": "camlens.api.explanation",
    "camlens.explainer": "camlens.api.explainer",
    "camlens.loceval": "camlens.metrics.loceval",
}
#: packages renamed: every submodule follows (``camlens.methods`` itself is the listing function)
RENAMED_PACKAGES: dict[str, str] = {"camlens.methods.": "camlens.attribution."}


def new_path(old: str) -> str | None:
    """Where the 0.2 module ``old`` lives now (``None``: it did not move)."""
    if old in MOVED:
        return MOVED[old]
    for prefix, new in RENAMED_PACKAGES.items():
        if old.startswith(prefix):
            return new + old[len(prefix) :]
    return None


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(
        f"{old} moved to {new} in camlens 0.3; import {new} (the old path goes in 0.4)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves a moved module's old name to the module object at its new path."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "camlens.methods":  # only reached by `import camlens.methods.<submodule>`
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        new = new_path(fullname)
        if new is None:
            return None
        found = importlib.util.find_spec(new)
        is_package = found is not None and found.submodule_search_locations is not None
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        if spec.name == "camlens.methods":
            return _MethodsPackage("camlens.methods")
        new = new_path(spec.name)
        assert new is not None
        warn_moved(spec.name, new, stacklevel=6)
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__  # the import system sets __spec__ after this call
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the module at its new path is already executed: only give it back its own spec
        own = self._specs.pop(module.__spec__.name if module.__spec__ else "", None)
        if own is not None:
            module.__spec__ = own


class _MethodsPackage(ModuleType):
    """``camlens.methods`` when a 0.2 submodule path (``camlens.methods.registry``) is imported: the
    import system then binds this object as ``camlens.methods``, so it stays the listing function
    when called, and its attributes are those of :mod:`camlens.attribution`."""

    __path__: list[str] = []  # noqa: RUF012 - a package for the import system; submodules come from _Alias

    def __call__(self, *args: object, **kwargs: object) -> object:
        from camlens.attribution.registry import methods

        return methods(*args, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(importlib.import_module("camlens.attribution"), name)


def install() -> None:
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.append(_Alias())


__all__ = ["MOVED", "RENAMED_PACKAGES", "install", "new_path", "warn_moved"]
