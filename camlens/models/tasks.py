"""Detectors and segmenters in the zoo: torchvision models by name, their layer, their frame.

* Detectors (``fasterrcnn_mobilenet_v3_large_320_fpn``, ``retinanet_resnet50_fpn``,
  ``fcos_resnet50_fpn``, ``ssdlite320_mobilenet_v3_large``, …) take RGB images in ``[0, 1]`` at
  their own size (a list when the sizes differ) and return per-image dicts of ``boxes`` (in the
  original image's pixels), ``labels`` and ``scores``. Their default layer is the last stage of
  the backbone that feeds every head: the output of the backbone body's last stage (it feeds every
  FPN level), or for SSD the first feature stage (its C4 map feeds the C4 head and all later maps).
* Segmenters (``fcn_resnet50``, ``deeplabv3_mobilenet_v3_large``, ``lraspp_mobilenet_v3_large``, …)
  take ImageNet-normalized images and return ``{"out": (N, C, H, W)}``; their default layer is the
  backbone's last stage (``"out"`` / ``"high"``).

Weights are read from a file or torchvision's cache, never downloaded (``weights_backbone=None``
too); ``"random"`` builds an untrained network. Extra keyword arguments go to the torchvision
constructor (``min_size=``, ``box_score_thresh=``, ``num_classes=`` …).

**The detector frame.** A torchvision detector resizes each image (shorter side to ``min_size``)
and pads the batch to a common size; its features cover that padded frame. :func:`record_frames`
notes the resized sizes during the forward pass and :func:`frame_maps` crops each image's part of
a feature-resolution map and resizes it to the original image, so maps and boxes share the
original pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.errors import CamlensError
from camlens.models.preprocess import IMAGENET, UNIT_RGB

DETECTORS = (
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    "ssd300_vgg16",
)
SEGMENTERS = (
    "fcn_resnet50",
    "fcn_resnet101",
    "deeplabv3_resnet50",
    "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large",
    "lraspp_mobilenet_v3_large",
)


def task_of(name: str) -> str | None:
    """``"detection"``, ``"segmentation"`` or ``None`` for a zoo name."""
    return "detection" if name in DETECTORS else "segmentation" if name in SEGMENTERS else None


def default_layer(model: nn.Module, task: str) -> str:
    """The dotted name of the layer explained by default (see the module docstring)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise CamlensError(f"{type(model).__name__} has no .backbone; pass layer= explicitly")
    if task == "detection":
        body = getattr(backbone, "body", None)
        if body is not None:  # BackboneWithFPN: the body's last returned stage
            last = list(getattr(body, "return_layers", {}) or [n for n, _ in body.named_children()])[-1]
            return f"backbone.body.{last}"
        feats = getattr(backbone, "features", None)
        if feats is not None:  # SSD: the first feature stage feeds every head
            return "backbone.features.0"
        raise CamlensError(f"no default layer for {type(model).__name__}; pass layer= explicitly")
    layers = list(getattr(backbone, "return_layers", {}) or [n for n, _ in backbone.named_children()])
    return f"backbone.{layers[-1]}"


def build_task_model(name: str, pretrained: bool, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """An untrained torchvision detector or segmenter (nothing downloaded: ``weights=None`` and
    ``weights_backbone=None``) and its card fields; :func:`camlens.models.zoo.load_model` then
    loads the weights. ``pretrained``: weights will be loaded (FCN and DeepLabV3 then get the aux
    head their published weights hold; ``aux_loss=False`` for a file without it)."""
    import torchvision  # heavy: only when a detector or segmenter is asked for
    from torchvision.models import get_model_weights

    task = task_of(name)
    if task is None:
        raise CamlensError(f"{name!r} is not a detector or segmenter camlens knows")
    categories = list(get_model_weights(name).DEFAULT.meta.get("categories") or []) or None
    if pretrained and name.startswith(("fcn_", "deeplabv3_")) and "aux_loss" not in kwargs:
        kwargs["aux_loss"] = True
    if kwargs.get("num_classes") is not None:
        categories = None
    try:
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kwargs)
    except TypeError as exc:
        raise CamlensError(f"{name}: bad constructor option ({exc})") from None
    card = {
        "preprocess": UNIT_RGB if task == "detection" else IMAGENET,
        "class_names": categories,
        "layer": default_layer(model, task),
        "extra": {"task": task},
    }
    return model, card


def keep_all_detections(model: nn.Module) -> nn.Module:
    """Set a torchvision detector's score threshold (or a detector adapter's ``conf`` /
    ``threshold``) to 0 (in place) so that its top-k boxes are always reported, however low their
    scores (the CLI ranks them and prints the scores)."""
    for holder in (getattr(model, "roi_heads", None), model):
        if holder is not None and isinstance(getattr(holder, "score_thresh", None), float):
            holder.score_thresh = 0.0
    if getattr(getattr(model, "transform", None), "records_frames", False):  # a detector adapter's threshold
        for name in ("conf", "threshold"):  # YOLO, DETR family (camlens.models.detectors)
            if isinstance(getattr(model, name, None), float):
                setattr(model, name, 0.0)
    return model


# ----------------------------------------------------------------------------------------------
# The detector frame
# ----------------------------------------------------------------------------------------------
@dataclass
class Frames:
    """What a detector's transform did in the last forward: each image's resized ``(h, w)``, the
    padded batch size ``(Hb, Wb)`` its features cover, and where each resized image lies in that
    frame (``offsets``: its top-left ``(y, x)``; empty: ``(0, 0)`` for all, torchvision's bottom-right
    padding; a letterbox centres the image)."""

    resized: list[tuple[int, int]] = field(default_factory=list)
    padded: tuple[int, int] | None = None
    offsets: list[tuple[int, int]] = field(default_factory=list)

    @property
    def seen(self) -> bool:
        return self.padded is not None


@contextlib.contextmanager
def record_frames(model: nn.Module, into: Frames | None = None) -> Iterator[Frames]:
    """Note the resize/pad of a detector adapter's transform during a forward
    (:mod:`camlens.models.detectors`: a ``transform`` module with ``records_frames = True``
    returning ``(network input, Frames)``; torchvision's detectors are explained through their
    adapter too), in ``into`` (default: a new :class:`Frames`); a no-op for other models.
    The hook is removed on exit, also on error."""
    frames = Frames() if into is None else into
    transform = getattr(model, "transform", None)
    handle = None
    if isinstance(transform, nn.Module) and getattr(transform, "records_frames", False) is True:

        def note(m, args, out):
            seen = out[1]
            frames.resized, frames.padded, frames.offsets = list(seen.resized), seen.padded, list(seen.offsets)

        handle = transform.register_forward_hook(note)
    try:
        yield frames
    finally:
        if handle is not None:
            handle.remove()


def frame_maps(raw: torch.Tensor, frames: Frames, sizes: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Feature-resolution maps ``(N, K, h, w)`` over the padded frame -> ``(N, K, H, W)`` maps in
    each image's original pixels (``sizes``; zero beyond an image smaller than the largest).

    Image ``n`` occupies rows ``[y_n, y_n + h_n)`` and columns ``[x_n, x_n + w_n)`` of the padded
    frame ``(Hb, Wb)`` (``frames.offsets``, ``(0, 0)`` by default): the map is upsampled to the
    frame (bilinear), cropped there, and resized to the original ``(H_n, W_n)``.
    """
    assert frames.padded is not None
    hb, wb = frames.padded
    H = max(s[0] for s in sizes)
    W = max(s[1] for s in sizes)
    out = raw.new_zeros(raw.shape[0], raw.shape[1], H, W, dtype=torch.float32)
    full = F.interpolate(raw.float(), size=(hb, wb), mode="bilinear", align_corners=False)
    offsets = frames.offsets or [(0, 0)] * len(frames.resized)
    for n, ((hr, wr), (ho, wo), (y0, x0)) in enumerate(zip(frames.resized, sizes, offsets)):
        crop = full[n : n + 1, :, y0 : y0 + hr, x0 : x0 + wr]
        out[n, :, :ho, :wo] = F.interpolate(crop, size=(ho, wo), mode="bilinear", align_corners=False)[0]
    return out


__all__ = [
    "DETECTORS",
    "SEGMENTERS",
    "Frames",
    "build_task_model",
    "default_layer",
    "frame_maps",
    "keep_all_detections",
    "record_frames",
    "task_of",
]
