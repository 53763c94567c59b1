"""Issue 28, item 11: one pointing game for camlens.metrics and camlens.metrics.loceval - TorchRay's
protocol (integer pixels, a hit only strictly below the tolerance), tied maxima a hit when any hits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from camlens import metrics
from camlens.metrics import loceval


def _both(m: torch.Tensor, box: np.ndarray, tolerance: float, seed: int = 0) -> tuple[float, float]:
    a = float(
        metrics.pointing_game(None, torch.zeros(1, 3, *m.shape[-2:]), m, gt=box, tolerance=tolerance, seed=seed)[0]
    )
    b = loceval.evaluate_maps(m.numpy(), [box], tolerance=tolerance, thresholds=[0.5]).metrics["pointing_game"]
    return a, b


def _torchray(m: np.ndarray, mask: np.ndarray, tolerance: float) -> float:
    """Reference written here: TorchRay's acceptance region around each tied maximum (u, v),
    (row - v)^2 + (col - u)^2 < tolerance^2, hit if it meets the mask; any tied maximum."""
    rows, cols = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    for v, u in zip(*np.nonzero(m == m.max())):
        accept = (rows - v) ** 2 + (cols - u) ** 2 < tolerance**2
        if (accept & mask).any() or mask[v, u]:
            return 1.0
    return 0.0


def test_the_issue_case_peak_11_px_right_and_down_of_the_box_corner_is_a_miss_at_15():
    """Peak (100, 100), box pixels 111..130: the nearest is (111, 111), sqrt(11^2 + 11^2) = 15.56 px
    away, so TorchRay's rule says miss at 15 (was: metrics 0.0, loceval 1.0) and hit at 16."""
    m = torch.zeros(1, 224, 224)
    m[0, 100, 100] = 1
    box = np.array([[111, 111, 131, 131]], float)
    assert _both(m, box, 15) == (0.0, 0.0)
    assert _both(m, box, 16) == (1.0, 1.0)
    assert _both(m, box, 242**0.5) == (0.0, 0.0)  # exactly at the distance: strict, a miss
    assert _both(m, box, 15.6) == (1.0, 1.0)
    assert _both(m, np.array([[100, 100, 101, 101]], float), 0) == (1.0, 1.0)  # on the object, tolerance 0


def test_distance_exactly_the_tolerance_is_a_miss_in_both():
    m = torch.zeros(1, 32, 32)
    m[0, 10, 10] = 1
    box = np.array([[20, 0, 30, 32]], float)  # nearest box pixel: column 20, 10 px away
    assert _both(m, box, 10) == (0.0, 0.0)
    assert _both(m, box, 10.01) == (1.0, 1.0)


def test_tied_maxima_hit_when_any_hits_whatever_the_seed():
    """Two tied maxima, one inside the box, one far away: a hit for every seed in both (was: metrics
    0/1/0/1 for seeds 0-3, loceval the first in raster order)."""
    box = np.array([[150, 150, 170, 170]], float)
    m = torch.zeros(1, 224, 224)
    m[0, 10, 10] = 1  # first in raster order, far from the box
    m[0, 160, 160] = 1  # inside the box
    for seed in range(4):
        assert _both(m, box, 15, seed) == (1.0, 1.0)
    m[0, 160, 160] = 0.5  # no longer tied: the far maximum misses
    assert _both(m, box, 15) == (0.0, 0.0)


def test_a_constant_map_points_nowhere():
    box = np.array([[0, 0, 32, 32]], float)
    assert _both(torch.zeros(1, 32, 32), box, 15) == (0.0, 0.0)
    assert _both(torch.ones(1, 32, 32), box, 15) == (0.0, 0.0)


def test_both_equal_the_torchray_reference_on_random_cases():
    rng = np.random.default_rng(0)
    n_hits = 0
    for _ in range(60):
        h, w = rng.integers(8, 40, size=2)
        m = np.round(rng.random((h, w)) * 4) / 4 * (rng.random((h, w)) < 0.3)  # coarse values: ties
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        box = np.array([[x0, y0, min(w, x0 + rng.integers(1, 8)), min(h, y0 + rng.integers(1, 8))]], float)
        tol = float(rng.choice([0, 1, 2.5, 3, 5, 15]))
        mask = np.zeros((h, w), bool)
        mask[int(box[0, 1]) : int(box[0, 3]), int(box[0, 0]) : int(box[0, 2])] = True
        want = 0.0 if m.max() == m.min() else _torchray(m, mask, tol)
        assert _both(torch.from_numpy(m)[None], box, tol) == (want, want)
        n_hits += int(want)
    assert 10 < n_hits < 50  # both outcomes are exercised


def test_a_map_smaller_than_the_image_points_from_its_pixel_centre():
    """A 4x4 map on a 32x32 image: map pixel (1, 2) -> image pixel (floor(1.5 * 8), floor(2.5 * 8))
    = (12, 20) (row, col); box columns 30..31 are 10 px right of it."""
    m = np.zeros((4, 4))
    m[1, 2] = 1
    box = np.array([[30, 0, 32, 32]], float)
    r = loceval.evaluate_maps([m], [box], image_sizes=[(32, 32)], tolerance=10)
    assert r.metrics["pointing_game"] == 0.0
    assert loceval.evaluate_maps([m], [box], image_sizes=[(32, 32)], tolerance=10.5).metrics["pointing_game"] == 1.0
    assert loceval.pointing_hit((20.5, 12.5), box, 10.5) and not loceval.pointing_hit((20.5, 12.5), box, 10)


@pytest.mark.parametrize("tolerance", [0, 15])
def test_the_centre_baselines_still_point_at_the_centre(tolerance):
    box = np.array([[15, 15, 17, 17]], float)  # the central pixels of a 32x32 image
    assert metrics.centre_baseline(box, (32, 32), tolerance=tolerance).tolist() == [1.0]
