"""Segmentation targets: a class's logits summed over a region of a segmenter's output."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from camlens.base.errors import NonFiniteError, TargetError
from camlens.targets.base import Target, _plain


def _segmentation_logits(output: Any) -> torch.Tensor:
    if isinstance(output, Mapping):
        if "out" not in output:
            raise TargetError(f"a segmentation output dict needs an 'out' entry; it has {list(output)}")
        output = output["out"]
    if not isinstance(output, torch.Tensor) or output.dim() != 4:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TargetError(f"Segmentation needs (N, num_classes, H, W) logits (or a dict with 'out'); got {shape}")
    return output


class Segmentation(Target):
    r"""Explain why a region is labelled ``category``: the class logits summed over a mask.

    With logits :math:`O` ``(N, C, H, W)`` (or ``output["out"]``, torchvision's segmenters) and mask
    :math:`M` ``(H, W)``:

    .. math:: y_c = \sum_{ij} M_{ij}\, O_{c,ij},\qquad M = [\arg\max_{c'} O_{c',ij} = c]\ \text{by default}

    (the predicted region of the class, fixed on the clean pass; the same score as pytorch-grad-cam's
    ``SemanticSegmentationTarget``). A given ``mask`` (``(H, W)`` or ``(N, H, W)``, bool or
    weights, in the model input's frame; resized nearest to the logits' size) replaces it.

    Args:
        category: class id (or a list of ids, ``K`` = their number); ``None``: each image's
            predicted class of largest area other than ``background`` (``K = 1``).
        mask: the region, or ``None`` for the predicted one.
        background: class id ignored by ``category=None``.
    """

    def __init__(self, category: int | Sequence[int] | None, mask: Any = None, *, background: int = 0) -> None:
        cats = None if category is None else [category] if isinstance(category, (int, np.integer)) else list(category)
        if cats is not None and (not cats or not all(isinstance(c, (int, np.integer)) for c in cats)):
            raise TargetError(f"category must be a class id or a list of ids, not {category!r}")
        self.category = cats
        self.mask = mask
        self.background = background
        self._cats: torch.Tensor | None = None  # (N, K)
        self._masks: torch.Tensor | None = None  # (N, K, H, W) float

    @property
    def k(self) -> int:
        return 1 if self.category is None else len(self.category)

    @property
    def labels(self) -> torch.Tensor | None:  # type: ignore[override]
        return self._cats

    def bind(self, output: Any, model: nn.Module | None = None) -> Segmentation:
        logits = _segmentation_logits(output).detach()
        n, c, h, w = logits.shape
        pred = logits.argmax(dim=1)  # (N, H, W)
        if self.category is None:
            counts = torch.stack([(pred == i).flatten(1).sum(1) for i in range(c)], dim=1)  # (N, C)
            if 0 <= self.background < c:
                counts[:, self.background] = -1
            cats = counts.argmax(dim=1)[:, None]
        else:
            bad = [int(x) for x in self.category if not 0 <= int(x) < c]
            if bad:
                raise TargetError(f"category {bad[0]} is out of range: the segmenter has {c} classes (0..{c - 1})")
            cats = torch.tensor(self.category, dtype=torch.long)[None].expand(n, -1)
        cats = cats.to(logits.device)
        if self.mask is None:
            masks = (pred[:, None] == cats[:, :, None, None]).to(logits.dtype)
        else:
            m = _as_mask(self.mask).to(logits.device, logits.dtype)
            if m.dim() == 2:
                m = m[None].expand(n, -1, -1)
            if m.dim() != 3 or m.shape[0] != n:
                raise TargetError(f"mask must be (H, W) or (N, H, W) for {n} images; got {tuple(m.shape)}")
            if tuple(m.shape[-2:]) != (h, w):
                m = torch.nn.functional.interpolate(m[:, None], size=(h, w), mode="nearest")[:, 0]
            masks = m[:, None].expand(n, cats.shape[1], h, w)
        out = Segmentation(self.category, self.mask, background=self.background)
        out._cats, out._masks = cats.cpu(), masks
        return out

    def empty_rows(self, image_sizes: Sequence[tuple[int, int]] | None = None) -> dict[int, str]:
        """Images whose every region is empty (an all-zero mask, a class predicted nowhere)."""
        if self._masks is None or self._cats is None:
            raise TargetError("this Segmentation target is not bound to a forward pass yet (call .bind(output))")
        area = (self._masks != 0).flatten(2).sum(-1).cpu()  # (N, K)
        reasons = {}
        for i in (area.sum(1) == 0).nonzero().flatten().tolist():
            if self.mask is not None:
                reasons[i] = (
                    "the given mask selects no pixel (all zero, or too small to survive the resize to the "
                    f"logits' {self._masks.shape[-2]}x{self._masks.shape[-1]} grid); pass a mask with non-zero pixels"
                )
            else:
                cats = self._cats[i].tolist()
                reasons[i] = (
                    f"no pixel is predicted as class {cats if len(cats) > 1 else cats[0]}; pass a mask= of the "
                    "region to explain or another category"
                )
        return reasons

    @property
    def extras(self) -> dict[str, Any]:
        """``"masks"``: the explained regions ``(N, K, H, W)`` (bool) in the logits' frame."""
        return {} if self._masks is None else {"masks": (self._masks > 0).cpu().numpy()}

    def take(self, rows: Sequence[int]) -> Segmentation:
        if self._masks is None or self._cats is None:
            raise TargetError("this Segmentation target is not bound to a forward pass yet (call .bind(output))")
        out = Segmentation(self.category, self.mask, background=self.background)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        out._cats, out._masks = self._cats[idx], self._masks[idx.to(self._masks.device)]
        return out

    def __call__(self, output: Any) -> torch.Tensor:
        if self._masks is None or self._cats is None:
            raise TargetError("this Segmentation target is not bound to a forward pass yet (call .bind(output))")
        logits = _segmentation_logits(output)
        sel = logits.gather(1, self._cats.to(logits.device)[:, :, None, None].expand(-1, -1, *logits.shape[-2:]))
        return (sel * self._masks.to(logits.dtype)).sum(dim=(2, 3))


def _as_mask(mask: Any) -> torch.Tensor:
    """A given segmentation mask as a finite float tensor (bool masks become 0/1)."""
    try:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    except (TypeError, ValueError):
        raise TargetError(
            f"mask must be an (H, W) or (N, H, W) array of 0/1 or weights; got {type(mask).__name__}"
        ) from None
    if m.is_complex():
        raise TargetError(f"mask must hold bools or real numbers; got {m.dtype}")
    m = _plain(m).float()
    if not bool(torch.isfinite(m).all()):
        raise NonFiniteError("the Segmentation mask holds NaN or Inf values; pass a mask of 0/1 or finite weights")
    return m
