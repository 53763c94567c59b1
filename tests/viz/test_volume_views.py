"""The three-view of volume maps and the clip pictures (camlens.viz.volume.three_view, camlens.viz.clip):
the crosshair sits on the peak voxel, panels keep the voxel spacing, every frame of a GIF / MP4 / strip
shares one colour scale (diverging around 0 for signed maps), and the files decode to T frames."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import camlens
from camlens.base.errors import InputError
from camlens.viz.clip import frame_strip, gif_bytes, mp4_bytes, overlay_frames
from camlens.viz.render import DIVERGING_CMAP, colormap_lut, render_map
from camlens.viz.volume import three_view, world_mm
from tests.conftest import TinyCNN


def blob(center, shape=(9, 10, 12), sign=1.0) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    c = center
    return sign * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / 4.0)


def _panels(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_title()]


def test_three_view_crosshair_sits_on_the_peak_voxel_in_every_view():
    peak = (3, 7, 9)
    m = blob(peak)
    fig = three_view(m, np.random.default_rng(0).random(m.shape), spacing=(2.5, 1.0, 1.0))
    axes = _panels(fig)
    assert [ax.get_title().split()[0] for ax in axes] == ["axial", "coronal", "sagittal"]
    # (rows, cols) of each view: axial (y, x), coronal (z, x), sagittal (z, y)
    for ax, (r, c) in zip(axes, [(1, 2), (0, 2), (0, 1)], strict=True):
        hair = [line for line in ax.lines if len(line.get_xdata()) == 2]
        xs = {float(v) for line in hair for v in line.get_xdata() if line.get_xdata()[0] == line.get_xdata()[1]}
        ys = {float(v) for line in hair for v in line.get_ydata() if line.get_ydata()[0] == line.get_ydata()[1]}
        assert xs == {peak[c]} and ys == {peak[r]}
        (ring,) = [line for line in ax.lines if len(line.get_xdata()) == 1]  # the circle on the peak
        assert (float(ring.get_xdata()[0]), float(ring.get_ydata()[0])) == (peak[c], peak[r])
        assert ax.get_aspect() == pytest.approx((2.5, 1.0, 1.0)[r] / (2.5, 1.0, 1.0)[c])
    assert "axial z = 3 / 9 · 7.5 mm" in axes[0].get_title()
    assert "coronal y = 7 / 10 · 7.0 mm" in axes[1].get_title()
    assert "peak (z, y, x) = (3, 7, 9)" in fig._suptitle.get_text()


def test_three_view_panel_is_the_slice_through_the_peak_on_the_volume_scale():
    m = blob((2, 5, 4)) + 0.5 * blob((7, 2, 10))
    fig = three_view(m, alpha=1.0)
    axial = _panels(fig)[0]
    # one scale for the whole volume (min .. max of all voxels), not of the slice
    from camlens.viz.render import color_scale

    expected, _ = render_map(np.full((10, 12, 3), 128, np.uint8), m[2], scale=color_scale(m), alpha=1.0)
    np.testing.assert_array_equal(np.asarray(axial.images[0].get_array()), expected)


def test_three_view_world_position_and_spacing_from_the_affine():
    aff = np.array([[0.0, 0.0, 3.0, -10.0], [0.0, 0.8, 0.0, 5.0], [-1.2, 0.0, 0.0, 40.0], [0, 0, 0, 1]])
    peak = (4, 6, 2)
    fig = three_view(blob(peak), affine=aff)
    # voxel (i, j, k) = (x, y, z) = (2, 6, 4) -> world = A @ (2, 6, 4) + t
    want = aff[:3, :3] @ np.array([2.0, 6.0, 4.0]) + aff[:3, 3]
    np.testing.assert_allclose(world_mm(aff, peak), want)
    assert "= ({:.1f}, {:.1f}, {:.1f}) mm".format(*want) in fig._suptitle.get_text()
    # spacing along (D, H, W) = column norms of (k, j, i) = (3, 0.8, 1.2): coronal (z rows, x cols)
    assert _panels(fig)[1].get_aspect() == pytest.approx(3.0 / 1.2)


def test_three_view_of_a_signed_map_is_diverging_and_centred_at_zero():
    m = blob((2, 3, 4)) - 1.5 * blob((6, 7, 8))
    fig = three_view(m)
    bar = fig.axes[-1]
    lim = float(np.abs(m).max())
    np.testing.assert_allclose(sorted(bar.get_yticks()), [-lim, 0.0, lim])
    assert "red +, blue −" in fig._suptitle.get_text()
    assert "(6, 7, 8)" in fig._suptitle.get_text()  # the peak of |m|


def _gif_frames(data: bytes) -> tuple[list[np.ndarray], list[int]]:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    frames, durations = [], []
    for i in range(im.n_frames):
        im.seek(i)
        frames.append(np.asarray(im.convert("RGB")))
        durations.append(im.info["duration"])
    return frames, durations


def test_gif_has_one_frame_per_clip_frame_on_one_shared_scale():
    values = np.arange(1.0, 6.0)  # frame t is constant t + 1: per-frame scales would make all frames alike
    m = np.broadcast_to(values[:, None, None], (5, 6, 8)).copy()
    frames, durations = _gif_frames(gif_bytes(m, timestamps=[0.0, 0.04, 0.08, 0.12, 0.16], alpha=1.0, band=False))
    assert len(frames) == 5 and frames[0].shape == (6 * 20, 8 * 20, 3)  # enlarged to >= 160 px wide
    lut = colormap_lut("jet")
    for t, f in enumerate(frames):
        want = lut[min(int((values[t] - 1) / 4 * 256), 255)]
        assert (f == want).all(), (t, f[0, 0], want)
    assert durations == [40] * 5


def test_gif_of_a_signed_clip_is_diverging_with_zero_untinted():
    m = np.broadcast_to(np.array([-2.0, 0.0, 2.0])[:, None, None], (3, 4, 4)).copy()
    frames, _ = _gif_frames(gif_bytes(m, alpha=1.0, band=False))
    lut = colormap_lut(DIVERGING_CMAP)
    assert (frames[0] == lut[0]).all()  # -L: the blue end
    assert (frames[1] == 128).all()  # 0: the grey background shows untinted
    assert (frames[2] == lut[255]).all()  # +L: the red end


def test_gif_band_and_frames_of_another_size():
    m = blob((1, 2, 3), shape=(3, 6, 8))
    rgb = np.zeros((3, 12, 16, 3), np.uint8)
    frames, durations = _gif_frames(gif_bytes(m, rgb, fps=10, min_width=0))
    assert len(frames) == 3 and frames[0].shape == (12 + 14, 16, 3)
    assert _gif_frames(gif_bytes(m, rgb, min_width=50))[0][0].shape == (48 + 14, 64, 3)  # x4: 64 >= 50
    assert durations == [100] * 3
    with pytest.raises(InputError, match="T = 3"):
        overlay_frames(m, np.zeros((2, 12, 16, 3), np.uint8))


def test_mp4_decodes_to_t_frames_of_the_right_size_and_colour():
    av = pytest.importorskip("av")
    m = np.broadcast_to(np.array([1.0, 2.0, 3.0, 4.0])[:, None, None], (4, 15, 20)).copy()  # odd height
    data = mp4_bytes(m, alpha=1.0, fps=12)
    with av.open(io.BytesIO(data)) as c:
        got = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        rate = float(c.streams.video[0].average_rate)
    assert len(got) == 4 and got[0].shape == (16, 20, 3)  # padded to even
    assert rate == pytest.approx(12)
    lut = colormap_lut("jet")
    for t, f in enumerate(got):
        want = lut[min(int(t / 3 * 256), 255)].astype(float)
        assert np.abs(f.reshape(-1, 3).mean(0) - want).max() < 12, (t, f.reshape(-1, 3).mean(0), want)


def test_frame_strip_keeps_every_kth_frame_and_the_peak_frame():
    m = blob((4, 3, 3), shape=(8, 6, 6))
    fig = frame_strip(m, timestamps=np.arange(8) / 4, every=3)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["frame 0 · 0.00 s", "frame 3 · 0.75 s", "frame 4 · 1.00 s", "frame 6 · 1.50 s"]
    red = [ax.get_title() for ax in fig.axes if ax.images and ax.title.get_color() == "red"]
    assert red == ["frame 4 · 1.00 s"]
    assert len(fig.axes) == 5  # 4 frames and one colorbar
    with pytest.raises(InputError, match="every"):
        frame_strip(m, every=0)


def test_explanation_figure_kinds_on_a_clip_explanation():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(3, 2),
    )
    exp = camlens.explain(net, torch.randn(1, 1, 6, 7, 8), "gradcam", targets=[[1]])
    assert "(peak)" in " ".join(ax.get_title() for ax in exp.figure().axes)
    three = exp.figure(kind="threeview")
    assert [ax.get_title().split()[0] for ax in _panels(three)] == ["axial", "coronal", "sagittal"]
    strip = exp.figure(kind="strip", every=2)
    assert next(ax.get_title() for ax in strip.axes if ax.images) == "frame 0"
    with pytest.raises(InputError, match="kind must be"):
        exp.figure(kind="pie")
    assert exp._repr_png_()[:4] == b"\x89PNG"  # a notebook shows a volume explanation as its montage


def test_resize_map_takes_a_flipped_view():
    from camlens.viz.render import resize_map

    m = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(resize_map(m[::-1], (2, 3)), m[::-1])  # a negative-stride view raised
    assert resize_map(m[::-1], (4, 6)).shape == (4, 6)


def test_coronal_and_sagittal_panels_have_z_upwards_in_both_figures():
    from camlens.viz.volume import slice_montage

    m = blob((2, 3, 4))
    for fig in (three_view(m), slice_montage(m, n_slices=2)):
        for ax in _panels(fig):
            lo, hi = ax.get_ylim()
            view = ax.get_title().split()[0]
            assert (lo < hi) == (view != "axial"), (view, lo, hi)  # rows grow upwards except axial's


def test_figure_kind_on_a_2d_explanation_is_refused_by_name():
    exp = camlens.explain(TinyCNN().eval(), torch.rand(1, 3, 16, 16), "gradcam")
    with pytest.raises(InputError, match="kind='threeview' is for volume and clip maps"):
        exp.figure(kind="threeview")
