r"""torchvision's detectors as camlens detectors: Faster R-CNN (and the box branch of Mask R-CNN and
Keypoint R-CNN), RetinaNet, FCOS, SSD / SSDlite.

The adapter runs the detector's own modules (its ``transform``, ``backbone``, ``rpn`` /
``anchor_generator``, ``roi_heads`` / ``head``) and stops before the post-processing, so the
candidates are the raw, differentiable outputs; then it re-does torchvision's post-processing
(``postprocess_detections`` and ``transform.postprocess``) on them, as torchvision documents it:

* **frame**: ``GeneralizedRCNNTransform`` normalizes, resizes each image (shorter side to
  ``min_size``, at most ``max_size``; SSD: a fixed size) and pads the batch at the bottom right;
  a box in the resized frame :math:`(h, w)` maps to the photo :math:`(H, W)` by
  :math:`x \cdot W/w`, :math:`y \cdot H/h` (float32 ratios, as ``resize_boxes``);
* **Faster R-CNN**: each proposal :math:`a` has softmax scores :math:`p_{ac}` and one regressed
  box per class, clipped to the resized image; every (proposal, foreground class) pair with
  :math:`p_{ac} >` ``box_score_thresh`` and a box larger than 0.01 px is kept, then class-wise NMS at
  ``box_nms_thresh``, best first, at most ``box_detections_per_img``;
* **RetinaNet**: anchor scores :math:`\sigma(z_{ac})`; **FCOS**:
  :math:`\sqrt{\sigma(z_{ac})\,\sigma(o_a)}` (:math:`o_a` the centerness); per feature level the
  (anchor, class) pairs above ``score_thresh``, at most ``topk_candidates`` of them, then class-wise
  NMS at ``nms_thresh`` over the levels, at most ``detections_per_img``;
* **SSD**: softmax scores; per foreground class the anchors above ``score_thresh``, at most
  ``topk_candidates``, then class-wise NMS.

The thresholds are read from the detector when it runs (``keep_all_detections`` and the user's own
settings apply). The adapter lays the detector's modules out under their own names (not under
``net.``), so layer names are torchvision's (``backbone.body.16``); the default layer is
:func:`camlens.models.tasks.default_layer`'s. Mask R-CNN's masks and Keypoint R-CNN's keypoints are
not computed: their boxes, labels and scores are explained.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.errors import CamlensError
from camlens.models.card import attach_card, card_of
from camlens.models.detectors.base import Candidates, DetectorAdapter, FrameTransform
from camlens.models.tasks import Frames, default_layer

#: torchvision's detector classes by family (checked by name in the class's MRO)
FAMILIES = {"GeneralizedRCNN": "rcnn", "RetinaNet": "retinanet", "FCOS": "fcos", "SSD": "ssd"}


def tv_family(model: Any) -> str | None:
    """``"rcnn"``, ``"retinanet"``, ``"fcos"``, ``"ssd"`` for a torchvision detector, else ``None``
    (checked by type name: torchvision's detection package is not imported for this)."""
    for c in type(model).__mro__:
        if c.__module__.startswith("torchvision.models.detection") and c.__name__ in FAMILIES:
            return FAMILIES[c.__name__]
    return None


def is_tv_detector(model: Any) -> bool:
    """Whether ``model`` is one of torchvision's detectors (see the module docstring)."""
    return isinstance(model, nn.Module) and tv_family(model) is not None


def to_original(boxes: torch.Tensor, resized: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``(..., 4)`` in a resized image ``(h, w)`` -> the original ``(H, W)``: x by ``W/w`` and
    y by ``H/h``, the ratios in float32 as torchvision's ``resize_boxes``."""
    rh, rw = (
        torch.tensor(s, dtype=torch.float32, device=boxes.device)
        / torch.tensor(r, dtype=torch.float32, device=boxes.device)
        for s, r in zip(size, resized)
    )
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0 * rw, y0 * rh, x1 * rw, y1 * rh), dim=-1)


class RcnnFrame(FrameTransform):
    """The detector's ``GeneralizedRCNNTransform`` (kept as ``inner``) with the :class:`Frames`
    it made: each image's resized size and the padded batch size."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: list[torch.Tensor]) -> tuple[Any, Frames]:
        image_list, _ = self.inner(images)
        sizes = [(int(h), int(w)) for h, w in image_list.image_sizes]
        return image_list, Frames(
            resized=sizes, padded=(int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1]))
        )


def _features(backbone: nn.Module, tensors: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
    feats = backbone(tensors)
    return OrderedDict([("0", feats)]) if isinstance(feats, torch.Tensor) else feats


class TorchvisionAdapter(DetectorAdapter):
    """Base of the torchvision adapters: the detector's modules under their own names, its
    transform with frames, its thresholds read live (``holder``: the module that has them)."""

    family = "torchvision"
    thresh_option = "score_thresh"  # the constructor option said in hints
    net: Any  # the torchvision detector (its attributes are read by name)

    def __init__(self, net: nn.Module, class_names: Any = None) -> None:
        super().__init__(net, RcnnFrame(cast(nn.Module, net.transform)), class_names)
        del self._modules["net"]  # not under "net.": layer names stay torchvision's
        self.__dict__["net"] = net
        for name, child in net.named_children():
            if name != "transform":
                self.add_module(name, child)

    @property
    def holder(self) -> Any:
        return self.net

    @property
    def score_thresh(self) -> float:
        return float(self.holder.score_thresh)

    @score_thresh.setter
    def score_thresh(self, value: float) -> None:
        self.holder.score_thresh = float(value)

    @property
    def threshold_hint(self) -> str:
        return (
            f"torchvision's post-processing keeps scores > {self.score_thresh:g}: load it with {self.thresh_option}=..."
        )

    def default_layer(self) -> tuple[str, str]:
        layer = default_layer(self.net, "detection")
        return layer, f"the last backbone stage feeding every head ({layer})"

    def _decoded(
        self, boxes: torch.Tensor, scores: torch.Tensor, resized: Any, size: tuple[int, int], **kw: Any
    ) -> Candidates:
        from torchvision.ops import clip_boxes_to_image

        frame = clip_boxes_to_image(boxes, (int(resized[0]), int(resized[1])))
        return Candidates(to_original(frame, (int(resized[0]), int(resized[1])), size), scores, frame_boxes=frame, **kw)

    def _nms(
        self, cands: Candidates, index: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.ops import batched_nms

        assert cands.frame_boxes is not None
        fb = cands.frame_boxes.detach()
        boxes = fb[index, labels] if fb.dim() == 3 else fb[index]
        keep = batched_nms(boxes, scores, labels, float(self.holder.nms_thresh))[: int(self.holder.detections_per_img)]
        return index[keep], labels[keep]


class RcnnAdapter(TorchvisionAdapter):
    """Faster R-CNN (Mask R-CNN's and Keypoint R-CNN's boxes): one candidate per proposal."""

    family = "torchvision Faster R-CNN"
    thresh_option = "box_score_thresh"

    @property
    def holder(self) -> Any:
        return self.net.roi_heads

    def run(self, inputs: Any) -> Any:
        feats = _features(cast(nn.Module, self.net.backbone), inputs.tensors)
        proposals, _ = self.net.rpn(inputs, feats)
        rh = self.holder
        x = rh.box_head(rh.box_roi_pool(feats, proposals, inputs.image_sizes))
        logits, regression = rh.box_predictor(x)
        return logits, regression, proposals, inputs.image_sizes

    def decode(self, raw: Any, frames: Frames, sizes: list[tuple[int, int]]) -> list[Candidates]:
        logits, regression, proposals, resized = raw
        boxes = self.holder.box_coder.decode(regression, proposals)  # (R, C, 4)
        scores = F.softmax(logits, -1)
        per = [len(p) for p in proposals]
        pairs = zip(boxes.split(per), scores.split(per), resized, sizes)
        return [self._decoded(b, s, r, size) for b, s, r, size in pairs]

    def select(self, cands: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.ops import remove_small_boxes

        s = cands.scores.detach()[:, 1:]  # no background; (proposal, class) pairs in row-major order
        assert cands.frame_boxes is not None
        fb = cands.frame_boxes.detach()[:, 1:].reshape(-1, 4)
        flat = s.reshape(-1)
        inds = torch.where(flat > self.score_thresh)[0]
        inds = inds[remove_small_boxes(fb[inds], min_size=1e-2)]
        index, labels = inds // s.shape[1], inds % s.shape[1] + 1
        return self._nms(cands, index, labels, flat[inds])


class OneStageAdapter(TorchvisionAdapter):
    """RetinaNet, FCOS, SSD: one candidate per anchor, the head's outputs split by level."""

    def run(self, inputs: Any) -> Any:
        feats = list(_features(cast(nn.Module, self.net.backbone), inputs.tensors).values())
        head = self.net.head(feats)
        anchors = self.net.anchor_generator(inputs, feats)
        hw = [int(f.shape[-2] * f.shape[-1]) for f in feats]
        per_level = [n * (int(head["cls_logits"].shape[1]) // sum(hw)) for n in hw]
        return head, anchors, per_level, inputs.image_sizes

    def scores(self, head: dict[str, torch.Tensor], i: int, per_level: list[int]) -> torch.Tensor:
        """Image ``i``'s ``(A, C)`` class scores as the family's post-processing uses them."""
        raise NotImplementedError

    def decode(self, raw: Any, frames: Frames, sizes: list[tuple[int, int]]) -> list[Candidates]:
        head, anchors, per_level, resized = raw
        coder = self.net.box_coder
        out = []
        for i, size in enumerate(sizes):
            decode = coder.decode_single if hasattr(coder, "decode_single") else coder.decode  # FCOS: decode
            boxes = decode(head["bbox_regression"][i], anchors[i])
            out.append(self._decoded(boxes, self.scores(head, i, per_level), resized[i], size, levels=per_level))
        return out

    def select(self, cands: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """RetinaNet, FCOS: per level, the (anchor, class) pairs above the threshold, the best
        ``topk_candidates``; then NMS over all levels."""
        s = cands.scores.detach()
        C, start = s.shape[1], 0
        index, labels, kept = [], [], []
        for n in cands.levels or [len(s)]:
            flat = s[start : start + n].flatten()
            ids = torch.where(flat > self.score_thresh)[0]
            top, order = flat[ids].topk(min(int(self.net.topk_candidates), len(ids)))
            ids = ids[order]
            index.append(start + torch.div(ids, C, rounding_mode="floor"))
            labels.append(ids % C)
            kept.append(top)
            start += n
        return self._nms(cands, torch.cat(index), torch.cat(labels), torch.cat(kept))


class RetinaNetAdapter(OneStageAdapter):
    family = "torchvision RetinaNet"

    def scores(self, head: dict[str, torch.Tensor], i: int, per_level: list[int]) -> torch.Tensor:
        return torch.cat([torch.sigmoid(z) for z in head["cls_logits"][i].split(per_level)])


class FcosAdapter(OneStageAdapter):
    family = "torchvision FCOS"

    def scores(self, head: dict[str, torch.Tensor], i: int, per_level: list[int]) -> torch.Tensor:
        z, o = head["cls_logits"][i].split(per_level), head["bbox_ctrness"][i].split(per_level)
        return torch.cat([torch.sqrt(torch.sigmoid(a) * torch.sigmoid(b)) for a, b in zip(z, o)])


class SsdAdapter(OneStageAdapter):
    family = "torchvision SSD"

    def scores(self, head: dict[str, torch.Tensor], i: int, per_level: list[int]) -> torch.Tensor:
        return F.softmax(head["cls_logits"][i], dim=-1)

    def select(self, cands: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """Per foreground class, the anchors above the threshold, the best ``topk_candidates``;
        then NMS over all classes."""
        s = cands.scores.detach()
        index, labels, kept = [], [], []
        for c in range(1, s.shape[1]):
            ids = torch.where(s[:, c] > self.score_thresh)[0]
            top, order = s[ids, c].topk(min(int(self.net.topk_candidates), len(ids)))
            index.append(ids[order])
            labels.append(torch.full_like(order, c))
            kept.append(top)
        return self._nms(cands, torch.cat(index), torch.cat(labels), torch.cat(kept))


ADAPTERS: dict[str, type[TorchvisionAdapter]] = {
    "rcnn": RcnnAdapter,
    "retinanet": RetinaNetAdapter,
    "fcos": FcosAdapter,
    "ssd": SsdAdapter,
}


def tv_adapter(model: nn.Module) -> TorchvisionAdapter:
    """A torchvision detector -> its adapter, with the detector's card (a zoo detector's: class
    names, default layer) or a new one stating the default layer."""
    family = tv_family(model)
    if family is None:
        raise CamlensError(f"{type(model).__name__} is not a torchvision detector")
    card = card_of(model)
    adapter = ADAPTERS[family](model, card.class_names if card is not None else None)
    attach_card(adapter, card if card is not None else adapter.card(type(model).__name__))
    return adapter


__all__ = [
    "ADAPTERS",
    "FcosAdapter",
    "OneStageAdapter",
    "RcnnAdapter",
    "RcnnFrame",
    "RetinaNetAdapter",
    "SsdAdapter",
    "TorchvisionAdapter",
    "is_tv_detector",
    "to_original",
    "tv_adapter",
    "tv_family",
]
