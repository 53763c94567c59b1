"""Detection targets: one map per box of a detector (given boxes, or the model's own detections)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from camlens.base.errors import TargetError
from camlens.targets.base import Target, _plain


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Pairwise IoU of boxes ``a`` ``(A, 4)`` and ``b`` ``(B, 4)`` as ``(x0, y0, x1, y1)`` -> ``(A, B)``.

    :math:`\mathrm{IoU} = |a \cap b| / (|a| + |b| - |a \cap b|)` (differentiable; 0 for empty unions).
    """
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp_min(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp_min(0).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))


def _detections(output: Any) -> list[Mapping[str, torch.Tensor]]:
    if isinstance(output, Mapping) and "boxes" in output:
        return [output]
    if isinstance(output, (list, tuple)) and all(isinstance(d, Mapping) and "boxes" in d for d in output):
        return list(output)
    raise TargetError(
        "Detection needs a detector's output: a list of per-image dicts with 'boxes' (x0, y0, x1, y1), "
        f"'scores' and 'labels' (torchvision's format); got {type(output).__name__}"
    )


def _check_labels(labels: Sequence[torch.Tensor], model: nn.Module | None) -> None:
    """Given box labels must be class ids of the model (when it says its classes: a zoo detector's
    card, a detector adapter's ``class_names``)."""
    card = getattr(model, "camlens", None)
    names = getattr(card, "class_names", None) or getattr(model, "class_names", None)
    if not names:
        return
    for lab in labels:
        bad = lab[(lab >= len(names)) | (lab < -1)]
        if len(bad):
            raise TargetError(
                f"box label {int(bad[0])} is not a class of this detector: it has {len(names)} classes "
                f"(ids 0..{len(names) - 1}, e.g. 0 = {names[0]!r}); pass labels= among them, or labels=None for any"
            )


class Detection(Target):
    r"""Explain detected boxes: one map per box, so ``K`` = number of boxes.

    For image :math:`n` and reference box :math:`b_k` with label :math:`c_k`, the score is the
    best match among the predicted boxes :math:`(P_j, \ell_j, s_j)` of the model's output:

    .. math:: y_k = \max_{j:\ \ell_j = c_k,\ \mathrm{IoU}(b_k, P_j) \ge \tau} \mathrm{IoU}(b_k, P_j)\, s_j

    (``0`` when no predicted box matches). ``labels=None`` with given boxes matches any label. When
    the output also holds class-probability vectors ``"probs"`` ``(D, C)`` (D-RISE's detection
    vector), the label test becomes the cosine :math:`\cos(e_{c_k}, p_j) = p_j[c_k]/\lVert p_j\rVert`
    and :math:`s_j` the ``"objectness"`` if given, else the score — then :math:`y_k` is D-RISE's
    similarity (Petsiuk et al., CVPR 2021) thresholded at :math:`\tau`. Gradients flow through the
    scores and, via the IoU, through the predicted box coordinates.

    Relation to pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``: that target returns *one* scalar
    :math:`\sum_k [\mathrm{IoU}_k > \tau][\ell = c_k](\mathrm{IoU}_k + s)` for the predicted box of
    highest IoU with each reference (one map for all boxes, the label checked after the match);
    this one keeps the boxes apart (one column each), matches among boxes of the right label, and
    multiplies IoU and score, so a poor overlap cannot be made up by a confident score.

    Args:
        boxes: reference boxes in original-image pixels ``(x0, y0, x1, y1)``: ``(K, 4)`` for every
            image or a list of ``(K_n, 4)`` per image; ``None``: the model's own detections with a
            score at least ``score_threshold`` (at most ``max_boxes`` per image, best first),
            chosen on the clean forward pass (:meth:`bind`).
        labels: class ids of the boxes (``(K,)`` or a list per image); ``None``: any label (given
            boxes) or the detections' own labels.
        iou: the IoU threshold :math:`\tau`.
        score_threshold, max_boxes: which own detections to explain when ``boxes=None``.

    Images with fewer boxes than the largest ``K`` of the batch get padding columns with label
    ``-1`` and score 0.
    """

    def __init__(
        self,
        boxes: Any = None,
        labels: Any = None,
        iou: float = 0.5,
        *,
        score_threshold: float = 0.5,
        max_boxes: int = 5,
    ) -> None:
        if not 0.0 <= float(iou) <= 1.0:
            raise TargetError(f"iou must be in [0, 1], not {iou}")
        if max_boxes < 1:
            raise TargetError("max_boxes must be >= 1")
        if boxes is not None:  # check early: a bad box is the caller's error, not the forward pass's
            per_image = isinstance(boxes, (list, tuple)) and len(boxes) and all(np.ndim(b) == 2 for b in boxes)
            for b in boxes if per_image else [boxes]:
                self._as_boxes(b)
        self.boxes = boxes
        self.label_spec = labels
        self.iou = float(iou)
        self.score_threshold = float(score_threshold)
        self.max_boxes = int(max_boxes)
        self._ref: list[torch.Tensor] | None = None  # per image (K, 4)
        self._lab: list[torch.Tensor] | None = None  # per image (K,), -1: any label
        self._index: list[torch.Tensor] = []  # per image (K,): own detections' index in the output, -1: given
        self._best: list[float | None] = []  # own detections: each image's best score (None: none)
        self._k = 0
        self._hint = ""  # a detector adapter's own threshold, said when it detected nothing

    # -- references -------------------------------------------------------------------------
    @staticmethod
    def _as_boxes(b: Any) -> torch.Tensor:
        try:
            t = _plain(torch.as_tensor(np.asarray(b, dtype=np.float64) if not isinstance(b, torch.Tensor) else b))
        except (TypeError, ValueError):
            raise TargetError(f"boxes must be numbers (x0, y0, x1, y1), a (K, 4) array; got {b!r}") from None
        if t.numel() and (t.dim() not in (1, 2) or t.shape[-1] != 4):
            raise TargetError(
                f"a box is 4 numbers (x0, y0, x1, y1) and boxes a (K, 4) array; got shape {tuple(t.shape)}: "
                f"{t.tolist()}"
            )
        t = t.float().reshape(-1, 4) if t.numel() else t.float().reshape(0, 4)
        if t.numel() and not bool((t[:, 2:] > t[:, :2]).all()):
            raise TargetError(f"boxes must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0; got {t.tolist()}")
        return t

    def _fresh(self) -> Detection:
        """An unbound target with the same settings (``bind`` and ``take`` fill it)."""
        return Detection(
            self.boxes, self.label_spec, self.iou, score_threshold=self.score_threshold, max_boxes=self.max_boxes
        )

    def _own_keep(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the own detections explained: score >= ``score_threshold``, best first, at
        most ``max_boxes``."""
        keep = (scores >= self.score_threshold).nonzero().flatten()
        return keep[scores[keep].argsort(descending=True)][: self.max_boxes]

    def bind(self, output: Any, model: nn.Module | None = None) -> Detection:
        dets = _detections(output)
        n = len(dets)
        refs, labs, index = [], [], []
        best: list[float | None] = [None] * n  # own detections: each image's best score
        if self.boxes is None:
            for i, d in enumerate(dets):
                s = d["scores"].detach()
                best[i] = float(s.max()) if len(s) else None
                keep = self._own_keep(s)
                refs.append(d["boxes"].detach()[keep].float().cpu())
                labs.append(d["labels"].detach()[keep].long().cpu())
                index.append(keep.cpu())
        else:
            per_image = isinstance(self.boxes, (list, tuple)) and (
                len(self.boxes) == n and all(np.ndim(b) == 2 for b in self.boxes)
            )
            bl = [self._as_boxes(b) for b in self.boxes] if per_image else [self._as_boxes(self.boxes)] * n
            if self.label_spec is None:
                ll = [torch.full((len(b),), -1, dtype=torch.long) for b in bl]
            else:
                per_lab = per_image and isinstance(self.label_spec, (list, tuple)) and len(self.label_spec) == n
                raw = self.label_spec if per_lab else [self.label_spec] * n
                ll = [torch.as_tensor(np.asarray(lb, dtype=np.int64)).reshape(-1) for lb in raw]
                for b, lb in zip(bl, ll):
                    if len(lb) != len(b):
                        raise TargetError(f"{len(lb)} labels for {len(b)} boxes")
            refs, labs = bl, ll
            index = [torch.full((len(b),), -1, dtype=torch.long) for b in bl]
            _check_labels(ll, model)
        out = self._fresh()
        out._ref, out._lab, out._index = refs, labs, index
        out._k = max(1, max((len(r) for r in refs), default=0))
        out._best = best
        out._hint = str(getattr(model, "threshold_hint", "") or "")
        return out

    def empty_rows(self, image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, str]:
        """Images with no box to explain (no own detection above ``score_threshold``, an empty box
        list). A given box entirely outside its image is a :class:`TargetError` (wrong coordinates)."""
        self._check_bound()
        assert self._ref is not None
        if image_sizes is not None and self.boxes is not None:
            for i, (ref, (h, w)) in enumerate(zip(self._ref, image_sizes)):
                out = (ref[:, 2] <= 0) | (ref[:, 3] <= 0) | (ref[:, 0] >= w) | (ref[:, 1] >= h)
                if bool(out.any()):
                    box = [round(float(v), 2) for v in ref[int(out.nonzero()[0, 0])]]
                    raise TargetError(
                        f"box {box} of image {i} lies entirely outside the image ({w}x{h} px, width x height): "
                        "boxes are (x0, y0, x1, y1) in the original image's pixels; fix its coordinates (were "
                        "they (x, y, w, h), normalized to [0, 1], or for a resized image?)"
                    )
        reasons = {}
        for i, ref in enumerate(self._ref):
            if len(ref):
                continue
            if self.boxes is not None:
                reasons[i] = "no box given for it; pass at least one (x0, y0, x1, y1) box"
            else:
                b = self._best[i] if i < len(self._best) else None
                seen = "the model detected nothing" if b is None else f"its best detection scores {b:.3g}"
                reasons[i] = (
                    f"no detection scores >= score_threshold={self.score_threshold:g} ({seen}); lower "
                    "Detection(score_threshold=...) or pass boxes="
                ) + (f" ({self._hint})" if self._hint and b is None else "")
        return reasons

    def take(self, rows: Sequence[int]) -> Detection:
        self._check_bound()
        assert self._ref is not None and self._lab is not None
        out = self._fresh()
        out._ref = [self._ref[int(r)] for r in rows]
        out._lab = [self._lab[int(r)] for r in rows]
        out._index = [self._index[int(r)] for r in rows] if self._index else []
        out._best = [self._best[int(r)] for r in rows] if self._best else []
        out._k = self._k
        return out

    def with_iou(self, iou: float) -> Detection:
        """The same bound references with another IoU threshold (D-RISE uses ``0``)."""
        self._check_bound()
        out = self.take(range(len(self._ref or [])))
        out.iou = float(iou)
        return out

    def _check_bound(self) -> None:
        if self._ref is None:
            raise TargetError("this Detection target is not bound to a forward pass yet (call .bind(output))")

    @property
    def k(self) -> int:
        return self._k

    @property
    def labels(self) -> torch.Tensor:  # type: ignore[override]
        """``(N, K)`` labels of the reference boxes (``-1``: any label or padding)."""
        self._check_bound()
        assert self._lab is not None
        out = torch.full((len(self._lab), self._k), -1, dtype=torch.long)
        for i, lb in enumerate(self._lab):
            out[i, : len(lb)] = lb
        return out

    @property
    def reference_boxes(self) -> torch.Tensor:
        """``(N, K, 4)`` reference boxes in original-image pixels (NaN rows: padding)."""
        self._check_bound()
        assert self._ref is not None
        out = torch.full((len(self._ref), self._k, 4), float("nan"))
        for i, b in enumerate(self._ref):
            out[i, : len(b)] = b
        return out

    @property
    def detection_index(self) -> torch.Tensor:
        """``(N, K)`` each explained box's index in the model's own detections of its image (the
        order of its output), ``-1`` for a given box or padding."""
        self._check_bound()
        out = torch.full((len(self._ref or []), self._k), -1, dtype=torch.long)
        for i, ix in enumerate(self._index):
            out[i, : len(ix)] = ix
        return out

    @property
    def extras(self) -> dict[str, Any]:
        return {"boxes": self.reference_boxes.numpy(), "detections": self.detection_index.numpy()}

    # -- scores -----------------------------------------------------------------------------
    def match(self, det: Mapping[str, torch.Tensor], ref: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """``(K,)`` scores of one image's detections ``det`` against references ``ref``/``lab``."""
        boxes = det["boxes"]
        if len(ref) == 0:
            return boxes.new_zeros(0)
        if len(boxes) == 0:
            return boxes.new_zeros(len(ref)) + 0.0 * boxes.sum()
        ref = ref.to(boxes.device, boxes.dtype)
        lab = lab.to(boxes.device)
        iou = box_iou(ref, boxes)  # (K, D)
        if "probs" in det:
            p = det["probs"]
            cls = p[:, lab.clamp_min(0)].T / p.norm(dim=1).clamp_min(1e-12)  # (K, D) cosine with one-hot
            cls = torch.where(lab[:, None] < 0, torch.ones_like(cls), cls)
            obj = det.get("objectness", det["scores"])
        else:
            cls = ((det["labels"][None, :] == lab[:, None]) | (lab[:, None] < 0)).to(boxes.dtype)
            obj = det["scores"]
        q = iou * cls * obj[None, :]
        q = torch.where(iou >= self.iou, q, torch.zeros_like(q)) if self.iou > 0 else q
        return q.max(dim=1).values

    def __call__(self, output: Any) -> torch.Tensor:
        self._check_bound()
        assert self._ref is not None and self._lab is not None
        dets = _detections(output)
        if len(dets) != len(self._ref):
            raise TargetError(f"the Detection target was bound to {len(self._ref)} images; the output has {len(dets)}")
        rows = []
        for det, ref, lab in zip(dets, self._ref, self._lab):
            s = self.match(det, ref, lab)
            if len(s) < self._k:
                s = torch.cat([s, s.new_zeros(self._k - len(s))])
            rows.append(s)
        return torch.stack(rows)

    def __repr__(self) -> str:
        return f"Detection(boxes={'own' if self.boxes is None else 'given'}, iou={self.iou}, k={self._k or '?'})"


class InstanceMask(Detection):
    r"""Explain why an instance segmenter predicts an instance's mask: one map per own detection.

    For the explained detection :math:`k` (box :math:`b_k`, label :math:`c_k`, predicted binary
    mask :math:`M_k` in the photo's pixels, fixed on the clean forward pass) the score is its mask
    logits summed over its mask — :class:`~camlens.targets.Segmentation`'s score for one instance:

    .. math:: y_k = \sum_{p} M_k(p)\, m_{j^*}(p), \qquad
        j^* = \arg\max_{j:\ \ell_j = c_k,\ \mathrm{IoU}(b_k, P_j) \ge \tau} \mathrm{IoU}(b_k, P_j)

    where :math:`m_j` are detection :math:`j`'s mask logits (``"mask_logits"``, before the sigmoid
    and the box crop) in the output being scored; on the clean pass :math:`j^*` is the instance
    itself; on a perturbed input (RISE, Score-CAM) the instance is found again by its box and label
    (``0`` when it is lost). The model's output must hold ``"masks"`` and ``"mask_logits"`` per
    detection (an Ultralytics YOLO segmentation model, :mod:`camlens.models.detectors.yolo`).

    Args:
        iou: the IoU threshold :math:`\tau` to find the instance again.
        score_threshold, max_boxes: which own detections to explain (best first).
    """

    def __init__(self, iou: float = 0.5, *, score_threshold: float = 0.5, max_boxes: int = 5) -> None:
        super().__init__(None, None, iou, score_threshold=score_threshold, max_boxes=max_boxes)
        self._masks: list[torch.Tensor] | None = None  # per image (K, H, W) bool

    def _fresh(self) -> InstanceMask:
        return InstanceMask(self.iou, score_threshold=self.score_threshold, max_boxes=self.max_boxes)

    def bind(self, output: Any, model: nn.Module | None = None) -> InstanceMask:
        dets = _detections(output)
        if not all("masks" in d and "mask_logits" in d for d in dets):
            raise TargetError(
                "InstanceMask explains an instance segmenter's masks: the model's detections need 'masks' and "
                "'mask_logits' (an Ultralytics YOLO -seg model: camlens.load_model('yolo:yolov8n-seg.pt')); for a "
                "detector's boxes use Detection()"
            )
        out = cast(InstanceMask, super().bind(output, model))
        out._masks = [d["masks"].detach()[self._own_keep(d["scores"].detach())].cpu() for d in dets]
        return out

    def take(self, rows: Sequence[int]) -> InstanceMask:
        out = cast(InstanceMask, super().take(rows))
        out._masks = None if self._masks is None else [self._masks[int(r)] for r in rows]
        return out

    @property
    def extras(self) -> dict[str, Any]:
        """``"boxes"`` and ``"masks"`` ``(N, K, H, W)`` (bool, the explained instances' masks in
        each photo's pixels; padding: all False)."""
        assert self._masks is not None
        h = max((int(m.shape[-2]) for m in self._masks), default=0)
        w = max((int(m.shape[-1]) for m in self._masks), default=0)
        masks = np.zeros((len(self._masks), self._k, h, w), bool)
        for i, m in enumerate(self._masks):
            masks[i, : len(m), : m.shape[-2], : m.shape[-1]] = m.numpy()
        return super().extras | {"masks": masks}

    def _instance_scores(self, det: Mapping[str, torch.Tensor], n: int) -> torch.Tensor:
        assert self._ref is not None and self._lab is not None and self._masks is not None
        ref, lab, masks = self._ref[n], self._lab[n], self._masks[n]
        logits = det["mask_logits"]
        if len(ref) == 0 or len(det["boxes"]) == 0:
            return logits.new_zeros(len(ref)) + 0.0 * logits.sum()
        iou = box_iou(ref.to(det["boxes"].device, det["boxes"].dtype), det["boxes"].detach())
        ok = (det["labels"][None, :] == lab.to(iou.device)[:, None]) & (iou >= self.iou)
        best = torch.where(ok, iou, torch.full_like(iou, -1.0)).max(dim=1)
        picked = logits[best.indices]  # (K, H, W): each reference's instance found again
        s = (masks.to(logits.device, logits.dtype) * picked).sum(dim=(1, 2))
        return torch.where(best.values >= 0, s, torch.zeros_like(s))

    def __call__(self, output: Any) -> torch.Tensor:
        self._check_bound()
        dets = _detections(output)
        assert self._ref is not None
        if len(dets) != len(self._ref):
            raise TargetError(
                f"the InstanceMask target was bound to {len(self._ref)} images; the output has {len(dets)}"
            )
        rows = []
        for n, det in enumerate(dets):
            s = self._instance_scores(det, n)
            rows.append(torch.cat([s, s.new_zeros(self._k - len(s))]) if len(s) < self._k else s)
        return torch.stack(rows)

    def __repr__(self) -> str:
        return f"InstanceMask(iou={self.iou}, k={self._k or '?'})"
