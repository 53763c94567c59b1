"""3-D boxes of volume maps: ``localize(..., spatial_dims=3)`` against a reference written here from
``scipy.ndimage.label`` (26-connectivity, largest component, ties by mass then raster order), on
synthetic blobs touching the border, several components, and two cubes that touch only at a corner
(one component in 26-connectivity, two in 6-connectivity)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import camlens
from camlens.base.errors import InputError
from camlens.base.localization import box_area, iou


def reference_box(m: np.ndarray, t: float) -> tuple[int, ...]:
    peak = m.max()
    if peak <= 0:
        return (-1,) * 6
    labels, n = ndimage.label(m > t * peak, structure=np.ones((3, 3, 3)))
    best = max(range(1, n + 1), key=lambda i: ((labels == i).sum(), m[labels == i].sum(), -i))
    z, y, x = np.nonzero(labels == best)
    return (x.min(), y.min(), z.min(), x.max() + 1, y.max() + 1, z.max() + 1)


def blobs(seed: int, shape=(9, 11, 13)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = rng.uniform(0, 0.1, shape)
    for _ in range(rng.integers(1, 5)):
        lo = [rng.integers(-2, s - 1) for s in shape]  # may start outside: touches the border
        hi = [min(s, a + rng.integers(2, 6)) for a, s in zip(lo, shape)]
        lo = [max(0, a) for a in lo]
        m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += rng.uniform(0.5, 1.0)
    return m


@pytest.mark.parametrize("seed", range(12))
def test_3d_boxes_equal_the_scipy_reference(seed):
    m = blobs(seed)
    for t in (0.3, 0.6):
        got = camlens.localize(m, t, spatial_dims=3)
        assert got.shape == (6,)
        assert tuple(got) == reference_box(m, t)


def test_corner_touching_cubes_are_one_26_connected_region():
    m = np.zeros((8, 8, 8))
    m[0:3, 0:3, 0:3] = 1.0  # touches the border
    m[3:5, 3:5, 3:5] = 1.0  # shares only the corner (2, 2, 2)-(3, 3, 3)
    m[6:8, 0:1, 6:8] = 0.9  # a third, separate component (smaller)
    assert tuple(camlens.localize(m, 0.5, spatial_dims=3)) == (0, 0, 0, 5, 5, 5)
    every = camlens.localize(m, 0.5, spatial_dims=3, mode="all")
    assert every.shape == (2, 6) and tuple(every[1]) == (6, 0, 6, 8, 1, 8)


def test_batched_volume_maps_and_empty_maps():
    maps = np.stack([blobs(s) for s in range(4)]).reshape(2, 2, 9, 11, 13)
    maps[1, 1] = 0.0
    got = camlens.localize(torch.as_tensor(maps), spatial_dims=3)
    assert got.shape == (2, 2, 6)
    assert tuple(got[1, 1]) == (-1,) * 6
    assert tuple(got[0, 1]) == reference_box(maps[0, 1], 0.3)
    # the same arrays read as 2-D maps are still boxed per slice, as before
    assert camlens.localize(maps).shape == (2, 2, 9, 4)


def test_3d_iou_and_volume():
    a, b = np.array([0, 0, 0, 2, 2, 2]), np.array([1, 1, 1, 3, 3, 3])
    assert box_area(a) == 8 and iou(a, b) == pytest.approx(1 / 15)
    assert iou(a, np.array([-1] * 6)) == 0
    with pytest.raises(InputError, match="spatial_dims must be 2"):
        camlens.localize(np.zeros((3, 3)), spatial_dims=4)


def test_explanation_boxes_of_a_volume_are_3d():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(3, 2),
    ).double()
    x = torch.zeros(1, 1, 6, 7, 8, dtype=torch.float64)
    x[0, 0, 1:3, 2:5, 3:7] = 5.0
    exp = camlens.explain(net, x, "saliency", targets=[[0]])
    boxes = exp.boxes(0.5)
    assert boxes.shape == (1, 1, 6) and boxes.frame == "input" and boxes.sizes == [(6, 7, 8)]
    assert tuple(boxes[0, 0]) == reference_box(exp.maps[0, 0].numpy(), 0.5)
    with pytest.raises(InputError, match="voxels"):
        exp.boxes(frame="image")
