"""``camlens explain scan.nii.gz | clip.mkv --volume-figures ...``: the three-view, GIF, MP4 and frame
strip of each map written next to the maps (a tiny 3-D network stands in for the zoo model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import camlens.cli.volume as cli_volume
from camlens.cli import main as cli_main

nib = pytest.importorskip("nibabel")
av = pytest.importorskip("av")

from tests.base.test_video import N_FRAMES, H, W, write_video  # noqa: E402


def tiny_3d(channels: int):
    def load(*_args, **_kw):
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv3d(channels, 4, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool3d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(4, 3),
        ).eval()

    return load


def _gif_frames(path) -> list[np.ndarray]:
    from PIL import Image

    im = Image.open(path)
    frames = []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(np.asarray(im.convert("RGB")))
    return frames


def _run(args):
    return CliRunner().invoke(cli_main, ["explain", *args, "--model", "tiny", "--topk", "1"], catch_exceptions=False)


def test_scan_figures_threeview_gif_mp4(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_volume, "load_model_seeded", tiny_3d(1))
    data = np.random.default_rng(0).uniform(0, 0.1, (12, 10, 6)).astype(np.float32)  # (i, j, k): D = 6
    path = tmp_path / "head.nii.gz"
    nib.Nifti1Image(data, np.diag([0.9, 1.2, 2.5, 1.0])).to_filename(str(path))
    out = tmp_path / "out"
    res = _run([str(path), "--out", str(out), "--volume-figures", "threeview,gif,mp4"])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "head.json",
        "head_gradcam_top1.gif",
        "head_gradcam_top1.mp4",
        "head_gradcam_top1.nii.gz",
        "head_gradcam_top1_threeview.png",
    ]
    gif = _gif_frames(out / "head_gradcam_top1.gif")
    assert len(gif) == 6 and gif[0].shape == (10 * 14 + 14, 12 * 14, 3)  # per axial slice, x14 to >= 160 px, the band
    with av.open(str(out / "head_gradcam_top1.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 6


def test_video_figures_by_default_and_bad_kinds(tmp_path, monkeypatch):
    monkeypatch.setattr(cli_volume, "load_model_seeded", tiny_3d(3))
    path = tmp_path / "moving.mkv"
    write_video(path)
    out = tmp_path / "vout"
    res = _run([str(path), "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("moving_gradcam_top1.png", "moving_gradcam_top1_strip.png", "moving_gradcam_top1.npy"):
        assert (out / name).stat().st_size > 200, name
    gif = _gif_frames(out / "moving_gradcam_top1.gif")
    assert len(gif) == N_FRAMES and gif[0].shape == (H * 3 + 14, W * 3, 3)  # the video's own frames, x3
    bad = _run([str(path), "--out", str(tmp_path / "o2"), "--volume-figures", "threeview,pie"])
    assert bad.exit_code != 0 and "pie" in bad.output and "threeview" in bad.output
    photo = CliRunner().invoke(cli_main, ["explain", "photo.jpg", "--volume-figures", "gif"])
    assert photo.exit_code != 0 and "NIfTI scans and video files" in photo.output
