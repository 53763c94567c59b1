"""The figure layouts: top-k, batch grid, pixel attributions, boxes, an explanation, the montage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from camlens.api.explanation import RANDOM_WEIGHTS, Explanation
from camlens.base._util import with_options
from camlens.base.errors import InputError
from camlens.base.localization import DEFAULT_THRESHOLD, map_boxes, scale_boxes
from camlens.viz.panels import _add_boxes, _grid, _image_of, _label, _method_title, _panel, _source_title, target_label
from camlens.viz.render import (
    BOX_COLOR,
    GT_COLOR,
    ColorScale,
    attribution_heat,
    attribution_rgb,
    colorize,
    overlay,
    render_map,
    resize_map,
    shared_color_scale,
)
from camlens.viz.tasks import detection_figure, segmentation_figure


def _render(exp: Explanation, i: int, k: int, img: np.ndarray, alpha: float, cmap: str, scale=None):
    """The overlay of map ``(i, k)`` on ``img`` and its colour scale (see :func:`render_map`)."""
    return render_map(img, exp.map(i, k), pixel=exp.kind == "pixel", alpha=alpha, cmap=cmap, scale=scale)


def image_scale(exp: Explanation, i: int, cmap: str = "jet") -> ColorScale:
    """One :func:`shared_color_scale` for the ``K`` maps of image ``i`` (one method: one unit)."""
    return shared_color_scale(exp.image_maps(i), pixel=exp.kind == "pixel", cmap=cmap)


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


@dataclass(frozen=True)
class GridLook:
    """How :func:`batch_grid` draws: heatmap opacity ``alpha`` and colormap ``cmap``, and the size
    of a cell in inches (``cell``)."""

    alpha: float = 0.4
    cmap: str = "jet"
    cell: float = 2.8


def batch_grid(
    images: Sequence[np.ndarray],
    maps=None,
    true_labels: Sequence | None = None,
    pred_labels: Sequence | None = None,
    probs: Sequence[float] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    ncols: int = 4,
    boxes=None,
    gt_boxes=None,
    title: str | None = None,
    **look: Any,
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
        look: :class:`GridLook` fields (``alpha=0.4``, ``cmap="jet"``, ``cell=2.8``).
    """
    style = with_options(GridLook, None, look, "batch_grid")
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
    fig, axes = _grid(n, ncols, style.cell, first.shape[0] / first.shape[1], extra_h=0.6)
    for i, ax in enumerate(axes):
        img = np.asarray(images[i])
        shown = overlay(img, maps[i], style.alpha, style.cmap) if maps is not None else img
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
    if exp.kind != "pixel":
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
    if exp.spatial_dims != 2:
        raise InputError(
            f"{exp.method}'s maps are volumes or clips {exp.shape}; draw them with "
            "camlens.viz.volume.volume_figure(exp, index, target) (a slice montage)"
        )
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
