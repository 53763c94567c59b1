"""Figures of volume and clip maps ``(D, H, W)``: a slice montage over the three orthogonal views,
and the orthogonal three-view through the peak (:func:`three_view`).

:func:`slice_montage` draws one row per view and ``n_slices`` slices per row:

* **axial** — slices along the first axis ``D`` (a scan's ``k``; a clip's frames), showing ``(H, W)``;
* **coronal** — along ``H``, showing ``(D, W)``;
* **sagittal** — along ``W``, showing ``(D, H)``.

Coronal and sagittal slices are drawn with ``z`` (the first axis) growing upwards: superior up
in a RAS scan, as in :func:`three_view` and the web app. (The names are a scan's in camlens'
``(k, j, i)`` order of a NIfTI file in the usual RAS-like orientation, see
:mod:`camlens.base.nifti`; for a clip "axial" means frames.) The slices are evenly spaced
over each axis, with the one nearest the map's **peak** replaced by the slice
through the peak itself: that panel is framed in red and the peak's in-plane position circled in
red. The peak is the largest value of an unsigned map, the largest ``|value|`` of a signed one.

Colours follow camlens' one rule (:func:`camlens.viz.color_scale`): one scale for the whole volume
(every slice comparable), ``jet`` over ``[min, max]`` for a map of one sign, a diverging map centred
at zero for signed maps (red for, blue against), with a colorbar in the map's units. Over a
background (the scan, or the explained input itself) the overlay is :func:`camlens.viz.render_map`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
            if rows == 0:  # coronal / sagittal: z upwards, as in three_view and the web app
                ax.invert_yaxis()
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


# --------------------------------------------------------------------------------------------
# The orthogonal three-view: one slice per view through the peak, a crosshair at the peak
# --------------------------------------------------------------------------------------------
#: view -> (the axis it slices, its rows' axis, its columns' axis) of ``(D, H, W)``
_PLANES = {"axial": (0, 1, 2), "coronal": (1, 0, 2), "sagittal": (2, 0, 1)}
_AXIS_LETTER = "zyx"


def world_mm(affine, zyx: Sequence[int]) -> np.ndarray:
    """World coordinates (mm) ``(x, y, z)`` of voxel ``(z, y, x)`` through a 4x4 voxel-to-world
    ``affine`` whose voxel axes are ``(x, y, z)`` (a NIfTI file's ``(i, j, k)``, see
    :class:`camlens.base.nifti.Volume`)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise InputError(f"affine must be a 4x4 voxel-to-world matrix, not shape {a.shape}")
    return a[:3, :3] @ np.asarray(zyx, dtype=np.float64)[::-1] + a[:3, 3]


def _spacing_of(spacing: Sequence[float] | None, affine) -> tuple[float, float, float]:
    """Voxel size along ``(D, H, W)``: ``spacing`` as given, else the affine's column norms (its
    ``(i, j, k)`` reversed), else 1."""
    if spacing is not None:
        sz = tuple(float(s) for s in spacing)
        if len(sz) != 3 or not all(s > 0 for s in sz):
            raise InputError(f"spacing must be three positive voxel sizes (D, H, W), not {tuple(spacing)!r}")
        return sz
    if affine is not None:
        s = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
        return (float(s[2]), float(s[1]), float(s[0]))
    return (1.0, 1.0, 1.0)


def _view_title(view: str, peak: tuple[int, int, int], shape: tuple[int, ...], sz, known: bool) -> str:
    axis = _PLANES[view][0]
    i = peak[axis]
    mm = f" · {i * sz[axis]:.1f} mm" if known else ""
    return f"{view} {_AXIS_LETTER[axis]} = {i} / {shape[axis]}{mm}"


def three_view(
    m,
    background=None,
    *,
    spacing: Sequence[float] | None = None,
    affine=None,
    alpha: float = 0.5,
    pixel: bool = False,
    title: str | None = None,
    cell: float = 3.2,
) -> Figure:
    """The orthogonal three-view of one map ``m`` ``(D, H, W)``: the axial, coronal and sagittal
    slices through the map's peak (:func:`peak_voxel`), a red crosshair at the peak in each, the map
    over ``background`` (the scan, grey) on one colour scale (:func:`camlens.viz.color_scale`:
    diverging around 0 for signed maps) with a colorbar.

    Each panel keeps its physical proportions: ``spacing`` (voxel size along ``(D, H, W)`` in mm) or
    else the ``affine``'s column norms set the pixel aspect and the panel widths, so an anisotropic
    scan is not squashed. Coronal and sagittal panels have ``z`` growing upwards (superior up in a
    RAS scan). Titles give each slice's index (and its offset in mm from the first slice when the
    spacing is known); the suptitle the peak voxel and, with ``affine``, its world position in mm.
    """
    a = _np3(m, "the map")
    bg = None if background is None else _grey(_np3(background, "the background"))
    if bg is not None and bg.shape != a.shape:
        raise InputError(f"the background has shape {bg.shape}, the map {a.shape}: they must match")
    sz = _spacing_of(spacing, affine)
    sc = color_scale(a, pixel=pixel)
    peak = peak_voxel(a, sc.kind != "sequential")
    widths = [a.shape[c] * sz[c] for _, _, c in _PLANES.values()]
    heights = [a.shape[r] * sz[r] for _, r, _ in _PLANES.values()]
    scale = cell / max(heights)
    fig = Figure(figsize=(scale * sum(widths) + 1.6, cell + 0.9), layout="constrained")
    axes = fig.subplots(1, 3, gridspec_kw={"width_ratios": widths})
    for ax, view in zip(axes, _PLANES, strict=True):
        _view_panel(ax, view, a, bg, sc, alpha, sz, peak)
        ax.set_title(_view_title(view, peak, a.shape, sz, spacing is not None or affine is not None), fontsize=8)
    _colorbar(fig, list(axes), sc, fraction=0.03, shrink=0.85)
    where = f"peak (z, y, x) = {peak}"
    if affine is not None:
        where += " = ({:.1f}, {:.1f}, {:.1f}) mm".format(*world_mm(affine, peak))
    head = f"{title}  " if title else ""
    fig.suptitle(f"{head}{where}\n{scale_label(sc)}", fontsize=9)
    return fig


def _view_panel(ax, view: str, a: np.ndarray, bg, sc: ColorScale, alpha: float, sz, peak) -> None:
    """One panel of :func:`three_view`: the slice through ``peak`` across the view's axis, the crosshair."""
    axis, rows, cols = _PLANES[view]
    m2 = _take(a, axis, peak[axis])
    b2 = None if bg is None else _take(bg, axis, peak[axis])
    _panel(ax, m2, b2, sc, alpha, sz[rows] / sz[cols])
    if rows == 0:  # z upwards
        ax.invert_yaxis()
    ax.axvline(peak[cols], color=PEAK_COLOR, lw=0.8, alpha=0.9)
    ax.axhline(peak[rows], color=PEAK_COLOR, lw=0.8, alpha=0.9)
    ax.plot([peak[cols]], [peak[rows]], marker="o", fillstyle="none", color=PEAK_COLOR, markersize=10, mew=1.2)
    ax.set_xlabel(_AXIS_LETTER[cols], fontsize=7, labelpad=1)
    ax.set_ylabel(_AXIS_LETTER[rows], fontsize=7, labelpad=1)


def volume_figure(
    exp: Explanation, index: int = 0, target: int = 0, *, kind: str = "montage", background=None, **kwargs: Any
) -> Figure:
    """One map of a volume or clip :class:`~camlens.Explanation` (image ``index``, target
    ``target``): ``kind="montage"`` (:func:`slice_montage`) or ``"threeview"`` (:func:`three_view`;
    ``spacing=`` / ``affine=`` go to it), over ``background`` (e.g. ``Volume.tensor()[0, 0]``) or
    else the explained input itself (its channel mean) when the explanation holds it."""
    draws: dict[str, Callable[..., Figure]] = {"montage": slice_montage, "threeview": three_view}
    draw = draws.get(kind)
    if draw is None:
        raise InputError(f"kind must be 'montage' or 'threeview' for volume_figure, not {kind!r}")
    if exp.spatial_dims != 3:
        raise InputError(f"volume_figure draws volume and clip maps (N, K, D, H, W); these are {exp.shape}")
    if background is None and exp.inputs is not None and exp.inputs.dim() == 5:
        background = exp.inputs[index].float().mean(0)
    kwargs.setdefault("title", explanation_title(exp, index, target))
    kwargs.setdefault("pixel", exp.kind == "pixel")
    return draw(exp.map(index, target), background, **kwargs)


def explanation_title(exp: Explanation, index: int = 0, target: int = 0) -> str:
    """``"gradcam · label"`` (and "(random weights)") for the figures of one map."""
    names = exp.labels()[index]
    return f"{exp.method} · {names[target]}" + (" (random weights)" if exp.random_weights else "")


__all__ = [
    "VIEWS",
    "explanation_title",
    "peak_voxel",
    "slice_indices",
    "slice_montage",
    "three_view",
    "volume_figure",
    "world_mm",
]
