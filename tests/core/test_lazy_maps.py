"""Lazy maps: a layer method's ``Explanation.maps`` is upsampled from ``raw`` on first access.

Oracle: ``F.interpolate(raw, size, mode="bilinear", align_corners=False)`` computed here; and the
same explanation with its maps forced eager (``replace(maps=exp.maps.clone())``) gives the same
boxes, files and figures. Every consumer that can go image by image must leave the maps lazy.
"""

import copy
import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import camlens
from camlens.api.explanation import Upsampled


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


@pytest.fixture
def exp():
    torch.manual_seed(1)
    x = torch.randn(3, 3, 20, 28)
    return camlens.explain(_net(), x, "gradcam", "top3", layer="3")


def _reference(raw: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(raw.double(), size=size, mode="bilinear", align_corners=False).float()


def test_maps_are_lazy_until_used_then_kept(exp):
    assert exp.lazy and "_maps_cache" not in exp.__dict__
    assert exp.shape == (3, 3, 20, 28) and len(exp) == 3 and "maps=20x28" in repr(exp)
    assert exp.lazy  # shape, len and repr computed nothing
    assert exp.raw.shape == (3, 3, 10, 14)
    m = exp.maps
    assert not exp.lazy and exp.maps is m  # computed once, then kept
    assert m.dtype == torch.float32 and m.shape == (3, 3, 20, 28)
    torch.testing.assert_close(m, _reference(exp.raw, (20, 28)), atol=1e-5, rtol=1e-5)


def test_one_image_and_one_map_without_the_batch(exp):
    ref = _reference(exp.raw, (20, 28))
    for i in range(3):
        torch.testing.assert_close(exp.image_maps(i), ref[i], atol=1e-5, rtol=1e-5)
        for k in range(3):
            torch.testing.assert_close(exp.map(i, k), ref[i, k], atol=1e-5, rtol=1e-5)
    assert exp.lazy
    m = exp.maps  # once computed, the accessors read the kept maps
    assert torch.equal(exp.image_maps(1), m[1]) and torch.equal(exp.map(2, 1), m[2, 1])


def test_select_to_replace_keep_maps_lazy(exp):
    ref = _reference(exp.raw, (20, 28))
    s = exp.select([2, 0])
    assert s.lazy and s.shape == (2, 3, 20, 28)
    torch.testing.assert_close(s.maps, ref[[2, 0]], atol=1e-5, rtol=1e-5)
    c = exp.to("cpu")
    assert c.lazy
    r = exp.replace(method="other")
    assert r.lazy and r.method == "other"
    one = exp.select(1)
    assert one.lazy and one.shape == (1, 3, 20, 28)
    top = exp.first_targets(2)
    assert top.lazy and top.shape == (3, 2, 20, 28) and torch.equal(top.classes, exp.classes[:, :2])
    torch.testing.assert_close(top.maps, ref[:, :2], atol=1e-5, rtol=1e-5)
    assert torch.equal(top.ranks, exp.ranks[:, :2]) and torch.equal(top.raw, exp.raw[:, :2])
    assert exp.lazy


def test_assigning_maps_replaces_the_lazy_ones(exp):
    new = torch.ones(3, 3, 20, 28)
    exp.maps = new
    assert exp.maps is new and not exp.lazy and exp.shape == (3, 3, 20, 28)
    assert torch.equal(exp.image_maps(0), new[0])


def test_signed_reads_the_small_maps_and_never_computes(exp):
    assert exp.signed is False and exp.lazy  # Grad-CAM is ReLU'd: no negative value in raw
    cam = camlens.explain(_net(), torch.randn(2, 3, 20, 28), "gradcam", "top2", layer="3", relu=False)
    assert cam.lazy
    assert cam.signed == bool((cam.raw < 0).any()) and cam.lazy


def test_boxes_and_save_go_image_by_image_and_equal_eager(exp, tmp_path):
    eager = exp.replace(maps=exp.maps.clone())  # computes the maps of a copy...
    lazy = exp.replace(maps=Upsampled(exp.raw, (20, 28)))  # ...and a fresh lazy twin
    assert lazy.lazy and not eager.lazy
    for kw in ({}, {"threshold": 0.6}, {"mode": "all", "min_area": 2}):
        got = lazy.boxes(**kw)
        assert np.array_equal(np.asarray(got), np.asarray(eager.boxes(**kw))) and got.frame == "input"
    assert lazy.lazy
    a = lazy.save(tmp_path / "lazy", formats=["png", "npy", "json"], boxes=True)
    b = eager.save(tmp_path / "eager", formats=["png", "npy", "json"], boxes=True)
    assert lazy.lazy  # the files were written from one image's maps at a time
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 3 * 3 + 3 + 3
    for pa, pb in zip(a, b):
        if pa.suffix == ".npy":
            assert np.array_equal(np.load(pa), np.load(pb))
        elif pa.suffix == ".json":
            assert json.loads(pa.read_text()) == json.loads(pb.read_text())
        else:
            assert pa.read_bytes() == pb.read_bytes()


def test_figures_and_pickling(exp):
    fig = exp.figure(max_images=2)  # a matplotlib Figure without pyplot: nothing to close
    assert len(fig.axes) >= 2 * 3 and exp.lazy
    for clone in (pickle.loads(pickle.dumps(exp)), copy.deepcopy(exp)):
        assert clone.lazy
        torch.testing.assert_close(clone.maps, exp.maps)


def test_pixel_and_detector_maps_are_not_lazy():
    x = torch.randn(2, 3, 12, 12)
    e = camlens.explain(_net(), x, "saliency")
    assert not e.lazy and e.maps.shape == (2, 1, 12, 12)


def test_top100_keeps_only_small_maps():
    """The memory target of issue 18: explain() holds no (N, K, H, W) float32 maps for K = 100."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 100)
    ).eval()
    e = camlens.explain(net, torch.randn(4, 3, 64, 64), "gradcam", "top100", layer="1")
    assert e.lazy and e.raw.shape == (4, 100, 16, 16)
    held = [v for v in e.__dict__.values() if isinstance(v, torch.Tensor) and v.numel() >= 4 * 100 * 64 * 64]
    assert held == []


def test_threads_asking_at_once_get_one_tensor(exp, monkeypatch):
    import time
    from concurrent.futures import ThreadPoolExecutor

    real, calls = Upsampled.compute, []

    def slow(self, index=slice(None)):  # a slow upsampling: every thread arrives before it ends
        calls.append(1)
        time.sleep(0.05)
        return real(self, index)

    monkeypatch.setattr(Upsampled, "compute", slow)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: exp.maps, range(32)))
    assert all(g is got[0] for g in got) and exp.maps is got[0] and len(calls) == 1
