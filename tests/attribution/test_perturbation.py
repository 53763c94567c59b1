"""Black-box methods: RISE, D-RISE, occlusion. Oracles: a hand-built model whose score is the mean
of one region (where the map must put its energy), exact identities (centred == paper estimator
minus a constant, batched == unbatched), a hand loop for occlusion on a linear model, and D-RISE
on a detector built from a classifier trained in the test on the synthetic shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.attribution.perturbation import rise_masks
from camlens.base.errors import MethodError
from camlens.targets import Detection

Y0, Y1, X0, X1 = 16, 48, 16, 48  # the central quarter of a 64x64 image


class RegionMean(nn.Module):
    """Two 'logits', both the mean of the input over one region."""

    def forward(self, x):
        return x[:, :, Y0:Y1, X0:X1].mean((1, 2, 3))[:, None].repeat(1, 2)


def _region() -> torch.Tensor:
    r = torch.zeros(64, 64)
    r[Y0:Y1, X0:X1] = 1
    return r


def test_rise_puts_its_energy_in_the_region():
    m = RegionMean()
    x = torch.ones(1, 3, 64, 64)
    e = camlens.explain(m, x, "rise", targets=0, n_masks=4000, cell=16, weighting="logit", center=True)
    s = e.maps[0, 0].clamp_min(0)
    r = _region()
    energy = float((s**2 * r).sum() / (s**2).sum())  # energy = sum of squares
    mass = float((s * r).sum() / s.sum())
    assert energy >= 0.9, energy
    assert mass >= 0.75, mass  # the region is 25 % of the image; the rest is the masks' blur (one cell)
    # the paper's estimator is the same map plus a constant: sum_i fbar M_i / (N p)
    raw = camlens.explain(m, x, "rise", targets=0, n_masks=4000, cell=16, weighting="logit")
    diff = raw.maps[0, 0] - e.maps[0, 0]
    get = rise_masks(4000, (64, 64), cell=16, p=0.5, seed=0)
    msum = get(0, 4000).sum((0, 1))
    with torch.no_grad():
        fbar = float(RegionMean()(x * get(0, 4000))[:, 0].mean())  # the mean masked score
    torch.testing.assert_close(diff, fbar * msum / (4000 * 0.5), rtol=1e-4, atol=1e-5)
    peak = int(raw.maps[0, 0].argmax())
    assert r.flatten()[peak] == 1


def test_rise_deterministic_and_batched_equals_unbatched():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    m.eval()
    x = torch.randn(2, 3, 20, 24)
    kw = dict(targets="top2", n_masks=40, cell=5, progress=False)
    a = camlens.explain(m, x, "rise", batch_size=1, **kw)
    b = camlens.explain(m, x, "rise", batch_size=64, **kw)
    c = camlens.explain(m, x, "rise", batch_size=7, **kw)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.maps, c.maps, rtol=1e-5, atol=1e-6)
    assert torch.equal(b.maps, camlens.explain(m, x, "rise", batch_size=64, **kw).maps)
    assert not torch.equal(b.maps, camlens.explain(m, x, "rise", batch_size=64, seed=1, **kw).maps)
    assert a.maps.shape == (2, 2, 20, 24) and a.extras["forwards"] == 80
    # the paper's mask: values in [0, 1], about p of the image kept on average
    masks = rise_masks(200, (20, 24), cell=5, p=0.3, seed=0)(0, 200)
    assert masks.min() >= 0 and masks.max() <= 1 + 1e-6
    assert abs(float(masks.mean()) - 0.3) < 0.05
    with pytest.raises(MethodError, match="p must"):
        camlens.explain(m, x, "rise", p=0.0)


def test_occlusion_equals_hand_loop_on_a_linear_model():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 3, 10, 12, generator=g)

    class Linear(nn.Module):
        def forward(self, x):
            return torch.einsum("nchw,kchw->nk", x, W)

    x = torch.randn(1, 3, 10, 12, generator=g)
    e = camlens.explain(Linear(), x, "occlusion", targets=[[0, 1]], window=4, stride=3, batch_size=5)
    want = torch.zeros(2, 10, 12)
    cnt = torch.zeros(10, 12)
    ys, xs = [0, 3, 6], [0, 3, 6, 8]  # last window flush with the border
    for k in range(2):
        for y in ys:
            for xx in xs:
                drop = float((W[k, :, y : y + 4, xx : xx + 4] * x[0, :, y : y + 4, xx : xx + 4]).sum())
                want[k, y : y + 4, xx : xx + 4] += drop
                if k == 0:
                    cnt[y : y + 4, xx : xx + 4] += 1
    torch.testing.assert_close(e.maps[0], want / cnt, rtol=1e-5, atol=1e-5)
    assert e.extras["windows"] == 12


# ----------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
        )
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class CamDetector(nn.Module):
    """A detector built from a trained classifier: one box per image, the bounding box of the
    predicted class's CAM above half its maximum, labelled with that class and scored with its
    softmax probability (torchvision's output format)."""

    def __init__(self, net: TinyNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        A = self.net.features(x)
        p = self.net.fc(A.mean((2, 3))).softmax(1)
        score, label = p.max(1)
        cam = torch.einsum("nc,nchw->nhw", self.net.fc.weight[label], A)[:, None]
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].relu()
        out = []
        for i in range(len(x)):
            on = cam[i] >= 0.5 * cam[i].max()  # all pixels (the whole image) when the CAM is 0
            ys, xs = torch.nonzero(on, as_tuple=True)
            box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()[None]
            out.append({"boxes": box, "labels": label[i : i + 1], "scores": score[i : i + 1]})
        return out


@pytest.mark.slow
def test_drise_peaks_in_the_box_more_often_than_the_centre():
    from camlens.data.synthetic import synthetic_arrays

    torch.manual_seed(0)
    data = synthetic_arrays(480, image_size=48, seed=0, classes=("circle", "cross"))
    x = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255 - 0.5
    y = torch.from_numpy(data.labels)
    net = TinyNet(len(data.classes))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(10):
        for i in range(0, 400, 32):
            opt.zero_grad()
            F.cross_entropy(net(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    net.eval()
    test = slice(400, 424)
    with torch.no_grad():
        acc = float((net(x[test]).argmax(1) == y[test]).float().mean())
    assert acc >= 0.7, acc  # trained (chance: 0.5)
    det = CamDetector(net).eval()
    gt = data.boxes[test]
    labels = data.labels[test]
    target = Detection([b[None] for b in gt], [[int(c)] for c in labels], iou=0.0)
    e = camlens.explain(det, x[test], "drise", targets=target, n_masks=300, cell=8, batch_size=64, progress=False)
    assert e.maps.shape == (24, 1, 48, 48)
    peak = e.maps[:, 0].flatten(1).argmax(1)
    py, px = (peak // 48).numpy(), (peak % 48).numpy()
    hits = (px >= gt[:, 0]) & (px < gt[:, 2]) & (py >= gt[:, 1]) & (py < gt[:, 3])
    centre = (gt[:, 0] <= 24) & (gt[:, 2] > 24) & (gt[:, 1] <= 24) & (gt[:, 3] > 24)
    assert hits.mean() > centre.mean() + 0.2, (hits.mean(), centre.mean())
    # D-RISE's similarity is the Detection score at iou=0: a box with the right label scores >0
    assert (e.scores[:, 0] >= 0).all()


def test_drise_needs_a_detection_target():
    m = RegionMean()
    with pytest.raises(MethodError, match="Detection"):
        camlens.explain(m, torch.ones(1, 3, 64, 64), "drise", targets=0, n_masks=2)


def test_drise_matches_rise_with_the_iou0_detection_target():
    """D-RISE = RISE's masks weighted by the Detection score without IoU threshold."""

    class OneBox(nn.Module):
        def forward(self, x):
            s = x[:, :, 4:12, 4:12].mean((1, 2, 3))
            return [
                {"boxes": torch.tensor([[4.0, 4.0, 12.0, 12.0]]), "labels": torch.tensor([1]), "scores": s[i : i + 1]}
                for i in range(len(x))
            ]

    x = torch.ones(1, 3, 16, 16)
    t = Detection([[3.0, 3.0, 12.0, 12.0]], [1], iou=0.9)  # IoU 64/81 < 0.9: RISE sees 0
    d = camlens.explain(OneBox(), x, "drise", targets=t, n_masks=50, cell=4, progress=False)
    r = camlens.explain(
        OneBox(), x, "rise", targets=Detection([[3.0, 3.0, 12.0, 12.0]], [1], iou=0.0), n_masks=50, cell=4
    )
    torch.testing.assert_close(d.maps, r.maps)
    assert float(d.maps.abs().sum()) > 0
    np.testing.assert_allclose(d.extras["boxes"][0, 0], [3, 3, 12, 12])


def test_black_box_hygiene_and_errors():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    m.train()
    x = torch.randn(1, 3, 12, 12)
    x0 = x.clone()
    a = camlens.explain(m, x, ["rise", "occlusion"], n_masks=8, window=4, stride=4, progress=False)
    b = camlens.explain(m, x, ["rise", "occlusion"], n_masks=8, window=4, stride=4, progress=False)
    assert m.training and all(mod.training for mod in m.modules())  # restored
    torch.testing.assert_close(a["rise"].maps, b["rise"].maps)  # eval held: dropout off, deterministic
    assert all(p.grad is None for p in m.parameters()) and torch.equal(x, x0)
    assert not m._forward_hooks and not m._forward_pre_hooks
    with pytest.raises(MethodError, match="window"):
        camlens.explain(m, x, "occlusion", window=0)
    with pytest.raises(MethodError, match="n_masks"):
        camlens.explain(m, x, "rise", n_masks=0)
