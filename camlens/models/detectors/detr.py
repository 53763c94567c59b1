r"""DETR-family detectors from Hugging Face transformers: ``DetrForObjectDetection``,
``ConditionalDetrForObjectDetection`` and ``RTDetrForObjectDetection``.

Each of the :math:`Q` queries predicts class logits :math:`z_q` and a box :math:`(c_x, c_y, w, h)`
relative to the image. The candidates are the queries: boxes
:math:`(c_x - w/2, c_y - h/2, c_x + w/2, c_y + h/2)\cdot(W, H, W, H)` in the original image's pixels,
and per-class scores as the library's ``post_process_object_detection`` computes them:

* DETR (and RT-DETR with ``use_focal_loss=False``): :math:`p_q = \mathrm{softmax}(z_q)` without its
  last ("no object") entry; each query keeps its best class, kept when :math:`\max_c p_{qc} >` the
  threshold, in query order;
* Conditional DETR and RT-DETR (focal loss): :math:`p_{qc} = \sigma(z_{qc})`; the ``top_k`` best
  (query, class) pairs over all of them (Conditional DETR: 100, RT-DETR: :math:`Q`), best first, kept
  above the threshold — one query may give several detections of different classes.

The input: each image normalized with the ImageNet mean and std (the processors' default), resized
when ``size=(H, W)`` is given (bilinear; else taken at its own size), padded at the bottom and right
to the batch's largest with ``pixel_mask`` marking the pixels, as the processors do. Images of
different sizes explained together then see padding a lone image does not: give ``size=`` for
maps that do not depend on the batch.

Default layer: ``net.model.input_projection`` (DETR, Conditional DETR: the backbone's last feature
map projected to the transformer's width, which the encoder reads and every query attends to) or
``net.model.encoder_input_proj.<last>`` (RT-DETR: the coarsest level's projection, which feeds the
encoder's attention and, top-down, every level the decoder samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from camlens.base.errors import CamlensError, MethodError
from camlens.models.card import attach_card
from camlens.models.detectors.base import Candidates, DetectorAdapter, FrameTransform, as_image_list
from camlens.models.preprocess import IMAGENET
from camlens.models.tasks import Frames

#: class name -> (score kind, top_k: None = no top-k, 0 = the number of queries)
FAMILIES: dict[str, tuple[str, int | None]] = {
    "DetrForObjectDetection": ("softmax", None),
    "ConditionalDetrForObjectDetection": ("sigmoid", 100),
    "RTDetrForObjectDetection": ("sigmoid", 0),
}


@dataclass
class AttentionPass:
    """What :meth:`DetrAdapter.attention_pass` returns (see there)."""

    detections: list[dict[str, torch.Tensor]]
    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]
    cross: list[torch.Tensor]
    grid: tuple[int, int]


def is_detr(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face DETR-family detector this module adapts."""
    return isinstance(model, nn.Module) and type(model).__name__ in FAMILIES


class DetrTransform(FrameTransform):
    """Normalize (ImageNet mean/std), optionally resize to ``size``, pad bottom-right; the network's
    input is ``(pixel_values, pixel_mask)``."""

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.register_buffer("mean", torch.tensor(IMAGENET.mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET.std).view(3, 1, 1), persistent=False)

    def forward(self, images: list[torch.Tensor]) -> tuple[Any, Frames]:
        mean, std = cast(torch.Tensor, self.mean), cast(torch.Tensor, self.std)
        ims = [(t - mean.to(t)) / std.to(t) for t in images]
        if self.size is not None:
            ims = [F.interpolate(t[None], size=self.size, mode="bilinear", align_corners=False)[0] for t in ims]
        H, W = max(t.shape[-2] for t in ims), max(t.shape[-1] for t in ims)
        x = torch.stack([F.pad(t, (0, W - t.shape[-1], 0, H - t.shape[-2])) for t in ims])
        mask = torch.zeros(len(ims), H, W, dtype=torch.long, device=x.device)
        for i, t in enumerate(ims):
            mask[i, : t.shape[-2], : t.shape[-1]] = 1
        frames = Frames([(int(t.shape[-2]), int(t.shape[-1])) for t in ims], (int(H), int(W)))
        return (x, mask), frames


class DetrAdapter(DetectorAdapter):
    """A Hugging Face DETR-family detector as a camlens detector (see the module docstring).

    Args:
        net: a ``DetrForObjectDetection``, ``ConditionalDetrForObjectDetection`` or
            ``RTDetrForObjectDetection``.
        threshold: the score threshold of the post-processing (the library's default, 0.5).
        size: resize every image to ``(H, W)`` first; ``None``: each at its own size.
    """

    def __init__(self, net: nn.Module, threshold: float = 0.5, size: tuple[int, int] | None = None) -> None:
        name = type(net).__name__
        if name not in FAMILIES:
            raise CamlensError(f"{name} is not a DETR-family detector camlens knows ({', '.join(FAMILIES)})")
        labels = getattr(net.config, "id2label", None) or {}
        n = int(getattr(net.config, "num_labels", len(labels)))
        names = [str(labels.get(i, i)) for i in range(n)]
        super().__init__(net, DetrTransform(size), names)
        kind, top_k = FAMILIES[name]
        if name == "RTDetrForObjectDetection" and not getattr(net.config, "use_focal_loss", True):
            kind, top_k = "softmax", 0
        self.family = name.replace("ForObjectDetection", "")
        self.kind, self.top_k, self.threshold = kind, top_k, float(threshold)

    @property
    def threshold_hint(self) -> str:
        return (
            f"the detector keeps scores > threshold={self.threshold:g}: "
            "camlens.models.detectors.as_detector(model, threshold=...)"
        )

    def run(self, inputs: Any) -> Any:
        pixel_values, pixel_mask = inputs
        if self.family == "RTDetr":  # RT-DETR takes no pixel mask
            return self.net(pixel_values=pixel_values)
        return self.net(pixel_values=pixel_values, pixel_mask=pixel_mask)

    def decode(self, raw: Any, frames: Frames, sizes: list[tuple[int, int]]) -> list[Candidates]:
        logits, rel = raw.logits, raw.pred_boxes
        probs = logits.softmax(-1)[..., :-1] if self.kind == "softmax" else logits.sigmoid()
        cx, cy, w, h = rel.unbind(-1)
        xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
        out = []
        for i, (H, W) in enumerate(sizes):
            scale = xyxy.new_tensor([W, H, W, H])
            out.append(Candidates(xyxy[i] * scale, probs[i]))
        return out

    def select(self, cands: Candidates) -> tuple[torch.Tensor, torch.Tensor]:
        p = cands.scores.detach()
        if self.kind == "softmax" and self.top_k is None:
            s, labels = p.max(-1)
            keep = (s > self.threshold).nonzero().flatten()
            return keep, labels[keep]
        if self.kind == "softmax":  # RT-DETR without focal loss: best class per query, top Q (all)
            s, labels = p.max(-1)
            s, index = s.topk(len(s))
            keep = s > self.threshold
            return index[keep], labels[index][keep]
        q, c = p.shape
        k = min(self.top_k or q, q * c)
        s, flat = p.flatten().topk(k)
        keep = s > self.threshold
        return torch.div(flat, c, rounding_mode="floor")[keep], (flat % c)[keep]

    def attention_pass(self, images: Any) -> AttentionPass:
        """One forward that also returns the attention weights (eager attention for this call, the
        model's own implementation restored): encoder self-attention ``(N, heads, T, T)``, decoder
        self-attention ``(N, heads, Q, Q)`` and cross-attention ``(N, heads, Q, T)`` per layer, in the
        autograd graph; ``T`` tokens on the ``grid`` of the projected backbone map. DETR and
        Conditional DETR only (RT-DETR's deformable attention samples points, it has no such maps)."""
        if self.family == "RTDetr":
            raise MethodError(
                "RT-DETR's decoder uses deformable attention (sampled points), which has no attention maps to "
                "propagate; use gradcam or drise"
            )
        ims = as_image_list(images)
        inputs, frames = self.transform(ims)
        grid: dict[str, tuple[int, int]] = {}
        proj = cast(Any, self.net).model.input_projection

        def note(m: nn.Module, args: Any, out: torch.Tensor) -> None:
            grid["hw"] = (int(out.shape[-2]), int(out.shape[-1]))

        handle = proj.register_forward_hook(note)
        config = cast(Any, self.net).config
        impl = config._attn_implementation
        try:
            config._attn_implementation = "eager"  # sdpa returns no weights
            raw = self.net(pixel_values=inputs[0], pixel_mask=inputs[1], output_attentions=True)
        finally:
            config._attn_implementation = impl
            handle.remove()
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in ims]
        dets = [c.take(*self.select(c)) for c in self.decode(raw, frames, sizes)]
        return AttentionPass(
            dets, list(raw.encoder_attentions), list(raw.decoder_attentions), list(raw.cross_attentions), grid["hw"]
        )

    def default_layer(self) -> tuple[str, str]:
        if self.family == "RTDetr":
            last = len(cast(Any, self.net).model.encoder_input_proj) - 1
            return (
                f"net.model.encoder_input_proj.{last}",
                "the coarsest backbone level's projection: it feeds the encoder's attention and, top-down, "
                "every level the decoder samples",
            )
        return (
            "net.model.input_projection",
            "the backbone's last feature map projected to the transformer's width: the encoder reads it and "
            "every query attends to it",
        )


def detr_adapter(net: nn.Module, threshold: float = 0.5, size: Sequence[int] | None = None) -> DetrAdapter:
    """A :class:`DetrAdapter` with its card attached (see :func:`camlens.models.detectors.as_detector`)."""
    adapter = DetrAdapter(net, threshold, None if size is None else (int(size[0]), int(size[1])))
    attach_card(adapter, adapter.card(f"hf:{type(net).__name__}", threshold=adapter.threshold))
    return adapter


__all__ = ["FAMILIES", "AttentionPass", "DetrAdapter", "DetrTransform", "detr_adapter", "is_detr"]
