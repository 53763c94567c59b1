"""Issue 19, defect 2: Eigen-CAM's sign must not come from rounding noise.

With ``center=True`` the projection of the centred features sums to zero by construction; the
former "projection sums to >= 0" rule decided on values of 1e-15…1e-12 and inverted the map (the
background highlighted) for 9 of the 20 toys below. The oracle: the toy's known object box (one
bright square on a dark noisy background, random conv + ReLU features), and invariance under
perturbations that change nothing but rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens

SEEDS = range(20)


def toy(seed: int):
    """A random conv + ReLU net and a 32 px image with one bright 8x8 square; the square's mask."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 5)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = 0.1 * torch.rand(1, 3, 32, 32, generator=g)
    r, c = torch.randint(4, 20, (2,), generator=g).tolist()
    x[..., r : r + 8, c : c + 8] += 1.0
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[r : r + 8, c : c + 8] = True
    return net.eval(), x, mask


@pytest.mark.parametrize("center", [False, True])
def test_eigencam_highlights_the_bright_object(center):
    hits = 0
    for s in SEEDS:
        net, x, mask = toy(s)
        m = camlens.explain(net, x, "eigencam", layer="1", center=center).maps[0, 0]
        hits += int(m[mask].mean() > m[~mask].mean())
    assert hits >= 19, f"center={center}: the object is highlighted on {hits} of {len(SEEDS)} seeds"


@pytest.mark.parametrize("center", [False, True])
def test_eigencam_stable_under_rounding_perturbation(center):
    """A relative perturbation of 1e-6 of the input moves the map by about as much — never flips it."""
    g = torch.Generator().manual_seed(123)
    for s in range(8):
        net, x, _ = toy(s)
        a = camlens.explain(net, x, "eigencam", layer="1", center=center).raw
        for _ in range(3):
            xp = x * (1 + 1e-6 * torch.randn(x.shape, generator=g))
            b = camlens.explain(net, xp, "eigencam", layer="1", center=center).raw
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


@pytest.mark.parametrize("center", [False, True])
def test_eigencam_independent_of_the_svd_sign(monkeypatch, center):
    """(U, S, Vh) and (-U, S, -Vh) are both SVDs; the map must not depend on which LAPACK returns."""
    net, x, _ = toy(0)
    a = camlens.explain(net, x, "eigencam", layer="1", center=center).raw
    svd = torch.linalg.svd

    def flipped(*args, **kwargs):
        u, s, vh = svd(*args, **kwargs)
        return -u, s, -vh

    monkeypatch.setattr(torch.linalg, "svd", flipped)
    b = camlens.explain(net, x, "eigencam", layer="1", center=center).raw
    torch.testing.assert_close(b, a)


def test_eigencam_centred_matches_hand_reference():
    """center=True against a hand-written PCA: V1 of the centred (hw, C) matrix, oriented along the
    uncentred mean activation vector, projection of the centred data, ReLU."""
    net, x, _ = toy(5)
    with torch.no_grad():
        A = net[:2](x)[0]  # (C, h, w)
    M = A.flatten(1).T.double()
    mean = M.mean(0)
    v = torch.linalg.eigh((M - mean).T @ (M - mean)).eigenvectors[:, -1]  # top eigenvector of the scatter
    v = v if mean @ v >= 0 else -v
    ref = ((M - mean) @ v).relu().view(A.shape[-2:])
    got = camlens.explain(net, x, "eigencam", layer="1", center=True).raw[0, 0]
    torch.testing.assert_close(got, ref.float(), rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
