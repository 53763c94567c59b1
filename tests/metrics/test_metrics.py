"""camlens.metrics against hand-computed toy cases: a model whose output is a known function of the
pixels (a linear score on pixel values), three-step curves with a known area, imputations with a
closed form, pointing results worked out by hand, and SciPy / scikit-image references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens import metrics as M
from camlens.base.errors import InputError, TargetError


class PixelLinear(nn.Module):
    """``logits = [sum_p w_p x_p, 0]``: the softmax probability of class 0 is
    ``sigmoid(sum_p w_p x_p)`` and that of class 1 is ``1 - sigmoid(...)``."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(int(x.shape[0]))
        s = (x * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def trap(y, x=None) -> float:
    """Independent trapezoid rule, normalized by the x span."""
    y = list(map(float, y))
    x = list(np.linspace(0, 1, len(y))) if x is None else list(map(float, x))
    area = sum((x[k] - x[k - 1]) * (y[k] + y[k - 1]) / 2 for k in range(1, len(y)))
    return area / (x[-1] - x[0])


@pytest.fixture
def lin():
    # one channel 2 x 2 image; w = 1 so the score is the pixel sum
    return PixelLinear(torch.ones(1, 2, 2, dtype=torch.float64))


@pytest.fixture
def x22():
    return torch.tensor([[[[2.0, 1.0], [0.5, -1.0]]]], dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# AUC and ranking
# --------------------------------------------------------------------------------------------
def test_auc_three_step_curve():
    # three steps: (1 + .5)/2 + (.5 + .25)/2 + (.25 + 0)/2 = 1.25, over 3 steps
    assert float(M.auc([1.0, 0.5, 0.25, 0.0])) == pytest.approx(1.25 / 3)
    assert float(M.auc([0.2, 0.2, 0.2])) == pytest.approx(0.2)
    # non-uniform x: normalized by the span
    assert float(M.auc([0.0, 1.0, 1.0], [0.0, 0.5, 2.0])) == pytest.approx(trap([0, 1, 1], [0, 0.5, 2]))
    assert float(M.auc([0.7])) == pytest.approx(0.7)
    batch = M.auc(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert batch.tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(InputError):
        M.auc([1.0, 2.0], [1.0, 1.0])


def test_pixel_order_descending_and_seeded_ties():
    m = torch.tensor([[[0.1, 0.9], [0.5, 0.3]]])
    for seed in range(3):  # distinct values: the seed does not matter
        assert M.pixel_order(m, seed).tolist() == [[1, 2, 3, 0]]
    rank = M.pixel_rank(m)
    assert rank.tolist() == [[3, 0, 1, 2]]
    flat = torch.zeros(1, 8, 8)
    o0, o0b, o1 = M.pixel_order(flat, 0), M.pixel_order(flat, 0), M.pixel_order(flat, 1)
    assert sorted(o0[0].tolist()) == list(range(64))  # a permutation
    assert torch.equal(o0, o0b) and not torch.equal(o0, o1)  # reproducible, seed-dependent
    # ties inside a map: the tied pixels keep their block, in random order
    m2 = torch.tensor([[[1.0, 1.0, 0.0, 5.0]]])
    o = M.pixel_order(m2, 3)[0].tolist()
    assert o[0] == 3 and set(o[1:3]) == {0, 1} and o[3] == 2


# --------------------------------------------------------------------------------------------
# deletion / insertion
# --------------------------------------------------------------------------------------------
def test_deletion_curve_on_pixel_sum_model(lin, x22):
    # map = the pixel values: removal order 2, 1, 0.5, -1; substrate 0
    maps = x22[:, 0]
    cur = M.deletion_curve(lin, x22, maps, targets=0, steps=4)
    sums = [2.5, 0.5, -0.5, -1.0, 0.0]
    expected = [sig(s) for s in sums]
    assert cur.fractions.tolist() == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert cur.probs[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(cur.auc[0]) == pytest.approx(trap(expected), abs=1e-6)
    assert float(M.deletion(lin, x22, maps, 0, steps=4)[0]) == pytest.approx(trap(expected), abs=1e-6)
    # class 1 has probability 1 - p
    cur1 = M.deletion_curve(lin, x22, maps, targets=1, steps=4)
    assert cur1.probs[0].tolist() == pytest.approx([1 - e for e in expected], abs=1e-6)
    # two steps: remove 0 then 2 then 4 pixels
    cur2 = M.deletion_curve(lin, x22, maps, targets=0, steps=2)
    assert cur2.probs[0].tolist() == pytest.approx([sig(2.5), sig(-0.5), sig(0.0)], abs=1e-6)


def test_insertion_curve_and_substrates(lin, x22):
    maps = x22[:, 0]
    cur = M.insertion_curve(lin, x22, maps, targets=0, steps=4, substrate="zero")
    expected = [sig(s) for s in (0.0, 2.0, 3.0, 3.5, 2.5)]
    assert cur.probs[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert float(cur.auc[0]) == pytest.approx(trap(expected), abs=1e-6)
    # a constant substrate c: removed pixels become c
    cur = M.deletion_curve(lin, x22, maps, targets=0, steps=4, substrate=10.0)
    assert cur.probs[0].tolist() == pytest.approx([sig(s) for s in (2.5, 10.5, 19.5, 29, 40)], abs=1e-6)
    # "mean" substrate: the image mean 0.625
    cur = M.deletion_curve(lin, x22, maps, targets=0, steps=4, substrate="mean")
    assert float(cur.probs[0, -1]) == pytest.approx(sig(4 * 0.625), abs=1e-6)
    # a callable substrate
    cur = M.deletion_curve(lin, x22, maps, targets=0, steps=1, substrate=lambda t: -t)
    assert cur.probs[0].tolist() == pytest.approx([sig(2.5), sig(-2.5)], abs=1e-6)
    # default insertion substrate is the blur; its sum is the blurred image's sum
    blur = M.gaussian_blur(x22)
    cur = M.insertion_curve(lin, x22, maps, targets=0, steps=1)
    assert float(cur.probs[0, 0]) == pytest.approx(sig(float(blur.sum())), abs=1e-6)
    with pytest.raises(InputError, match="substrate"):
        M.deletion(lin, x22, maps, 0, substrate="plaid")


def test_gaussian_blur_reference():
    from scipy.ndimage import convolve1d

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 20, 17, generator=g, dtype=torch.float64)
    k = np.exp(-0.5 * ((np.arange(11) - 5) / 5.0) ** 2)
    k /= k.sum()
    ref = convolve1d(convolve1d(x.numpy(), k, axis=-1, mode="mirror"), k, axis=-2, mode="mirror")
    assert np.allclose(M.gaussian_blur(x).numpy(), ref, atol=1e-12)
    const = torch.full((1, 1, 12, 12), 3.0)
    assert torch.allclose(M.gaussian_blur(const), const)


def test_deletion_batches_are_bounded(lin):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    lin.seen.clear()
    a = M.deletion(lin, x, x[:, 0], 0, steps=4, batch_size=4)
    assert max(lin.seen) <= 4
    assert sum(lin.seen) == 3 + 3 * 5  # target resolution pass + 15 perturbed images
    b = M.deletion(lin, x, x[:, 0], 0, steps=4, batch_size=64)
    assert torch.allclose(a, b)


def test_the_default_batch_is_small_on_the_cpu():
    from camlens.base.defaults import forward_batch, method_batch

    assert forward_batch("cpu") == 4 and forward_batch("cuda") == 64
    assert method_batch("cpu") == 8 and method_batch("cuda") == 64
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
    lin = PixelLinear(torch.ones(1, 2, 2, dtype=torch.float64))
    M.deletion(lin, x, x[:, 0], 0, steps=4)
    assert lin.seen[1:] == [4, 4, 4, 3]  # after the target pass: 15 perturbed images, 4 per forward


class ReadsMemoryOrder(nn.Module):
    """A CNN whose head reads the raw memory of its input (as a custom C++ op might): another layout
    gives other numbers, silently."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        raw = torch.as_strided(x, (x.shape[0], 12), (x.stride(0), 1))  # the first 12 values in memory
        return torch.stack([raw.sum(1) + self.conv(x).mean((1, 2, 3)), torch.zeros(x.shape[0])], 1)


class ViewsItsFeatures(nn.Module):
    """A CNN that flattens with ``view`` (refused on a channels-last tensor)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.conv(x).view(x.shape[0], -1))


def _plain_deletion(model, x, maps, cls, steps):
    """Deletion probabilities of the plain layout, one image per forward (the reference)."""
    from camlens.metrics._common import pixel_rank

    rank = pixel_rank(maps, 0).view(x.shape[0], 1, *x.shape[2:])
    n = maps[0].numel()
    out = torch.zeros(x.shape[0], steps + 1)
    with torch.no_grad():
        for i in range(x.shape[0]):
            for k in range(steps + 1):
                keep = rank[i : i + 1] >= round(k * n / steps)
                xi = torch.where(keep, x[i : i + 1], torch.zeros(()))
                out[i, k] = model(xi.contiguous()).softmax(1)[0, int(cls[i])]
    return out


@pytest.mark.parametrize("make", [ReadsMemoryOrder, ViewsItsFeatures, None], ids=["memory", "view", "cnn"])
def test_channels_last_only_where_it_gives_the_same_scores(make):
    torch.manual_seed(0)
    if make is None:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.AdaptiveAvgPool2d(1)
        )
        model = nn.Sequential(model, nn.Flatten()).eval()
    else:
        model = make().eval()
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    before = x.clone()
    maps = x.abs().sum(1)
    cls = torch.tensor([0, 1, 0, 1, 0]) if make is not ViewsItsFeatures else torch.tensor([0, 1, 2, 0, 1])
    curve = M.deletion_curve(model, x, maps, cls, steps=6, batch_size=4)
    torch.testing.assert_close(curve.probs, _plain_deletion(model, x, maps, cls, 6), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, before) and x.is_contiguous()


def test_channels_last_forward_decides_on_the_first_batch():
    from camlens.metrics._common import ChannelsLastForward

    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(2, 3, 8, 8)
    for model, expected in ((cnn, True), (ReadsMemoryOrder().eval(), False), (ViewsItsFeatures().eval(), False)):
        f = ChannelsLastForward(model)
        with torch.no_grad():
            f(x[:, :, :6, :6] if isinstance(model, ViewsItsFeatures) else x)
        assert f.channels_last is expected, model
    assert ChannelsLastForward(PixelLinear(torch.ones(1, 2, 2))).channels_last is False  # no convolution


def test_constant_and_zero_maps_never_nan(lin, x22):
    for maps in (torch.zeros(1, 2, 2), torch.full((1, 2, 2), 7.0)):
        vals = [
            M.deletion(lin, x22, maps, 0, steps=4),
            M.insertion(lin, x22, maps, 0, steps=4),
            M.average_drop(lin, x22, maps, 0),
            M.increase_in_confidence(lin, x22, maps, 0),
            M.road(lin, x22, maps, 0, percentages=(0.5,)),
            M.pointing_game(None, x22, maps, gt=[[0, 0, 1, 1]]),
            M.energy_pointing_game(None, x22, maps, gt=[[0, 0, 1, 1]]),
            M.spearman(maps, maps),
            M.ssim(maps, maps),
            M.spearman(maps, x22[:, 0].float()),
        ]
        for v in vals:
            assert torch.isfinite(v).all()
    # a constant map ranks pixels exactly like its seeded random order
    const = M.deletion_curve(lin, x22, torch.ones(1, 2, 2), 0, steps=4, seed=5)
    order = M.pixel_order(torch.ones(1, 2, 2), 5)[0]
    explicit = torch.zeros(4)
    explicit[order] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    ref = M.deletion_curve(lin, x22, explicit.view(1, 2, 2), 0, steps=4)
    assert torch.allclose(const.probs, ref.probs)


def test_maps_forms_and_errors(tiny, tiny_x):
    e = camlens.explain(tiny, tiny_x, "gradcam")
    a = M.deletion(tiny, tiny_x, e.maps[:, 0], e.classes[:, 0], steps=3)
    b = M.deletion(tiny, tiny_x, e, steps=3)  # an Explanation: its maps and classes
    c = M.deletion(tiny, tiny_x, "gradcam", steps=3)  # a method name: explain() for the top-1
    assert torch.allclose(a, b) and torch.allclose(a, c)
    # (N, 1, H, W) maps and NumPy arrays are accepted; other sizes are resized
    assert torch.allclose(a, M.deletion(tiny, tiny_x, e.maps.numpy(), e.classes[:, 0], steps=3))
    small = torch.nn.functional.interpolate(e.maps, size=(6, 6), mode="bilinear", align_corners=False)
    M.deletion(tiny, tiny_x, small, e.classes[:, 0], steps=3)
    with pytest.raises(InputError, match="maps for 3 images|one map per image"):
        M.deletion(tiny, tiny_x, e.maps[:2, 0], steps=3)
    with pytest.raises(InputError, match="NaN"):
        M.deletion(tiny, tiny_x, torch.full((3, 12, 12), float("nan")), steps=3)
    with pytest.raises(InputError, match="shape"):
        M.deletion(tiny, tiny_x, torch.zeros(3, 2, 12, 12), steps=3)
    with pytest.raises(TargetError, match="callable"):
        M.deletion(tiny, tiny_x, e.maps[:, 0], lambda z: z[:, 0], steps=3)
    with pytest.raises(InputError, match="steps"):
        M.deletion(tiny, tiny_x, e.maps[:, 0], steps=0)
    with pytest.raises(InputError, match="batch_size"):
        M.deletion(tiny, tiny_x, e.maps[:, 0], steps=2, batch_size=0)
    with pytest.raises(camlens.base.errors.MethodError):
        M.deletion(tiny, tiny_x, "gradcamm", steps=2)


def test_model_left_untouched(tiny, tiny_x):
    tiny.train()
    tiny.conv1.eval()
    flags = [m.training for m in tiny.modules()]
    state = copy.deepcopy(tiny.state_dict())
    M.deletion(tiny, tiny_x, "gradcam", steps=2)
    M.road(tiny, tiny_x, "random", percentages=(0.5,))
    M.average_drop(tiny, tiny_x, "random")
    M.sanity_randomization(tiny, tiny_x, "gradcam")
    M.class_sensitivity(tiny, tiny_x, "gradcam")
    assert [m.training for m in tiny.modules()] == flags
    assert all(torch.equal(v, tiny.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None and p.requires_grad for p in tiny.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in tiny.modules())


def test_baseline_maps():
    r = M.baseline_maps("random", 2, (64, 64), torch.device("cpu"), seed=3)
    assert r.shape == (2, 64, 64) and float(r.min()) >= 0 and float(r.max()) <= 1
    assert torch.equal(r, M.baseline_maps("random", 2, (64, 64), torch.device("cpu"), seed=3))
    # smooth: neighbouring pixels are close (a 2 x 2 grid upsampled)
    assert float((r[:, 1:] - r[:, :-1]).abs().max()) < 0.1
    rp = M.baseline_maps("random_pixels", 1, (8, 8), torch.device("cpu"))
    assert rp.unique().numel() == 64
    c = M.baseline_maps("centre", 1, (5, 7), torch.device("cpu"))
    assert tuple(divmod(int(c[0].argmax()), 7)) == (2, 3) and float(c.max()) == 1.0


# --------------------------------------------------------------------------------------------
# average drop / increase in confidence
# --------------------------------------------------------------------------------------------
def test_average_drop_and_increase_by_hand():
    lin = PixelLinear(torch.ones(1, 1, 3, dtype=torch.float64))
    x = torch.tensor([[[[1.0, 2.0, -1.0]]], [[[1.0, 2.0, -1.0]]]], dtype=torch.float64)
    maps = torch.tensor([[[0.0, 1.0, 0.5]], [[1.0, 0.0, 0.0]]])  # min-max: [0, 1, .5] and [1, 0, 0]
    y = sig(2.0)
    o = [sig(2.0 - 0.5), sig(1.0)]
    drop = M.average_drop(lin, x, maps, 0)
    assert drop.tolist() == pytest.approx([100 * (y - o[0]) / y, 100 * (y - o[1]) / y], abs=1e-4)
    # keep only the negative pixel's complement: the masked image scores higher -> increase, drop 0
    maps_up = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    assert M.average_drop(lin, x, maps_up, 0)[0] == 0.0
    assert M.increase_in_confidence(lin, x, maps_up, 0).tolist() == [100.0, 0.0]
    assert M.increase_in_confidence(lin, x, maps, 0).tolist() == [0.0, 0.0]
    # the paper's figures are the means of these per-image values
    y_, o_ = M.confidence_pair(lin, x, maps, 0)
    assert y_.tolist() == pytest.approx([y, y], abs=1e-6) and o_.tolist() == pytest.approx(o, abs=1e-6)


# --------------------------------------------------------------------------------------------
# ROAD
# --------------------------------------------------------------------------------------------
def test_linear_imputation_closed_forms():
    # centre of a 3 x 3 image: the weighted average of its 8 neighbours (1/6 direct, 1/12 diagonal)
    img = torch.arange(9, dtype=torch.float64).view(1, 3, 3) ** 2
    rm = torch.zeros(3, 3, dtype=torch.bool)
    rm[1, 1] = True
    out = M.noisy_linear_imputation(img, rm, noise=0)
    v = img[0]
    want = (v[0, 1] + v[1, 0] + v[1, 2] + v[2, 1]) / 6 + (v[0, 0] + v[0, 2] + v[2, 0] + v[2, 2]) / 12
    assert float(out[0, 1, 1]) == pytest.approx(float(want), abs=1e-6)
    assert torch.equal(out[0][~rm], img[0][~rm])  # kept pixels unchanged
    # a 1 x 4 strip with two unknowns: linear interpolation (2a + d)/3, (a + 2d)/3
    strip = torch.tensor([[[3.0, 0.0, 0.0, 9.0]]], dtype=torch.float64)
    rm = torch.tensor([[False, True, True, False]])
    out = M.noisy_linear_imputation(strip, rm, noise=0)
    assert out[0, 0].tolist() == pytest.approx([3.0, 5.0, 7.0, 9.0], abs=1e-6)
    # a border pixel: the average of its in-image neighbours only
    rm = torch.tensor([[True, False, False, False]])
    assert float(M.noisy_linear_imputation(strip, rm, noise=0)[0, 0, 0]) == pytest.approx(0.0, abs=1e-6)
    # linear images are reproduced exactly inside any interior hole, per channel
    yy, xx = torch.meshgrid(torch.arange(9.0), torch.arange(11.0), indexing="ij")
    ramp = torch.stack([2 * yy + 3 * xx, 0.5 * xx - yy]).double()[None]
    rm = torch.zeros(1, 9, 11, dtype=torch.bool)
    rm[0, 2:7, 3:9] = True
    rm[0, 4, 1] = True
    assert torch.allclose(M.noisy_linear_imputation(ramp, rm, noise=0), ramp, atol=1e-5)
    # everything removed: a constant image (the ridge), no NaN
    full = M.noisy_linear_imputation(ramp, torch.ones(1, 9, 11, dtype=torch.bool), noise=0)
    assert torch.isfinite(full).all() and float(full.std()) < 1e-6


def test_imputation_noise():
    img = torch.zeros(1, 3, 40, 40, dtype=torch.float64)
    rm = torch.zeros(1, 40, 40, dtype=torch.bool)
    rm[0, 10:30, 10:30] = True
    out = M.noisy_linear_imputation(img, rm, noise=0.5, seed=1)
    assert float(out[0][:, ~rm[0]].abs().max()) == 0.0  # noise only on the imputed pixels
    assert float(out[0][:, rm[0]].std()) == pytest.approx(0.5, rel=0.05)
    assert torch.equal(out, M.noisy_linear_imputation(img, rm, noise=0.5, seed=1))


def test_road_morf_lerf_by_hand():
    lin = PixelLinear(torch.ones(1, 1, 4, dtype=torch.float64))
    x = torch.tensor([[[[1.0, 4.0, 2.0, 1.0]]]], dtype=torch.float64)
    maps = torch.tensor([[[0.0, 3.0, 2.0, 1.0]]])
    r = M.road_curves(lin, x, maps, 0, percentages=(0.25, 0.5), noise=0)
    # MoRF 25%: pixel 1 -> (1 + 2)/2 = 1.5; 50%: pixels 1, 2 -> (2*1 + 1)/3 = 1, (1 + 2*1)/3 = 1
    # LeRF 25%: pixel 0 -> its only neighbour 4; 50%: pixels 0, 3 -> 4 and 2
    assert r.morf[0].tolist() == pytest.approx([sig(1 + 1.5 + 2 + 1), sig(1 + 1 + 1 + 1)], abs=1e-5)
    assert r.lerf[0].tolist() == pytest.approx([sig(4 + 4 + 2 + 1), sig(4 + 4 + 2 + 2)], abs=1e-5)
    assert float(M.road(lin, x, maps, 0, order="morf", percentages=(0.25, 0.5), noise=0)[0]) == pytest.approx(
        float(r.morf.mean()), abs=1e-6
    )
    comb = M.road(lin, x, maps, 0, order="combined", percentages=(0.25, 0.5), noise=0)
    assert float(comb[0]) == pytest.approx(float((r.lerf - r.morf).mean() / 2), abs=1e-6)
    with pytest.raises(InputError):
        M.road(lin, x, maps, 0, order="sideways")
    with pytest.raises(InputError):
        M.road(lin, x, maps, 0, percentages=(1.5,))


# --------------------------------------------------------------------------------------------
# pointing games
# --------------------------------------------------------------------------------------------
def test_pointing_game_by_hand():
    x = torch.zeros(1, 1, 32, 32)
    m = torch.zeros(1, 32, 32)
    m[0, 10, 10] = 1.0  # the maximum at row 10, column 10
    pg = M.pointing_game
    assert pg(None, x, m, gt=[[5, 5, 15, 15]]).tolist() == [1.0]  # inside
    # nearest box pixel is column 20: distance 10, a hit only strictly below the tolerance (TorchRay)
    assert pg(None, x, m, gt=[[20, 0, 30, 32]], tolerance=10.5).tolist() == [1.0]
    assert pg(None, x, m, gt=[[20, 0, 30, 32]], tolerance=10).tolist() == [0.0]
    # exclusive ends: box [0, 0, 10, 10] covers rows/cols 0..9, diagonal distance sqrt(2)
    assert pg(None, x, m, gt=[[0, 0, 10, 10]], tolerance=0).tolist() == [0.0]
    assert pg(None, x, m, gt=[[0, 0, 10, 10]], tolerance=1.5).tolist() == [1.0]
    # several boxes (their union), a mask, batches
    assert pg(None, x, m, gt=[np.array([[25, 25, 30, 30], [9, 9, 11, 11]])], tolerance=0).tolist() == [1.0]
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[0, 20:, 20:] = True
    assert pg(None, x, m, gt=mask, tolerance=0).tolist() == [0.0]
    m2 = torch.stack([m[0], m[0].flip(-1)])
    x2 = torch.zeros(2, 1, 32, 32)
    assert pg(None, x2, m2, gt=np.array([[5, 5, 15, 15], [5, 5, 15, 15]]), tolerance=0).tolist() == [1.0, 0.0]
    with pytest.raises(InputError, match="ground truth"):
        pg(None, x, m)
    with pytest.raises(InputError, match="empty"):
        pg(None, x, m, gt=[[40, 40, 50, 50]])
    # the centre baseline points at the middle
    assert M.centre_baseline([[12, 12, 20, 20], [0, 0, 4, 4]], (32, 32), tolerance=0).tolist() == [1.0, 0.0]
    c = pg(None, x, "centre", gt=[[16, 16, 17, 17]], tolerance=1)
    assert c.tolist() == [1.0]


def test_energy_pointing_game_by_hand():
    x = torch.zeros(1, 1, 4, 4)
    m = torch.zeros(1, 4, 4)
    m[0, 0, 0] = 3.0  # inside the box
    m[0, 3, 3] = 1.0  # outside
    m[0, 3, 0] = -5.0  # negative evidence is not energy
    box = [[0, 0, 2, 2]]
    assert float(M.energy_pointing_game(None, x, m, gt=box)[0]) == pytest.approx(0.75)
    # no energy: the area fraction of the box (4 of 16 pixels), like a constant map
    assert float(M.energy_pointing_game(None, x, torch.zeros(1, 4, 4), gt=box)[0]) == pytest.approx(0.25)
    assert float(M.energy_pointing_game(None, x, torch.ones(1, 4, 4), gt=box)[0]) == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------
# similarity
# --------------------------------------------------------------------------------------------
def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 6, 7), generator=g).float() - 2  # many ties, signed
    b = a + torch.randn(3, 6, 7, generator=g)
    got = M.spearman(a, b)
    got_abs = M.spearman(a, b, absolute=True)
    for i in range(3):
        assert float(got[i]) == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten())[0], abs=1e-6)
        ref = spearmanr(a[i].abs().flatten(), b[i].abs().flatten())[0]
        assert float(got_abs[i]) == pytest.approx(ref, abs=1e-6)
    assert float(M.spearman(a[:1], -a[:1])[0]) == pytest.approx(-1.0)
    # constant maps: 1 when both are, 0 when one is
    z = torch.zeros(1, 6, 7)
    assert M.spearman(z, z).tolist() == [1.0] and M.spearman(z, a[:1]).tolist() == [0.0]
    assert float(M.pearson(a[:1], b[:1])[0]) == pytest.approx(
        np.corrcoef(a[0].flatten(), b[0].flatten())[0, 1], abs=1e-6
    )


def test_similarity_constancy_is_relative_to_the_maps_magnitude():
    """Constant means constant up to the map's own rounding (camlens.base.ops.is_constant), not an
    absolute epsilon: a float32 map upsampled from a constant ripples by ~1e-7 of its value (its
    ranks are noise: correlation 0 with a real map), while a map of tiny values keeps its contrast."""
    from camlens.api.explanation import upsample

    g = torch.Generator().manual_seed(3)
    real = torch.rand(2, 24, 24, generator=g)
    flat = upsample(torch.full((2, 1, 1), 3.7)[:, None].expand(2, 1, 5, 5).contiguous(), (24, 24))[:, 0]
    assert not torch.equal(flat.amax(dim=(1, 2)), flat.amin(dim=(1, 2)))  # the ripple is there
    for f in (M.spearman, M.pearson, lambda a, b: M.spearman(a, b, absolute=True)):
        assert f(flat, real).tolist() == [0.0, 0.0]
        assert f(flat, flat).tolist() == [1.0, 1.0]
    tiny = real.double() * 1e-13  # before: "constant" by an absolute 1e-12, so 0 with its own pattern
    assert M.pearson(tiny, real).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert M.spearman(tiny, real).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    # a map of ±c only: |m| is constant, so the absolute ranking has nothing to rank
    pm = torch.where(real > 0.5, 2.0, -2.0)
    assert M.spearman(pm, real, absolute=True).tolist() == [0.0, 0.0]


def test_ssim_matches_skimage():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 24, 30, generator=g, dtype=torch.float64)
    b = (a + 0.3 * torch.rand(2, 24, 30, generator=g, dtype=torch.float64)).clamp(0, 1)
    a[:, 0, 0], a[:, -1, -1] = 0.0, 1.0  # min-max normalization leaves these maps unchanged
    b[:, 0, 0], b[:, -1, -1] = 0.0, 1.0
    got = M.ssim(a, b)
    for i in range(2):
        ref = structural_similarity(
            a[i].numpy(), b[i].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert float(got[i]) == pytest.approx(ref, abs=1e-5)
    assert M.ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert M.ssim(torch.zeros(1, 5, 5), torch.zeros(1, 5, 5)).tolist() == pytest.approx([1.0])


def test_class_sensitivity(tiny, tiny_x):
    # the pair form
    a = torch.rand(2, 5, 5)
    assert M.class_sensitivity(None, None, (a, a)).tolist() == pytest.approx([1.0, 1.0])
    # a method: the maps of the top-1 and of the least likely class, from one explain() call
    logits = tiny(tiny_x).detach()
    top, last = logits.argmax(1), logits.argmin(1)
    e = camlens.explain(tiny, tiny_x, "cam", targets=torch.stack([top, last], 1))
    ref = M.spearman(e.maps[:, 0], e.maps[:, 1], absolute=True)
    assert torch.allclose(M.class_sensitivity(tiny, tiny_x, "cam"), ref)
    second = logits.topk(2, dim=1).indices[:, 1]
    e2 = camlens.explain(tiny, tiny_x, "cam", targets=torch.stack([top, second], 1))
    got = M.class_sensitivity(tiny, tiny_x, "cam", other="top2", similarity_kind="ssim")
    assert torch.allclose(got, M.ssim(e2.maps[:, 0], e2.maps[:, 1]))
    with pytest.raises(InputError, match="two classes"):
        M.class_sensitivity(tiny, tiny_x, e.maps[:, 0])


# --------------------------------------------------------------------------------------------
# sanity randomization (toy network; the paper's finding is in test_metrics_real.py)
# --------------------------------------------------------------------------------------------
def test_randomization_layers_and_cascade(tiny, tiny_x):
    from camlens.metrics.sanity import _generator, randomize_

    assert M.randomization_layers(tiny, tiny_x) == ["fc", "conv2", "conv1"]
    res = M.sanity_randomization(tiny, tiny_x, ["cam", "gradcam"], targets=1)
    assert res.steps == ["original", "fc", "conv2", "conv1"]
    for metric in ("spearman_abs", "spearman", "ssim"):
        assert res.values[metric]["cam"][0].tolist() == pytest.approx([1.0] * 3)
    # oracle: randomize a copy by hand, step by step, and compare the maps
    work = copy.deepcopy(tiny)
    orig = camlens.explain(tiny, tiny_x, "cam", targets=1).maps[:, 0]
    for k, unit in enumerate(["fc", "conv2"]):
        randomize_(work.get_submodule(unit), _generator(0, k))
        new = camlens.explain(work, tiny_x, "cam", targets=1).maps[:, 0]
        assert torch.allclose(res.at(unit, "cam"), M.spearman(orig, new, absolute=True))
        assert torch.allclose(res.values["ssim"]["cam"][k + 1], M.ssim(orig.abs(), new.abs()))
    assert res.table()[0] == {
        "step": 0,
        "layer": "original",
        "method": "cam",
        "spearman_abs": 1.0,
        "spearman_abs_std": 0.0,
        "spearman": 1.0,
        "spearman_std": 0.0,
        "ssim": pytest.approx(1.0),
        "ssim_std": 0.0,
    }
    # independent randomization: the last step has only conv1 random, unlike the cascade
    ind = M.sanity_randomization(tiny, tiny_x, "cam", targets=1, mode="independent")
    work = copy.deepcopy(tiny)
    randomize_(work.conv1, _generator(0, 2))
    new = camlens.explain(work, tiny_x, "cam", targets=1).maps[:, 0]
    assert torch.allclose(ind.at("conv1", "cam"), M.spearman(orig, new, absolute=True))
    # explicit layers, the reset initialisation, a plot
    r2 = M.sanity_randomization(tiny, tiny_x, "cam", layers=["fc"], init="reset")
    assert r2.steps == ["original", "fc"]
    ax = r2.plot()
    assert len(ax.lines) >= 1
    with pytest.raises(camlens.base.errors.LayerNotFoundError):
        M.sanity_randomization(tiny, tiny_x, "cam", layers=["nope"])
    with pytest.raises(InputError):
        M.sanity_randomization(tiny, tiny_x, "cam", mode="sometimes")


def test_randomize_normal_keeps_statistics():
    from camlens.metrics.sanity import _generator, randomize_

    torch.manual_seed(0)
    lin = nn.Linear(200, 300)
    w0 = lin.weight.detach().clone()
    state = torch.random.get_rng_state()
    randomize_(lin, _generator(0, 0))
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG use
    w1 = lin.weight.detach()
    assert float(w1.std()) == pytest.approx(float(w0.std()), rel=0.02)
    assert float(w1.mean()) == pytest.approx(float(w0.mean()), abs=0.01 * float(w0.std()))
    assert abs(float(torch.corrcoef(torch.stack([w0.flatten(), w1.flatten()]))[0, 1])) < 0.02
    bn = nn.BatchNorm2d(4)
    state = torch.random.get_rng_state()
    randomize_(bn, _generator(0, 0), init="reset")
    assert torch.equal(state, torch.random.get_rng_state())
