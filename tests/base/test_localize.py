from collections import deque

import numpy as np
import pytest
import torch

import camlens
from camlens.api.explanation import Explanation
from camlens.base.errors import InputError
from camlens.base.localization import (
    DEFAULT_THRESHOLD,
    centre_box,
    draw_boxes,
    image_boxes,
    iou,
    localize,
    scale_boxes,
)


def _oracle_components(mask):
    """Independent 8-connected flood fill: list of (area, first_pixel_raster, box)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                q, pix = deque([(y, x)]), []
                seen[y, x] = True
                while q:
                    cy, cx = q.popleft()
                    pix.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                q.append((ny, nx))
                ys = [p[0] for p in pix]
                xs = [p[1] for p in pix]
                out.append((len(pix), pix, (min(xs), min(ys), max(xs) + 1, max(ys) + 1)))
    return out


def test_rectangle_exact_box_exclusive_ends():
    m = np.zeros((10, 12))
    m[2:7, 3:9] = 1.0
    assert localize(m).tolist() == [3, 2, 9, 7]
    # y0:y1, x0:x1 slices the object exactly
    x0, y0, x1, y1 = localize(m)
    assert m[y0:y1, x0:x1].sum() == m.sum()


def test_empty_constant_negative_and_nan_maps_give_minus_one():
    assert localize(np.zeros((5, 5))).tolist() == [-1] * 4
    assert localize(-np.ones((5, 5))).tolist() == [-1] * 4
    bad = np.ones((5, 5))
    bad[0, 0] = np.nan
    assert localize(bad).tolist() == [-1] * 4
    # a constant positive map covers the whole frame
    assert localize(np.full((4, 6), 3.0)).tolist() == [0, 0, 6, 4]


def test_threshold_is_a_strict_fraction_of_the_max():
    m = np.tile(np.arange(10, dtype=float), (3, 1))  # values 0..9 along x, max 9
    # > 0.5 * 9 = 4.5 -> x >= 5
    assert localize(m, 0.5).tolist() == [5, 0, 10, 3]
    # exactly at the threshold is excluded: 1/3 * 9 = 3 -> x >= 4
    assert localize(m, 1 / 3).tolist() == [4, 0, 10, 3]
    # threshold 0 keeps every positive pixel: x >= 1
    assert localize(m, 0.0).tolist() == [1, 0, 10, 3]
    # scale invariance: only the ratio to the map's own max matters
    assert localize(m * 1e-6, 0.5).tolist() == localize(m * 1e6, 0.5).tolist()
    assert DEFAULT_THRESHOLD == 0.3
    with pytest.raises(InputError, match="fraction"):
        localize(m, 1.0)
    with pytest.raises(InputError, match="fraction"):
        localize(m, -0.1)


def test_largest_component_wins_and_all_mode_lists_them():
    m = np.zeros((20, 20))
    m[1:4, 1:4] = 1.0  # 9 px, higher values
    m[10:15, 8:18] = 0.5  # 50 px
    m[18, 0] = 0.9  # 1 px
    assert localize(m, 0.2).tolist() == [8, 10, 18, 15]
    allb = localize(m, 0.2, mode="all")
    assert allb.tolist() == [[8, 10, 18, 15], [1, 1, 4, 4], [0, 18, 1, 19]]
    # min_area drops small components
    assert localize(m, 0.2, mode="all", min_area=5).tolist() == [[8, 10, 18, 15], [1, 1, 4, 4]]
    assert localize(m, 0.2, min_area=51).tolist() == [-1] * 4
    # raising the threshold above 0.5 of the max leaves the two small ones
    assert localize(m, 0.6).tolist() == [1, 1, 4, 4]


def test_all_mode_pads_with_minus_one_across_a_batch():
    a = np.zeros((8, 8))
    a[0, 0] = a[5, 5] = 1
    b = np.zeros((8, 8))
    b[2:4, 2:4] = 1
    out = localize(np.stack([a, b, np.zeros((8, 8))]), mode="all")
    assert out.shape == (3, 2, 4)
    assert out[0].tolist() == [[0, 0, 1, 1], [5, 5, 6, 6]]
    assert out[1].tolist() == [[2, 2, 4, 4], [-1] * 4]
    assert out[2].tolist() == [[-1] * 4, [-1] * 4]


def test_ties_equal_area_prefer_more_mass_then_raster_order():
    m = np.zeros((10, 10))
    m[0:2, 6:8] = 0.6  # 4 px, mass 2.4, first in raster order
    m[6:8, 1:3] = 1.0  # 4 px, mass 4.0
    assert localize(m, 0.1).tolist() == [1, 6, 3, 8]
    m[6:8, 1:3] = 0.6  # equal area and mass: raster order decides (top one first)
    m[0, 9] = 0.0
    assert localize(m, 0.1).tolist() == [6, 0, 8, 2]
    # ties in the maximum value do not matter: both plateaus are the max
    p = np.zeros((6, 6))
    p[0, 0] = p[5, 5] = 1.0
    p[4:6, 4:6] = 1.0
    assert localize(p, 0.5).tolist() == [4, 4, 6, 6]


def test_eight_connectivity_joins_diagonals():
    m = np.eye(5)
    assert localize(m, 0.5).tolist() == [0, 0, 5, 5]
    assert localize(m, 0.5, mode="all").shape == (1, 4)


def test_batched_tensor_matches_independent_flood_fill():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 2, 17, 13, generator=g) ** 3
    got = camlens.localize(maps, threshold=0.3)
    assert got.shape == (3, 2, 4) and got.dtype == np.int64
    for i in range(3):
        for k in range(2):
            m = maps[i, k].numpy().astype(np.float64)
            comps = _oracle_components(m > 0.3 * m.max())
            best = max(comps, key=lambda c: (c[0], sum(m[p] for p in c[1]), -c[1][0][0] * 100 - c[1][0][1]))
            assert got[i, k].tolist() == list(best[2])
    allb = localize(maps, 0.3, mode="all")
    for i in range(3):
        for k in range(2):
            m = maps[i, k].numpy().astype(np.float64)
            comps = _oracle_components(m > 0.3 * m.max())
            rows = [r for r in allb[i, k].tolist() if r != [-1] * 4]
            assert sorted(rows) == sorted(list(c[2]) for c in comps)


def test_camlens_localize_stays_callable_after_submodule_import():
    import camlens.base.localization as mod

    m = np.zeros((4, 4))
    m[1, 2] = 1
    assert camlens.localize(m).tolist() == [2, 1, 3, 2]
    assert mod.iou is iou


def test_iou_closed_form_and_broadcasting():
    assert iou([0, 0, 2, 2], [0, 0, 2, 2]) == 1.0
    assert iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert iou([0, 0, 2, 2], [2, 2, 4, 4]) == 0.0  # touching edges, exclusive ends
    assert iou([0, 0, 2, 2], [-1, -1, -1, -1]) == 0.0
    assert iou([-1] * 4, [-1] * 4) == 0.0
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]])
    b = np.array([[0, 0, 10, 5], [0, 0, 10, 10], [20, 20, 30, 30]])
    got = iou(a[:, None], b[None])
    assert got.shape == (2, 3)
    assert got[0].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert got[1, 1] == pytest.approx(25 / 175)
    with pytest.raises(InputError):
        iou([0, 0, 1], [0, 0, 1, 1])


def test_scale_boxes_per_axis_and_empty():
    b = np.array([[10, 20, 30, 40], [-1, -1, -1, -1]])
    # maps 100x50 (H, W) -> image 200x150: x * 3, y * 2
    assert scale_boxes(b, (100, 50), (200, 150)).tolist() == [[30, 40, 90, 80], [-1] * 4]
    # shrinking rounds outwards: starts floor, ends ceil, clipped to the image
    assert scale_boxes([[1, 1, 3, 3]], (4, 4), (3, 3)).tolist() == [[0, 0, 3, 3]]
    assert scale_boxes([[0, 0, 4, 4]], (4, 4), (4, 4)).tolist() == [[0, 0, 4, 4]]


def test_centre_box():
    assert centre_box((100, 200)).tolist() == [50, 25, 150, 75]
    assert centre_box((10, 10), 1.0).tolist() == [0, 0, 10, 10]


def test_draw_boxes_outline_on_exact_pixels():
    img = np.zeros((20, 30, 3), dtype=np.uint8)
    out = draw_boxes(img, [[5, 4, 15, 10], [-1, -1, -1, -1]], color=(255, 0, 0), width=1)
    assert img.sum() == 0  # input untouched
    red = (out == [255, 0, 0]).all(-1)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (5, 4, 15, 10)
    assert red[4, 5:15].all() and red[9, 5:15].all() and red[4:10, 5].all() and red[4:10, 14].all()
    assert not red[5:9, 6:14].any()  # hollow


def _exp_from_maps(maps, images=None):
    n, k = maps.shape[:2]
    return Explanation(
        maps=maps,
        raw=maps,
        classes=torch.zeros(n, k, dtype=torch.long),
        scores=torch.zeros(n, k),
        probs=torch.zeros(n, k),
        method="cam",
        images=images,
    )


def test_explanation_boxes_and_image_frame():
    maps = torch.zeros(2, 1, 10, 10)
    maps[0, 0, 2:4, 5:8] = 1.0
    exp = _exp_from_maps(maps, images=[np.zeros((20, 40, 3), np.uint8), np.zeros((10, 10, 3), np.uint8)])
    # issue 12: boxes() are in original-image pixels when the images are known (map pixels on request)
    assert exp.boxes(frame="input").tolist() == [[[5, 2, 8, 4]], [[-1] * 4]]
    assert exp.boxes().tolist() == [[[20, 4, 32, 8]], [[-1] * 4]] and exp.boxes().frame == "image"
    assert exp.boxes(threshold=0.5).shape == (2, 1, 4)
    per_image = image_boxes(exp)
    assert per_image[0].tolist() == [[20, 4, 32, 8]] and per_image[1].tolist() == [[-1] * 4]
