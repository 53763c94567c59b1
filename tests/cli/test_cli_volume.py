"""``camlens explain scan.nii.gz --model ...``: NIfTI scans through the CLI, maps back as NIfTI in
the scan's space (the peak of a blob at a known voxel comes back there), montage and JSON written,
nothing overwritten without --overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

nib = pytest.importorskip("nibabel")

from camlens.cli import main as cli_main  # noqa: E402


@pytest.fixture
def scan(tmp_path):
    data = np.random.default_rng(0).uniform(0, 0.1, (12, 10, 8)).astype(np.float32)
    data[7:10, 2:5, 4:7] += 1.0
    aff = np.diag([0.9, 1.2, 2.5, 1.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    path = tmp_path / "head.nii.gz"
    nib.Nifti1Image(data, aff).to_filename(str(path))
    return path, aff


@pytest.mark.slow
def test_explain_a_nifti_scan_writes_maps_in_the_scans_space(tmp_path, scan):
    path, aff = scan
    out = tmp_path / "out"
    args = ["explain", str(path), "--model", "r3d_18", "--weights", "random", "--method", "saliency"]
    args += ["--topk", "1", "--out", str(out)]
    runner = CliRunner()
    res = runner.invoke(cli_main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    saved = nib.load(str(out / "head_saliency_top1.nii.gz"))
    assert saved.shape == (12, 10, 8)
    np.testing.assert_allclose(saved.affine, aff, atol=1e-5)
    assert (out / "head_saliency_top1.png").stat().st_size > 1000
    summary = json.loads((out / "head.json").read_text())
    row = summary["methods"]["saliency"][0]
    assert len(row["box_voxels_xyzxyz"]) == 6 and summary["shape_dhw"] == [8, 10, 12]
    assert np.asarray(row["box_world_mm"]).shape == (2, 3)
    z, y, x = row["peak_voxel_zyx"]
    np.testing.assert_allclose(row["peak_world_mm"], nib.affines.apply_affine(aff, (x, y, z)), atol=1e-6)
    again = runner.invoke(cli_main, args)
    assert again.exit_code != 0 and "overwrite" in again.output


def test_scans_and_images_are_not_mixed(tmp_path, scan):
    path, _ = scan
    res = CliRunner().invoke(cli_main, ["explain", str(path), "photo.jpg", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "or images, not both" in res.output


@pytest.mark.slow
def test_explain_a_video_file_writes_maps_and_timestamps(tmp_path):
    pytest.importorskip("av")
    from tests.base.test_video import write_video

    path = tmp_path / "moving.mkv"
    write_video(path)
    out = tmp_path / "vout"
    args = ["explain", str(path), "--model", "mc3_18", "--weights", "random", "--method", "gradcam"]
    res = CliRunner().invoke(cli_main, [*args, "--topk", "1", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "moving.json").read_text())
    assert summary["timestamps_s"] == pytest.approx([t / 10 for t in range(12)])  # 12 frames < 16 asked
    row = summary["methods"]["gradcam"][0]
    assert row["peak_time_s"] == pytest.approx(row["peak_frame_yx"][0] / 10)
    assert np.load(out / "moving_gradcam_top1.npy").shape == (12, 112, 112)
    assert (out / "moving_gradcam_top1.png").stat().st_size > 1000
