"""Saving an explanation: PNG overlays, ``.npy`` maps and a JSON summary (:func:`save_explanation`)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camlens._version import __version__, versions
from camlens.api.explanation import RANDOM_WEIGHTS, Explanation
from camlens.base._util import numbered, rank_tags, with_options
from camlens.base.errors import InputError
from camlens.base.fsio import atomic_write, check_targets, safe_out_dir
from camlens.base.localization import DEFAULT_THRESHOLD, localize, photo_sizes, scale_boxes
from camlens.base.names import safe_name, unique_names
from camlens.viz.panels import _image_of, _method_title, _short, is_topk, target_label
from camlens.viz.png import PNG_COMPRESS_LEVEL, overlay_figure, overlay_png, save_figure, save_png
from camlens.viz.render import ColorScale, color_scale, render_map, resize_map, shared_color_scale


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
    if exp.spatial_dims != 2:
        raise InputError(
            f"{exp.method}'s maps are volumes or clips {exp.shape}: save them with "
            "camlens.base.nifti.save_nifti(exp.maps[i, k], scan, PATH) (in a scan's space), numpy.save, or "
            "camlens.viz.volume.volume_figure(exp, i, k).savefig(PATH)"
        )
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
        pixel = exp.kind == "pixel"
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
