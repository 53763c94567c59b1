"""Detector adapters: one file per detector family (see :mod:`camlens.models.detectors.base`).

* :mod:`~camlens.models.detectors.detr` — Hugging Face DETR, Conditional DETR, RT-DETR;
* :mod:`~camlens.models.detectors.yolo` — Ultralytics YOLO v8/v11 (optional extra ``camlens[yolo]``);
* :mod:`~camlens.models.detectors.torchvision` — torchvision's Faster R-CNN (and Mask / Keypoint
  R-CNN's boxes), RetinaNet, FCOS, SSD / SSDlite.

:func:`as_detector` wraps a user's detector object; :func:`camlens.explain` calls it for a DETR,
YOLO or torchvision detector passed directly (``camlens.load_model`` returns torchvision's detectors
as torchvision builds them, wrapped when explained), and ``camlens.load_model("yolo:PATH")`` returns one.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from camlens.base.errors import CamlensError
from camlens.models.detectors.base import Candidates, DetectorAdapter, FrameTransform, as_image_list
from camlens.models.detectors.detr import DetrAdapter, detr_adapter, is_detr
from camlens.models.detectors.torchvision import TorchvisionAdapter, is_tv_detector, tv_adapter
from camlens.models.detectors.yolo import YOLO_PREFIX, YoloAdapter, is_yolo, load_yolo, yolo_adapter


def is_detector(model: Any) -> bool:
    """Whether ``model`` is a detector object an adapter here wraps (DETR family, Ultralytics YOLO,
    torchvision's detectors)."""
    return is_detr(model) or is_yolo(model) or is_tv_detector(model)


def as_detector(model: Any, **options: Any) -> nn.Module:
    """The camlens detector for ``model``: an adapter (returned as is), a Hugging Face DETR-family
    detector (options ``threshold``, ``size``) or an Ultralytics YOLO (options ``imgsz``, ``conf``,
    ``iou``, ``max_det``, ``rect``) or a torchvision detector (its own settings; no options).
    Anything else is returned unchanged."""
    if isinstance(model, DetectorAdapter):
        return model
    if is_tv_detector(model):
        if options:
            raise CamlensError(
                f"a torchvision detector takes no adapter options ({', '.join(sorted(options))}); set them on "
                "the detector (e.g. load_model(NAME, box_score_thresh=...))"
            )
        return tv_adapter(model)
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
    "TorchvisionAdapter",
    "YoloAdapter",
    "as_detector",
    "as_image_list",
    "detr_adapter",
    "is_detector",
    "is_detr",
    "is_tv_detector",
    "is_yolo",
    "load_yolo",
    "tv_adapter",
    "yolo_adapter",
]
