"""The detector adapter: one small interface from a detector's raw, differentiable output to the
detections camlens explains.

::

    images (RGB in [0, 1], any sizes) ──transform──▶ network input + Frames (resize, letterbox, pad)
        ──network──▶ raw output ──decode──▶ Candidates per image: boxes in the image's own pixels,
        per-class scores before any NMS or threshold, objectness where the model has it
        ──select (the model's own post-processing)──▶ the detections the user sees

An adapter is an ``nn.Module`` around the user's network (``adapter.net``). Its forward takes what
torchvision's detectors take (a ``(N, 3, H, W)`` batch or a list of ``(3, H, W)`` images of
different sizes, RGB in ``[0, 1]``) and returns what they return: one dict per image with
``"boxes"`` ``(D, 4)`` (x0, y0, x1, y1 in the original image's pixels), ``"labels"`` ``(D,)`` and
``"scores"`` ``(D,)``, plus ``"class_scores"`` ``(D, C)`` (each detection's score for every class),
all in the autograd graph of the network, and ``"candidate"`` ``(D,)`` (the index of the candidate,
e.g. the DETR query, each detection came from). So :class:`camlens.targets.Detection`, D-RISE, Score-CAM
and every layer and pixel method run through it unchanged, and :func:`camlens.models.tasks.frame_maps`
maps the features' frame back to each photo (the transform reports its :class:`Frames`).

Adding a detector family is one file: a :class:`FrameTransform` (how the network's input is made)
and a :class:`DetectorAdapter` subclass with ``run`` (call the network), ``decode`` (raw ->
:class:`Candidates`) and ``select`` (the family's post-processing, as its library does it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from camlens.base.errors import InputError
from camlens.models.card import ModelCard
from camlens.models.preprocess import UNIT_RGB
from camlens.models.tasks import Frames


@dataclass
class Candidates:
    """One image's candidate detections before the model's post-processing.

    Attributes:
        boxes: ``(A, 4)`` x0, y0, x1, y1 in the original image's pixels, or ``(A, C, 4)`` a box
            per class (two-stage detectors such as Faster R-CNN regress one box per class).
        scores: ``(A, C)`` per-class scores (probabilities as the family's post-processing uses them).
        objectness: ``(A,)`` where the model has it, else ``None``.
        frame_boxes: the boxes (same shape as ``boxes``) in the network's input frame, where the
            family's post-processing (NMS) runs; ``None``: ``boxes``.
        levels: the number of candidates of each feature level, in order, where the
            post-processing picks per level (torchvision's RetinaNet and FCOS); ``None``: one group.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    objectness: torch.Tensor | None = None
    frame_boxes: torch.Tensor | None = None
    levels: list[int] | None = None

    def take(self, index: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The detections ``(index[d], labels[d])`` in torchvision's format (differentiable gathers)."""
        out = {
            "boxes": self.boxes[index, labels] if self.boxes.dim() == 3 else self.boxes[index],
            "labels": labels,
            "scores": self.scores[index, labels],
            "class_scores": self.scores[index],
            "candidate": index,  # which candidate (query, anchor) each detection is
        }
        if self.objectness is not None:
            out["objectness"] = self.objectness[index]
        return out


def as_image_list(images: Any) -> list[torch.Tensor]:
    """A ``(N, 3, H, W)`` batch or a list of ``(3, H, W)`` images -> a list of ``(3, H, W)``."""
    ims = list(images.unbind(0)) if isinstance(images, torch.Tensor) and images.dim() == 4 else images
    if not isinstance(ims, (list, tuple)) or not ims or not all(isinstance(t, torch.Tensor) for t in ims):
        raise InputError(
            "a detector takes RGB images in [0, 1]: a (N, 3, H, W) tensor or a list of (3, H, W) tensors; "
            f"got {type(images).__name__}"
        )
    bad = [tuple(t.shape) for t in ims if t.dim() != 3 or t.shape[0] != 3]
    if bad:
        raise InputError(f"a detector takes (3, H, W) RGB images in [0, 1]; got shape {bad[0]}")
    return list(ims)


class FrameTransform(nn.Module):
    """images -> ``(network input, Frames)``. :func:`camlens.models.tasks.record_frames` notes the
    :class:`~camlens.models.tasks.Frames` of each forward (``records_frames``), so that maps over
    the network's frame are mapped back to each photo."""

    records_frames = True

    def forward(self, images: list[torch.Tensor]) -> tuple[Any, Frames]:  # pragma: no cover - abstract
        raise NotImplementedError


class DetectorAdapter(nn.Module):
    """Base class of the detector adapters (see the module docstring).

    Args:
        net: the user's network (kept as ``self.net``; never modified).
        transform: how images become the network's input.
        class_names: the names of the class ids (``None``: unknown).
    """

    family = "detector"

    def __init__(self, net: nn.Module, transform: FrameTransform, class_names: Sequence[str] | None) -> None:
        super().__init__()
        self.net = net
        self.transform = transform
        self.class_names = list(class_names) if class_names is not None else None

    # -- what a family implements ------------------------------------------------------------
    def run(self, inputs: Any) -> Any:
        """The network's raw output for the transform's ``inputs``."""
        return self.net(inputs)

    def decode(self, raw: Any, frames: Frames, sizes: list[tuple[int, int]]) -> list[Candidates]:
        """Raw output -> each image's :class:`Candidates` (``sizes``: the original ``(H, W)``)."""
        raise NotImplementedError

    def select(self, cands: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's own post-processing: ``(candidate index, label)`` of each detection kept,
        in the library's order."""
        raise NotImplementedError

    def default_layer(self) -> tuple[str, str]:
        """``(dotted name within the adapter, why)`` of the layer explained by default."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def candidates(self, images: Any) -> list[Candidates]:
        """Each image's candidates (before post-processing), differentiable."""
        ims = as_image_list(images)
        inputs, frames = self.transform(ims)
        return self.decode(self.run(inputs), frames, [(int(t.shape[-2]), int(t.shape[-1])) for t in ims])

    def forward(self, images: Any) -> list[dict[str, torch.Tensor]]:
        out = []
        for c in self.candidates(images):
            index, labels = self.select(c)
            out.append(c.take(index, labels))
        return out

    @property
    def threshold_hint(self) -> str:
        """How to see more detections (said when an image has none): the post-processing's threshold."""
        return ""

    def card(self, name: str, **extra: Any) -> ModelCard:
        """The card camlens attaches: RGB in [0, 1] at the image's own size, the class names, the
        default layer and why it was chosen (``extra["layer_choice"]``)."""
        layer, why = self.default_layer()
        info = {"task": "detection", "detector": self.family, "layer_choice": why} | extra
        return ModelCard(name, UNIT_RGB, self.class_names, layer=layer, extra=info)


__all__ = ["Candidates", "DetectorAdapter", "FrameTransform", "as_image_list"]
