"""Preprocessing presets: image arrays to the normalized tensor a network expects.

``x = (resize(img) * scale - mean) / std`` per channel, in the channel order the network
was trained with. By default images are *stretched* to the input size (no crop), so maps
and boxes cover the whole image; ``resize="center_crop"`` gives the classic ImageNet
resize-shorter-side-then-crop; ``resize="none"`` keeps each image's own size (detectors,
which resize internally and report boxes in the original pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Preprocess:
    """How to turn RGB uint8 images into a model input batch."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    scale: float = 1.0 / 255.0
    channel_order: str = "RGB"
    resize: str = "stretch"
    name: str = field(default="imagenet", compare=False)

    def __post_init__(self) -> None:
        if self.channel_order not in ("RGB", "BGR"):
            raise ValueError(f"channel_order must be 'RGB' or 'BGR', not {self.channel_order!r}")
        if self.resize not in ("stretch", "center_crop", "none"):
            raise ValueError(f"resize must be 'stretch', 'center_crop' or 'none', not {self.resize!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        d = dict(d)
        for k in ("size", "mean", "std"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)

    def min_decode_size(self, size: tuple[int, int]) -> tuple[int, int] | None:
        """The smallest ``(H, W)`` an image of ``size`` ``(H, W)`` must be decoded at for this
        preprocessing to see all it uses (``None``: in full): the input ``size`` itself when
        stretching, the resized-before-crop size for ``center_crop``; ``resize="none"`` keeps the
        image's own size. :func:`camlens.base.io.decode_image` decodes a larger JPEG at the smallest
        1/2, 1/4, 1/8 scale that still covers it."""
        H, W = int(size[0]), int(size[1])
        h, w = self.size
        if self.resize == "none" or H < 1 or W < 1:
            return None
        if self.resize == "center_crop":
            s = max(h / H, w / W)
            h, w = max(h, math.ceil(H * s)), max(w, math.ceil(W * s))
        return None if h >= H and w >= W else (h, w)

    def resize_image(self, img: np.ndarray) -> torch.Tensor:
        """One HxWx3 uint8 array -> float ``(3, h, w)`` tensor in [0, 255] at ``size``."""
        t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        h, w = self.size
        if self.resize == "center_crop":
            H, W = t.shape[-2:]
            s = max(h / H, w / W)
            nh, nw = max(h, round(H * s)), max(w, round(W * s))
            t = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            top, left = (nh - h) // 2, (nw - w) // 2
            t = t[..., top : top + h, left : left + w]
        elif self.resize != "none" and tuple(t.shape[-2:]) != (h, w):
            t = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return t[0].clamp_(0, 255)

    def normalize(self, t: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` RGB in [0, 255] -> normalized network input."""
        if self.channel_order == "BGR":
            t = t.flip(1)
        mean = torch.tensor(self.mean, dtype=t.dtype, device=t.device)[:, None, None]
        std = torch.tensor(self.std, dtype=t.dtype, device=t.device)[:, None, None]
        return (t * self.scale - mean) / std

    def __call__(self, images: Sequence[np.ndarray], device: torch.device | str | None = None) -> torch.Tensor:
        """A list of HxWx3 uint8 RGB arrays -> ``(N, 3, H, W)`` float32 tensor."""
        batch = torch.stack([self.resize_image(img) for img in images])
        if device is not None:
            batch = batch.to(device)
        return self.normalize(batch)


#: torchvision's ImageNet normalization (most torchvision classifiers).
IMAGENET = Preprocess(name="imagenet")
#: EfficientNet-Lite's TensorFlow normalization: (x - 127) / 128 on 0..255 RGB.
EFFICIENTNET_LITE = Preprocess(mean=(127 / 255,) * 3, std=(128 / 255,) * 3, name="efficientnet_lite")
#: Caffe-style VGG (the notebooks): BGR, 0..255, per-channel mean subtraction, no scaling.
CAFFE_BGR = Preprocess(
    mean=(103.939, 116.779, 123.68), std=(1.0, 1.0, 1.0), scale=1.0, channel_order="BGR", name="caffe_bgr"
)

#: torchvision detectors: RGB in [0, 1] at the image's own size (the model normalizes and resizes).
UNIT_RGB = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="none", name="unit_rgb")

PRESETS = {p.name: p for p in (IMAGENET, EFFICIENTNET_LITE, CAFFE_BGR, UNIT_RGB)}
