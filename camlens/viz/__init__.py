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
  volumes and clips: :func:`slice_montage`, :func:`three_view`, :func:`volume_figure`
  (:mod:`camlens.viz.volume`), :func:`frame_strip`, :func:`gif_bytes`, :func:`mp4_bytes` (:mod:`camlens.viz.clip`);
  :func:`save_explanation` — PNG (with a colorbar), ``.npy`` and JSON.

One module per job: ``render`` (colours, the colour rule), ``panels`` (titles, labels, boxes, grids),
``figures`` (the layouts), ``tasks`` (detection/segmentation figures), ``png`` (files, fonts),
``notebook`` (display), ``export`` (:func:`save_explanation`); safe file names are
:mod:`camlens.base.names`. This package re-exports their public names.
"""

from __future__ import annotations

from camlens.base.names import safe_name, unique_names
from camlens.viz.clip import clip_explanation_figure, frame_strip, gif_bytes, mp4_bytes, overlay_frames
from camlens.viz.export import SaveOptions, output_paths, save_explanation, save_options
from camlens.viz.figures import (
    batch_grid,
    boxes_figure,
    explanation_figure,
    image_scale,
    montage,
    pixel_figure,
    scale_label,
    topk_figure,
)
from camlens.viz.notebook import display_figure, figure_png, in_notebook, interactive_backend
from camlens.viz.panels import denormalize, is_topk, layer_title, ordinal, patch_boxes, target_label, true_rank
from camlens.viz.png import (
    FALLBACK_FONTS,
    PNG_COMPRESS_LEVEL,
    ColorbarGeometry,
    colorbar_geometry,
    overlay_figure,
    overlay_png,
    save_figure,
    save_png,
)
from camlens.viz.render import (
    BOX_COLOR,
    BOX_POINTS,
    DIVERGING_CMAP,
    GT_COLOR,
    PIXEL_PERCENTILE,
    SIGN_TOLERANCE,
    ColorScale,
    attribution_heat,
    attribution_rgb,
    color_scale,
    colorize,
    colormap_lut,
    normalize,
    overlay,
    render_map,
    resize_map,
    shared_color_scale,
)
from camlens.viz.tasks import detection_figure, segmentation_figure
from camlens.viz.volume import slice_montage, three_view, volume_figure

__all__ = [
    "BOX_COLOR",
    "BOX_POINTS",
    "DIVERGING_CMAP",
    "FALLBACK_FONTS",
    "GT_COLOR",
    "PIXEL_PERCENTILE",
    "PNG_COMPRESS_LEVEL",
    "SIGN_TOLERANCE",
    "ColorScale",
    "ColorbarGeometry",
    "SaveOptions",
    "attribution_heat",
    "attribution_rgb",
    "batch_grid",
    "boxes_figure",
    "clip_explanation_figure",
    "color_scale",
    "colorbar_geometry",
    "colorize",
    "colormap_lut",
    "denormalize",
    "detection_figure",
    "display_figure",
    "explanation_figure",
    "figure_png",
    "frame_strip",
    "gif_bytes",
    "image_scale",
    "in_notebook",
    "interactive_backend",
    "is_topk",
    "layer_title",
    "montage",
    "mp4_bytes",
    "normalize",
    "ordinal",
    "output_paths",
    "overlay",
    "overlay_figure",
    "overlay_frames",
    "overlay_png",
    "patch_boxes",
    "pixel_figure",
    "render_map",
    "resize_map",
    "safe_name",
    "save_explanation",
    "save_figure",
    "save_options",
    "save_png",
    "scale_label",
    "segmentation_figure",
    "shared_color_scale",
    "slice_montage",
    "target_label",
    "three_view",
    "topk_figure",
    "true_rank",
    "unique_names",
    "volume_figure",
]
