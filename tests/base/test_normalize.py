"""Issue 19, defect 3: one min–max normalization with a threshold relative to the map's magnitude.

The former absolute threshold (``max - min > 1e-8``) took float32 ripple for signal: a constant map
upsampled from 1x1 features (a few 1e-7 of ripple) became [0, 1] noise, and genuine contrast in
maps of magnitude below 1e-8 was zeroed. Oracles: exact zeros for constant maps (by construction
and after bilinear upsampling), the closed form ``(m - min) / (max - min)`` for genuine contrast,
and the same function behind ``normalized()``, overlays, colour maps and the confidence-drop mask.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.base.ops import ULPS, is_constant, minmax
from camlens.metrics.confidence import confidence_pair
from camlens.viz import colorize, normalize, overlay

MAGNITUDES = [1e-20, 1e-9, 0.37, 1.0, 3.3, 876.0, 1e6]
SIZES = [(7, 7), (32, 32), (37, 53), (224, 224)]


def upsampled_constant(v: float, size) -> torch.Tensor:
    return F.interpolate(torch.full((1, 1, 1, 1), v), size=size, mode="bilinear", align_corners=False)[0]


@pytest.mark.parametrize("v", [*MAGNITUDES, -2.5, 0.0])
def test_constant_map_normalizes_to_exact_zero(v):
    m = torch.full((2, 9, 11), v)
    assert torch.equal(minmax(m), torch.zeros_like(m))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("v", [0.37, 3.3, 876.0, 1e6])
def test_constant_map_upsampled_from_1x1_normalizes_to_exact_zero(v, size):
    m = upsampled_constant(v, size)
    assert torch.equal(minmax(m), torch.zeros_like(m))
    assert bool(is_constant(m).all())


def test_the_ripple_is_real():
    """The case above is not vacuous: bilinear upsampling of 1x1 really leaves float32 ripple."""
    m = upsampled_constant(0.37, (37, 53))
    assert float(m.max() - m.min()) > 1e-8


@pytest.mark.parametrize("scale", MAGNITUDES)
def test_genuine_1e3_relative_contrast_is_kept(scale):
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(1, 16, 16, generator=g)
    m = scale * (1 + 1e-3 * pattern)  # contrast: 1e-3 of the magnitude
    lo, hi = m.amin(), m.amax()
    ref = (m.double() - lo.double()) / (hi.double() - lo.double())
    got = minmax(m)
    torch.testing.assert_close(got.double(), ref, atol=2e-3, rtol=0)
    assert float(got.min()) == 0.0 and float(got.max()) == 1.0
    assert not bool(is_constant(m).any())


def test_threshold_is_relative_and_per_dtype():
    """Contrast just above ULPS float units of the magnitude is kept, just below is constant; float64
    maps get float64's epsilon."""
    eps32 = torch.finfo(torch.float32).eps
    base = torch.ones(1, 4, 4)
    above = base.clone()
    above[0, 0, 0] += 4 * ULPS * eps32
    below = base.clone()
    below[0, 0, 0] += 0.25 * ULPS * eps32
    assert float(minmax(above).max()) == 1.0
    assert torch.equal(minmax(below), torch.zeros_like(below))
    d = base.double()
    d[0, 0, 0] += 1e-12  # far below float32 rounding, far above float64's
    assert minmax(d).dtype == torch.float64 and float(minmax(d).max()) == 1.0


def test_nan_and_dtypes():
    out = minmax(torch.tensor([[[float("nan"), 1.0], [0.0, 2.0]]]))
    assert not torch.isnan(out).any()
    assert minmax(torch.tensor([[1, 3], [2, 5]])).dtype == torch.float32
    h = minmax(torch.tensor([[1.0, 3.0], [2.0, 5.0]], dtype=torch.float16))
    assert h.dtype == torch.float16 and float(h.max()) == 1.0
    torch.testing.assert_close(minmax(torch.arange(6.0).view(2, 3), dims=1), torch.tensor([[0, 0.5, 1]] * 2))


# ------------------------------------------------------------------------ every user of it
class OneByOne(nn.Module):
    """A net whose features are 1x1 (as ResNet-18 at 32 px): every CAM upsampled from them is constant."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.act(self.body(x)).flatten(1))


@pytest.mark.parametrize("method", ["gradcam", "cam", "eigencam", "layercam"])
def test_explanation_normalized_of_1x1_features_is_zero(method):
    e = camlens.explain(OneByOne().eval(), torch.randn(2, 3, 37, 53), method, layer="act")
    assert e.raw.shape[-2:] == (1, 1)
    assert float(e.maps.abs().max()) > 0  # non-trivial constant maps (not all zero already)
    assert torch.equal(e.normalized(), torch.zeros_like(e.maps))
    assert np.array_equal(normalize(e.maps.numpy()), np.zeros(e.maps.shape, np.float32))


def test_overlay_and_colorize_of_constant_upsampled_map_are_flat():
    m = upsampled_constant(3.3, (37, 53))[0]
    cm = matplotlib.colormaps["jet"]
    flat = (np.asarray(cm(0.0))[:3] * 255 + 0.5).astype(np.uint8)
    assert (colorize(m) == flat).all()
    img = np.full((37, 53, 3), 100, np.uint8)
    out = overlay(img, upsampled_constant(3.3, (1, 1))[0].expand(5, 7))  # resized in the overlay
    assert (out == out[0, 0]).all()


def test_confidence_mask_of_constant_map_keeps_nothing():
    """Average drop's mask comes from the same function: a rippled constant map keeps nothing, so
    ``O`` equals the score of the substrate (the zero image) exactly."""
    net = OneByOne().eval()
    x = torch.randn(2, 3, 37, 53, generator=torch.Generator().manual_seed(4))
    maps = upsampled_constant(3.3, (37, 53)).expand(2, 37, 53).clone()
    y, o = confidence_pair(net, x, maps, [1, 2])
    with torch.no_grad():
        ref = net(torch.zeros_like(x)).softmax(1)[[0, 1], [1, 2]]
    torch.testing.assert_close(o, ref)
    assert not torch.allclose(y, o)


def test_scorecam_mask_of_rippled_channel_is_zero():
    """Score-CAM's masks use the same function: a channel constant up to rounding masks everything."""
    from camlens.attribution.scorecam import _minmax_rows

    rows = upsampled_constant(876.0, (37, 53)).flatten(1)
    assert torch.equal(_minmax_rows(rows), torch.zeros_like(rows))
