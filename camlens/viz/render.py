"""Colours and maps over photos: normalize, colorize, overlay, and THE colour rule (:func:`color_scale`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from camlens.base.errors import InputError
from camlens.base.ops import ULPS, minmax

#: colours (matplotlib names) used for boxes: predicted, ground truth


BOX_COLOR = "lime"


BOX_POINTS = 2.0  #: line width of a drawn box, in points


GT_COLOR = "white"


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------
def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def normalize(maps, *, ulps: float = ULPS):
    """Min–max normalize each ``(..., H, W)`` map to [0, 1]: ``(m - min) / (max - min)``, or 0 where
    the map is constant up to rounding (see :func:`camlens.base.ops.minmax`). Returns the input's type
    (arrays as float32)."""
    if isinstance(maps, torch.Tensor):
        return minmax(maps, ulps=ulps)
    return minmax(torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)), ulps=ulps).numpy()


def resize_map(m, size: Sequence[int]) -> np.ndarray:
    """Resize one ``(h, w)`` map to ``size = (H, W)`` (bilinear, ``align_corners=False``)."""
    t = (
        m.detach().float().cpu()
        if isinstance(m, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(m, np.float32))
    )
    if t.dim() != 2:
        raise InputError(f"expected one (H, W) map, got shape {tuple(t.shape)}")
    if tuple(t.shape) == tuple(size):
        return t.numpy().astype(np.float32, copy=True)
    return F.interpolate(t[None, None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


@functools.lru_cache(maxsize=64)
def colormap_lut(cmap: str = "jet") -> np.ndarray:
    """The ``(256, 3)`` uint8 table of a matplotlib colormap: entry ``i`` is ``cmap(i)`` rounded, so
    ``lut[min(int(v · 256), 255)]`` is exactly ``colorize`` of ``v`` in [0, 1] (matplotlib's own
    quantization of a float to its 256 colours)."""
    import matplotlib

    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError:
        raise InputError(f"unknown matplotlib colormap {cmap!r}; try 'jet', 'viridis', 'inferno'") from None
    lut = (cm(np.arange(cm.N))[:, :3] * 255 + 0.5).astype(np.uint8)
    if len(lut) != 256:  # a colormap with another number of colours: sample it at 256 levels
        lut = (cm(np.linspace(0.0, 1.0, 256))[:, :3] * 255 + 0.5).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def _lut_index(v: np.ndarray) -> np.ndarray:
    """Float32 values in [0, 1] -> colour indices ``min(int(v · 256), 255)`` (NaN -> 0)."""
    x = np.nan_to_num(np.asarray(v, dtype=np.float32), nan=0.0) * np.float32(256)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def colorize(m, cmap: str = "jet", *, normalized: bool = False) -> np.ndarray:
    """An ``(H, W)`` map -> ``(H, W, 3)`` uint8 RGB through a matplotlib colormap (a lookup table,
    :func:`colormap_lut`, equal to calling the colormap).

    The map is min–max normalized first unless ``normalized=True`` (then values are clipped to [0, 1]).
    """
    lut = colormap_lut(cmap)
    v = np.clip(_np(m).astype(np.float32), 0, 1) if normalized else normalize(_np(m).astype(np.float32))
    return lut[_lut_index(v)]


def overlay(image: np.ndarray, m, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a heatmap over an ``(H, W, 3)`` uint8 image: ``(1 - α) · image + α · colorize(map)``.

    The map (any resolution) is min–max normalized **at its own resolution** (cheap on a small
    map; bilinear resizing keeps values in [0, 1] and the image corners exact), then resized
    bilinearly to the image and coloured through a lookup table: NumPy only, no figure.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"overlay needs an (H, W, 3) RGB image, got shape {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    lut = colormap_lut(cmap)
    small = normalize(_np(m).astype(np.float32))
    heat = lut[_lut_index(resize_map(small, img.shape[:2]))]
    out = np.multiply(heat, np.float32(alpha), dtype=np.float32)
    out += np.multiply(img, np.float32(1.0 - alpha), dtype=np.float32)
    out += np.float32(0.5)
    return out.astype(np.uint8)  # a convex blend of uint8 values: within [0.5, 255.5) before truncation


#: colormap of signed maps: red positive, white zero, blue negative
DIVERGING_CMAP = "RdBu_r"


#: pixel maps are clipped at this percentile of |value| (a few extreme pixels would wash out the rest)
PIXEL_PERCENTILE = 99.5


#: a map "has both signs" when its smaller side exceeds this fraction of its largest magnitude
SIGN_TOLERANCE = 1e-2


@dataclass(frozen=True)
class ColorScale:
    """How map values become colours: values ``lo .. hi`` go to the positions ``span`` of ``cmap``.

    ``kind`` follows the one rule of :func:`color_scale`: ``"sequential"`` (a map of one sign,
    ``cmap``), ``"diverging"`` (both signs: ``±L``, zero at the diverging colormap's white centre),
    ``"negative"`` (every value ≤ 0: ``[-L, 0]`` on the diverging colormap's blue half, so "against"
    stays blue and the scale is not half wasted). ``shared``: one scale for several maps.
    """

    kind: str
    lo: float
    hi: float
    cmap: str
    pixel: bool = False
    shared: bool = False

    @property
    def span(self) -> tuple[float, float]:
        """The part of the colormap used: ``(0, 0.5)`` (its lower half) for ``"negative"``."""
        return (0.0, 0.5) if self.kind == "negative" else (0.0, 1.0)

    def unit(self, v: np.ndarray) -> np.ndarray:
        """Values -> ``[0, 1]`` along the scale (``(v - lo) / (hi - lo)``, clipped; a constant scale -> 0)."""
        d = self.hi - self.lo
        if not d > 0:
            return np.zeros(np.shape(v), np.float64)
        return np.clip((np.asarray(v, np.float64) - self.lo) / d, 0.0, 1.0)

    def position(self, v: np.ndarray) -> np.ndarray:
        """Values -> positions in ``cmap`` (``[0, 1]``), the lookup-table index of :func:`colorize`."""
        a, b = self.span
        return a + (b - a) * self.unit(v)

    def strength(self, v: np.ndarray) -> np.ndarray:
        """``|v| / L`` in ``[0, 1]`` for diverging and negative scales (opacity: zero stays untinted),
        the position on the scale for sequential ones."""
        if self.kind == "sequential":
            return self.unit(v)
        lim = max(abs(self.lo), abs(self.hi))
        return np.clip(np.abs(np.asarray(v, np.float64)) / lim, 0.0, 1.0) if lim > 0 else np.zeros(np.shape(v))

    def colors(self, n: int = 256) -> np.ndarray:
        """``(n, 3)`` uint8: the colours from ``lo`` to ``hi`` (a colorbar's gradient)."""
        pos = np.linspace(*self.span, n)
        return colormap_lut(self.cmap)[_lut_index(pos.astype(np.float32))]

    def to_dict(self) -> dict[str, Any]:
        """For JSON summaries: ``{"kind", "min", "max", "colormap", "shared"}``."""
        return {"kind": self.kind, "min": self.lo, "max": self.hi, "colormap": self.cmap, "shared": self.shared}


def _finite(m) -> np.ndarray:
    v = _np(m).astype(np.float64).ravel()
    return v[np.isfinite(v)]


def color_scale(
    m,
    *,
    pixel: bool = False,
    cmap: str = "jet",
    diverging_cmap: str = DIVERGING_CMAP,
    anchored: bool = False,
) -> ColorScale:
    """THE colour rule of every camlens picture (figures, saved PNGs, the web app), from the values alone:

    * **both signs** (each side beyond :data:`SIGN_TOLERANCE` of the largest ``|m|``): ``diverging_cmap``
      centred at zero, limits ``±L`` (``L`` = max ``|m|``; pixel maps: its :data:`PIXEL_PERCENTILE`
      percentile) — red "for", blue "against", white "none";
    * **all ≥ 0** (Grad-CAM, CAM of a top class, saliency…): ``cmap`` over ``[min, max]`` (pixel maps:
      the percentiles ``100 - p .. p``), the full colormap — contrast even when the map never nears
      zero (CAM of a top class, 0.84 .. 21.65, is not a pale tint on a ``±21.65`` scale);
      ``anchored=True`` starts it at 0 (a scale shared by several maps, where ratios must show);
    * **all ≤ 0** (CAM of an absent class): ``[-L, 0]`` on the diverging colormap's blue half.

    ``m``: one map, or several (any shape: the scale covers all their values, see
    :func:`shared_color_scale`).
    """
    v = _finite(m)
    if v.size == 0:
        return ColorScale("sequential", 0.0, 1.0, cmap, pixel)
    lo, hi = float(v.min()), float(v.max())
    tol = SIGN_TOLERANCE * max(abs(lo), abs(hi))
    if lo < -tol or (lo < 0 and hi <= 0):
        if hi > tol:  # both signs
            lim = float(np.percentile(np.abs(v), PIXEL_PERCENTILE)) if pixel else max(-lo, hi)
            lim = lim if lim > 0 else max(-lo, hi)
            return ColorScale("diverging", -lim, lim, diverging_cmap, pixel)
        lim = float(np.percentile(-v, PIXEL_PERCENTILE)) if pixel else -lo
        lim = lim if lim > 0 else -lo
        return ColorScale("negative", -lim, 0.0, diverging_cmap, pixel)
    if pixel:
        lo, hi = (float(q) for q in np.percentile(v, [100 - PIXEL_PERCENTILE, PIXEL_PERCENTILE]))
    if anchored:  # from 0: values below it (within the sign tolerance) take the first colour
        lo = 0.0
    return ColorScale("sequential", lo, hi, cmap, pixel)


def shared_color_scale(maps: Sequence | torch.Tensor | np.ndarray, **kwargs: Any) -> ColorScale:
    """One :func:`color_scale` for several maps (the classes of one image, one method), anchored at
    zero, so that a map's colours say how strong it is next to the others: on a shared sequential
    scale ``[0, M]`` (``M`` the largest value of all), a map whose maximum is half of ``M`` reaches half
    way up the colormap. Maps of different methods are in different units: share within a method."""
    vals = np.concatenate([_finite(m) for m in maps]) if len(maps) else np.zeros(0)
    return replace(color_scale(vals, anchored=True, **kwargs), shared=True)


def _opacity(u: np.ndarray, alpha: float, pixel: bool, gamma: float = 1.0) -> np.ndarray:
    """Per-pixel opacity from a magnitude ``u`` in [0, 1]: ``α·u`` for layer maps, ``min(1, 2α)·u^γ``
    for sparse pixel maps (0 always stays untinted; ``γ = 1/2`` for signed pixel maps, whose values
    split between two colours, keeps their mid-strength attributions visible)."""
    op = np.minimum(1.0, 2 * alpha) * u**gamma if pixel else alpha * u
    return op[..., None]


def render_map(
    image: np.ndarray,
    m,
    *,
    pixel: bool = False,
    alpha: float = 0.5,
    cmap: str = "jet",
    diverging_cmap: str = DIVERGING_CMAP,
    scale: ColorScale | None = None,
) -> tuple[np.ndarray, ColorScale]:
    """The one rendering of a map over its image, used by ``show()``, the saved PNGs and the montage.

    Returns the ``(H, W, 3)`` uint8 overlay and its :class:`ColorScale` (for a colorbar). The scale is
    ``scale`` when given (e.g. :func:`shared_color_scale` of one image's classes), else
    :func:`color_scale` of ``m`` (the rule: both signs -> diverging around zero; one sign ->
    the full ``cmap`` or the diverging colormap's blue half for negative maps).

    * **diverging / negative** scales: blended with opacity ``α · |m| / L`` (pixel maps:
      ``min(1, 2α) · √(|m| / L)``): zero leaves the photo as it is, positive evidence turns red,
      negative blue.
    * **sequential layer maps** (Grad-CAM family, Score-CAM, CAM of a top class): ``cmap`` blended with
      a uniform opacity ``α`` (the notebooks' look).
    * **sequential pixel maps** (saliency, guided backprop…): clipped at the percentiles, ``cmap``
      blended with opacity ``min(1, 2α) · value``: the many near-zero pixels leave the photo
      untinted (a uniform blend tinted the whole photo blue).

    A fine checkerboard in pixel maps is not a rendering artifact: gradients through strided
    convolutions (EfficientNet-Lite0's stem is a 3x3 stride-2 convolution) alternate between the
    pixels a kernel reaches often and those it reaches rarely (Odena et al., "Deconvolution and
    Checkerboard Artifacts", Distill 2016). It is drawn as it is; SmoothGrad averages it away.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3:
        raise InputError(f"render_map needs an (H, W, 3) RGB image, got shape {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    own = scale is None
    sc = color_scale(m, pixel=pixel, cmap=cmap, diverging_cmap=diverging_cmap) if scale is None else scale
    if own and sc.kind == "sequential" and not pixel:  # the classic overlay, normalized at the map's resolution
        return overlay(img, m, alpha, cmap), sc
    v = np.nan_to_num(resize_map(m, img.shape[:2]).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    heat = colormap_lut(sc.cmap)[_lut_index(sc.position(v).astype(np.float32))].astype(np.float64)
    if sc.kind == "sequential":
        op = _opacity(sc.unit(v), alpha, True) if sc.pixel else np.full((*v.shape, 1), alpha)
    else:
        op = _opacity(sc.strength(v), alpha, sc.pixel, gamma=0.5)
    out = (1.0 - op) * img.astype(np.float64) + op * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), sc


def attribution_rgb(attr, percentile: float = 99.5) -> np.ndarray:
    """A pixel attribution ``(3, H, W)`` -> ``(H, W, 3)`` float in [0, 1] shown as colour:
    ``clip(0.5 + 0.5 · a / q, 0, 1)`` with ``q`` the ``percentile`` of ``|a|`` (grey = 0; the sign and
    the channel stay visible; a few extreme pixels do not wash the rest out)."""
    a = _np(attr).astype(np.float64)
    if a.ndim != 3:
        raise InputError(f"expected a (C, H, W) attribution, got shape {a.shape}")
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    a = a[:3].transpose(1, 2, 0)
    peak = np.percentile(np.abs(a), percentile) if percentile < 100 else np.abs(a).max()
    if not peak > 0:
        peak = np.abs(a).max()
    return np.clip(0.5 + 0.5 * a / peak, 0, 1) if peak > 0 else np.full(a.shape, 0.5)


def attribution_heat(attr, percentile: float = 99.5) -> np.ndarray:
    """A pixel attribution ``(C, H, W)`` -> ``(H, W)`` heat: ``Σ_c |a_c|`` (or a ready ``(H, W)`` map),
    clipped at its ``percentile`` and min–max normalized to [0, 1]."""
    a = _np(attr).astype(np.float32)
    if a.ndim == 3:
        a = np.abs(a).sum(0)
    elif a.ndim != 2:
        raise InputError(f"expected a (C, H, W) attribution or an (H, W) map, got shape {a.shape}")
    if percentile < 100 and a.size:
        lo, hi = np.percentile(a, [100 - percentile, percentile])
        if hi > lo:
            a = np.clip(a, lo, hi)
    return normalize(a)
