"""Per-frame box track and temporal extent of clip maps ``(T, H, W)``: the threshold is cut once for
the whole clip, each frame's box is its largest 8-connected region (a reference written here from
``scipy.ndimage.label``), frames with nothing above the cut give no box, and the extent spans the
first to the last frame that keeps anything (with the frames' timestamps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

import camlens
from camlens.base.cliptrack import box_track, clip_track, temporal_extent
from camlens.base.errors import InputError
from camlens.base.localization import scale_boxes
from camlens.base.video import Clip
from camlens.cli.volume import ScanRun, _write_clip


def reference_frame_box(frame: np.ndarray, cut: float) -> tuple[int, ...]:
    labels, n = ndimage.label(frame > cut, structure=np.ones((3, 3)))
    if n == 0:
        return (-1, -1, -1, -1)
    best = max(range(1, n + 1), key=lambda i: ((labels == i).sum(), frame[labels == i].sum(), -i))
    y, x = np.nonzero(labels == best)
    return (x.min(), y.min(), x.max() + 1, y.max() + 1)


def clip_map(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.uniform(0, 0.05, (7, 10, 12))
    for _ in range(4):
        t0, t1 = sorted(rng.integers(0, 8, 2))
        y0, x0 = rng.integers(-2, 9), rng.integers(-2, 11)  # may touch the border
        m[t0 : t1 + 1, max(0, y0) : y0 + 3, max(0, x0) : x0 + 4] += rng.uniform(0.2, 1.0)
    return m


@pytest.mark.parametrize("seed", range(8))
def test_track_equals_a_per_frame_scipy_reference_at_the_clip_wide_cut(seed):
    m = clip_map(seed)
    for t in (0.3, 0.7):
        got = box_track(m, t)
        cut = t * m.max()
        assert got.shape == (7, 4)
        assert [tuple(b) for b in got] == [reference_frame_box(f, cut) for f in m]
        on = [i for i, f in enumerate(m) if (f > cut).any()]
        ext = temporal_extent(m, t)
        assert (ext.first, ext.last) == (on[0], on[-1])


def test_weak_frames_have_no_box_and_the_extent_has_timestamps():
    m = np.zeros((5, 6, 6))
    m[1, 2:4, 1:5] = 1.0  # frame 1: a 2x4 region
    m[3, 0:6, 5] = 0.8  # frame 3: a column touching three borders
    m[4, 0, 0] = 0.2  # frame 4: below 0.3 of the clip's max
    track = clip_track(torch.from_numpy(m), 0.3, timestamps=[0.0, 0.04, 0.08, 0.12, 0.16])
    assert track.boxes.tolist() == [[-1] * 4, [1, 2, 5, 4], [-1] * 4, [5, 0, 6, 6], [-1] * 4]
    assert track.present.tolist() == [False, True, False, True, False]
    assert (track.extent.first, track.extent.last, track.extent.frames) == (1, 3, 3)
    assert (track.extent.start_s, track.extent.end_s) == (0.04, 0.12)
    d = track.to_dict()
    assert d["temporal_extent"] == {"first_frame": 1, "last_frame": 3, "start_s": 0.04, "end_s": 0.12}
    assert d["frames"][0] == {"frame": 0, "box_xyxy": None, "time_s": 0.0}
    assert d["frames"][3]["box_xyxy"] == [5, 0, 6, 6]


def test_empty_clip_maps_have_no_track_and_bad_input_is_named():
    for m in (np.zeros((3, 4, 4)), -np.ones((3, 4, 4)), np.full((3, 4, 4), np.nan)):
        track = clip_track(m)
        assert (track.boxes == -1).all() and track.extent is None
    with pytest.raises(InputError, match=r"\(T, H, W\)"):
        clip_track(np.zeros((4, 4)))
    with pytest.raises(InputError, match="timestamps"):
        clip_track(np.ones((3, 4, 4)), timestamps=[0.0, 1.0])
    with pytest.raises(InputError, match="threshold"):
        clip_track(np.ones((3, 4, 4)), 1.5)


def test_the_clip_summary_of_camlens_explain_has_the_track_and_the_extent(tmp_path):
    rng = np.random.default_rng(0)
    clip = Clip(rng.integers(0, 255, (6, 16, 20, 3), dtype=np.uint8), np.arange(6) / 25 + 1.0, 25.0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(3, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    res = camlens.explain(net, clip.tensor(size=(8, 10)), ["gradcam"], targets="top1")
    run = ScanRun(("c.mp4",), "tiny", None, None, None, None, ("gradcam",), 1, (), str(tmp_path), False, 0.5, ())
    _write_clip(tmp_path, "c.mp4", clip, res, run)
    row = json.loads((tmp_path / "c.json").read_text())["methods"]["gradcam"][0]
    m = np.load(tmp_path / "c_gradcam_top1.npy")
    want = clip_track(m, 0.5, timestamps=clip.timestamps)
    assert row["temporal_extent"] == want.extent.to_dict()
    assert row["temporal_extent"]["start_s"] == pytest.approx(1.0 + want.extent.first / 25)
    assert [r["box_xyxy"] for r in row["track"]] == [b.tolist() if b[0] >= 0 else None for b in want.boxes]
    video = [r["box_xyxy_video"] for r in row["track"]]
    assert video == [(2 * b).tolist() if b[0] >= 0 else None for b in want.boxes]  # 8x10 -> 16x20
    assert [r["time_s"] for r in row["track"]] == pytest.approx(list(clip.timestamps))
    assert scale_boxes(want.boxes[want.present], (8, 10), (16, 20)).tolist() == [v for v in video if v]
