"""Video files sampled into clips (camlens[video]: PyAV): frames every ``stride``-th from ``start``,
their timestamps in seconds, the tensor a video classifier takes, and a clip explained end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
import camlens  # noqa: E402
from camlens.base.errors import CamlensError, InputError  # noqa: E402
from camlens.base.video import KINETICS_MEAN, is_video, read_clip  # noqa: E402

FPS, N_FRAMES, H, W = 10, 12, 48, 64


def square_x(t: int) -> int:
    return 4 + 4 * t  # the square's left edge in frame t


def write_video(path) -> None:
    """A white 8x8 square moving right 4 px per frame over black, lossless (FFV1)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("ffv1", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv444p"
        for t in range(N_FRAMES):
            img = np.zeros((H, W, 3), np.uint8)
            img[20:28, square_x(t) : square_x(t) + 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_frames_stride_start_and_timestamps(tmp_path):
    path = tmp_path / "moving.mkv"
    write_video(path)
    assert is_video(path)
    clip = read_clip(path, frames=4, stride=2, start=0.3)
    assert clip.frames.shape == (4, H, W, 3) and clip.fps == pytest.approx(FPS)
    np.testing.assert_allclose(clip.timestamps, [0.3, 0.5, 0.7, 0.9], atol=1e-6)
    for f, t in zip(clip.frames, (3, 5, 7, 9), strict=True):  # the square is where frame t drew it
        cols = np.nonzero(f[24, :, 0] > 128)[0]
        assert (cols.min(), cols.max()) == (square_x(t), square_x(t) + 7)
    short = read_clip(path, frames=50)
    assert len(short.frames) == N_FRAMES  # the file has 12


def test_clip_tensor_and_an_explanation_over_time(tmp_path):
    path = tmp_path / "moving.mkv"
    write_video(path)
    clip = read_clip(path, frames=8)
    x = clip.tensor(size=(32, 40))
    assert x.shape == (1, 3, 8, 32, 40)
    black = (0 - KINETICS_MEAN[0]) / 0.22803
    assert float(x[0, 0, 0, 0, 0]) == pytest.approx(black, abs=1e-5)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    exp = camlens.explain(net, x, "saliency", targets=[[0]])
    assert exp.shape == (1, 1, 8, 32, 40)


def test_bad_arguments_and_files(tmp_path, monkeypatch):
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InputError, match="not a readable video"):
        read_clip(tmp_path / "bad.mp4")
    with pytest.raises(InputError, match="stride must be"):
        read_clip(tmp_path / "bad.mp4", stride=0)
    monkeypatch.setitem(__import__("sys").modules, "av", None)
    with pytest.raises(CamlensError, match=r"camlens\[video\]"):
        read_clip(tmp_path / "bad.mp4")
