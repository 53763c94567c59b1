"""Figures and files: normalize, colorize, overlay, top-k / batch / pixel figures, and export.

Everything here builds :class:`matplotlib.figure.Figure` objects directly (no pyplot, no global
figure list, no display needed) and saves through the Agg canvas. In a notebook, a returned figure
displays itself as the cell's result.

* :func:`normalize` — per-map min–max to [0, 1] by :func:`camlens.ops.minmax` (maps constant up to
  rounding -> 0, never NaN): the function behind every overlay and colour map.
* :func:`colorize` — any matplotlib colormap (``"jet"`` by default, as in the notebooks).
* :func:`overlay` — ``(1 - α) · image + α · colormap(map)``, the map resized (bilinear) to the image.
* :func:`topk_figure`, :func:`batch_grid`, :func:`pixel_figure`, :func:`boxes_figure`,
  :func:`explanation_figure` — the layouts; :func:`save_explanation` — PNG, ``.npy`` and JSON.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ._util import numbered, rank_tags
from ._version import __version__
from .errors import InputError
from .explanation import Explanation
from .fsio import atomic_write, check_targets, safe_out_dir
from .localization import DEFAULT_THRESHOLD, image_boxes, localize, scale_boxes
from .methods.registry import methods
from .ops import ULPS, minmax

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
    the map is constant up to rounding (see :func:`camlens.ops.minmax`). Returns the input's type
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
    signed: bool = False,
    pixel: bool = False,
    alpha: float = 0.5,
    cmap: str = "jet",
    diverging_cmap: str = DIVERGING_CMAP,
) -> tuple[np.ndarray, tuple[float, float, str]]:
    """The one rendering of a map over its image, used by ``show()`` and by the saved PNGs alike.

    Returns the ``(H, W, 3)`` uint8 overlay and the colour scale ``(vmin, vmax, colormap)`` in the
    map's own units (for a colorbar).

    * **signed** maps (CAM, Integrated Gradients, input x gradient…): a diverging colormap centred at
      zero with symmetric limits ``±L`` (``L`` = max ``|m|``; for pixel maps its
      :data:`PIXEL_PERCENTILE` percentile), blended with opacity ``α · |m| / L`` (pixel maps:
      ``min(1, 2α) · √(|m| / L)``): zero leaves the
      photo as it is, positive evidence turns red, negative blue. Min–max jet would paint the map's
      most negative value dark blue and its *least negative* value red — on CAM of an absent class
      (negative everywhere) the whole photo turned red.
    * **unsigned layer maps** (Grad-CAM family, Score-CAM): min–max normalized jet blended with a
      uniform opacity ``α`` (the notebooks' look).
    * **unsigned pixel maps** (saliency, guided backprop…): clipped at the percentile, min–max
      normalized, jet blended with opacity ``min(1, 2α) · value``: the many near-zero pixels leave the photo
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
    if not signed and not pixel:  # the classic overlay (normalized at the map's own resolution: fast)
        small = _np(m).astype(np.float64)
        lo, hi = float(np.nanmin(small)), float(np.nanmax(small))
        return overlay(img, m, alpha, cmap), (lo, hi if hi > lo else lo + 1.0, cmap)
    v = resize_map(m, img.shape[:2]).astype(np.float64)
    v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
    base = img.astype(np.float64)
    if signed:
        a = np.abs(v)
        lim = float(np.percentile(a, PIXEL_PERCENTILE)) if pixel else float(a.max())
        if not lim > 0:
            lim = float(a.max()) or 1.0
        u = np.clip(v / lim, -1, 1)
        heat = colormap_lut(diverging_cmap)[_lut_index((u + 1) / 2)].astype(np.float64)
        op = _opacity(np.abs(u), alpha, pixel, gamma=0.5)
        scale = (-lim, lim, diverging_cmap)
    else:
        if pixel:
            lo, hi = np.percentile(v, [100 - PIXEL_PERCENTILE, PIXEL_PERCENTILE]) if v.size else (0.0, 0.0)
            v = np.clip(v, lo, hi) if hi > lo else v
        lo, hi = float(v.min()), float(v.max())
        u = (v - lo) / (hi - lo) if hi - lo > 1e-8 else np.zeros_like(v)
        heat = colorize(u, cmap, normalized=True).astype(np.float64)
        op = _opacity(u, alpha, pixel) if pixel else np.full((*u.shape, 1), alpha)
        scale = (lo, hi if hi > lo else lo + 1.0, cmap)
    out = (1.0 - op) * base + op * heat
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), scale


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


def _render(exp: Explanation, i: int, k: int, img: np.ndarray, alpha: float, cmap: str):
    """The overlay of map ``(i, k)`` on ``img`` and its colour scale (see :func:`render_map`)."""
    return render_map(img, exp.map(i, k), signed=exp.signed, pixel=exp.raw.dim() == 5, alpha=alpha, cmap=cmap)


def _colorbar(fig: Figure, ax, scale: tuple[float, float, str], signed: bool) -> None:
    """A colorbar beside ``ax`` in the map's own units (signed: symmetric around 0)."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    lo, hi, name = scale
    cb = fig.colorbar(
        ScalarMappable(Normalize(lo, hi), matplotlib.colormaps[name]), ax=ax, fraction=0.046, pad=0.02, shrink=0.9
    )
    cb.ax.tick_params(labelsize=7)
    if signed:
        cb.set_ticks([lo, 0.0, hi])
        cb.set_label("signed: 0 = none", fontsize=7)
    else:
        cb.set_ticks([lo, hi])


def _image_boxes(exp: Explanation, threshold: float | None) -> list[np.ndarray]:
    return image_boxes(exp, DEFAULT_THRESHOLD if threshold is None else threshold)


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
) -> Figure:
    """One image's ``K`` target classes side by side, each overlay titled ``"1st: name (p%)"``
    (as the notebooks' top-1 / top-2 figures); the original image first when ``show_image``."""
    img = _image_of(exp, index)
    k = 1 if exp.class_agnostic else exp.shape[1]
    fig, axes = _grid(k + int(show_image), k + int(show_image), cell, img.shape[0] / img.shape[1])
    if show_image:
        _panel(axes[0], img, _source_title(exp, index))
        axes = axes[1:]
    bx = _image_boxes(exp, threshold)[index] if boxes else None
    for j, ax in enumerate(axes):
        shown, scale = _render(exp, index, j, img, alpha, cmap)
        _panel(ax, shown, target_label(exp, index, j))
        _colorbar(fig, ax, scale, exp.signed)
        if bx is not None:
            _add_boxes(ax, bx[j])
    fig.suptitle(_method_title(exp), fontsize=11)
    return fig


def _method_title(exp: Explanation) -> str:
    info = methods().get(exp.method)
    pretty = info.title if info is not None else exp.method
    parts = [pretty]
    if exp.model_name:
        parts.append(exp.model_name)
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
    **kwargs: Any,
) -> Figure:
    """The default figure of an :class:`~camlens.Explanation` (``exp.show()``, ``exp.figure()``): one
    row per image (at most ``max_images``), the original then one overlay per target class titled
    with its true rank (when known), name and probability, each with a colorbar — the same rendering
    as the saved PNGs (:func:`render_map`: signed maps diverging around zero, unsigned ones jet).
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
        return topk_figure(exp, rows[0], alpha=alpha, cmap=cmap, boxes=boxes, threshold=threshold, cell=cell, **kwargs)
    k = 1 if exp.class_agnostic else exp.shape[1]
    img0 = _image_of(exp, rows[0])
    ncols = k + 1
    fig, axes = _grid(len(rows) * ncols, ncols, cell, img0.shape[0] / img0.shape[1])
    bxs = _image_boxes(exp, threshold) if boxes else None
    for r, i in enumerate(rows):
        img = _image_of(exp, i)
        ax_row = axes[r * ncols : (r + 1) * ncols]
        _panel(ax_row[0], img, _source_title(exp, i), fontsize=9)
        for j in range(k):
            shown, scale = _render(exp, i, j, img, alpha, cmap)
            _panel(ax_row[1 + j], shown, target_label(exp, i, j), fontsize=9)
            _colorbar(fig, ax_row[1 + j], scale, exp.signed)
            if bxs is not None:
                _add_boxes(ax_row[1 + j], bxs[i][j])
            ref = np.asarray(exp.extras["boxes"])[i, j] if "boxes" in exp.extras else None
            if ref is not None and np.isfinite(ref).all():  # a detector's explained box
                _add_boxes(ax_row[1 + j], np.round(ref))
    fig.suptitle(_method_title(exp), fontsize=11)
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
        _panel(ax, overlay(img, m, alpha, cmap), _task_title(exp, index, k))
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
        _panel(ax, overlay(img, exp.map(index, k), alpha, cmap), _task_title(exp, index, k))
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
    atomically (:func:`camlens.fsio.atomic_write`); ``overwrite=False`` refuses an existing file.
    ``compress_level`` (0–9) sets a PNG's zlib level (default: matplotlib's)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    p = Path(path)
    fmt = kwargs.pop("format", None) or (p.suffix.lstrip(".").lower() or "png")
    if compress_level is not None and fmt == "png":
        kwargs["pil_kwargs"] = {**kwargs.get("pil_kwargs", {}), "compress_level": int(compress_level)}
    _font_fallback(fig)
    # atomic and symlink-safe (camlens.fsio): complete or absent, a link is replaced, never followed
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
    (:func:`camlens.fsio.atomic_write`); ``overwrite=False`` refuses an existing file."""
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
    signed: bool = False,
    pixel: bool = False,
) -> Figure:
    """One overlay at the image's own resolution (upscaled to at least ``min_width`` pixels wide, no
    side beyond ``max_side`` from the upscale) with a title band on top: the saved PNG is ``W·s`` x
    ``H·s + 30·min(s, 5)`` pixels, ``s`` the upscale. The overlay is :func:`render_map`'s, as in
    ``show()``."""
    img = np.asarray(image)
    h, w = img.shape[:2]
    lay = _overlay_layout(h, w, title, min_width, max_side, dpi)
    W, H = lay.width, lay.height
    fig = Figure(figsize=(W / dpi, H / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, h * lay.scale / H))
    shown, _ = render_map(img, m, signed=signed, pixel=pixel, alpha=alpha, cmap=cmap)
    ax.imshow(shown, interpolation="nearest" if lay.scale > 1 else "antialiased")
    ax.set_axis_off()
    if boxes is not None:
        _add_boxes(ax, boxes, lw=BOX_POINTS)
    fig.text(0.5, 1 - (lay.band / 2) / H, title, ha="center", va="center", fontsize=lay.fontsize)
    return fig


@dataclass(frozen=True)
class _OverlayLayout:
    """Geometry of a titled overlay (:func:`overlay_figure`, :func:`overlay_png`): the upscale, the
    title band's height, the canvas size (pixels, unrounded) and the title's font size (points)."""

    scale: float
    band: float
    width: float
    height: float
    fontsize: float


def _overlay_layout(h: int, w: int, title: str, min_width: int, max_side: int, dpi: int) -> _OverlayLayout:
    s = max(1.0, min_width / w)
    s = min(s, max(1.0, max_side / h))  # a 1-pixel-wide strip is not blown up to 320 x 100 000
    band = 30 * min(s, 5.0)  # the title band grows with the upscale, up to 150 px (a 1x1 image: 320 x 470)
    W = w * s
    # font size that fits the width: average glyph ≈ 0.55 em, 1 pt = dpi/72 px
    fs = float(np.clip((W - 8) / (0.6 * max(len(title), 1) * dpi / 72), 6, 13))
    return _OverlayLayout(s, band, W, h * s + band, fs)


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
    signed: bool = False,
    pixel: bool = False,
) -> np.ndarray | None:
    """:func:`overlay_figure`'s picture drawn with PIL alone, as an ``(H, W, 3)`` uint8 array: the
    same size, upscale, title band, font and font size, and boxes of the same colour and width
    (2 pt), without matplotlib artists or the Agg canvas (which cost most of a titled PNG's time).
    Returns ``None`` when the title needs glyphs outside the default font (then the figure, with
    its font fallbacks, is the way) or the font cannot be loaded."""
    from PIL import Image, ImageDraw

    if not title.isascii() and not all(ord(c) in _default_font()[1] for c in title):
        return None
    img = np.asarray(image)
    h, w = img.shape[:2]
    lay = _overlay_layout(h, w, title, min_width, max_side, dpi)
    W, H = int(lay.width + 1e-6), int(lay.height + 1e-6)  # the Agg canvas truncates its float size
    ih = min(H, max(1, round(h * lay.scale)))
    font = _title_font(max(1, round(lay.fontsize * dpi / 72)))
    if font is None:
        return None
    shown, _ = render_map(img, m, signed=signed, pixel=pixel, alpha=alpha, cmap=cmap)
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
    ImageDraw.Draw(canvas).text((W / 2, (H - ih) / 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    return np.asarray(canvas)


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


def _versions() -> dict[str, str]:
    return {"camlens": __version__, "torch": torch.__version__}


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


def save_explanation(
    exp: Explanation,
    directory: str | Path,
    *,
    formats: Sequence[str] | str = ("png", "npy", "json"),
    overwrite: bool = False,
    threshold: float | None = None,
    boxes: bool = False,
    alpha: float = 0.5,
    cmap: str = "jet",
    suffix: str = "auto",
    dpi: int = 100,
    title: bool = True,
    compress_level: int = PNG_COMPRESS_LEVEL,
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
      ``title=False``: the overlay alone at the image's own resolution, written by NumPy + PIL
      without matplotlib figures (the fast path; the title stays in the ``Title`` text field).
      ``compress_level``: the PNGs' zlib level (default :data:`PNG_COMPRESS_LEVEL`, for speed).
    * ``npy``: ``{stem}_{m}.npy`` — the raw maps ``(K, H, W)`` float32 at the model's input size.
    * ``json``: ``{stem}_{m}.json`` — classes, class names, scores (logits), probabilities, boxes
      (image and map pixels, at ``threshold``), method, layer, model, camlens and torch versions.

    Existing files are never replaced unless ``overwrite=True``: all names are checked before
    anything is written, and :class:`~camlens.errors.OutputExistsError` says to pass ``--overwrite``.
    """
    fmts = [f.strip().lower() for f in (formats.split(",") if isinstance(formats, str) else formats)]
    bad = [f for f in fmts if f not in ("png", "npy", "json")]
    if bad or not fmts:
        raise InputError(f"unknown output format(s) {bad or fmts}; choose from png, npy, json")
    if suffix not in ("rank", "class", "auto"):
        raise InputError(f"suffix must be 'auto', 'rank' or 'class', not {suffix!r}")
    if suffix == "auto":
        suffix = "rank" if is_topk(exp) else "class"
    if suffix == "rank" and not exp.class_agnostic and exp.ranks is not None and not is_topk(exp):
        raise InputError(
            "suffix='rank' names files top1, top2…, but these targets are not the top-k classes "
            "(or their ranks are unknown); use suffix='class' or 'auto'"
        )
    thr = DEFAULT_THRESHOLD if threshold is None else threshold
    draw = boxes or threshold is not None
    out = Path(directory)
    n = len(exp)
    stems = unique_names([safe_name(s) for s in (exp.sources or numbered("image", n))])
    labels = exp.labels()
    if exp.class_agnostic:
        suffix = "agnostic"
    plan = output_paths(out, stems, exp.method, labels, fmts, suffix)
    flat = [p for per in plan for ps in per.values() for p in ps]
    if len(set(flat)) != len(flat):
        raise InputError("two outputs would get the same file name; use suffix='rank'")
    check_targets(flat, overwrite)  # files and links (even dangling ones) are in the way without overwrite
    safe_out_dir(out)

    size = tuple(exp.shape[-2:])
    written: list[Path] = []
    title0 = _method_title(exp)
    signed = exp.signed  # once: it looks at every map
    for i in range(n):
        maps_i = exp.image_maps(i)  # (K, H, W): one image's maps at a time (lazy maps stay small)
        map_boxes = localize(maps_i, thr)  # (K, 4) in the maps' frame
        img = _image_of(exp, i)
        img_boxes = scale_boxes(map_boxes, size, img.shape[:2]) if exp.images else map_boxes
        if "png" in fmts:
            for j, p in enumerate(plan[i]["png"]):
                heading = f"{title0.split(' · ')[0]} · {target_label(exp, i, j)}"
                if signed:
                    heading += " · red +, blue −"
                meta = {
                    "Title": heading,
                    "Software": f"camlens {_versions()['camlens']}",
                    "Description": f"{exp.method} map of class {int(exp.classes[i, j])} "
                    f"({labels[i][j]}) for {stems[i]}",
                }
                bx = img_boxes[j] if draw else None
                pixel = exp.raw.dim() == 5
                if "boxes" in exp.extras and np.isfinite(ref := np.asarray(exp.extras["boxes"])[i, j]).all():
                    bx = np.round(ref)  # a detector's explained box, in the image's pixels
                kw: dict[str, Any] = dict(alpha=alpha, cmap=cmap, signed=signed, pixel=pixel)
                drawn = overlay_png(img, maps_i[j], heading, boxes=bx, dpi=dpi, **kw) if title else None
                if drawn is not None:  # the titled overlay, drawn with PIL
                    save_png(drawn, p, metadata=meta, compress_level=compress_level, overwrite=overwrite)
                elif title:  # glyphs the default font lacks: the figure, with matplotlib's font fallbacks
                    fig = overlay_figure(img, maps_i[j], heading, boxes=bx, dpi=dpi, **kw)
                    save_figure(fig, p, dpi=dpi, overwrite=overwrite, metadata=meta, compress_level=compress_level)
                else:  # the same rendering, without a title band
                    shown, _ = render_map(img, maps_i[j], **kw)
                    save_png(shown, p, metadata=meta, compress_level=compress_level, boxes=bx, overwrite=overwrite)
                written.append(p)
        if "npy" in fmts:
            p = plan[i]["npy"][0]
            arr = maps_i.detach().float().cpu().numpy()
            atomic_write(p, functools.partial(np.save, arr=arr), overwrite=overwrite)
            written.append(p)
        if "json" in fmts:
            p = plan[i]["json"][0]
            summary = {
                "source": exp.sources[i] if exp.sources else stems[i],
                "method": exp.method,
                "layer": exp.layer,
                "model": exp.model_name,
                "image_size": list(img.shape[:2]) if exp.images else None,
                "map_size": list(size),
                "classes": [int(c) for c in exp.classes[i].tolist()],
                "class_names": labels[i],
                "scores": [float(v) for v in exp.scores[i].tolist()],
                "probs": [None if v != v else float(v) for v in exp.probs[i].tolist()],
                "ranks": None if exp.ranks is None else [int(r) for r in exp.ranks[i].tolist()],
                "signed": signed,
                "threshold": float(thr),
                "boxes": img_boxes.tolist(),
                "boxes_map": map_boxes.tolist(),
                "box_format": "x0,y0,x1,y1 pixels, x1/y1 exclusive, -1 = no box",
                "extras": _scalar_extras(exp.extras),
                **(
                    {
                        "explained_boxes": [
                            None if b[0] != b[0] else [float(v) for v in b] for b in exp.extras["boxes"][i]
                        ]
                    }
                    if "boxes" in exp.extras
                    else {}
                ),
                "versions": _versions(),
            }
            atomic_write(p, json.dumps(summary, indent=2) + "\n", overwrite=overwrite)
            written.append(p)
    return written


__all__ = [
    "attribution_heat",
    "attribution_rgb",
    "batch_grid",
    "boxes_figure",
    "colorize",
    "colormap_lut",
    "detection_figure",
    "explanation_figure",
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
    "target_label",
    "topk_figure",
    "unique_names",
]
