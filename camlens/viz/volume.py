"""Figures of volume and clip maps ``(D, H, W)``: a slice montage over the three orthogonal views.

:func:`slice_montage` draws one row per view and ``n_slices`` slices per row:

* **axial** — slices along the first axis ``D`` (a scan's ``k``; a clip's frames), showing ``(H, W)``;
* **coronal** — along ``H``, showing ``(D, W)``;
* **sagittal** — along ``W``, showing ``(D, H)``.

(The names are a scan's in camlens' ``(k, j, i)`` order of a NIfTI file in the usual RAS-like
orientation, see :mod:`camlens.base.nifti`; for a clip "axial" means frames.) The slices are
evenly spaced over each axis, with the one nearest the map's **peak** replaced by the slice
through the peak itself: that panel is framed in red and the peak's in-plane position circled in
red. The peak is the largest value of an unsigned map, the largest ``|value|`` of a signed one.

Colours follow camlens' one rule (:func:`camlens.viz.color_scale`): one scale for the whole volume
(every slice comparable), ``jet`` over ``[min, max]`` for a map of one sign, a diverging map centred
at zero for signed maps (red for, blue against), with a colorbar in the map's units. Over a
background (the scan, or the explained input itself) the overlay is :func:`camlens.viz.render_map`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from camlens.api.explanation import Explanation
from camlens.base.errors import InputError
from camlens.viz.figures import _colorbar, scale_label
from camlens.viz.render import ColorScale, color_scale, render_map

#: view name -> the map axis it slices (of ``(D, H, W)``)
VIEWS = {"axial": 0, "coronal": 1, "sagittal": 2}
PEAK_COLOR = "red"


def _np3(m, what: str) -> np.ndarray:
    a = m.detach().float().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m, dtype=np.float64)
    if a.ndim != 3:
        raise InputError(f"{what} must be one (D, H, W) volume, got shape {a.shape}; pick one, e.g. exp.map(i, k)")
    return a.astype(np.float64)


def peak_voxel(m: np.ndarray, signed: bool) -> tuple[int, int, int]:
    """``(z, y, x)`` of the map's peak: its largest value, or largest ``|value|`` when ``signed``."""
    v = np.nan_to_num(np.abs(m) if signed else m, nan=-np.inf)
    z, y, x = np.unravel_index(int(np.argmax(v)), m.shape)
    return int(z), int(y), int(x)


def slice_indices(size: int, n: int, peak: int) -> list[int]:
    """``n`` evenly spaced indices over ``0 .. size - 1`` (fewer when ``size < n``), the one
    nearest ``peak`` replaced by ``peak``; sorted, distinct."""
    idx = sorted({round(float(v)) for v in np.linspace(0, size - 1, min(n, size))})
    nearest = min(range(len(idx)), key=lambda i: abs(idx[i] - peak))
    idx[nearest] = peak
    return sorted(set(idx))


def _grey(background: np.ndarray) -> np.ndarray:
    """A ``(D, H, W)`` background min-max scaled to uint8 grey levels."""
    lo, hi = np.nanmin(background), np.nanmax(background)
    u = (background - lo) / (hi - lo) if hi > lo else np.zeros_like(background)
    return np.clip(np.nan_to_num(u) * 255 + 0.5, 0, 255).astype(np.uint8)


def _aspect(shape: tuple[int, ...], spacing: tuple[float, ...], axis: int) -> float:
    """Height / width of a slice across ``axis`` of a ``shape`` volume with voxel ``spacing``."""
    rows, cols = [d for d in range(3) if d != axis]
    return (shape[rows] * spacing[rows]) / (shape[cols] * spacing[cols])


def _take(a: np.ndarray, axis: int, i: int) -> np.ndarray:
    return np.take(a, i, axis=axis)


def _panel(ax, m2: np.ndarray, bg2: np.ndarray | None, sc: ColorScale, alpha: float, aspect: float) -> None:
    if bg2 is None:
        rgb = np.full((*m2.shape, 3), 128, dtype=np.uint8)
        rgb, _ = render_map(rgb, m2, scale=sc, pixel=sc.pixel, alpha=1.0)
    else:
        rgb, _ = render_map(np.repeat(bg2[..., None], 3, axis=2), m2, scale=sc, pixel=sc.pixel, alpha=alpha)
    ax.imshow(rgb, aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def slice_montage(
    m,
    background=None,
    *,
    views: Sequence[str] = ("axial", "coronal", "sagittal"),
    n_slices: int = 5,
    alpha: float = 0.5,
    pixel: bool = False,
    spacing: Sequence[float] | None = None,
    title: str | None = None,
    cell: float = 2.2,
) -> Figure:
    """A slice montage of one map ``m`` ``(D, H, W)`` (see the module docstring), over an optional
    ``background`` volume of the same shape (the scan: grey levels). ``pixel``: the map is a pixel
    attribution (percentile-clipped scale, opacity by strength). ``spacing``: the voxel size along
    ``(D, H, W)`` (e.g. ``Volume.spacing[::-1]``) so that anisotropic slices keep their proportions.
    Returns a :class:`matplotlib.figure.Figure`."""
    a = _np3(m, "the map")
    bg = None if background is None else _grey(_np3(background, "the background"))
    if bg is not None and bg.shape != a.shape:
        raise InputError(f"the background has shape {bg.shape}, the map {a.shape}: they must match")
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise InputError(f"views must be some of {', '.join(VIEWS)}, not {list(views)!r}")
    if n_slices < 1:
        raise InputError(f"n_slices must be >= 1, not {n_slices}")
    sc = color_scale(a, pixel=pixel)
    peak = peak_voxel(a, sc.kind != "sequential")
    sz = tuple(float(s) for s in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    # each row as tall as its slices' proportions (a clip's 8 frames x 112 px make flat slices)
    ratios = [_aspect(a.shape, sz, VIEWS[v]) for v in views]
    fig = Figure(figsize=(cell * n_slices + 1.2, cell * sum(ratios) + 0.35 * len(views) + 0.6), layout="constrained")
    axes = fig.subplots(len(views), n_slices, squeeze=False, gridspec_kw={"height_ratios": ratios})
    for r, view in enumerate(views):
        axis = VIEWS[view]
        rows, cols = [d for d in range(3) if d != axis]
        idx = slice_indices(a.shape[axis], n_slices, peak[axis])
        for c in range(n_slices):
            ax = axes[r, c]
            if c >= len(idx):
                ax.set_visible(False)
                continue
            i = idx[c]
            _panel(ax, _take(a, axis, i), None if bg is None else _take(bg, axis, i), sc, alpha, sz[rows] / sz[cols])
            on_peak = i == peak[axis]
            ax.set_title(
                f"{view} {i}" + (" (peak)" if on_peak else ""), fontsize=8, color=PEAK_COLOR if on_peak else "black"
            )
            if on_peak:
                ax.plot(
                    [peak[cols]], [peak[rows]], marker="o", fillstyle="none", color=PEAK_COLOR, markersize=14, mew=1.5
                )
                for s in ax.spines.values():
                    s.set_edgecolor(PEAK_COLOR)
                    s.set_linewidth(2.5)
    _colorbar(fig, axes.ravel().tolist(), sc, fraction=0.02, shrink=0.8)
    head = f"{title}  " if title else ""
    fig.suptitle(f"{head}peak at (z, y, x) = {peak}, {scale_label(sc)}", fontsize=9)
    return fig


def volume_figure(exp: Explanation, index: int = 0, target: int = 0, *, background=None, **kwargs: Any) -> Figure:
    """:func:`slice_montage` of one map of a volume or clip :class:`~camlens.Explanation` (image
    ``index``, target ``target``), over ``background`` (e.g. ``Volume.tensor()[0, 0]``) or else the
    explained input itself (its channel mean) when the explanation holds it."""
    if exp.spatial_dims != 3:
        raise InputError(f"volume_figure draws volume and clip maps (N, K, D, H, W); these are {exp.shape}")
    if background is None and exp.inputs is not None and exp.inputs.dim() == 5:
        background = exp.inputs[index].float().mean(0)
    names = exp.labels()[index]
    title = f"{exp.method} · {names[target]}" + (" (random weights)" if exp.random_weights else "")
    kwargs.setdefault("pixel", exp.kind == "pixel")
    return slice_montage(exp.map(index, target), background, title=kwargs.pop("title", title), **kwargs)


__all__ = ["VIEWS", "peak_voxel", "slice_indices", "slice_montage", "volume_figure"]
