"""Detection and segmentation figures (a panel per detection / mask)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from camlens.api.explanation import Explanation
from camlens.viz.panels import _add_boxes, _grid, _image_of, _label, _method_title, _panel
from camlens.viz.render import BOX_COLOR, render_map


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
