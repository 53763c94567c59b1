"""DICOM series (camlens[medical]: pydicom): slices ordered by their position along the slice normal,
not by file name; the affine puts each voxel where its slice's ImagePositionPatient says (RAS)."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from camlens.base.dicom import read_dicom_series  # noqa: E402
from camlens.base.errors import InputError  # noqa: E402
from camlens.base.nifti import save_nifti  # noqa: E402

ROWS, COLS, SLICES = 6, 5, 4
R = np.array([np.cos(0.3), np.sin(0.3), 0.0])  # row direction (increasing column index)
C = np.array([0.0, 0.0, -1.0])  # column direction (increasing row index): a coronal-ish oblique plane
N = np.cross(R, C)
P0 = np.array([-10.0, 25.0, 40.0])
DI, DJ, DK = 0.7, 1.1, 2.5


def write_series(folder, series_uid=None) -> np.ndarray:
    """Slices whose file names run against their positions; returns the stored values (k, j, i)."""
    folder.mkdir(exist_ok=True)
    uid = series_uid or generate_uid()
    values = np.arange(SLICES * ROWS * COLS, dtype=np.int16).reshape(SLICES, ROWS, COLS)
    for k in range(SLICES):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = uid
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.ImageOrientationPatient = [*R.tolist(), *C.tolist()]
        ds.ImagePositionPatient = (P0 + k * DK * N).tolist()
        ds.PixelSpacing = [DJ, DI]
        ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
        ds.PixelData = values[k].tobytes()
        ds.save_as(str(folder / f"IM{SLICES - k:03d}.dcm"), enforce_file_format=True)  # names reversed
    (folder / "README.txt").write_text("not a DICOM file")
    return values


def test_series_is_ordered_by_position_and_placed_by_its_affine(tmp_path):
    values = write_series(tmp_path / "series")
    vol = read_dicom_series(tmp_path / "series")
    assert vol.data.shape == (COLS, ROWS, SLICES) and vol.shape == (SLICES, ROWS, COLS)
    t = vol.tensor()[0, 0].numpy()  # (k, j, i)
    np.testing.assert_array_equal(t, values.astype(np.float32) * 2 - 1000)
    np.testing.assert_allclose(vol.spacing, (DI, DJ, DK), rtol=1e-6)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    for k, j, i in [(0, 0, 0), (3, 5, 4), (2, 1, 3)]:
        lps = P0 + i * DI * R + j * DJ * C + k * DK * N
        np.testing.assert_allclose(vol.world((k, j, i)), lps * lps_to_ras, atol=1e-9)


def test_dicom_maps_save_as_nifti_in_the_series_space(tmp_path):
    nib = pytest.importorskip("nibabel")
    write_series(tmp_path / "s")
    vol = read_dicom_series(tmp_path / "s")
    out = save_nifti(vol.tensor()[0, 0], vol, tmp_path / "m.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-5)
    np.testing.assert_allclose(img.get_fdata(), vol.data, atol=1e-3)


def test_mixed_series_and_empty_folders_are_named(tmp_path):
    write_series(tmp_path / "a", series_uid="1.2.3")
    write_series(tmp_path / "b", series_uid="1.2.4")
    for f in (tmp_path / "b").glob("*.dcm"):
        f.rename(tmp_path / "a" / ("b" + f.name))
    with pytest.raises(InputError, match="mixes 2 DICOM series"):
        read_dicom_series(tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no DICOM slices"):
        read_dicom_series(tmp_path / "empty")
