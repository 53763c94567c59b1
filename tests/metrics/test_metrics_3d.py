"""The faithfulness metrics on volumes and clips ``(N, C, D, H, W)`` with maps ``(N, D, H, W)``.

Oracles: the deletion / insertion AUC of a perfect map on a 3-D model whose score is the sum of a
known region equals the closed form written here; ROAD's imputation of one removed voxel is the
mean of its 6 face neighbours (the 1/(6|d|^2)-weighted mean of its 26); a volume of depth 1 through
a model that drops the depth axis gives the 2-D results exactly (``torch.equal``); the pointing and
energy games in voxels against hand-placed peaks; the sanity check's 3-D table against a
randomization redone in the test."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import camlens
from camlens.base.errors import InputError
from camlens.base.localization import box_mask
from camlens.metrics import (
    centre_baseline,
    deletion_curve,
    energy_pointing_game,
    insertion_curve,
    noisy_linear_imputation,
    pointing_game,
    road_curves,
    sanity_randomization,
    spearman,
    ssim,
)
from camlens.metrics.sanity import _generator, randomize_
from tests.conftest import TinyCNN

SIZE = 16
REGION = (slice(4, 8), slice(0, 16), slice(0, 16))  # z 4..7, every y and x: 1024 of 4096 voxels


class RegionSum(nn.Module):
    """Logits ``(S, 0)`` with ``S = 4/1024 * sum of the region's voxels``: p = sigmoid(S)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, 0][(slice(None), *REGION)].sum((1, 2, 3)) * (4 / 1024)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


class Depthless(nn.Module):
    """A 2-D model applied to the only slice of a depth-1 volume."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, 0])


class PlainLayout(nn.Module):
    """The 2-D model on a contiguous input: the metrics hand a CNN channels-last batches on the CPU,
    whose convolutions round differently; the slice of a volume is contiguous."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous())


def tiny_3d_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(6, classes),
    )


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def closed_form_auc(p: list[float]) -> float:
    s = len(p) - 1
    return (sum(p) - (p[0] + p[-1]) / 2) / s


def region_volume() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, SIZE, SIZE, SIZE, generator=g) * 5  # outside the region: anything
    x[(0, 0, *REGION)] = 1.0
    perfect = torch.zeros(1, SIZE, SIZE, SIZE)
    perfect[(0, *REGION)] = 1.0
    return x, perfect


def test_deletion_and_insertion_of_a_perfect_map_equal_the_closed_form():
    x, perfect = region_volume()
    # 16 steps of 256 voxels: the region (1024 voxels) goes in the first 4; S = 4 - k, then 0
    dele = deletion_curve(RegionSum(), x, perfect, targets=0, steps=16)
    want = [sigmoid(max(4 - k, 0)) for k in range(17)]
    assert dele.probs[0].tolist() == pytest.approx(want, abs=1e-6)
    assert float(dele.auc[0]) == pytest.approx(closed_form_auc(want), abs=1e-6)
    ins = insertion_curve(RegionSum(), x, perfect, targets=0, steps=16, substrate="zero")
    want = [sigmoid(min(k, 4)) for k in range(17)]
    assert float(ins.auc[0]) == pytest.approx(closed_form_auc(want), abs=1e-6)
    # the reverse map removes the region last: a worse (higher) deletion AUC
    worse = deletion_curve(RegionSum(), x, 1 - perfect, targets=0, steps=16)
    assert float(worse.auc[0]) > float(dele.auc[0]) + 0.2


def test_the_3d_blur_and_mean_substrates():
    x, _ = region_volume()
    blurred = camlens.metrics.gaussian_blur(x)
    assert blurred.shape == x.shape
    assert float(blurred.std()) < float(x.std())  # smoothed along every axis
    const = torch.full_like(x, 2.5)
    assert torch.allclose(camlens.metrics.gaussian_blur(const), const)
    mean = camlens.metrics.make_substrate(x, "mean")
    assert torch.allclose(mean, x.mean().expand_as(x))
    # the depth pass alone: a volume constant in each (H, W) slice is blurred along D only
    ramp = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE, 1, 1).expand(1, 1, SIZE, 4, 4).contiguous()
    k = torch.exp(-(torch.arange(-5, 6, dtype=torch.float32) ** 2) / 50)
    k = k / k.sum()
    want = sum(k[i] * ramp[0, 0, 8 + i - 5, 0, 0] for i in range(11))
    assert float(camlens.metrics.gaussian_blur(ramp)[0, 0, 8, 2, 2]) == pytest.approx(float(want), abs=1e-5)


def test_road_imputes_a_single_voxel_as_its_neighbours_mean():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 5, 6, 7, generator=g, dtype=torch.float64)
    removed = torch.zeros(1, 5, 6, 7, dtype=torch.bool)
    removed[0, 2, 3, 3] = True
    six = noisy_linear_imputation(x, removed, noise=0, neighbourhood=6)
    faces = [x[0, :, 2 + dz, 3 + dy, 3 + dx] for dz, dy, dx in itertools.permutations((1, 0, 0))]
    faces += [x[0, :, 2 + dz, 3 + dy, 3 + dx] for dz, dy, dx in itertools.permutations((-1, 0, 0))]
    assert len({tuple(f.tolist()) for f in faces}) == 6
    assert torch.allclose(six[0, :, 2, 3, 3], torch.stack(faces).mean(0), atol=1e-7)
    kept = ~removed[0]
    assert torch.equal(six[0][:, kept], x[0][:, kept])
    # 26 neighbours weighted 1 / (6 |d|^2): faces 1/6, edges 1/12, corners 1/18
    every = noisy_linear_imputation(x, removed, noise=0)
    num, den = 0, 0.0
    for d in itertools.product((-1, 0, 1), repeat=3):
        if d != (0, 0, 0):
            w = 1 / (6 * sum(v * v for v in d))
            num = num + w * x[0, :, 2 + d[0], 3 + d[1], 3 + d[2]]
            den += w
    assert torch.allclose(every[0, :, 2, 3, 3], num / den, atol=1e-7)
    # a corner voxel of the volume has 3 face neighbours inside it
    corner = torch.zeros_like(removed)
    corner[0, 0, 0, 0] = True
    got = noisy_linear_imputation(x, corner, noise=0, neighbourhood=6)[0, :, 0, 0, 0]
    assert torch.allclose(got, (x[0, :, 1, 0, 0] + x[0, :, 0, 1, 0] + x[0, :, 0, 0, 1]) / 3, atol=1e-7)
    with pytest.raises(InputError, match="26"):
        noisy_linear_imputation(x, removed, neighbourhood=8)
    with pytest.raises(InputError, match="8 neighbours"):
        noisy_linear_imputation(x[:, :, 0], removed[:, 0], neighbourhood=26)


def test_a_depth_one_volume_gives_the_2d_results_exactly():
    torch.manual_seed(0)
    net = TinyCNN(c_in=3, classes=4).eval()
    x = torch.randn(2, 3, 12, 10)
    maps = torch.rand(2, 12, 10)
    flat, deep = (PlainLayout(net), x, maps), (Depthless(net), x[:, :, None], maps[:, None])
    for sub in ("zero", "mean", 0.25):
        a = deletion_curve(*flat, targets=[1, 2], steps=7, substrate=sub)
        b = deletion_curve(*deep, targets=[1, 2], steps=7, substrate=sub)
        assert torch.equal(a.probs, b.probs) and torch.equal(a.auc, b.auc)
        a = insertion_curve(*flat, targets=[1, 2], steps=7, substrate=sub)
        b = insertion_curve(*deep, targets=[1, 2], steps=7, substrate=sub)
        assert torch.equal(a.probs, b.probs)
    a = road_curves(*flat, targets=[1, 2], percentages=(0.2, 0.5, 0.9), noise=0.05)
    b = road_curves(*deep, targets=[1, 2], percentages=(0.2, 0.5, 0.9), noise=0.05)
    assert torch.equal(a.morf, b.morf) and torch.equal(a.lerf, b.lerf)
    gt = torch.zeros(2, 12, 10, dtype=torch.bool)
    gt[:, 3:7, 2:5] = True
    for tol in (0, 3):
        assert torch.equal(
            pointing_game(None, x, maps, gt=gt, tolerance=tol),
            pointing_game(None, deep[1], deep[2], gt=gt[:, None], tolerance=tol),
        )
    assert torch.equal(
        energy_pointing_game(None, x, maps, gt=gt), energy_pointing_game(None, deep[1], deep[2], gt=gt[:, None])
    )
    # SSIM: a window of one tap along a depth of 1 is the 2-D SSIM
    assert torch.allclose(ssim(maps, maps.flip(-1)), ssim(maps[:, None], maps.flip(-1)[:, None]), atol=1e-6)


def test_the_pointing_and_energy_games_in_voxels():
    x = torch.zeros(3, 1, 12, 12, 12)
    box = [4, 4, 4, 8, 8, 8]  # (x0, y0, z0, x1, y1, z1): voxels 4..7 on each axis
    maps = torch.zeros(3, 12, 12, 12)
    maps[0, 11, 5, 5] = 1.0  # 4 voxels past the box in z: distance 4 exactly
    maps[1, 11, 5, 5] = maps[1, 6, 6, 6] = 1.0  # tied maxima, one inside: a hit
    maps[2] = 0.5  # constant: points nowhere
    gt = torch.tensor([box] * 3)
    assert pointing_game(None, x, maps, gt=gt, tolerance=4).tolist() == [0.0, 1.0, 0.0]  # strict
    assert pointing_game(None, x, maps, gt=gt, tolerance=4.01).tolist() == [1.0, 1.0, 0.0]
    assert pointing_game(None, x, maps, gt=gt, tolerance=0).tolist() == [0.0, 1.0, 0.0]
    # the box mask: x indexes W, y indexes H, z indexes D
    want = np.zeros((12, 12, 12), bool)
    want[3:9, 2:6, 1:4] = True
    assert np.array_equal(box_mask([1, 2, 3, 4, 6, 9], (12, 12, 12)), want)
    e = torch.zeros(1, 12, 12, 12)
    e[0, 4:6, 4:6, 4:6] = 1.0  # 8 voxels of 1 inside
    e[0, 0, 0, :2] = 3.0  # 2 voxels of 3 outside
    e[0, 11, 11, 11] = -5.0  # negative evidence carries no energy
    assert float(energy_pointing_game(None, x[:1], e, gt=[np.array([box])])[0]) == pytest.approx(8 / 14)
    # the centre baseline points at the volume's centre voxels (5..6 on each axis)
    assert centre_baseline([box, [0, 0, 0, 3, 3, 3]], (12, 12, 12), tolerance=0).tolist() == [1.0, 0.0]
    with pytest.raises(InputError, match=r"\(N, 6\)"):
        pointing_game(None, x, maps, gt=torch.zeros(3, 4))


def test_volume_maps_are_checked_and_resized_trilinearly():
    net = tiny_3d_cnn()
    x = torch.randn(1, 1, 8, 8, 8)
    coarse = torch.rand(1, 2, 2, 2)
    c = deletion_curve(net, x, coarse, steps=4)
    up = torch.nn.functional.interpolate(coarse[:, None], size=(8, 8, 8), mode="trilinear", align_corners=False)
    assert torch.equal(c.probs, deletion_curve(net, x, up[:, 0], steps=4).probs)
    with pytest.raises(InputError, match=r"\(N, D, H, W\)"):
        deletion_curve(net, x, torch.rand(8, 8), steps=4)
    for name in ("random", "centre", "random_pixels"):
        assert deletion_curve(net, x, name, steps=2).probs.shape == (1, 3)


def test_sanity_check_of_a_3d_cnn_matches_a_randomization_redone_here():
    net = tiny_3d_cnn()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 1, 6, 6, 6, generator=torch.Generator().manual_seed(2))
    res = sanity_randomization(net, x, "saliency", targets=[0, 1])
    assert res.steps == ["original", "6", "2", "0"]
    assert res.values["spearman_abs"]["saliency"][0].tolist() == [1.0, 1.0]
    assert res.values["ssim"]["saliency"][0].tolist() == pytest.approx([1.0, 1.0])
    work = copy.deepcopy(net)
    orig = camlens.explain(work, x, "saliency", targets=[[0], [1]]).maps[:, 0]
    for k, unit in enumerate(["6", "2", "0"]):
        randomize_(work.get_submodule(unit), _generator(0, k), "normal")
        new = camlens.explain(work, x, "saliency", targets=[[0], [1]]).maps[:, 0]
        assert torch.equal(res.values["spearman_abs"]["saliency"][k + 1], spearman(orig, new, absolute=True))
        assert torch.equal(res.values["ssim"]["saliency"][k + 1], ssim(orig.abs(), new.abs()))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the user's model untouched
