r"""NIfTI scans (``.nii``, ``.nii.gz``) in and maps out, in the scan's own space (nibabel, the optional
extra ``camlens[medical]``).

**Axes.** A NIfTI array is indexed :math:`(i, j, k)`; its affine :math:`A` (4x4) maps a voxel to
world millimetres, :math:`(x, y, z, 1)^T = A\,(i, j, k, 1)^T`. camlens volumes are ``(N, C, D, H, W)``
with depth first, so :meth:`Volume.tensor` is the array transposed to :math:`(k, j, i)`: the map's
``(z, y, x)`` voxel is the scan's :math:`(i, j, k) = (x, y, z)` voxel, and a 3-D box
``(x0, y0, z0, x1, y1, z1)`` of :func:`camlens.localize` is a box of :math:`(i, j, k)` indices.
:func:`save_nifti` transposes back and writes the scan's affine (and its qform/sform codes), so
the saved map lies on top of the scan in ITK-SNAP or 3D Slicer. No resampling or reorientation is
done anywhere: the voxels the model sees are the file's.

**Intensity windows** (CT, Hounsfield units): ``Volume.tensor(window=...)`` clips to a
``(low, high)`` range and scales it to [0, 1]; presets in :data:`WINDOWS` (level/width from the
usual radiology settings).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from camlens.base.errors import CamlensError, InputError
from camlens.base.fsio import atomic_write

#: CT windows in Hounsfield units, ``(low, high)`` = level -/+ width / 2
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (0.0, 80.0),  # L40 W80
    "subdural": (-30.0, 170.0),  # L70 W200
    "soft_tissue": (-160.0, 240.0),  # L40 W400
    "lung": (-1350.0, 150.0),  # L-600 W1500
    "bone": (-450.0, 1050.0),  # L300 W1500
    "liver": (-25.0, 125.0),  # L50 W150
}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nibabel() -> Any:
    try:
        import nibabel  # optional dependency: camlens[medical]
    except ImportError:
        raise CamlensError(
            "reading and writing NIfTI scans needs nibabel: pip install 'camlens[medical]' (or pip install nibabel)"
        ) from None
    return nibabel


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class Volume:
    """A scan: ``data`` ``(I, J, K)`` float32 as stored (file axes), its 4x4 ``affine`` (voxel ->
    world mm), the nibabel ``header`` it came with (``None`` for a hand-made volume) and its ``path``."""

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` of :meth:`tensor` (the file's ``(K, J, I)``)."""
        i, j, k = self.data.shape
        return (int(k), int(j), int(i))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the file's ``(i, j, k)`` axes (the affine's column norms)."""
        s = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(s[0]), float(s[1]), float(s[2]))

    def tensor(self, window: str | tuple[float, float] | None = None) -> torch.Tensor:
        """The scan as a float32 ``(1, 1, D, H, W)`` batch (``(k, j, i)`` order, see the module
        docstring), optionally through an intensity ``window`` (a name of :data:`WINDOWS` or
        ``(low, high)``: clipped, then scaled to [0, 1])."""
        vol = np.ascontiguousarray(self.data.transpose(2, 1, 0), dtype=np.float32)
        if window is not None:
            lo, hi = _window(window)
            vol = (np.clip(vol, lo, hi) - lo) / (hi - lo)
        return torch.from_numpy(vol)[None, None]

    def world(self, zyx) -> np.ndarray:
        """World coordinates (mm) of voxel indices ``(..., 3)`` given as ``(z, y, x)`` of :meth:`tensor`."""
        v = np.asarray(zyx, dtype=np.float64)[..., ::-1]  # (i, j, k)
        return v @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_box(self, box) -> np.ndarray:
        """The world-space (mm) bounding box ``(2, 3)`` — rows: the minimum and maximum corner — of a
        3-D voxel box ``(x0, y0, z0, x1, y1, z1)`` of :func:`camlens.localize` (ends exclusive): the
        8 corners of the voxels' extent (voxel centres -/+ half a voxel) mapped through the affine.
        An empty box (``-1``) gives NaN."""
        b = np.asarray(box, dtype=np.float64)
        if b.shape != (6,):
            raise InputError(f"a 3-D box is (x0, y0, z0, x1, y1, z1), not shape {b.shape}")
        if (b < 0).any():
            return np.full((2, 3), np.nan)
        lo, hi = b[:3] - 0.5, b[3:] - 0.5  # (i, j, k) extent: first voxel's near face, last voxel's far face
        corners = np.array([[(hi if c >> a & 1 else lo)[a] for a in range(3)] for c in range(8)])
        world = corners @ self.affine[:3, :3].T + self.affine[:3, 3]
        return np.stack([world.min(0), world.max(0)])

    def voxel(self, xyz_mm) -> np.ndarray:
        """Fractional ``(z, y, x)`` voxel indices of :meth:`tensor` for world points ``(..., 3)`` in mm."""
        p = np.asarray(xyz_mm, dtype=np.float64)
        ijk = (p - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T
        return ijk[..., ::-1]


def _window(window: str | tuple[float, float]) -> tuple[float, float]:
    if isinstance(window, str):
        if window not in WINDOWS:
            raise InputError(f"unknown window {window!r}; presets: {', '.join(WINDOWS)}, or give (low, high)")
        return WINDOWS[window]
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise InputError(f"window=(low, high) needs high > low, not {window!r}")
    return lo, hi


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a 3-D NIfTI scan (``.nii`` / ``.nii.gz``) with its affine; a 4-D file (a time series, or
    several channels) is refused with the fix."""
    nib = _nibabel()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such NIfTI file")
    try:
        img = nib.load(str(p))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel raises its own ImageFileError, OSError, EOFError…
        raise InputError(f"{p} is not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(
            f"{p} holds a {data.ndim}-D array of shape {data.shape}; camlens explains 3-D scans: pick one "
            "volume, e.g. nibabel.four_to_three(nibabel.load(path))[0]"
        )
    return Volume(data, np.asarray(img.affine, dtype=np.float64), img.header, p)


def save_nifti(maps, volume: Volume, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a map ``(D, H, W)`` (of :meth:`Volume.tensor`'s shape; a tensor or an array) as a float32
    NIfTI file in ``volume``'s space: the same voxel grid, affine and orientation codes, so that it
    opens on top of the scan. ``.nii.gz`` is compressed. Nothing is overwritten unless asked."""
    nib = _nibabel()
    m = maps.detach().float().cpu().numpy() if isinstance(maps, torch.Tensor) else np.asarray(maps, np.float32)
    if m.ndim == 5 and m.shape[:2] == (1, 1):
        m = m[0, 0]
    if m.shape != volume.shape:
        raise InputError(
            f"the map has shape {m.shape} but the scan's volume is {volume.shape} (D, H, W): save one map of "
            "the scan, e.g. exp.maps[0, k]"
        )
    p = Path(path)
    if not is_nifti(p):
        raise InputError(f"{p}: a NIfTI file name ends in .nii or .nii.gz")
    img = nib.Nifti1Image(np.ascontiguousarray(m.transpose(2, 1, 0), dtype=np.float32), volume.affine)
    if volume.header is not None:
        for kind in ("qform", "sform"):
            _, code = getattr(volume.header, f"get_{kind}")(coded=True)
            getattr(img, f"set_{kind}")(volume.affine, code=int(code) if code is not None else 1)
        img.header.set_xyzt_units(*volume.header.get_xyzt_units())
    data = img.to_bytes()
    return atomic_write(p, gzip.compress(data, compresslevel=6) if str(p).lower().endswith(".gz") else data, overwrite)


__all__ = ["NIFTI_SUFFIXES", "WINDOWS", "Volume", "is_nifti", "read_nifti", "save_nifti"]
