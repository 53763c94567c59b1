"""Detector adapters: one file per detector family (see :mod:`camlens.models.detectors.base`).

* :mod:`~camlens.models.detectors.detr` — Hugging Face DETR, Conditional DETR, RT-DETR;
* :mod:`~camlens.models.detectors.yolo` — Ultralytics YOLO v8/v11 (optional extra ``camlens[yolo]``).

torchvision's detectors already return per-image dicts of boxes in the photo's pixels, labels and
scores with their own resize/pad frame (:mod:`camlens.models.tasks`); they are explained as they are.

:func:`as_detector` wraps a user's detector object; :func:`camlens.explain` calls it for a DETR or
YOLO model passed directly, and ``camlens.load_model("yolo:PATH")`` returns one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from camlens.models.detectors.base import Candidates, DetectorAdapter, FrameTransform, as_image_list
from camlens.models.detectors.detr import DetrAdapter, detr_adapter, is_detr
from camlens.models.detectors.yolo import YOLO_PREFIX, YoloAdapter, is_yolo, load_yolo, yolo_adapter


def is_detector(model: Any) -> bool:
    """Whether ``model`` is a detector object an adapter here wraps (DETR family, Ultralytics YOLO)."""
    return is_detr(model) or is_yolo(model)


def as_detector(model: Any, **options: Any) -> nn.Module:
    """The camlens detector for ``model``: an adapter (returned as is), a Hugging Face DETR-family
    detector (options ``threshold``, ``size``) or an Ultralytics YOLO (options ``imgsz``, ``conf``,
    ``iou``, ``max_det``, ``rect``). Anything else is returned unchanged."""
    if isinstance(model, DetectorAdapter):
        return model
    if is_detr(model):
        return detr_adapter(model, **options)
    if is_yolo(model):
        return load_yolo(model, **options)
    return model


__all__ = [
    "YOLO_PREFIX",
    "Candidates",
    "DetectorAdapter",
    "DetrAdapter",
    "FrameTransform",
    "YoloAdapter",
    "as_detector",
    "as_image_list",
    "detr_adapter",
    "is_detector",
    "is_detr",
    "is_yolo",
    "load_yolo",
    "yolo_adapter",
]
