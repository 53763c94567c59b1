"""NIfTI scans in, maps out in the scan's own space (camlens[medical]: nibabel).

Oracle: a scan with a rotated, translated, anisotropic affine (0.8 x 1.5 x 3.0 mm voxels) holds a
bright blob at a known world point; a 3-D network whose CAM is the input itself explains it, the map
is saved as NIfTI, read back with nibabel directly, and its peak lies at that world point (to one
voxel), with the scan's affine and shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import CamlensError, InputError, OutputExistsError

nib = pytest.importorskip("nibabel")
from camlens.base.nifti import Volume, read_nifti, save_nifti  # noqa: E402


def scan_affine() -> np.ndarray:
    a = math.radians(20)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.8, 1.5, 3.0])
    aff[:3, 3] = [-40.0, 12.5, 70.0]
    return aff


BLOB_IJK = (13, 5, 7)  # (i, j, k) of the blob's centre in a (20, 16, 10) scan


def write_scan(path, shape=(20, 16, 10)) -> np.ndarray:
    aff = scan_affine()
    data = np.random.default_rng(0).uniform(0, 0.2, shape).astype(np.float32)
    i, j, k = BLOB_IJK
    data[i - 1 : i + 2, j - 1 : j + 2, k - 1 : k + 2] += 1.0
    data[i, j, k] += 1.0  # the peak
    nib.Nifti1Image(data, aff).to_filename(str(path))
    return aff


def identity_cam_net() -> nn.Module:
    """Conv3d(1x1x1, weight 1) -> ReLU -> GAP -> Linear(1, 1): its CAM is ReLU(input)."""
    net = nn.Sequential(nn.Conv3d(1, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(1, 1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[4].weight.fill_(1.0)
        net[4].bias.zero_()
    return net


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_map_saved_in_the_scans_space_peaks_at_the_blobs_world_point(tmp_path, suffix):
    aff = write_scan(tmp_path / f"scan{suffix}")
    vol = read_nifti(tmp_path / f"scan{suffix}")
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    np.testing.assert_allclose(vol.spacing, (0.8, 1.5, 3.0), rtol=1e-5)
    x = vol.tensor()
    assert x.shape == (1, 1, 10, 16, 20) == (1, 1, *vol.shape)
    exp = camlens.explain(identity_cam_net(), x, "cam", targets=[[0]])
    out = save_nifti(exp.maps[0, 0], vol, tmp_path / f"map{suffix}")

    saved = nib.load(str(out))  # read back independently of camlens
    assert saved.shape == (20, 16, 10)
    np.testing.assert_allclose(saved.affine, aff, atol=1e-5)
    peak_ijk = np.unravel_index(np.argmax(saved.get_fdata()), saved.shape)
    blob_world = nib.affines.apply_affine(aff, BLOB_IJK)
    peak_world = nib.affines.apply_affine(saved.affine, peak_ijk)
    assert np.linalg.norm(peak_world - blob_world) <= 3.0  # one voxel (the largest spacing)
    assert tuple(peak_ijk) == BLOB_IJK
    # camlens' own conversions agree with nibabel's
    zyx = np.array(BLOB_IJK[::-1])
    np.testing.assert_allclose(vol.world(zyx), blob_world, atol=1e-9)
    np.testing.assert_allclose(vol.voxel(blob_world), zyx, atol=1e-9)
    # and the 3-D box of the map holds the blob, in (i, j, k) = (x, y, z) voxels
    box = exp.boxes(0.5)[0, 0]
    assert tuple(box) == (12, 4, 6, 15, 7, 9)
    # its extent in mm: the corners of voxels 12..14, 4..6, 6..8 (faces at -/+ half a voxel)
    ijk = np.array([[i, j, k] for i in (11.5, 14.5) for j in (3.5, 6.5) for k in (5.5, 8.5)])
    mm = nib.affines.apply_affine(aff, ijk)
    np.testing.assert_allclose(vol.world_box(box), [mm.min(0), mm.max(0)], atol=1e-9)
    assert np.isnan(vol.world_box([-1] * 6)).all()


def test_save_refuses_overwrite_wrong_shape_and_names(tmp_path):
    write_scan(tmp_path / "scan.nii")
    vol = read_nifti(tmp_path / "scan.nii")
    m = torch.zeros(vol.shape)
    save_nifti(m, vol, tmp_path / "m.nii")
    with pytest.raises(OutputExistsError):
        save_nifti(m, vol, tmp_path / "m.nii")
    save_nifti(m + 1, vol, tmp_path / "m.nii", overwrite=True)
    assert float(nib.load(str(tmp_path / "m.nii")).get_fdata().min()) == 1.0
    with pytest.raises(InputError, match=r"map has shape \(16, 20, 10\)"):
        save_nifti(torch.zeros(16, 20, 10), vol, tmp_path / "x.nii")
    with pytest.raises(InputError, match=r"\.nii or \.nii\.gz"):
        save_nifti(m, vol, tmp_path / "x.png")


def test_windows_and_4d_files(tmp_path):
    v = Volume(np.array([-2000.0, 0.0, 40.0, 500.0], dtype=np.float32).reshape(4, 1, 1), np.eye(4))
    np.testing.assert_allclose(v.tensor("brain").flatten().numpy(), [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_allclose(v.tensor((0, 1000)).flatten().numpy(), [0.0, 0.0, 0.04, 0.5])
    with pytest.raises(InputError, match="presets"):
        v.tensor("nope")
    nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)).to_filename(str(tmp_path / "t.nii"))
    with pytest.raises(InputError, match="4-D array.*four_to_three"):
        read_nifti(tmp_path / "t.nii")
    (tmp_path / "bad.nii").write_bytes(b"not a scan")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        read_nifti(tmp_path / "bad.nii")


def test_without_nibabel_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "nibabel", None)
    with pytest.raises(CamlensError, match=r"camlens\[medical\]"):
        read_nifti(tmp_path / "scan.nii")
