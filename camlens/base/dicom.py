r"""DICOM series (a folder of ``.dcm`` slices, one series) read as a :class:`~camlens.base.nifti.Volume`
(pydicom, the optional extra ``camlens[medical]``).

**Order by position, never by file name.** Slices are sorted by the projection of their
``ImagePositionPatient`` on the slice normal :math:`n = r \times c` (``r``, ``c`` the row and column
direction cosines of ``ImageOrientationPatient``): scanners and exports name files in any order.

**Space.** Voxel :math:`(i, j, k)` — column ``i``, row ``j`` of slice ``k`` — lies at
:math:`P_0 + i\,\Delta_i\,r + j\,\Delta_j\,c + k\,s` in DICOM's patient space (LPS, mm), with
:math:`\Delta_j, \Delta_i` = ``PixelSpacing`` and :math:`s = (P_{K-1} - P_0)/(K - 1)` the step between
slice positions; the affine is returned in NIfTI's RAS convention (x and y negated), so
:func:`camlens.base.nifti.save_nifti` writes maps that overlay the series converted to NIfTI.
Values are ``RescaleSlope · stored + RescaleIntercept`` (Hounsfield units for CT), ready for the
CT windows of :data:`camlens.base.nifti.WINDOWS`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from camlens.base.errors import CamlensError, InputError
from camlens.base.nifti import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pydicom() -> Any:
    try:
        import pydicom  # optional dependency: camlens[medical]
    except ImportError:
        raise CamlensError(
            "reading DICOM series needs pydicom: pip install 'camlens[medical]' (or pip install pydicom)"
        ) from None
    return pydicom


def _slices(folder: Path) -> list[Any]:
    pydicom = _pydicom()
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            try:
                ds = pydicom.dcmread(str(p))
            except Exception:  # not a DICOM file (a README, a DICOMDIR index…): skipped
                continue
            if "PixelData" in ds and "ImagePositionPatient" in ds:
                out.append(ds)
    if not out:
        raise InputError(f"{folder} holds no DICOM slices with pixel data and a position")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for ds in out}
    if len(series) > 1:
        raise InputError(
            f"{folder} mixes {len(series)} DICOM series; put each series in its own folder (SeriesInstanceUID)"
        )
    return out


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read the one series of DICOM slices in ``folder`` as a :class:`Volume` (see the module doc)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: a DICOM series is read from a folder of slices")
    dss = _slices(root)
    iop = np.asarray(dss[0].ImageOrientationPatient, dtype=np.float64)
    r, c = iop[:3], iop[3:]
    normal = np.cross(r, c)
    dss.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    pos = np.array([ds.ImagePositionPatient for ds in dss], dtype=np.float64)
    dj, di = (float(v) for v in dss[0].PixelSpacing)
    step = (pos[-1] - pos[0]) / (len(dss) - 1) if len(dss) > 1 else normal * float(getattr(dss[0], "SliceThickness", 1))
    planes = []
    for ds in dss:
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        arr = ds.pixel_array.astype(np.float32) * slope + float(getattr(ds, "RescaleIntercept", 0) or 0)
        planes.append(arr.T)  # (rows j, cols i) -> (i, j)
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise InputError(f"the slices of {root} differ in size ({sorted(shapes)}); one series has one size")
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2], affine[:3, 3] = r * di, c * dj, step, pos[0]
    return Volume(np.stack(planes, axis=2), LPS_TO_RAS @ affine, None, root)


__all__ = ["read_dicom_series"]
