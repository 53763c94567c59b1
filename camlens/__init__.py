"""camlens: where does a convolutional image classifier look when it decides?

The public API::

    camlens.explain(model, inputs, method="gradcam", targets=None, layer=None, capture="output")
    camlens.load_model(name, weights=None)
    camlens.methods()
    camlens.localize(maps, threshold=...)
    camlens.explain_dataset(model, dataset, method="gradcam", out="store", batch_size=16, num_workers=4)
    camlens.open_results("store")
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


def explain_dataset(model, dataset, method="gradcam", out="camlens-store", **kwargs):
    """A whole dataset into a resumable result store; see :func:`camlens.pipeline.explain_dataset`."""
    from .pipeline import explain_dataset as _explain_dataset  # pyarrow/zarr only when used

    return _explain_dataset(model, dataset, method, out, **kwargs)


def open_results(directory):
    """A result store as a pandas table and lazy maps; see :func:`camlens.pipeline.open_results`."""
    from .pipeline import open_results as _open_results

    return _open_results(directory)


__all__ = [
    "CamlensError",
    "Explanation",
    "__version__",
    "available_models",
    "explain",
    "explain_dataset",
    "load_model",
    "localize",
    "methods",
    "open_results",
    "predict",
]
