"""Figures and files: normalize, colorize, overlay, top-k / batch / pixel figures, and export.

Everything here builds :class:`matplotlib.figure.Figure` objects directly (no pyplot, no global
figure list, no display needed) and saves through the Agg canvas. In a notebook, a returned figure
displays itself as the cell's result.

* :func:`normalize` — per-map min–max to [0, 1] by :func:`camlens.base.ops.minmax` (maps constant up to
  rounding -> 0, never NaN): the function behind every overlay and colour map.
* :func:`colorize` — any matplotlib colormap (``"jet"`` by default, as in the notebooks).
* :func:`overlay` — ``(1 - α) · image + α · colormap(map)``, the map resized (bilinear) to the image.
* :func:`color_scale` — THE colour rule of every picture: both signs -> diverging around zero, one
  sign -> the whole colormap; :func:`shared_color_scale` — one scale for an image's classes;
  :func:`render_map` — a map over its photo by that rule (figures, saved PNGs, the montage).
* :func:`topk_figure`, :func:`batch_grid`, :func:`pixel_figure`, :func:`boxes_figure`,
  :func:`explanation_figure`, :func:`montage` (methods x classes) — the layouts;
  :func:`save_explanation` — PNG (with a colorbar), ``.npy`` and JSON.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from camlens._version import __version__, versions
from camlens.api.explanation import RANDOM_WEIGHTS, Explanation
from camlens.attribution.registry import methods
from camlens.base._util import numbered, rank_tags, with_options
from camlens.base.errors import InputError
from camlens.base.fsio import atomic_write, check_targets, safe_out_dir
from camlens.base.localization import DEFAULT_THRESHOLD, localize, map_boxes, photo_sizes, scale_boxes
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
    t = m.detach().float().cpu() if isinstance(m, torch.Tensor) else torch.from_numpy(np.asarray(m, np.float32))
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


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------
def _short(name: str, n: int = 28) -> str:
    name = name.split(",")[0].strip()  # ImageNet names: "tabby, tabby cat" -> "tabby"
    return name if len(name) <= n else name[: n - 1] + "…"


def ordinal(r: int) -> str:
    """``1`` -> ``"1st"``, ``2`` -> ``"2nd"``, ``11`` -> ``"11th"``, ``23`` -> ``"23rd"``."""
    suffix = "th" if 10 <= r % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(r % 10, "th")
    return f"{r}{suffix}"


def true_rank(exp: Explanation, i: int, k: int) -> int | None:
    """The 1-based rank of target ``k`` of image ``i`` among all classes, if known."""
    if exp.ranks is None or int(exp.classes[i, k]) < 0:
        return None
    return int(exp.ranks[i, k])


def target_label(exp: Explanation, i: int, k: int, *, rank: bool = True) -> str:
    """``"3rd: tabby (6.8%)"`` for image ``i``, target ``k``: the class's *true* rank among all the
    model's classes (from ``exp.ranks``; no rank when it is unknown), its name and probability.
    Class-agnostic methods (Eigen-CAM) name no class."""
    if exp.class_agnostic:
        return "class-agnostic (same map for every class)"
    c = int(exp.classes[i, k])
    name = _short(exp.labels()[i][k])
    p = float(exp.probs[i, k])
    what = f"{name} ({p:.1%})" if p == p else f"{name} (score {float(exp.scores[i, k]):.3g})"
    if c < 0:
        return f"custom target (score {float(exp.scores[i, k]):.3g})"
    r = true_rank(exp, i, k)
    return f"{ordinal(r)}: {what}" if rank and r is not None else what


def _label(v, class_names: Sequence[str] | None) -> str:
    if isinstance(v, (int, np.integer)) or (isinstance(v, torch.Tensor) and v.dim() == 0):
        v = int(v)
        return _short(class_names[v]) if class_names and 0 <= v < len(class_names) else str(v)
    return _short(str(v))


def _add_boxes(ax, boxes, color: str = BOX_COLOR, lw: float = 2.0, kind: str = "pred") -> None:
    """Rectangles in image pixel coordinates (pixel centres at integers, so edges sit at ``x0 - 0.5``)."""
    from matplotlib.patches import Rectangle

    for b in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
        if (b < 0).any() or b[2] <= b[0] or b[3] <= b[1]:
            continue
        r = Rectangle(
            (b[0] - 0.5, b[1] - 0.5), b[2] - b[0], b[3] - b[1], fill=False, edgecolor=color, linewidth=lw, label=kind
        )
        r.set_gid(f"{kind}:{b[0]},{b[1]},{b[2]},{b[3]}")
        ax.add_patch(r)


def patch_boxes(ax, kind: str = "pred") -> list[list[int]]:
    """The boxes drawn on an axes by this module, as ``[[x0, y0, x1, y1], …]`` (for tests and tools)."""
    out = []
    for p in ax.patches:
        gid = p.get_gid() or ""
        if gid.startswith(kind + ":"):
            out.append([int(v) for v in gid.split(":", 1)[1].split(",")])
    return out


def _panel(ax, image, title: str | None = None, *, color=None, fontsize: float = 10) -> None:
    ax.imshow(image, interpolation="nearest" if image.shape[0] < 200 else "antialiased")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=fontsize, **({"color": color} if color else {}))


def _grid(n: int, ncols: int, cell: float, aspect: float, extra_h: float = 0.45) -> tuple[Figure, list]:
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(cell * ncols, (cell * aspect + extra_h) * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------
def denormalize(x: torch.Tensor, preprocess=None) -> list[np.ndarray]:
    """A preprocessed ``(N, C, H, W)`` batch back to RGB uint8 images for figures: the inverse of
    ``preprocess`` (``(x · std + mean) / scale``, BGR flipped back) when it is known, else each image
    min–max scaled (an honest view of an unknown normalization rather than a flat grey panel)."""
    t = x.detach().float().cpu()
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    t = t[:, :3]
    if preprocess is not None and t.shape[1] == 3:
        mean = torch.tensor(preprocess.mean, dtype=t.dtype)[:, None, None]
        std = torch.tensor(preprocess.std, dtype=t.dtype)[:, None, None]
        t = (t * std + mean) / preprocess.scale
        if preprocess.channel_order == "BGR":
            t = t.flip(1)
    else:
        lo = t.amin(dim=(1, 2, 3), keepdim=True)
        hi = t.amax(dim=(1, 2, 3), keepdim=True)
        t = (t - lo) / (hi - lo).clamp_min(1e-12) * 255
    return [a.permute(1, 2, 0).clamp(0, 255).round().to(torch.uint8).numpy() for a in t]


def _image_of(exp: Explanation, i: int) -> np.ndarray:
    if exp.images:
        return exp.images[i]
    if exp.inputs is not None and exp.inputs.dim() == 4 and exp.inputs.shape[1] in (1, 3):
        return denormalize(exp.inputs[i : i + 1], exp.preprocess)[0]  # tensor inputs: the input itself
    h, w = exp.shape[-2:]
    return np.full((h, w, 3), 128, dtype=np.uint8)


def _source_title(exp: Explanation, i: int) -> str:
    name = exp.sources[i] if exp.sources else f"image{i}"
    if not exp.images and exp.inputs is not None:
        how = "de-normalized" if exp.preprocess is not None else "min-max scaled"
        return f"{name} (input, {how})"
    return name


def _render(exp: Explanation, i: int, k: int, img: np.ndarray, alpha: float, cmap: str, scale=None):
    """The overlay of map ``(i, k)`` on ``img`` and its colour scale (see :func:`render_map`)."""
    return render_map(img, exp.map(i, k), pixel=exp.raw.dim() == 5, alpha=alpha, cmap=cmap, scale=scale)


def image_scale(exp: Explanation, i: int, cmap: str = "jet") -> ColorScale:
    """One :func:`shared_color_scale` for the ``K`` maps of image ``i`` (one method: one unit)."""
    return shared_color_scale(exp.image_maps(i), pixel=exp.raw.dim() == 5, cmap=cmap)


def _scales(exp: Explanation, i: int, cmap: str, shared: bool) -> list[ColorScale | None]:
    """Per target of image ``i``: the shared scale, or ``None`` (each map its own :func:`color_scale`)."""
    k = exp.shape[1]
    return [image_scale(exp, i, cmap)] * k if shared else [None] * k


def _colormap(scale: ColorScale):
    """The matplotlib colormap of a scale (the used part of ``scale.cmap`` only)."""
    import matplotlib
    from matplotlib.colors import ListedColormap

    if scale.span == (0.0, 1.0):
        return matplotlib.colormaps[scale.cmap]
    return ListedColormap(scale.colors() / 255.0, name=f"{scale.cmap}_{scale.kind}")


def scale_label(scale: ColorScale) -> str:
    """``"0.84 … 21.6"`` and what the colours mean, for titles and colorbars."""
    rng = f"{scale.lo:.3g} … {scale.hi:.3g}"
    what = {"diverging": "red +, blue −, white 0", "negative": "all ≤ 0: blue = against"}.get(scale.kind)
    return f"{rng} ({what})" if what else rng


def _colorbar(fig: Figure, ax, scale: ColorScale, **kw: Any) -> None:
    """A colorbar beside ``ax`` (an axes or a list of axes) in the map's own units."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    lo, hi = scale.lo, scale.hi if scale.hi > scale.lo else scale.lo + 1.0
    opts = dict(fraction=0.046, pad=0.02, shrink=0.9) | kw
    cb = fig.colorbar(ScalarMappable(Normalize(lo, hi), _colormap(scale)), ax=ax, **opts)
    cb.ax.tick_params(labelsize=7)
    if scale.kind == "diverging":
        cb.set_ticks([lo, 0.0, hi])
        cb.set_label("0 = none", fontsize=7)
    else:
        cb.set_ticks([lo, hi])
        if scale.kind == "negative":
            cb.set_label("against", fontsize=7)


def _image_boxes(exp: Explanation, threshold: float | None) -> list[np.ndarray]:
    """Boxes in the pixels of the images drawn (smaller than the photo after a scaled decode)."""
    b = map_boxes(exp, DEFAULT_THRESHOLD if threshold is None else threshold)
    if not exp.images:
        return list(b)
    size = tuple(exp.shape[-2:])
    return [scale_boxes(bi, size, img.shape[:2]) for bi, img in zip(b, exp.images, strict=True)]


def topk_figure(
    exp: Explanation,
    index: int = 0,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    boxes: bool = False,
    threshold: float | None = None,
    show_image: bool = True,
    cell: float = 3.2,
    shared_scale: bool = False,
) -> Figure:
    """One image's ``K`` target classes side by side, each overlay titled ``"1st: name (p%)"``
    (as the notebooks' top-1 / top-2 figures); the original image first when ``show_image``.
    ``shared_scale=True``: one colour scale for the ``K`` maps (:func:`shared_color_scale`), one
    colorbar, the range in the title."""
    img = _image_of(exp, index)
    k = 1 if exp.class_agnostic else exp.shape[1]
    fig, axes = _grid(k + int(show_image), k + int(show_image), cell, img.shape[0] / img.shape[1])
    if show_image:
        _panel(axes[0], img, _source_title(exp, index))
        axes = axes[1:]
    bx = _image_boxes(exp, threshold)[index] if boxes else None
    scales = _scales(exp, index, cmap, shared_scale)
    for j, ax in enumerate(axes):
        shown, scale = _render(exp, index, j, img, alpha, cmap, scales[j])
        _panel(ax, shown, target_label(exp, index, j))
        if not shared_scale:
            _colorbar(fig, ax, scale)
        if bx is not None:
            _add_boxes(ax, bx[j])
    title = _method_title(exp)
    if shared_scale and axes:
        _colorbar(fig, axes, scale, fraction=0.02)
        title += f"\none colour scale for the {len(axes)} classes: {scale_label(scale)}"
    fig.suptitle(title, fontsize=11)
    return fig


def _method_title(exp: Explanation) -> str:
    info = methods().get(exp.method)
    pretty = info.title if info is not None else exp.method
    parts = [pretty]
    if exp.model_name:
        parts.append(exp.model_name + (f" ({RANDOM_WEIGHTS})" if exp.random_weights else ""))
    elif exp.random_weights:
        parts.append(RANDOM_WEIGHTS)
    if exp.layer and info is not None and info.kind == "layer":
        parts.append(layer_title(exp.layer))
    return " · ".join(parts)


def layer_title(layer: str) -> str:
    """A layer description in plain words for titles: ``"input of _avg_pooling"`` ->
    ``"features before _avg_pooling"``, ``"input of global pooling (…)"`` -> ``"last features before
    global pooling"``, ``"output of layer4"`` -> ``"features of layer4"``."""
    if layer.startswith("input of global pooling"):
        return "last features before global pooling"
    if layer.startswith("input of "):
        return "features before " + layer.removeprefix("input of ")
    if layer.startswith("output of "):
        return "features of " + layer.removeprefix("output of ")
    return layer


def batch_grid(
    images: Sequence[np.ndarray],
    maps=None,
    true_labels: Sequence | None = None,
    pred_labels: Sequence | None = None,
    probs: Sequence[float] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    ncols: int = 4,
    alpha: float = 0.4,
    cmap: str = "jet",
    boxes=None,
    gt_boxes=None,
    title: str | None = None,
    cell: float = 2.8,
) -> Figure:
    """A grid of a batch: each image (with its heatmap when ``maps`` is given) titled
    ``"true: cat / pred: dog (87.1%)"``, green when right and red when wrong — the notebooks'
    validation-batch figure.

    Args:
        images: ``N`` RGB uint8 ``(H, W, 3)`` arrays (sizes may differ).
        maps: ``None`` or ``N`` maps ``(h, w)`` (any resolution; resized to each image).
        true_labels, pred_labels: ``N`` class ids (named with ``class_names``) or names; either may
            be ``None``.
        probs: ``N`` probabilities of the predicted class.
        boxes: ``N`` predicted boxes ``(4,)`` or ``(M, 4)`` in image pixels (``-1`` = none);
        gt_boxes: ``N`` ground-truth boxes, drawn in white.
    """
    n = len(images)
    if n == 0:
        raise InputError("batch_grid needs at least one image")
    for name, seq in (
        ("maps", maps),
        ("true_labels", true_labels),
        ("pred_labels", pred_labels),
        ("probs", probs),
        ("boxes", boxes),
        ("gt_boxes", gt_boxes),
    ):
        if seq is not None and len(seq) != n:
            raise InputError(f"{n} images but {len(seq)} {name}; give one per image")
    first = np.asarray(images[0])
    fig, axes = _grid(n, ncols, cell, first.shape[0] / first.shape[1], extra_h=0.6)
    for i, ax in enumerate(axes):
        img = np.asarray(images[i])
        shown = overlay(img, maps[i], alpha, cmap) if maps is not None else img
        lines, color = [], None
        t = _label(true_labels[i], class_names) if true_labels is not None else None
        p = _label(pred_labels[i], class_names) if pred_labels is not None else None
        if t is not None:
            lines.append(f"true: {t}")
        if p is not None:
            q = f" ({float(probs[i]):.1%})" if probs is not None else ""
            lines.append(f"pred: {p}{q}")
        if t is not None and p is not None:
            color = "tab:green" if t == p else "tab:red"
        _panel(ax, shown, "\n".join(lines) or None, color=color, fontsize=9)
        if gt_boxes is not None:
            _add_boxes(ax, gt_boxes[i], GT_COLOR, kind="gt")
        if boxes is not None:
            _add_boxes(ax, boxes[i])
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def pixel_figure(
    exp: Explanation,
    index: int = 0,
    *,
    cmap: str = "jet",
    channel_order: str = "RGB",
    show_image: bool = True,
    cell: float = 3.0,
) -> Figure:
    """Pixel attributions of one image: for each target, the attribution as colour
    (:func:`attribution_rgb`) and as heat (``exp.maps``, the method's own channel reduction)."""
    if exp.raw.dim() != 5:
        raise InputError(f"{exp.method} is not a pixel method (raw has shape {tuple(exp.raw.shape)}); use topk_figure")
    img = _image_of(exp, index)
    k = exp.shape[1]
    n = 2 * k + int(show_image)
    fig, axes = _grid(n, n, cell, img.shape[0] / img.shape[1])
    if show_image:
        _panel(axes[0], img, (exp.sources or ["image"])[index] if exp.sources else "image")
        axes = axes[1:]
    size = img.shape[:2]
    for j in range(k):
        a = exp.raw[index, j].detach().float().cpu()
        if channel_order == "BGR":
            a = a.flip(0)
        a = torch.from_numpy(np.stack([resize_map(c, size) for c in a]))
        label = target_label(exp, index, j)
        _panel(axes[2 * j], attribution_rgb(a), f"{label}\nRGB", fontsize=9)
        heat = attribution_heat(resize_map(exp.map(index, j), size))
        _panel(axes[2 * j + 1], colorize(heat, cmap, normalized=True), f"{label}\nheat", fontsize=9)
    fig.suptitle(_method_title(exp), fontsize=11)
    return fig


def boxes_figure(
    image: np.ndarray,
    boxes,
    *,
    gt_boxes=None,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    cell: float = 5.0,
) -> Figure:
    """An image with predicted boxes (green) and optional ground-truth boxes (white)."""
    img = np.asarray(image)
    fig, (ax,) = _grid(1, 1, cell, img.shape[0] / img.shape[1])
    _panel(ax, img, title)
    if gt_boxes is not None:
        _add_boxes(ax, gt_boxes, GT_COLOR, kind="gt")
    _add_boxes(ax, boxes)
    if labels:
        for b, lab in zip(np.asarray(boxes).reshape(-1, 4), labels, strict=False):
            if (b >= 0).all():
                ax.text(b[0], b[1] - 2, lab, color=BOX_COLOR, fontsize=9, va="bottom")
    return fig


def explanation_figure(
    exp: Explanation,
    index: int | Sequence[int] | None = None,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    boxes: bool = False,
    threshold: float | None = None,
    max_images: int = 8,
    cell: float = 3.0,
    shared_scale: bool = False,
    **kwargs: Any,
) -> Figure:
    """The default figure of an :class:`~camlens.Explanation` (``exp.show()``, ``exp.figure()``): one
    row per image (at most ``max_images``), the original then one overlay per target class titled
    with its true rank (when known), name and probability, each with a colorbar — the same rendering
    as the saved PNGs (:func:`render_map`: maps with both signs diverging around zero, maps of one
    sign on the full colormap, :func:`color_scale`). ``shared_scale=True``: one colour scale per
    image across its classes (:func:`shared_color_scale`), so a weaker class looks weaker.
    :func:`pixel_figure` shows pixel attributions as colour as well."""
    n = len(exp)
    rows = list(range(min(n, max_images))) if index is None else ([index] if isinstance(index, int) else list(index))
    for r in rows:
        if not -n <= r < n:
            raise InputError(f"index {r} out of range for an explanation of {n} image(s)")
    if len(rows) == 1 and "boxes" in exp.extras:  # a detector: one panel per explained box
        return detection_figure(exp, rows[0], alpha=alpha, cmap=cmap, cell=cell)
    if len(rows) == 1 and "masks" in exp.extras:  # a segmenter: the explained region's outline
        return segmentation_figure(exp, rows[0], alpha=alpha, cmap=cmap, cell=cell)
    if len(rows) == 1:
        return topk_figure(
            exp,
            rows[0],
            alpha=alpha,
            cmap=cmap,
            boxes=boxes,
            threshold=threshold,
            cell=cell,
            shared_scale=shared_scale,
            **kwargs,
        )
    k = 1 if exp.class_agnostic else exp.shape[1]
    img0 = _image_of(exp, rows[0])
    ncols = k + 1
    fig, axes = _grid(len(rows) * ncols, ncols, cell, img0.shape[0] / img0.shape[1])
    bxs = _image_boxes(exp, threshold) if boxes else None
    for r, i in enumerate(rows):
        img = _image_of(exp, i)
        ax_row = axes[r * ncols : (r + 1) * ncols]
        _panel(ax_row[0], img, _source_title(exp, i), fontsize=9)
        scales = _scales(exp, i, cmap, shared_scale)
        for j in range(k):
            shown, scale = _render(exp, i, j, img, alpha, cmap, scales[j])
            _panel(ax_row[1 + j], shown, target_label(exp, i, j), fontsize=9)
            if not shared_scale or j == k - 1:
                _colorbar(fig, ax_row[1 + j] if not shared_scale else ax_row[1:], scale)
            if bxs is not None:
                _add_boxes(ax_row[1 + j], bxs[i][j])
            ref = np.asarray(exp.extras["boxes"])[i, j] if "boxes" in exp.extras else None
            if ref is not None and np.isfinite(ref).all():  # a detector's explained box
                _add_boxes(ax_row[1 + j], np.round(ref))
    title = _method_title(exp) + ("\none colour scale per image across its classes" if shared_scale else "")
    fig.suptitle(title, fontsize=11)
    return fig


def _as_methods(exps) -> dict[str, Explanation]:
    """An Explanation, a ``{method: Explanation}`` dict (``explain(method=[...])``) or a list -> a dict."""
    if isinstance(exps, Explanation):
        return {exps.method: exps}
    if isinstance(exps, dict):
        items = dict(exps)
    else:
        items = {e.method: e for e in exps}
    if not items or not all(isinstance(e, Explanation) for e in items.values()):
        raise InputError("montage needs an Explanation, a list of them or explain(method=[...])'s dict")
    return items


def montage(
    explanations,
    index: int = 0,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    shared_scale: bool = False,
    cell: float = 2.4,
) -> Figure:
    """One image's explanations as one figure for a paper: a row per method (its title at the left),
    the photo then a column per target class (its true rank, name and probability on top).

    ``explanations``: ``camlens.explain(model, image, method=["gradcam", "cam"], targets="top3")``
    (a dict), a list of explanations of the same image(s), or one explanation. Every map follows
    :func:`color_scale`; ``shared_scale=True`` gives each row (method) one scale across its classes
    (:func:`shared_color_scale`) and one colorbar, else each panel has its own colorbar. Methods
    keep separate scales: their maps are in different units.
    """
    rows = _as_methods(explanations)
    first = next(iter(rows.values()))
    n = len(first)
    if not -n <= index < n or any(len(e) != n for e in rows.values()):
        raise InputError(f"index {index} out of range, or the explanations differ in their number of images ({n})")
    img = _image_of(first, index)
    k = max(1 if e.class_agnostic else e.shape[1] for e in rows.values())
    same = all(torch.equal(e.classes[index].cpu(), first.classes[index].cpu()) for e in rows.values())
    fig, axes = _grid(len(rows) * (k + 1), k + 1, cell, img.shape[0] / img.shape[1], extra_h=0.35)
    for r, exp in enumerate(rows.values()):
        ax_row = axes[r * (k + 1) : (r + 1) * (k + 1)]
        _panel(ax_row[0], img, _source_title(exp, index) if r == 0 else None, fontsize=9)
        ax_row[0].set_ylabel(_method_title(exp).split(" · ")[0], fontsize=10)
        kr = 1 if exp.class_agnostic else exp.shape[1]
        scales = _scales(exp, index, cmap, shared_scale)
        for j in range(k):
            ax = ax_row[1 + j]
            if j >= kr:
                ax.set_visible(False)
                continue
            shown, scale = _render(exp, index, j, img, alpha, cmap, scales[j])
            _panel(ax, shown, target_label(exp, index, j) if r == 0 or not same else None, fontsize=9)
            if not shared_scale:
                _colorbar(fig, ax, scale)
        if shared_scale:
            _colorbar(fig, ax_row[1 : 1 + kr], scale, fraction=0.02)
    model = first.model_name or ""
    rnd = f" ({RANDOM_WEIGHTS})" if first.random_weights else ""
    fig.suptitle(f"{model}{rnd}" + (" · one colour scale per method" if shared_scale else ""), fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# Detection and segmentation figures
# --------------------------------------------------------------------------------------------
def _task_title(exp: Explanation, i: int, k: int) -> str:
    """``"person 0.87"``: the target's label (``"any"`` for a label-free box) and its score."""
    c = int(exp.classes[i, k])
    name = _label(c, exp.class_names) if c >= 0 else "any"
    return f"{name} {float(exp.scores[i, k]):.3g}"


def _task_panels(exp: Explanation, index: int, keep: list[int], cell: float):
    img = _image_of(exp, index)
    fig, axes = _grid(max(len(keep), 1), max(len(keep), 1), cell, img.shape[0] / img.shape[1])
    return img, fig, axes


def detection_figure(
    exp: Explanation, index: int = 0, *, alpha: float = 0.5, cmap: str = "jet", cell: float = 3.2
) -> Figure:
    """One panel per explained box of image ``index``: the box drawn over its map, titled with the
    box's label and score (``exp.extras["boxes"]``, original-image pixels; padding boxes skipped)."""
    boxes = np.asarray(exp.extras["boxes"])[index]  # (K, 4), NaN rows: padding
    keep = [k for k in range(boxes.shape[0]) if np.isfinite(boxes[k]).all()]
    img, fig, axes = _task_panels(exp, index, keep, cell)
    h, w = img.shape[:2]
    for ax, k in zip(axes, keep):
        m = exp.map(index, k)
        if exp.images and tuple(m.shape) != (h, w) and m.shape[0] >= h and m.shape[1] >= w:
            m = m[:h, :w]  # a batch of different sizes: the map is padded beyond this image
        _panel(ax, render_map(img, m, alpha=alpha, cmap=cmap)[0], _task_title(exp, index, k))  # the colour rule
        _add_boxes(ax, np.round(boxes[k]))
    if not keep:
        _panel(axes[0], img, "no box to explain")
    fig.suptitle(_method_title(exp), fontsize=11)
    return fig


def segmentation_figure(
    exp: Explanation, index: int = 0, *, alpha: float = 0.5, cmap: str = "jet", cell: float = 3.2
) -> Figure:
    """One panel per explained region of image ``index``: the map with the region's outline
    (``exp.extras["masks"]``, resized nearest to the image), titled with the class and score."""
    masks = np.asarray(exp.extras["masks"])[index]  # (K, h, w)
    keep = list(range(masks.shape[0]))
    img, fig, axes = _task_panels(exp, index, keep, cell)
    for ax, k in zip(axes, keep):
        _panel(ax, render_map(img, exp.map(index, k), alpha=alpha, cmap=cmap)[0], _task_title(exp, index, k))
        mt = torch.from_numpy(masks[k].astype(np.float32))[None, None]
        mk = F.interpolate(mt, size=img.shape[:2], mode="nearest")[0, 0].numpy()
        if mk.max() > 0.5 > mk.min():
            ax.contour(mk, levels=[0.5], colors=[BOX_COLOR], linewidths=1.5)
    fig.suptitle(_method_title(exp), fontsize=11)
    return fig


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
_SAFE_ASCII = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")


def _keep(ch: str) -> bool:
    if ch.isascii():
        return ch in _SAFE_ASCII
    return unicodedata.category(ch)[0] not in "CZ"  # letters, marks, digits, symbols (CJK, emoji) stay


def safe_name(s: str, max_bytes: int = 200) -> str:
    """A file-name-safe version of ``s``: Unicode letters, digits and symbols are kept (``chat_été``,
    ``猫``), ASCII other than ``A-Za-z0-9._+-``, spaces and control characters become ``_`` (so ``/``,
    ``\\``, ``:``, ``*``… never reach the file system); NFC-normalized, at most ``max_bytes`` UTF-8 bytes."""
    text = unicodedata.normalize("NFC", str(s))
    out = re.sub(r"_+", "_", "".join(ch if _keep(ch) else "_" for ch in text)).strip("._")
    while len(out.encode("utf-8")) > max_bytes:
        out = out[:-1]
    return out or "image"


def unique_names(names: Sequence[str]) -> list[str]:
    """Make names unique by appending ``-2``, ``-3``… to repeats (``cat``, ``cat-2``)."""
    seen: dict[str, int] = {}
    taken = set(names)
    out = []
    for n in names:
        if n not in seen:
            seen[n] = 1
            out.append(n)
            continue
        j = seen[n]
        while True:
            j += 1
            cand = f"{n}-{j}"
            if cand not in taken:
                break
        seen[n] = j
        taken.add(cand)
        out.append(cand)
    return out


#: zlib level of the PNGs camlens writes: 1 encodes several times faster than PIL's default 6 for
#: files about a fifth larger on photo overlays (the encode was the largest single cost of saving).
PNG_COMPRESS_LEVEL = 1


def save_figure(
    fig: Figure,
    path: str | Path,
    *,
    dpi: int = 100,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
    compress_level: int | None = None,
    **kwargs: Any,
) -> Path:
    """Save a figure through the Agg canvas (no display needed); PNG text metadata if given. Written
    atomically (:func:`camlens.base.fsio.atomic_write`); ``overwrite=False`` refuses an existing file.
    ``compress_level`` (0–9) sets a PNG's zlib level (default: matplotlib's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    p = Path(path)
    fmt = kwargs.pop("format", None) or (p.suffix.lstrip(".").lower() or "png")
    if compress_level is not None and fmt == "png":
        kwargs["pil_kwargs"] = {**kwargs.get("pil_kwargs", {}), "compress_level": int(compress_level)}
    _font_fallback(fig)
    # atomic and symlink-safe (camlens.base.fsio): complete or absent, a link is replaced, never followed
    atomic_write(p, lambda f: fig.savefig(f, format=fmt, dpi=dpi, metadata=metadata, **kwargs), overwrite=overwrite)
    return p


def save_png(
    rgb: np.ndarray,
    path: str | Path,
    *,
    metadata: dict[str, str] | None = None,
    compress_level: int = PNG_COMPRESS_LEVEL,
    boxes=None,
    box_color: tuple[int, int, int] = (0, 255, 0),
    box_width: int = 2,
    overwrite: bool = True,
) -> Path:
    """Write an ``(H, W, 3)`` uint8 array as a PNG with PIL (no matplotlib): text ``metadata`` as
    PNG text chunks, ``boxes`` ``(M, 4)`` ``x0, y0, x1, y1`` (exclusive; ``-1``: none) drawn as
    rectangles on the pixels ``x0 .. x1 - 1``, zlib level ``compress_level``. Written atomically
    (:func:`camlens.base.fsio.atomic_write`); ``overwrite=False`` refuses an existing file."""
    from PIL import Image, ImageDraw, PngImagePlugin

    im = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if boxes is not None:
        draw = ImageDraw.Draw(im)
        for b in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
            if (b < 0).any() or b[2] <= b[0] or b[3] <= b[1]:
                continue
            draw.rectangle((int(b[0]), int(b[1]), int(b[2]) - 1, int(b[3]) - 1), outline=box_color, width=box_width)
    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_text(k, v)
    p = Path(path)
    atomic_write(
        p, lambda f: im.save(f, format="PNG", pnginfo=info, compress_level=int(compress_level)), overwrite=overwrite
    )
    return p


#: fonts that cover CJK / emoji, used as fallbacks when installed (matplotlib >= 3.6 falls back per glyph)
FALLBACK_FONTS = ("Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans JP", "WenQuanYi Zen Hei", "Droid Sans Fallback")
_FALLBACKS: list[str] | None = None
_COVERED: set[int] | None = None
_NOTICE_GIVEN = False


def _font_fallback(fig: Figure) -> None:
    """Texts of ``fig`` with characters the default font lacks (CJK, emoji…) get the installed
    fallback fonts; when none has them, one notice per process says so (and matplotlib's per-glyph
    warnings are silenced, since the notice already says it)."""
    global _FALLBACKS, _COVERED, _NOTICE_GIVEN
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if isinstance(t, Text) and not t.get_text().isascii()]
    if not texts:
        return
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    if _FALLBACKS is None:
        have = {f.name for f in font_manager.fontManager.ttflist}
        _FALLBACKS = [f for f in FALLBACK_FONTS if f in have]
        covered: set[int] = set()
        for fam in [None, *_FALLBACKS]:
            path = font_manager.findfont(font_manager.FontProperties(family=fam))
            covered |= set(FT2Font(path).get_charmap())
        _COVERED = covered
    known: set[int] = _COVERED or set()
    missing = {ch for t in texts for ch in t.get_text() if ord(ch) not in known and not ch.isspace()}
    if _FALLBACKS:
        for t in texts:
            t.set_fontfamily([*t.get_fontfamily(), *_FALLBACKS])
    if missing and not _NOTICE_GIVEN:
        _NOTICE_GIVEN = True
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        warnings.warn(
            f"some characters of the titles ({''.join(sorted(missing))[:20]}) are not in the installed fonts "
            "and are drawn as empty boxes in the figures; install a font that has them (e.g. fonts-noto-cjk) "
            "and camlens uses it. File names and JSON keep the names intact. (Said once.)",
            UserWarning,
            stacklevel=3,
        )


def overlay_figure(
    image: np.ndarray,
    m,
    title: str,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    boxes=None,
    min_width: int = 320,
    max_side: int = 4096,
    dpi: int = 100,
    pixel: bool = False,
    scale: ColorScale | None = None,
    colorbar: bool = False,
) -> Figure:
    """One overlay at the image's own resolution (upscaled to at least ``min_width`` pixels wide, no
    side beyond ``max_side`` from the upscale) with a title band on top: the saved PNG is ``W·s`` x
    ``H·s + 30·min(s, 5)`` pixels, ``s`` the upscale. The overlay is :func:`render_map`'s, as in
    ``show()`` (``scale``: a given colour scale, e.g. shared by an image's classes). ``colorbar=True``
    adds a band of ``22·min(s, 5)`` pixels under the title: the scale's colours from its minimum to
    its maximum, both written beside it (:func:`colorbar_geometry`)."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    lay = _overlay_layout(h, w, title, min_width, max_side, dpi, colorbar)
    W, H = lay.width, lay.height
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h * lay.scale / H))
    shown, sc = render_map(img, m, pixel=pixel, alpha=alpha, cmap=cmap, scale=scale)
    ax.imshow(shown, interpolation="nearest" if lay.scale > 1 else "antialiased")
    ax.set_axis_off()
    if boxes is not None:
        _add_boxes(ax, boxes, lw=BOX_POINTS)
    fig.text(0.5, 1 - (lay.band / 2) / H, title, ha="center", va="center", fontsize=lay.fontsize)
    if colorbar:
        g = colorbar_geometry(lay)
        bar = fig.add_axes((g.x0 / W, 1 - g.y1 / H, (g.x1 - g.x0) / W, (g.y1 - g.y0) / H))
        bar.imshow(sc.colors()[None], aspect="auto", interpolation="nearest", extent=(0, 1, 0, 1))
        bar.set_axis_off()
        if sc.kind == "diverging":  # zero: a dark tick at the centre
            bar.axvline(0.5, color="black", linewidth=72 / dpi)
        y = 1 - (g.y0 + g.y1) / 2 / H
        lo, hi = _bar_labels(sc)
        fig.text((g.x0 - g.gap) / W, y, lo, ha="right", va="center", fontsize=g.fontsize)
        fig.text((g.x1 + g.gap) / W, y, hi, ha="left", va="center", fontsize=g.fontsize)
    return fig


@dataclass(frozen=True)
class _OverlayLayout:
    """Geometry of a titled overlay (:func:`overlay_figure`, :func:`overlay_png`): the upscale, the
    title band's height, the colorbar band's height (0: none), the canvas size (pixels, unrounded)
    and the title's font size (points)."""

    scale: float
    band: float
    width: float
    height: float
    fontsize: float
    bar: float = 0.0


def _overlay_layout(
    h: int, w: int, title: str, min_width: int, max_side: int, dpi: int, colorbar: bool = False
) -> _OverlayLayout:
    s = max(1.0, min_width / w)
    s = min(s, max(1.0, max_side / h))  # a 1-pixel-wide strip is not blown up to 320 x 100 000
    band = 30 * min(s, 5.0)  # the title band grows with the upscale, up to 150 px (a 1x1 image: 320 x 470)
    bar = 22 * min(s, 5.0) if colorbar else 0.0
    W = w * s
    # font size that fits the width: average glyph ≈ 0.55 em, 1 pt = dpi/72 px
    fs = float(np.clip((W - 8) / (0.6 * max(len(title), 1) * dpi / 72), 6, 13))
    return _OverlayLayout(s, band, W, h * s + band + bar, fs, bar)


@dataclass(frozen=True)
class ColorbarGeometry:
    """Where a saved PNG's colorbar is, in canvas pixels: the gradient ``x0 .. x1`` x ``y0 .. y1``
    (the middle 60 % of the width, the middle half of the band under the title), the labels' gap
    from it and their font size (points)."""

    x0: float
    x1: float
    y0: float
    y1: float
    gap: float
    fontsize: float


def colorbar_geometry(lay: _OverlayLayout) -> ColorbarGeometry:
    """The colorbar of a titled overlay with ``colorbar=True`` (see :func:`overlay_figure`)."""
    return ColorbarGeometry(
        x0=round(0.2 * lay.width),
        x1=round(0.8 * lay.width),
        y0=round(lay.band + 0.25 * lay.bar),
        y1=round(lay.band + 0.75 * lay.bar),
        gap=4.0,
        fontsize=float(min(lay.fontsize, 9.0)),
    )


def _bar_labels(sc: ColorScale) -> tuple[str, str]:
    """The colorbar's end labels (ASCII, so the PIL path's font always has them)."""
    return f"{sc.lo:.3g}", f"{sc.hi:.3g}"


@functools.lru_cache(maxsize=1)
def _default_font() -> tuple[str, frozenset[int]]:
    """The file of matplotlib's default font (the one :func:`overlay_figure` titles with) and the
    code points it has glyphs for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(font_manager.FontProperties())
    return path, frozenset(FT2Font(path).get_charmap())


@functools.lru_cache(maxsize=32)
def _title_font(px: int):
    """:func:`_default_font` at ``px`` pixels as a PIL font; ``None`` if it cannot be loaded."""
    from PIL import ImageFont

    try:
        return ImageFont.truetype(_default_font()[0], size=px)
    except OSError:
        return None


def overlay_png(
    image: np.ndarray,
    m,
    title: str,
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
    boxes=None,
    min_width: int = 320,
    max_side: int = 4096,
    dpi: int = 100,
    pixel: bool = False,
    scale: ColorScale | None = None,
    colorbar: bool = False,
) -> np.ndarray | None:
    """:func:`overlay_figure`'s picture drawn with PIL alone, as an ``(H, W, 3)`` uint8 array: the
    same size, upscale, title band, colorbar, font and font size, and boxes of the same colour and
    width (2 pt), without matplotlib artists or the Agg canvas (which cost most of a titled PNG's time).
    Returns ``None`` when the title needs glyphs outside the default font (then the figure, with
    its font fallbacks, is the way) or the font cannot be loaded."""
    from PIL import Image, ImageDraw

    if not title.isascii() and not all(ord(c) in _default_font()[1] for c in title):
        return None
    img = np.asarray(image)
    h, w = img.shape[:2]
    lay = _overlay_layout(h, w, title, min_width, max_side, dpi, colorbar)
    W, H = int(lay.width + 1e-6), int(lay.height + 1e-6)  # the Agg canvas truncates its float size
    ih = min(H, max(1, round(h * lay.scale)))
    font = _title_font(max(1, round(lay.fontsize * dpi / 72)))
    if font is None:
        return None
    shown, sc = render_map(img, m, pixel=pixel, alpha=alpha, cmap=cmap, scale=scale)
    pic = Image.fromarray(np.ascontiguousarray(shown))
    if (W, ih) != (w, h):
        pic = pic.resize((W, ih), Image.Resampling.NEAREST if lay.scale > 1 else Image.Resampling.BILINEAR)
    if boxes is not None:  # on the picture, so that the lines are clipped to it as the figure's
        from matplotlib.colors import to_rgb

        draw = ImageDraw.Draw(pic)
        lw = max(1, round(BOX_POINTS * dpi / 72))
        color = tuple(round(255 * c) for c in to_rgb(BOX_COLOR))
        for b in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
            if (b < 0).any() or b[2] <= b[0] or b[3] <= b[1]:
                continue
            x0, x1, y0, y1 = b[0] * W / w, b[2] * W / w, b[1] * ih / h, b[3] * ih / h  # pixel edges
            draw.rectangle(
                # a line of width lw centred on each edge, on the pixels it covers most
                tuple(int(np.floor(v + 0.5)) for v in (x0 - lw / 2, y0 - lw / 2, x1 + lw / 2 - 1, y1 + lw / 2 - 1)),
                outline=color,
                width=lw,
            )
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    canvas.paste(pic, (0, H - ih))
    draw = ImageDraw.Draw(canvas)
    draw.text((W / 2, (H - ih - lay.bar) / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    if colorbar:
        _draw_colorbar(canvas, sc, lay, dpi)
    return np.asarray(canvas)


def _draw_colorbar(canvas, sc: ColorScale, lay: _OverlayLayout, dpi: int) -> None:
    """The colorbar of :func:`overlay_png` (PIL), where :func:`overlay_figure` puts it."""
    from PIL import Image, ImageDraw

    g = colorbar_geometry(lay)
    x0, x1, y0, y1 = int(g.x0), int(g.x1), int(g.y0), int(g.y1)
    if x1 <= x0 or y1 <= y0:
        return
    n = x1 - x0  # one colour per pixel column, sampled as matplotlib's nearest-neighbour imshow does
    cols = sc.colors()[np.minimum(((np.arange(n) + 0.5) * 256 / n).astype(int), 255)]
    canvas.paste(Image.fromarray(np.ascontiguousarray(np.repeat(cols[None], y1 - y0, 0))), (x0, y0))
    draw = ImageDraw.Draw(canvas)
    if sc.kind == "diverging":
        draw.line(((x0 + x1) // 2, y0, (x0 + x1) // 2, y1 - 1), fill=(0, 0, 0), width=max(1, round(dpi / 72)))
    font = _title_font(max(1, round(g.fontsize * dpi / 72)))
    if font is None:
        return
    lo, hi = _bar_labels(sc)
    ym = (y0 + y1) / 2
    draw.text((x0 - g.gap, ym), lo, fill=(0, 0, 0), font=font, anchor="rm")
    draw.text((x1 + g.gap, ym), hi, fill=(0, 0, 0), font=font, anchor="lm")


def is_topk(exp: Explanation) -> bool:
    """Whether the targets are each image's top-K classes in order: target ``j`` ranks ``j + 1`` (or
    better, when logits tie: ranks count the classes with a strictly higher logit)."""
    if exp.ranks is None:
        return False
    k = exp.ranks.shape[1]
    return bool((exp.ranks.cpu() <= torch.arange(1, k + 1)).all())


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A figure as PNG bytes (through the Agg canvas)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def in_notebook() -> bool:
    """Whether code runs in a Jupyter/IPython kernel (where figures display inline)."""
    import sys

    ip = sys.modules.get("IPython")
    if ip is None:
        return False
    shell = ip.get_ipython() if hasattr(ip, "get_ipython") else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def interactive_backend() -> bool:
    """Whether matplotlib's current backend can open a window (not Agg, PDF, SVG… nor inline)."""
    import matplotlib
    from matplotlib.backends import BackendFilter, backend_registry

    name = matplotlib.get_backend().lower()
    if "inline" in name:
        return False
    return name not in {b.lower() for b in backend_registry.list_builtin(BackendFilter.NON_INTERACTIVE)}


def display_figure(fig: Figure) -> str:
    """Show ``fig`` now; returns where: ``"notebook"`` (IPython's ``display``, so it shows even when
    the call is not the cell's last expression), ``"window"`` (a pyplot window, in a script with an
    interactive backend; blocks until closed as ``plt.show()`` does), or ``"none"`` (a
    non-interactive backend such as Agg: nothing can be shown; save the figure instead)."""
    if in_notebook():
        from IPython.display import display

        display(fig)
        return "notebook"
    if not interactive_backend():
        return "none"
    import matplotlib.pyplot as plt

    manager = plt.figure().canvas.manager  # a pyplot manager to host our figure
    if manager is None:
        return "none"
    manager.canvas.figure = fig
    fig.set_canvas(manager.canvas)
    plt.show()
    return "window"


def _scalar_extras(extras: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in extras.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, torch.Tensor) and v.numel() <= 64:
            out[k] = v.detach().cpu().tolist()
    return out


def output_paths(
    directory: str | Path,
    stems: Sequence[str],
    method: str,
    labels: Sequence[Sequence[str]],
    formats: Sequence[str] = ("png", "npy", "json"),
    suffix: str = "rank",
) -> list[dict[str, list[Path]]]:
    """The files :func:`save_explanation` writes, per image ``{"png": [...], "npy": [...], "json": [...]}``
    (for checking them before any work). ``labels``: per image the ``K`` class names."""
    out = Path(directory)
    meth = safe_name(method)
    plan = []
    for stem, labs in zip(stems, labels, strict=True):
        ranks = rank_tags(len(labs))
        tags = [ranks[j] if suffix == "rank" else safe_name(_short(lab, 60)) for j, lab in enumerate(labs)]
        pngs = [out / f"{stem}_{meth}_{t}.png" for t in tags]
        if suffix == "agnostic":  # one map whatever the class: one file, no class in its name
            pngs = [out / f"{stem}_{meth}.png"]
        plan.append(
            {
                "png": pngs if "png" in formats else [],
                "npy": [out / f"{stem}_{meth}.npy"] if "npy" in formats else [],
                "json": [out / f"{stem}_{meth}.json"] if "json" in formats else [],
            }
        )
    return plan


@dataclass(frozen=True)
class SaveOptions:
    """What :func:`save_explanation` writes and how (see there for each field)."""

    formats: Sequence[str] | str = ("png", "npy", "json")
    overwrite: bool = False
    threshold: float | None = None
    boxes: bool = False
    alpha: float = 0.5
    cmap: str = "jet"
    suffix: str = "auto"
    dpi: int = 100
    title: bool = True
    compress_level: int = PNG_COMPRESS_LEVEL
    colorbar: bool = True
    shared_scale: bool = False
    map_size: str = "input"

    def checked(self) -> SaveOptions:
        """These options with ``formats`` as a list, every value checked."""
        f = self.formats
        fmts = [x.strip().lower() for x in (f.split(",") if isinstance(f, str) else f)]
        bad = [x for x in fmts if x not in ("png", "npy", "json")]
        if bad or not fmts:
            raise InputError(f"unknown output format(s) {bad or fmts}; choose from png, npy, json")
        if self.suffix not in ("rank", "class", "auto"):
            raise InputError(f"suffix must be 'auto', 'rank' or 'class', not {self.suffix!r}")
        if self.map_size not in ("input", "photo"):
            raise InputError(f"map_size must be 'input' (the model's input size) or 'photo', not {self.map_size!r}")
        return replace(self, formats=tuple(fmts))


def save_options(options: SaveOptions | None = None, **kwargs: Any) -> SaveOptions:
    """``options`` (default :class:`SaveOptions`) with ``kwargs`` applied, checked."""
    return with_options(SaveOptions, options, kwargs, "save").checked()


def save_explanation(
    exp: Explanation, directory: str | Path, options: SaveOptions | None = None, **kwargs: Any
) -> list[Path]:
    """Write an explanation to ``directory`` (created when missing); returns the written paths.

    Per image ``stem`` (``exp.sources``, made unique) and method ``m``:

    * ``png``: ``{stem}_{m}_top{k}.png`` — the overlay on the original image (the rendering of
      ``show()``, :func:`render_map`; ``k`` zero-padded to the width of ``K``: ``top01`` … ``top20``,
      so the files sort by rank), titled with the method, the class's true rank when known, its
      name and probability (also in the PNG's ``Title`` text field); the box at ``threshold`` is
      drawn when ``boxes=True`` (or a ``threshold`` is given). ``suffix="auto"`` (default) names
      files ``top{k}`` only when the targets *are* the top-k classes (``exp.ranks`` is 1..K),
      else after the class (``{stem}_{m}_Egyptian_cat.png``, as ``suffix="class"``); a class-agnostic
      map is written once (``{stem}_{m}.png``).
      Under the title, a colorbar gives the colour scale in the map's units (``colorbar=False``:
      none); the colours follow :func:`color_scale` (both signs: red/blue around zero; one sign: the
      full ``cmap``). ``shared_scale=True``: one scale for the ``K`` classes of an image
      (:func:`shared_color_scale`, anchored at 0), so a weaker class is drawn weaker.
      ``title=False``: the overlay alone at the image's own resolution, written by NumPy + PIL
      without matplotlib figures (the fast path; no title band, no colorbar; the title stays in
      the ``Title`` text field).
      ``compress_level``: the PNGs' zlib level (default :data:`PNG_COMPRESS_LEVEL`, for speed).
    * ``npy``: ``{stem}_{m}.npy`` — the raw maps ``(K, H, W)`` float32 at the model's input size
      (``map_size="input"``, the default), or resized bilinearly to the photo's own height and
      width (``map_size="photo"``: the frame of the boxes, for images given as files or arrays).
    * ``json``: ``{stem}_{m}.json`` — classes, class names, scores (logits), probabilities, boxes
      (image and map pixels, at ``threshold``), method, layer, model, ``random_weights``, each map's
      raw ``value_range`` ``[min, max]`` and the ``color_scales`` the PNGs use, camlens and torch versions.

    The options are the fields of :class:`SaveOptions`: pass ``options=`` or any of them as
    keywords (keywords override ``options``; an unknown one names the valid ones).

    Existing files are never replaced unless ``overwrite=True``: all names are checked before
    anything is written, and :class:`~camlens.base.errors.OutputExistsError` says to pass ``--overwrite``.
    """
    opts = save_options(options, **kwargs)
    thr = DEFAULT_THRESHOLD if opts.threshold is None else opts.threshold
    draw = opts.boxes or opts.threshold is not None
    stems, plan = _save_plan(exp, Path(directory), opts)
    own = photo_sizes(exp)
    labels = exp.labels()
    size = tuple(exp.shape[-2:])
    written: list[Path] = []
    look = _PngLook(opts.alpha, opts.cmap, opts.dpi, opts.title, opts.colorbar, opts.compress_level, opts.overwrite)
    for i in range(len(exp)):
        maps_i = exp.image_maps(i)  # (K, H, W): one image's maps at a time (lazy maps stay small)
        map_boxes = localize(maps_i, thr)  # (K, 4) in the maps' frame
        img = _image_of(exp, i)
        photo_size = own[i] if own is not None else tuple(img.shape[:2])  # a scaled decode: the photo's own
        img_boxes = scale_boxes(map_boxes, size, photo_size) if exp.images else map_boxes
        shown_boxes = scale_boxes(map_boxes, size, img.shape[:2]) if exp.images else map_boxes  # drawn on img
        pixel = exp.raw.dim() == 5
        shared = shared_color_scale(maps_i, pixel=pixel, cmap=opts.cmap) if opts.shared_scale else None
        scales = [shared or color_scale(mj, pixel=pixel, cmap=opts.cmap) for mj in maps_i]
        if "png" in opts.formats:
            for j, p in enumerate(plan[i]["png"]):
                bx = shown_boxes[j] if draw else None
                if "boxes" in exp.extras and np.isfinite(ref := np.asarray(exp.extras["boxes"])[i, j]).all():
                    bx = np.round(ref)  # a detector's explained box, in the image's pixels
                meta = {
                    "Title": _png_heading(exp, i, j, scales[j]),
                    "Software": f"camlens {__version__}",
                    "Description": f"{exp.method} map of class {int(exp.classes[i, j])} "
                    f"({labels[i][j]}) for {stems[i]}",
                }
                _save_overlay(img, maps_i[j], p, scales[j], bx, meta, look)
                written.append(p)
        photo = opts.map_size == "photo" and bool(exp.images) and tuple(photo_size) != size  # the boxes' frame
        if "npy" in opts.formats:
            p = plan[i]["npy"][0]
            arr = maps_i.detach().float().cpu().numpy()
            if photo:
                arr = np.stack([resize_map(mj, photo_size) for mj in arr])
            atomic_write(p, functools.partial(np.save, arr=arr), overwrite=opts.overwrite)
            written.append(p)
        if "json" in opts.formats:
            p = plan[i]["json"][0]
            boxes = {"threshold": float(thr), "image": img_boxes, "map": map_boxes}
            summary = _json_summary(exp, i, stems[i], photo_size, maps_i, scales, boxes, opts.map_size == "photo")
            atomic_write(p, json.dumps(summary, indent=2) + "\n", overwrite=opts.overwrite)
            written.append(p)
    return written


def _save_plan(exp: Explanation, out: Path, opts: SaveOptions) -> tuple[list[str], list[dict[str, list[Path]]]]:
    """The unique stems and every path :func:`save_explanation` will write, checked before any
    is written (no clash, nothing in the way unless ``overwrite``), and the folder made safe."""
    suffix = opts.suffix
    if suffix == "auto":
        suffix = "rank" if is_topk(exp) else "class"
    if suffix == "rank" and not exp.class_agnostic and exp.ranks is not None and not is_topk(exp):
        raise InputError(
            "suffix='rank' names files top1, top2…, but these targets are not the top-k classes "
            "(or their ranks are unknown); use suffix='class' or 'auto'"
        )
    n = len(exp)
    stems = unique_names([safe_name(s) for s in (exp.sources or numbered("image", n))])
    if exp.class_agnostic:
        suffix = "agnostic"
    plan = output_paths(out, stems, exp.method, exp.labels(), list(opts.formats), suffix)
    flat = [p for per in plan for ps in per.values() for p in ps]
    if len(set(flat)) != len(flat):
        raise InputError("two outputs would get the same file name; use suffix='rank'")
    check_targets(flat, opts.overwrite)  # files and links (even dangling ones) are in the way without overwrite
    safe_out_dir(out)
    return stems, plan


def _json_summary(
    exp: Explanation,
    i: int,
    stem: str,
    photo_size: tuple[int, int],
    maps_i: torch.Tensor,
    scales: list[ColorScale],
    boxes: dict[str, Any],
    at_photo: bool,
) -> dict[str, Any]:
    """The JSON summary of image ``i`` (see :func:`save_explanation`)."""
    size = tuple(exp.shape[-2:])
    summary: dict[str, Any] = {
        "source": exp.sources[i] if exp.sources else stem,
        "method": exp.method,
        "layer": exp.layer,
        "model": exp.model_name,
        "image_size": list(photo_size) if exp.images else None,
        "map_size": list(photo_size) if at_photo and exp.images else list(size),
        "classes": [int(c) for c in exp.classes[i].tolist()],
        "class_names": exp.labels()[i],
        "scores": [float(v) for v in exp.scores[i].tolist()],
        "probs": [None if v != v else float(v) for v in exp.probs[i].tolist()],
        "ranks": None if exp.ranks is None else [int(r) for r in exp.ranks[i].tolist()],
        "signed": exp.signed,
        "random_weights": exp.random_weights,
        "value_range": [[float(mj.min()), float(mj.max())] for mj in maps_i],
        "color_scales": [s.to_dict() for s in scales],
        "threshold": boxes["threshold"],
        "boxes": boxes["image"].tolist(),
        "boxes_map": boxes["map"].tolist(),
        "box_format": "x0,y0,x1,y1 pixels, x1/y1 exclusive, -1 = no box",
        "extras": _scalar_extras(exp.extras),
    }
    if "boxes" in exp.extras:
        summary["explained_boxes"] = [None if b[0] != b[0] else [float(v) for v in b] for b in exp.extras["boxes"][i]]
    summary["versions"] = versions()
    return summary


@dataclass(frozen=True)
class _PngLook:
    """How :func:`save_explanation` draws its PNGs."""

    alpha: float
    cmap: str
    dpi: int
    title: bool
    colorbar: bool
    compress_level: int
    overwrite: bool


def _png_heading(exp: Explanation, i: int, j: int, scale: ColorScale) -> str:
    """``"Grad-CAM · 1st: tabby (63.3%)"``, plus ``random weights`` and what the colours mean."""
    heading = f"{_method_title(exp).split(' · ')[0]} · {target_label(exp, i, j)}"
    if exp.random_weights:
        heading += f" · {RANDOM_WEIGHTS}"
    if scale.kind == "diverging":
        heading += " · red +, blue −"
    elif scale.kind == "negative":
        heading += " · all ≤ 0 (blue)"
    if scale.shared:
        heading += " · shared scale"
    return heading


def _save_overlay(img, m, path: Path, scale: ColorScale, boxes, meta: dict[str, str], look: _PngLook) -> None:
    """One PNG of :func:`save_explanation`: titled with a colorbar (PIL, or the matplotlib figure when
    the title needs glyphs the default font lacks), or the bare overlay (``title=False``)."""
    # a map's own scale is recomputed by render_map (the same color_scale), so show() and the PNG agree
    kw: dict[str, Any] = dict(
        alpha=look.alpha, cmap=look.cmap, scale=scale if scale.shared else None, pixel=scale.pixel
    )
    io_kw: dict[str, Any] = dict(metadata=meta, compress_level=look.compress_level, overwrite=look.overwrite)
    heading = meta["Title"]
    if not look.title:  # the same rendering, without a title band
        shown, _ = render_map(img, m, **kw)
        save_png(shown, path, boxes=boxes, **io_kw)
        return
    drawn = overlay_png(img, m, heading, boxes=boxes, dpi=look.dpi, colorbar=look.colorbar, **kw)
    if drawn is not None:  # the titled overlay, drawn with PIL
        save_png(drawn, path, **io_kw)
    else:  # glyphs the default font lacks: the figure, with matplotlib's font fallbacks
        fig = overlay_figure(img, m, heading, boxes=boxes, dpi=look.dpi, colorbar=look.colorbar, **kw)
        save_figure(fig, path, dpi=look.dpi, **io_kw)


__all__ = [
    "ColorScale",
    "attribution_heat",
    "attribution_rgb",
    "batch_grid",
    "boxes_figure",
    "color_scale",
    "colorize",
    "colormap_lut",
    "detection_figure",
    "explanation_figure",
    "montage",
    "normalize",
    "output_paths",
    "overlay",
    "overlay_figure",
    "patch_boxes",
    "pixel_figure",
    "resize_map",
    "safe_name",
    "save_explanation",
    "save_figure",
    "save_png",
    "segmentation_figure",
    "shared_color_scale",
    "target_label",
    "topk_figure",
    "unique_names",
]
