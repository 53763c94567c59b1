"""The web app's volumes and clips (camlens.serve.volume): a NIfTI scan or a video uploaded, explained by
a 3-D model of the pool, shown one slice / frame at a time on one colour scale for the whole volume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
nib = pytest.importorskip("nibabel")

from fastapi.testclient import TestClient  # noqa: E402

from camlens.serve.app import create_app  # noqa: E402
from camlens.serve.service import ModelPool, Service  # noqa: E402
from camlens.viz.render import color_scale, render_map  # noqa: E402


def tiny_3d(channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(channels, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
    ).eval()


@pytest.fixture
def client() -> TestClient:
    pool = ModelPool({"tiny3d": tiny_3d(1), "tinyclip": tiny_3d(3), "flat": torch.nn.Linear(4, 2)})
    return TestClient(create_app(Service(pool)))


def _scan_bytes(tmp_path, shape=(12, 10, 6), spacing=(0.9, 1.2, 2.5)) -> bytes:
    data = np.random.default_rng(0).uniform(0, 1, shape).astype(np.float32)
    path = tmp_path / "head.nii.gz"
    nib.Nifti1Image(data, np.diag([*spacing, 1.0])).to_filename(str(path))
    return path.read_bytes()


def _upload(client, data: bytes, name: str, model: str, method: str = "gradcam"):
    return client.post(f"/api/volume?model={model}&method={method}", content=data, headers={"x-filename": name})


def _png(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def test_volume_upload_gives_axes_aspect_and_peak_and_slices_share_one_scale(client, tmp_path):
    r = _upload(client, _scan_bytes(tmp_path), "head.nii.gz", "tiny3d", "input_x_gradient")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["kind"] == "volume" and info["shape"] == [6, 10, 12]
    assert info["axes"] == {"axial": 6, "coronal": 10, "sagittal": 12}
    # physical aspect of a coronal slice (rows z: 6 x 2.5 mm, cols x: 12 x 0.9 mm)
    assert info["aspect"]["coronal"] == pytest.approx(15.0 / 10.8)
    assert info["spacing"] == pytest.approx([2.5, 1.2, 0.9])
    entry = client.app.state.volumes.get(info["id"])
    m = entry.m
    lim = np.percentile(np.abs(m), 99.5)  # a pixel map: clipped at the 99.5th percentile of |m|, centred at 0
    assert info["scale"]["kind"] == "diverging" and info["scale"]["min"] == pytest.approx(-lim, rel=1e-5)
    assert info["scale"]["max"] == pytest.approx(lim, rel=1e-5)
    sc = color_scale(m, pixel=True)
    assert list(np.unravel_index(np.abs(m).argmax(), m.shape)) == info["peak"]
    assert info["start"]["axial"] == info["peak"][0]
    # an axial slice is the map's slice over the scan, on the volume's scale (not the slice's own)
    got = _png(client.get(f"/api/volume/{info['id']}/slice/axial/2.png?alpha=0.7"))
    bg = np.repeat(entry.background[2][..., None], 3, axis=2)
    want, _ = render_map(bg, m[2], scale=sc, alpha=0.7)
    np.testing.assert_array_equal(got, want)
    # coronal: z upwards (row 0 is the last slice)
    cor = _png(client.get(f"/api/volume/{info['id']}/slice/coronal/4.png?alpha=0.7"))
    want, _ = render_map(
        np.repeat(entry.background[:, 4][::-1][..., None], 3, axis=2), m[:, 4][::-1], scale=sc, alpha=0.7
    )
    np.testing.assert_array_equal(cor, want)


def test_volume_slice_refusals(client, tmp_path):
    info = _upload(client, _scan_bytes(tmp_path), "head.nii.gz", "tiny3d").json()
    bad = client.get(f"/api/volume/{info['id']}/slice/axial/6.png")
    assert bad.status_code == 400 and "out of range 0 .. 5" in bad.json()["error"]
    bad = client.get(f"/api/volume/{info['id']}/slice/frame/0.png")
    assert bad.status_code == 400 and "axial, coronal, sagittal" in bad.json()["error"]
    assert client.get("/api/volume/vnope/slice/axial/0.png").status_code == 404
    r = _upload(client, b"not a scan", "notes.txt", "tiny3d")
    assert r.status_code == 415 and "NIfTI" in r.json()["error"]
    r = _upload(client, b"garbage", "broken.nii.gz", "tiny3d")
    assert r.status_code == 400 and "broken.nii.gz" in r.json()["error"]
    r = _upload(client, _scan_bytes(tmp_path), "head.nii.gz", "tiny3d", "scorecam")
    assert r.status_code == 400 and "gradcam" in r.json()["error"]
    r = _upload(client, _scan_bytes(tmp_path), "head.nii.gz", "flat")
    assert r.status_code == 400 and "choose a 3-D model" in r.json()["error"]


def test_clip_upload_has_a_frame_slider_over_the_videos_own_frames(client, tmp_path):
    pytest.importorskip("av")
    from tests.base.test_video import FPS, N_FRAMES, H, W, write_video

    path = tmp_path / "moving.mkv"
    write_video(path)
    r = _upload(client, path.read_bytes(), "moving.mkv", "tinyclip")
    assert r.status_code == 200, r.text
    info = r.json()
    assert info["kind"] == "clip" and info["axes"] == {"frame": N_FRAMES}
    assert info["timestamps"] == pytest.approx([t / FPS for t in range(N_FRAMES)])
    assert info["aspect"]["frame"] == pytest.approx(H / W)
    frames = [_png(client.get(f"/api/volume/{info['id']}/slice/frame/{t}.png?alpha=0")) for t in (0, 5)]
    assert frames[0].shape == (H, W, 3)
    assert not np.array_equal(frames[0], frames[1])  # alpha 0: the video's own frames, the square moved
