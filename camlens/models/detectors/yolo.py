r"""Ultralytics YOLO detectors (v8, v11: detect and segment heads) as camlens detectors.

Ultralytics is AGPL-3.0: it is an optional dependency the user installs (``pip install
camlens[yolo]``), imported only here and only when a YOLO model is asked for; none of its code is
copied. camlens re-implements what ``YOLO.predict`` does around the network, from its documented
behaviour:

* **letterbox**: an image of ``(h, w)`` is scaled by :math:`r = \min(S/h, S/w)` (``S`` = ``imgsz``)
  to :math:`(\mathrm{round}(h r), \mathrm{round}(w r))` (bilinear), then padded with grey
  (114/255) on both sides to ``S x S``, or — ``rect=True`` and all images of one size, as
  ``predict`` does for one image — only to the next multiple of the network's stride;
* **candidates**: every anchor point :math:`a` of the head's output ``(N, 4 + C, A)``: a box
  :math:`(c_x, c_y, w, h)` in the letterboxed frame and per-class sigmoid scores :math:`p_{ac}` (no
  objectness in v8/v11); boxes are mapped back to the photo by removing the padding and dividing by
  each axis' scale, then clipped to the photo;
* **post-processing** (``predict``'s defaults ``conf=0.25``, ``iou=0.7``, ``max_det=300``): each
  anchor's best class :math:`c^* = \arg\max_c p_{ac}`, kept if :math:`p_{ac^*} >` ``conf``, then
  class-aware NMS at IoU ``iou`` in the letterboxed frame, best first, at most ``max_det``.

Default layer: the finest neck output feeding the head (``Detect.f[0]``, P3 at stride 8, e.g.
``net.model.15`` in YOLOv8): it feeds the P3 head directly and the P4 and P5 heads through the
bottom-up path, so every detection's gradient reaches it (the choice is stated in the card's
``extra["layer_choice"]``; ``extra["neck_layers"]`` names the three scales for ``layer=``).

Nothing is downloaded: ``YOLO_OFFLINE=1`` is set before Ultralytics is imported (unless the user
set it), so it does not probe the network at import; a ``.pt`` must exist on disk; camlens never
calls ``predict``, so no font or update check runs. Importing Ultralytics the first time creates its
settings file (``~/.config/Ultralytics`` or ``$YOLO_CONFIG_DIR``); nothing is written during a call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.errors import CamlensError, InputError
from camlens.models.card import ModelCard, attach_card
from camlens.models.detectors.base import Candidates, DetectorAdapter, FrameTransform
from camlens.models.preprocess import Preprocess
from camlens.models.tasks import Frames

YOLO_PREFIX = "yolo:"
#: suffixes of Ultralytics' exported formats (not PyTorch: no gradients to explain with)
EXPORTED = (
    ".engine",
    ".onnx",
    ".torchscript",
    ".tflite",
    ".pb",
    ".mlpackage",
    ".mlmodel",
    ".xml",
    ".bin",
    ".param",
    "_openvino_model",
    "_saved_model",
    "_ncnn_model",
    "_paddle_model",
    "_web_model",
    "_mnn",
    ".mnn",
    ".rknn",
)
PAD_VALUE = 114 / 255


def ultralytics_yolo() -> Any:
    """The ``ultralytics.YOLO`` class (Ultralytics imported offline), or a clear error."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # no DNS probe at import
    os.environ.setdefault("YOLO_VERBOSE", "False")
    import numpy as np
    from PIL import Image

    opener = Image.open
    np_print, torch_print = np.get_printoptions(), torch._tensor_str.get_printoptions()
    try:
        from ultralytics import YOLO  # optional extra (AGPL-3.0): imported only for YOLO models
    except ImportError as exc:
        raise CamlensError(
            "YOLO models need Ultralytics, an optional dependency (AGPL-3.0): pip install 'camlens[yolo]'"
        ) from exc
    finally:
        # Ultralytics replaces PIL.Image.open process-wide at import (an unidentified image then tries
        # to install and import pi-heif) and sets numpy's and torch's print options (a float formatter:
        # every array the user prints, and any repr-based digest, changed): importing it here must not
        # change the user's process
        Image.open = opener
        np.set_printoptions(**np_print)
        torch.set_printoptions(**torch_print)
    return YOLO


def is_yolo(model: Any) -> bool:
    """Whether ``model`` is an ``ultralytics.YOLO`` object or an Ultralytics ``DetectionModel``
    (checked by type name: Ultralytics is not imported for this)."""
    names = {c.__name__ for c in type(model).__mro__}
    return bool(names & {"YOLO", "DetectionModel", "ClassificationModel"}) and type(model).__module__.startswith(
        "ultralytics"
    )


def _check_path(spec: str) -> str:
    low = spec.lower().rstrip("/\\")
    if low.endswith(EXPORTED) or (Path(spec).is_dir() and not low.endswith((".pt", ".yaml", ".yml"))):
        raise CamlensError(
            f"{spec} is an exported YOLO model (TensorRT engine, ONNX, TorchScript, OpenVINO…): it has no "
            "gradients and no layers camlens can hook. Pass the PyTorch checkpoint it was exported from "
            "(yolo:best.pt), or a black-box method with a scoring function"
        )
    if low.endswith(".pt"):
        if not Path(spec).is_file():
            raise CamlensError(
                f"{spec}: no such file. camlens never downloads weights: pass the path of a .pt checkpoint you "
                "have, or a model .yaml (e.g. yolo:yolov8n.yaml) for random weights"
            )
        return spec
    if low.endswith((".yaml", ".yml")):
        return spec
    raise CamlensError(
        f"yolo:{spec}: expected a .pt checkpoint or a model .yaml (yolo:best.pt, yolo:yolov8n.yaml, yolo:yolo11n.yaml)"
    )


class Letterbox(FrameTransform):
    """YOLO's letterbox (see the module docstring): images -> ``(N, 3, H', W')`` and Frames."""

    def __init__(self, imgsz: int, stride: int, rect: bool = True) -> None:
        super().__init__()
        self.imgsz, self.stride, self.rect = int(imgsz), int(stride), bool(rect)

    def forward(self, images: list[torch.Tensor]) -> tuple[Any, Frames]:
        S = self.imgsz
        auto = self.rect and len({tuple(t.shape) for t in images}) == 1
        out, frames = [], Frames()
        for t in images:
            h, w = int(t.shape[-2]), int(t.shape[-1])
            r = min(S / h, S / w)
            nw, nh = max(round(w * r), 1), max(round(h * r), 1)
            dw, dh = S - nw, S - nh
            if auto:
                dw, dh = dw % self.stride, dh % self.stride
            top, bottom = round(dh / 2 - 0.1), round(dh / 2 + 0.1)
            left, right = round(dw / 2 - 0.1), round(dw / 2 + 0.1)
            if (nh, nw) != (h, w):
                t = F.interpolate(t[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            out.append(F.pad(t, (left, right, top, bottom), value=PAD_VALUE))
            frames.resized.append((nh, nw))
            frames.offsets.append((top, left))
        x = torch.stack(out)
        frames.padded = (int(x.shape[-2]), int(x.shape[-1]))
        return x, frames


@dataclass
class MaskCandidates(Candidates):
    """A segmentation model's candidates: each one's mask coefficients ``(A, nm)``, the image's
    prototypes ``(nm, mh, mw)`` over the letterboxed frame, and where the photo lies in it."""

    coeffs: torch.Tensor | None = None
    protos: torch.Tensor | None = None
    window: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, resized h, resized w
    frame: tuple[int, int] = (0, 0)  # the letterboxed frame (H', W')
    size: tuple[int, int] = (0, 0)  # the photo (H, W)

    def mask_logits(self, index: torch.Tensor) -> torch.Tensor:
        r"""Mask logits ``(D, H, W)`` of candidates ``index`` in the photo's pixels.

        The prototype combination :math:`m = c^\top P` lives on the prototype grid ``(mh, mw)``,
        ``s0 = H'/mh`` (4) frame pixels per cell. It is upsampled (bilinear) by the smallest
        :math:`f \in \{1, 2, 4\}` for which the photo's window in the letterboxed frame (top, left,
        height, width) falls on whole cells of ``s0/f`` pixels, the window cropped, and resized
        (bilinear) to ``(H, W)`` — the sampling ``predict(retina_masks=True)`` does."""
        assert self.coeffs is not None and self.protos is not None
        nm, mh, mw = self.protos.shape
        m = (self.coeffs[index] @ self.protos.float().reshape(nm, -1)).reshape(-1, 1, mh, mw)
        top, left, nh, nw = self.window
        s0 = self.frame[0] // mh
        f = next((f for f in (1, 2) if all(v % (s0 // f) == 0 for v in self.window)), s0)
        if f > 1:
            m = F.interpolate(m, size=(mh * f, mw * f), mode="bilinear", align_corners=False)
        s = s0 // f
        m = m[..., top // s : (top + nh) // s, left // s : (left + nw) // s]
        if tuple(m.shape[-2:]) != self.size:
            m = F.interpolate(m, size=self.size, mode="bilinear", align_corners=False)
        return m[:, 0]


def box_crop(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(D, H, W)`` bool: pixel ``(i, j)`` is inside box ``(x0, y0, x1, y1)`` when ``x0 <= j < x1``
    and ``y0 <= i < y1`` (pixel indices against box coordinates, as Ultralytics crops its masks)."""
    h, w = size
    b = boxes.detach()[:, :, None, None]
    cols = torch.arange(w, device=boxes.device, dtype=b.dtype)[None, None, :]
    rows = torch.arange(h, device=boxes.device, dtype=b.dtype)[None, :, None]
    return (cols >= b[:, 0]) & (cols < b[:, 2]) & (rows >= b[:, 1]) & (rows < b[:, 3])


class YoloAdapter(DetectorAdapter):
    """An Ultralytics detection (or segmentation) network as a camlens detector.

    A segmentation model's detections also carry ``"mask_logits"`` ``(D, H, W)`` (differentiable,
    :meth:`MaskCandidates.mask_logits`) and ``"masks"`` ``(D, H, W)`` bool: logit > 0 inside the
    detection's box (``predict``'s instance masks with ``retina_masks=True``); detections whose
    mask is empty are dropped, as ``predict`` drops them.

    Args:
        net: the ``DetectionModel`` / ``SegmentationModel`` (``YOLO(...).model``).
        names: class names by id.
        imgsz, conf, iou, max_det: as ``YOLO.predict``'s (defaults 640, 0.25, 0.7, 300).
        rect: pad one image (or images of one size) only to the stride (``predict``'s
            behaviour); ``False``: always to ``imgsz x imgsz`` (what ``predict`` does for images of
            different sizes), so that an image's map does not depend on its batch.
    """

    family = "YOLO"

    def __init__(
        self,
        net: nn.Module,
        names: Any,
        *,
        imgsz: int = 640,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        rect: bool = True,
    ) -> None:
        body = cast(Any, net)
        head = body.model[-1]
        if type(head).__name__ not in ("Detect", "Segment"):
            raise CamlensError(
                f"camlens explains YOLO detection, segmentation and classification models (detect, segment, "
                f"classify); this one's head is {type(head).__name__} ({getattr(net, 'task', '?')} task: pose and "
                "OBB are not supported yet)"
            )
        if getattr(head, "end2end", False):
            raise CamlensError(
                "this YOLO head is end-to-end (NMS-free, e.g. YOLOv10/YOLO26): not supported yet; use a v8/v11 model"
            )
        stride = int(max(int(s) for s in body.stride)) if hasattr(net, "stride") else 32
        labels = dict(names) if isinstance(names, dict) else dict(enumerate(names))
        super().__init__(net, Letterbox(imgsz, stride, rect), [str(labels[i]) for i in range(len(labels))])
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)
        self.nc = int(cast(Any, head).nc)
        self.segment = type(head).__name__ == "Segment"

    @property
    def threshold_hint(self) -> str:
        return f"the YOLO post-processing keeps scores > conf={self.conf:g}: load it with conf=..."

    def decode(self, raw: Any, frames: Frames, sizes: list[tuple[int, int]]) -> list[Candidates]:
        y = raw[0] if isinstance(raw, (tuple, list)) else raw
        protos = None
        if isinstance(y, (tuple, list)):  # segmentation: (boxes + scores + mask coefficients, prototypes)
            y, protos = y[0], y[1]
        y = y.transpose(1, 2)  # (N, A, 4 + C [+ masks])
        cx, cy, w, h = y[..., :4].unbind(-1)
        frame = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
        out = []
        for i, (H, W) in enumerate(sizes):
            (nh, nw), (top, left) = frames.resized[i], frames.offsets[i]
            shift = frame.new_tensor([left, top, left, top])
            gain = frame.new_tensor([nw / W, nh / H, nw / W, nh / H])
            b = (frame[i] - shift) / gain
            b = torch.stack([b[:, 0].clamp(0, W), b[:, 1].clamp(0, H), b[:, 2].clamp(0, W), b[:, 3].clamp(0, H)], -1)
            if protos is None:
                out.append(Candidates(b, y[i, :, 4 : 4 + self.nc], frame_boxes=frame[i]))
                continue
            out.append(
                MaskCandidates(
                    b,
                    y[i, :, 4 : 4 + self.nc],
                    frame_boxes=frame[i],
                    coeffs=y[i, :, 4 + self.nc :],
                    protos=protos[i],
                    window=(top, left, nh, nw),
                    frame=cast(tuple[int, int], frames.padded),
                    size=(H, W),
                )
            )
        return out

    def forward(self, images: Any) -> list[dict[str, torch.Tensor]]:
        out = []
        for c in self.candidates(images):
            index, labels = self.select(c)
            det = c.take(index, labels)
            if isinstance(c, MaskCandidates):
                logits = c.mask_logits(index)
                masks = (logits.detach() > 0) & box_crop(det["boxes"], c.size)
                keep = masks.flatten(1).any(1).nonzero().flatten()  # predict drops empty masks
                det = {k: v[keep] for k, v in det.items()} | {"mask_logits": logits[keep], "masks": masks[keep]}
            out.append(det)
        return out

    def select(self, cands: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        import torchvision  # heavy; Ultralytics depends on it anyway

        s, labels = cands.scores.detach().max(1)
        keep = (s > self.conf).nonzero().flatten()
        assert cands.frame_boxes is not None
        boxes = cands.frame_boxes.detach()[keep]
        kept = torchvision.ops.batched_nms(boxes, s[keep], labels[keep], self.iou)[: self.max_det]
        index = keep[kept]
        return index, labels[index]

    def neck_layers(self) -> dict[str, str]:
        """``{"P3/8": "net.model.15", …}``: the neck outputs feeding the head, by scale."""
        head = cast(Any, self.net).model[-1]
        strides = [int(s) for s in getattr(head, "stride", [])] or [8 * 2**i for i in range(len(head.f))]
        return {f"P{s.bit_length() - 1}/{s}": f"net.model.{f}" for f, s in zip(head.f, strides)}

    def default_layer(self) -> tuple[str, str]:
        scale, name = next(iter(self.neck_layers().items()))
        return name, (
            f"the finest neck output feeding the head ({scale}, {name}): it feeds that scale's head directly and "
            "the coarser heads through the bottom-up path, so every detection's gradient reaches it"
        )


class YoloClassifier(nn.Module):
    """An Ultralytics classification network (``yolov8n-cls``) as a plain classifier: images ->
    logits ``(N, C)``. Its ``Classify`` head returns ``(softmax, logits)`` in eval mode and the
    logits in training mode; camlens explains the logits (``predict``'s ``probs`` are their
    softmax)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y[1] if isinstance(y, (tuple, list)) else y


def yolo_classifier(net: nn.Module, names: Any, imgsz: int = 224) -> nn.Module:
    """A :class:`YoloClassifier` with its card: ``predict``'s preprocessing (RGB in [0, 1], shorter
    side resized to ``imgsz`` and centre-cropped to ``imgsz x imgsz``, no normalization), the class
    names, and the head's 1x1 convolution as the default layer (its output is pooled into the
    linear classifier: CAM's layer)."""
    head = cast(Any, net).model[-1]
    labels = dict(names) if isinstance(names, dict) else dict(enumerate(names))
    pp = Preprocess((int(imgsz), int(imgsz)), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), resize="center_crop", name="yolo-cls")
    layer = f"net.model.{len(cast(Any, net).model) - 1}.conv"
    why = f"the classify head's 1x1 convolution ({layer}): its output is average-pooled into the linear classifier"
    card = ModelCard(
        f"yolo:{type(net).__name__}",
        pp,
        [str(labels[i]) for i in range(len(labels))],
        layer=layer if hasattr(head, "conv") else None,
        extra={"task": "classification", "layer_choice": why, "imgsz": int(imgsz)},
    )
    return attach_card(YoloClassifier(net), card)


def yolo_adapter(model: Any, **options: Any) -> nn.Module:
    """An ``ultralytics.YOLO`` object (or its ``DetectionModel``) -> a :class:`YoloAdapter` with its
    card (options: ``imgsz``, ``conf``, ``iou``, ``max_det``, ``rect``). A classification model
    comes back as its own network with a classifier's card."""
    net = getattr(model, "model", None) if type(model).__name__ == "YOLO" else model
    if not isinstance(net, nn.Module) or not hasattr(net, "model"):
        raise CamlensError(
            f"{type(model).__name__}: not a PyTorch YOLO model (an exported or hub model?); load the .pt checkpoint"
        )
    names = getattr(model, "names", None) or getattr(net, "names", None) or {}
    if type(cast(Any, net).model[-1]).__name__ == "Classify":
        unknown = sorted(set(options) - {"imgsz"})
        if unknown:
            raise CamlensError(f"a YOLO classification model takes imgsz= only, not {', '.join(unknown)}")
        return yolo_classifier(net, names, **options)
    adapter = YoloAdapter(net, names, **options)
    card = adapter.card(
        f"yolo:{type(net).__name__}",
        neck_layers=adapter.neck_layers(),
        imgsz=adapter.transform.imgsz,
        conf=adapter.conf,
        iou=adapter.iou,
    )
    return attach_card(adapter, card)


def load_yolo(spec: Any, **options: Any) -> nn.Module:
    """``yolo:PATH`` (a ``.pt`` checkpoint on disk or a model ``.yaml``: random weights), or a
    ``YOLO`` object -> a YOLO detector camlens explains (see :func:`yolo_adapter`)."""
    if isinstance(spec, (str, os.PathLike)):
        path = _check_path(os.fspath(spec))
        try:
            model = ultralytics_yolo()(path)
        except (FileNotFoundError, KeyError, ValueError, AttributeError) as exc:
            raise CamlensError(f"yolo:{path}: Ultralytics could not build it ({type(exc).__name__}: {exc})") from None
    else:
        model = spec
    if not is_yolo(model):
        raise InputError(f"expected an ultralytics.YOLO model or a yolo:PATH, not {type(model).__name__}")
    return yolo_adapter(model, **options)


__all__ = [
    "EXPORTED",
    "YOLO_PREFIX",
    "Letterbox",
    "MaskCandidates",
    "YoloAdapter",
    "YoloClassifier",
    "box_crop",
    "is_yolo",
    "load_yolo",
    "ultralytics_yolo",
    "yolo_adapter",
    "yolo_classifier",
]
