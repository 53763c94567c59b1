"""camlens: where does a vision model look when it decides?

The public API::

    camlens.explain(model, inputs, method="gradcam", targets=None, layer=None, capture="output")
    camlens.predict(model, inputs, topk=5)
    camlens.load_model(name, weights=None)
    camlens.methods()                       # the registered methods
    camlens.localize(maps, threshold=...)   # heatmaps -> boxes
    camlens.compare(model, data)            # which map should I trust? rank the methods
    camlens.explain_dataset(model, dataset, method="gradcam", out="store")  # a dataset -> result store
    camlens.open_results("store")           # the store as a pandas table + lazy Zarr maps
    camlens.Explanation

and the sub-packages ``camlens.metrics``, ``camlens.viz``, ``camlens.data``, ``camlens.train``,
``camlens.models``, ``camlens.targets``. The code is in folders by layer (``base/``, ``core/``,
``attribution/`` for the methods, ``api/``, ``viz/``, ``metrics/``…; see CONTRIBUTING.md); the 0.2
module paths (``camlens.engine``, ``camlens.io``…) still import, with a DeprecationWarning.

Everything is imported on first use (PEP 562 module ``__getattr__``), so ``import camlens`` and
``camlens --version`` do not import torch. Only the method registry (no torch) is imported eagerly,
for ``camlens.methods()``, the listing function (the methods themselves are ``camlens.attribution``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from camlens import _moved
from camlens._version import __version__
from camlens.attribution.registry import methods
from camlens.base import backends
from camlens.base.errors import CamlensError

_moved.install()
backends.declare("figures", "camlens.viz")  # Explanation.show/save/figure (api layer) call the figure code

if TYPE_CHECKING:  # the lazy attributes, for type checkers and IDEs
    import numpy as np

    from camlens import data, metrics, models, targets, train, viz
    from camlens.api.explainer import ExplainRequest, explain, predict, run_request
    from camlens.api.explanation import Explanation
    from camlens.comparison import CompareConfig, compare
    from camlens.core.extra import Constant
    from camlens.models.zoo import available_models, load_model
    from camlens.pipeline import explain_dataset, open_results

#: public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "explain": ("camlens.api.explainer", "explain"),
    "predict": ("camlens.api.explainer", "predict"),
    "ExplainRequest": ("camlens.api.explainer", "ExplainRequest"),
    "run_request": ("camlens.api.explainer", "run_request"),
    "Explanation": ("camlens.api.explanation", "Explanation"),
    "load_model": ("camlens.models.zoo", "load_model"),
    "available_models": ("camlens.models.zoo", "available_models"),
    "compare": ("camlens.comparison", "compare"),
    "CompareConfig": ("camlens.comparison", "CompareConfig"),
    "Constant": ("camlens.core.extra", "Constant"),
    "data": ("camlens.data", None),
    "metrics": ("camlens.metrics", None),
    "models": ("camlens.models", None),
    "targets": ("camlens.targets", None),
    "train": ("camlens.train", None),
    "viz": ("camlens.viz", None),
    "pipeline": ("camlens.pipeline", None),
    "explain_dataset": ("camlens.pipeline", "explain_dataset"),
    "open_results": ("camlens.pipeline", "open_results"),
}


def __getattr__(name: str) -> Any:
    moved = _moved.MOVED.get(f"camlens.{name}")
    if moved is not None:  # camlens.loceval, camlens.io… (0.2 attributes)
        _moved.warn_moved(f"camlens.{name}", moved)
        return importlib.import_module(moved)
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'camlens' has no attribute {name!r}") from None
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def localize(maps: Any, threshold: float | None = None, **kwargs: Any) -> np.ndarray:
    """Heatmaps ``(..., H, W)`` -> boxes ``(..., 4)``; volumes ``(..., D, H, W)`` with ``spatial_dims=3``
    -> 3-D boxes ``(..., 6)``; see :func:`camlens.base.localization.localize`."""
    from camlens.base.localization import DEFAULT_THRESHOLD
    from camlens.base.localization import localize as _localize

    return _localize(maps, DEFAULT_THRESHOLD if threshold is None else threshold, **kwargs)


__all__ = [
    "CamlensError",
    "CompareConfig",
    "Constant",
    "ExplainRequest",
    "Explanation",
    "__version__",
    "available_models",
    "compare",
    "data",
    "explain",
    "explain_dataset",
    "load_model",
    "localize",
    "methods",
    "metrics",
    "models",
    "open_results",
    "predict",
    "run_request",
    "targets",
    "train",
    "viz",
]
