"""Volumes and clips in the web app: a NIfTI scan or a video file uploaded, explained by a 3-D model
of the pool, and shown one slice (or frame) at a time under a slider.

:meth:`VolumeService.explain_upload` reads the upload (:func:`camlens.base.nifti.read_nifti`: the
scan's ``(D, H, W)`` and voxel spacing; :func:`camlens.base.video.read_clip`: the frames and their
timestamps), explains it with :func:`camlens.explain` under the model's lock (top-1 class, one
method) and keeps the map with **one colour scale for the whole volume** (:func:`camlens.viz.color_scale`:
diverging around zero for signed maps), so that moving the slider never rescales the colours.
:func:`slice_png` renders one slice across an axis (``axial``/``coronal``/``sagittal`` for a scan,
``frame`` for a clip, over the clip's own frame) with :func:`camlens.viz.render_map`; the page
shows it at the slice's physical aspect (``aspect`` in the entry's JSON, from the voxel spacing).

Nothing is kept on disk: the upload's temporary file is removed once read.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from camlens.api.explainer import explain
from camlens.base.errors import CamlensError
from camlens.base.nifti import is_nifti, read_nifti
from camlens.base.video import VIDEO_EXTENSIONS, is_video, read_clip
from camlens.serve.render import png_bytes
from camlens.serve.service import LRU, Limits, ModelPool, ServeError
from camlens.viz.render import ColorScale, color_scale, render_map
from camlens.viz.volume import VIEWS, peak_voxel

#: frames of an uploaded clip (as the CLI)
CLIP_FRAMES = 16
#: the methods the page offers for volumes (they declare ``volumes=True``)
VOLUME_METHODS = ("gradcam", "gradcam++", "saliency", "input_x_gradient")


@dataclass(frozen=True)
class VolumeEntry:
    """One explained upload: ``m`` the ``(D, H, W)`` map, ``background`` the scan ``(D, H, W)`` uint8
    grey or the clip's frames ``(T, H', W', 3)``, ``spacing`` along ``(D, H, W)`` (mm; clips 1),
    ``timestamps`` (clips), the shared colour ``scale`` and what was explained."""

    id: str
    name: str
    kind: str  # "volume" | "clip"
    m: np.ndarray
    background: np.ndarray
    spacing: tuple[float, float, float]
    scale: ColorScale
    label: str
    method: str
    model: str
    timestamps: tuple[float, ...] | None = None

    def axes(self) -> dict[str, int]:
        """Slider axes -> their number of slices."""
        if self.kind == "clip":
            return {"frame": int(self.m.shape[0])}
        return {v: int(self.m.shape[a]) for v, a in VIEWS.items()}

    def aspect(self, axis: str) -> float:
        """Height / width of a slice across ``axis`` in physical units (a frame: its pixels)."""
        if self.kind == "clip":
            return float(self.background.shape[1] / self.background.shape[2])
        a = VIEWS[axis]
        rows, cols = [d for d in range(3) if d != a]
        return (self.m.shape[rows] * self.spacing[rows]) / (self.m.shape[cols] * self.spacing[cols])

    def info(self) -> dict[str, Any]:
        """The page's JSON: axes and sizes, the peak (the slider starts there), the scale's colours."""
        peak = peak_voxel(self.m, self.scale.kind != "sequential")
        start = {ax: peak[0 if ax == "frame" else VIEWS[ax]] for ax in self.axes()}
        colors = ["#{:02x}{:02x}{:02x}".format(*c) for c in self.scale.colors(11)]
        return {
            "id": self.id,
            "name": self.name,
            "kind": self.kind,
            "shape": list(self.m.shape),
            "axes": self.axes(),
            "aspect": {ax: self.aspect(ax) for ax in self.axes()},
            "peak": list(peak),
            "start": start,
            "spacing": list(self.spacing),
            "timestamps": list(self.timestamps) if self.timestamps is not None else None,
            "scale": self.scale.to_dict() | {"colors": colors},
            "label": self.label,
            "method": self.method,
            "model": self.model,
        }


def _suffix(filename: str | None) -> str:
    name = (filename or "").lower()
    if is_nifti(name):
        return ".nii.gz" if name.endswith(".nii.gz") else ".nii"
    if is_video(name):
        return os.path.splitext(name)[1]
    raise ServeError(
        f"{filename or 'the upload'}: not a NIfTI scan (.nii, .nii.gz) or a video ({', '.join(VIDEO_EXTENSIONS)})",
        415,
    )


def _grey(vol: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(vol)), float(np.nanmax(vol))
    u = (vol - lo) / (hi - lo) if hi > lo else np.zeros_like(vol)
    return np.clip(np.nan_to_num(u) * 255 + 0.5, 0, 255).astype(np.uint8)


class VolumeService:
    """Uploads of scans and clips, explained by a 3-D model of ``pool`` (see the module docstring)."""

    def __init__(self, pool: ModelPool, limits: Limits | None = None) -> None:
        self.pool = pool
        self.limits = limits or Limits()
        self.entries = LRU(8)

    def get(self, entry_id: str) -> VolumeEntry:
        got = self.entries.get(entry_id)
        if got is None:
            raise ServeError(f"unknown or expired volume {entry_id!r}; upload it again", 404)
        return got

    def _read(self, data: bytes, filename: str | None) -> tuple[Any, str]:
        """``(Volume or Clip, kind)`` of the upload, through a temporary file removed at once."""
        suffix = _suffix(filename)
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="camlens-upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if suffix.startswith(".nii"):
                return read_nifti(tmp), "volume"
            return read_clip(tmp, frames=CLIP_FRAMES), "clip"
        except CamlensError as exc:
            raise ServeError(f"{filename}: {exc}", 400) from None
        finally:
            os.unlink(tmp)

    def explain_upload(self, data: bytes, filename: str | None, model: str, method: str = "gradcam") -> VolumeEntry:
        """Read, explain (top-1 class) and keep one upload; the entry's JSON is :meth:`VolumeEntry.info`."""
        if method not in VOLUME_METHODS:
            raise ServeError(f"method {method!r} is not offered for volumes; choose one of {VOLUME_METHODS}", 400)
        src, kind = self._read(data, filename)
        with self.pool.use(model) as net:
            first = next((m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
            x = (
                src.tensor()
                if kind == "clip"
                else src.tensor().expand(-1, first.in_channels if first else 1, -1, -1, -1)
            )
            try:
                exp = explain(net, x.to(next(net.parameters()).device), method, targets="top1")
            except CamlensError as exc:
                raise ServeError(f"{model} cannot explain {filename}: {exc}", 400) from None
            except RuntimeError as exc:  # the model's own forward refuses the shape (a 2-D model, another grid)
                shape = "x".join(map(str, x.shape))
                raise ServeError(
                    f"{model} cannot take {filename} as a (N, C, D, H, W) = {shape} volume ({exc}); "
                    "choose a 3-D model (one with Conv3d layers) that takes this grid",
                    400,
                ) from None
        m = exp.map(0, 0).float().numpy()
        digest = hashlib.sha256(data + f"{model}/{method}".encode()).hexdigest()[:20]
        if kind == "clip":
            bg, spacing, stamps = src.frames, (1.0, 1.0, 1.0), tuple(float(t) for t in src.timestamps)
        else:
            bg, spacing, stamps = _grey(src.tensor()[0, 0].numpy()), tuple(src.spacing[::-1]), None
        entry = VolumeEntry(
            f"v{digest}", os.path.basename(filename or "upload"), kind, m, bg, spacing,
            color_scale(m, pixel=exp.kind == "pixel"), exp.labels()[0][0], exp.method, model, stamps,
        )  # fmt: skip
        return self.entries.put(entry.id, entry)


def slice_png(entry: VolumeEntry, axis: str, index: int, alpha: float = 0.5) -> bytes:
    """Slice ``index`` across ``axis`` of ``entry``'s map over its scan (or frame ``index`` of a clip
    over the clip's own frame) on the entry's one colour scale, as PNG."""
    axes = entry.axes()
    if axis not in axes:
        raise ServeError(f"axis must be one of {', '.join(axes)} for this {entry.kind}, not {axis!r}", 400)
    if not 0 <= index < axes[axis]:
        raise ServeError(f"{axis} slice {index} is out of range 0 .. {axes[axis] - 1}", 400)
    if entry.kind == "clip":
        img, m2 = entry.background[index], entry.m[index]
    else:
        a = VIEWS[axis]
        m2 = np.take(entry.m, index, axis=a)
        img = np.repeat(np.take(entry.background, index, axis=a)[..., None], 3, axis=2)
        if a != 0:  # coronal / sagittal: z upwards (superior up in a RAS scan), as in three_view
            m2, img = m2[::-1], img[::-1]
    rgb, _ = render_map(img, m2, scale=entry.scale, pixel=entry.scale.pixel, alpha=alpha)
    return png_bytes(rgb)


__all__ = ["CLIP_FRAMES", "VOLUME_METHODS", "VolumeEntry", "VolumeService", "slice_png"]
