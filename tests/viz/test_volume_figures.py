"""The slice montage of volume maps (camlens.viz.volume): the peak's slice is always shown and marked,
one colour scale (diverging for signed maps, as in 2-D) with a colorbar, bad inputs named."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch

import camlens
from camlens.base.errors import InputError
from camlens.viz.volume import peak_voxel, slice_indices, slice_montage, volume_figure


def blob(center, shape=(9, 10, 12), sign=1.0) -> np.ndarray:
    z, y, x = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    c = center
    return sign * np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / 4.0)


def test_slice_indices_always_hold_the_peak():
    for size, n, peak in [(10, 5, 3), (10, 5, 9), (3, 5, 1), (1, 4, 0), (40, 6, 17)]:
        idx = slice_indices(size, n, peak)
        assert peak in idx and idx == sorted(set(idx)) and len(idx) <= min(n, size)
        assert all(0 <= i < size for i in idx)


def test_peak_of_a_signed_map_is_its_largest_magnitude():
    m = blob((2, 3, 4)) * 0.5 + blob((6, 7, 8), sign=-1.0)
    assert peak_voxel(m, signed=False) == (2, 3, 4)
    assert peak_voxel(m, signed=True) == (6, 7, 8)


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.get_title()]


def test_montage_marks_the_peak_slice_in_each_view():
    fig = slice_montage(blob((2, 7, 5)), np.random.default_rng(0).random((9, 10, 12)), n_slices=4)
    titles = _titles(fig)
    assert {"axial 2 (peak)", "coronal 7 (peak)", "sagittal 5 (peak)"} <= set(titles)
    assert len(titles) == 12
    assert "peak at (z, y, x) = (2, 7, 5)" in fig._suptitle.get_text()
    assert len(fig.axes) == 13  # 3 x 4 panels and one colorbar


def test_signed_maps_get_the_diverging_scale_and_unsigned_ones_jet():
    signed = slice_montage(blob((2, 3, 4)) - blob((6, 7, 8)))
    unsigned = slice_montage(blob((2, 3, 4)))
    assert "red +, blue −" in signed._suptitle.get_text()
    assert "red +" not in unsigned._suptitle.get_text()
    bar = signed.axes[-1]
    assert 0.0 in list(bar.get_yticks())


def test_volume_figure_of_an_explanation_and_refusals():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(1, 3, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool3d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(3, 2),
    )
    exp = camlens.explain(net, torch.randn(1, 1, 6, 7, 8), "gradcam", targets=[[1]])
    fig = volume_figure(exp, n_slices=3, views=("axial",))
    assert any("(peak)" in t for t in _titles(fig)) and "gradcam" in fig._suptitle.get_text()
    assert "(peak)" in " ".join(ax.get_title() for ax in exp.figure().axes)  # the montage by default
    with pytest.raises(InputError, match="save_nifti"):
        exp.save("unused-folder")
    with pytest.raises(InputError, match="views must be"):
        slice_montage(blob((1, 1, 1)), views=("top",))
    with pytest.raises(InputError, match=r"one \(D, H, W\) volume"):
        slice_montage(np.zeros((2, 3, 4, 5)))
    with pytest.raises(InputError, match="must match"):
        slice_montage(blob((1, 1, 1)), np.zeros((3, 3, 3)))
