"""The :class:`Explanation` returned by :func:`camlens.explain`."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .localization import localize
from .ops import ULPS, minmax


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)``: 1-D linear interpolation with ``align_corners=False`` as a matrix (column
    ``j`` is :func:`torch.nn.functional.interpolate` of the unit impulse at ``j``)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0].T.contiguous()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    r"""Bilinear resize of float32 ``(..., h, w)`` maps to ``size = (H, W)`` (``align_corners=False``).

    The same numbers as ``F.interpolate(..., mode="bilinear", align_corners=False)`` (to float
    rounding), computed as :math:`W_y\,M\,W_x^T` with the two 1-D interpolation matrices: two
    small matrix products instead of a gather per output pixel (EfficientNet-Lite0, 16 images x
    100 classes, 7x7 -> 224x224, CPU, 1 thread: 140 ms instead of 230 ms).
    """
    m = maps.float()
    h, w = m.shape[-2:]
    H, W = int(size[0]), int(size[1])
    if (h, w) == (H, W):
        return m.clone()
    wy = _interp_matrix(h, H).to(device=m.device, dtype=m.dtype)
    wx = _interp_matrix(w, W).to(device=m.device, dtype=m.dtype)
    return torch.matmul(torch.matmul(wy, m), wx.T)


#: extras that hold one entry per image (target objects' boxes and masks), sliced by ``select``
PER_IMAGE_EXTRAS = ("boxes", "masks", "image_sizes")


@dataclass
class Explanation:
    """Maps for ``N`` images x ``K`` target classes, plus what produced them.

    Attributes:
        maps: float32 ``(N, K, H, W)`` at input resolution, un-normalized.
        raw: the method's unreduced output: ``(N, K, h, w)`` at feature resolution for layer
            methods (CAM family), ``(N, K, C, H, W)`` for pixel methods.
        classes: ``(N, K)`` class ids (``-1`` for a callable target).
        scores: ``(N, K)`` target logits (or callable scores).
        probs: ``(N, K)`` softmax probabilities of those classes (NaN for callable targets).
        method: registered method name.
        layer: description of the captured layer (``None`` for pixel methods without one).
        class_names: all class names of the model, if known.
        images: the original RGB uint8 images when ``inputs`` were images (for overlays).
        sources: a name per image (file stem, or ``image0``…), used to name output files.
        model_name: the model's zoo name, if known.
        extras: method-specific results (e.g. Integrated Gradients' completeness error), and what
            a target object adds: ``"boxes"`` ``(N, K, 4)`` explained boxes of a detector (original
            pixels, NaN rows: padding), ``"masks"`` ``(N, K, h, w)`` explained regions of a
            segmenter, ``"image_sizes"`` for a batch of different-size images.
        logits: the model's ``(N, num_classes)`` logits from the same forward pass (``None`` when
            unknown), so that :meth:`top` needs no second forward.
    """

    maps: torch.Tensor
    raw: torch.Tensor
    classes: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    method: str
    layer: str | None = None
    class_names: list[str] | None = None
    images: list[np.ndarray] | None = None
    sources: list[str] | None = None
    model_name: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.maps.shape)

    def __len__(self) -> int:
        return int(self.maps.shape[0])

    def __repr__(self) -> str:
        n, k, h, w = self.maps.shape
        return (
            f"Explanation(method={self.method!r}, layer={self.layer!r}, N={n}, K={k}, maps={h}x{w}, "
            f"classes={self.labels()})"
        )

    def normalized(self, *, ulps: float = ULPS) -> torch.Tensor:
        """Maps min-max normalized per map to [0, 1] by :func:`camlens.ops.minmax`: a map constant up
        to rounding (range within ``ulps`` float32 units of its magnitude) -> zeros; never NaN."""
        return minmax(self.maps.float(), ulps=ulps)

    def labels(self) -> list[list[str]]:
        """Class names (or ids as strings) of ``classes``, ``(N, K)`` nested lists."""
        out = []
        for row in self.classes.tolist():
            out.append(
                [
                    "custom"
                    if c < 0
                    else (self.class_names[c] if self.class_names and c < len(self.class_names) else str(c))
                    for c in row
                ]
            )
        return out

    def top(self, k: int = 5) -> list[list[tuple[int, str, float]]]:
        """The model's ``k`` most probable classes per image, over all its logits (not only the
        explained targets): ``[[(class_id, name, probability), …], …]``, as :func:`camlens.predict`
        returns them, from the logits of the explaining forward pass (no second forward)."""
        if self.logits is None:
            raise InputError("this explanation carries no logits; use camlens.predict(model, images, topk=k)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"k must be an integer >= 1, not {k!r}")
        p = self.logits.detach().float().softmax(dim=1)
        v, i = p.topk(min(k, p.shape[1]), dim=1)
        names = self.class_names
        return [
            [(int(c), names[c] if names and c < len(names) else str(int(c)), float(q)) for q, c in zip(vr, ir)]
            for vr, ir in zip(v.tolist(), i.tolist())
        ]

    def to(self, device: torch.device | str) -> Explanation:
        """A copy with tensors on ``device``."""
        return replace(
            self,
            maps=self.maps.to(device),
            raw=self.raw.to(device),
            classes=self.classes.to(device),
            scores=self.scores.to(device),
            probs=self.probs.to(device),
            logits=None if self.logits is None else self.logits.to(device),
        )

    def cpu(self) -> Explanation:
        return self.to("cpu")

    def select(self, index) -> Explanation:
        """A sub-explanation for some images: ``exp.select([0, 2])`` or ``exp.select(slice(0, 4))``."""
        idx = [index] if isinstance(index, int) else index
        rows = list(range(len(self)))[idx] if isinstance(idx, slice) else list(idx)
        return replace(
            self,
            maps=self.maps[idx],
            raw=self.raw[idx],
            classes=self.classes[idx],
            scores=self.scores[idx],
            probs=self.probs[idx],
            logits=None if self.logits is None else self.logits[idx],
            images=[self.images[i] for i in rows] if self.images else None,
            sources=[self.sources[i] for i in rows] if self.sources else None,
            extras={
                k: ([v[i] for i in rows] if isinstance(v, list) else v[rows]) if k in PER_IMAGE_EXTRAS else v
                for k, v in self.extras.items()
            },
        )

    # --- localization, figures and export (see camlens.localize and camlens.viz) ---------------
    def boxes(self, threshold: float | None = None, **kwargs) -> np.ndarray:
        """Bounding boxes ``(N, K, 4)`` as ``(x0, y0, x1, y1)`` (exclusive), see :func:`camlens.localize`."""
        kw = dict(kwargs)
        if threshold is not None:
            kw["threshold"] = threshold
        return localize(self.maps, **kw)

    def show(self, **kwargs):
        """Display overlays in a notebook (returns the matplotlib figure)."""
        from .viz import explanation_figure  # lazy: figure code (matplotlib) only when asked for

        return explanation_figure(self, **kwargs)

    def save(self, directory: str | Path, **kwargs) -> list[Path]:
        """Write PNG overlays, ``.npy`` maps and a JSON summary to ``directory``; returns the paths."""
        from .viz import save_explanation  # lazy: figure code (matplotlib) only when asked for

        return save_explanation(self, directory, **kwargs)
