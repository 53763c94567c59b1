"""camlens: where does a convolutional image classifier look when it decides?

The public API::

    camlens.explain(model, inputs, method="gradcam", targets=None, layer=None, capture="output")
    camlens.load_model(name, weights=None)
    camlens.methods()
    camlens.localize(maps, threshold=...)
    camlens.Explanation
"""

from .errors import CamlensError
from .explain import explain, predict
from .explanation import Explanation
from .methods.registry import methods
from .models.zoo import available_models, load_model

__version__ = "0.1.0"


def localize(maps, threshold=None, **kwargs):
    """Heatmaps ``(..., H, W)`` -> boxes ``(..., 4)``; see :func:`camlens.localize.localize`."""
    from .localize import localize as _localize

    if threshold is not None:
        kwargs["threshold"] = threshold
    return _localize(maps, **kwargs)


__all__ = [
    "CamlensError",
    "Explanation",
    "__version__",
    "available_models",
    "explain",
    "load_model",
    "localize",
    "methods",
    "predict",
]
