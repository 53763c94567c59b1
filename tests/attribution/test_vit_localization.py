"""No real transformer weights are on this machine: a small hybrid ViT (conv stem, 6x6 patch
tokens + class token, two blocks of 2-head attention) is trained here on the synthetic shapes and
must localize them better than the centre baseline."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import camlens
from camlens.data import synthetic_arrays
from camlens.metrics.loceval import evaluate_maps
from camlens.models.preprocess import Preprocess
from tests.core.test_attention import Block


class HybridViT(nn.Module):
    def __init__(self, classes: int, d: int = 32):
        super().__init__()

        def cbr(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.stem = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2))
        self.patch = nn.Conv2d(32, d, 2, stride=2)  # 48 px -> 6x6 tokens
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 37, d) * 0.02)
        self.blocks = nn.Sequential(Block(d, 2), Block(d, 2))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.patch(self.stem(x)).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(x), -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.blocks(t)[:, 0]))


@pytest.mark.slow
def test_small_vit_localizes_synthetic_objects_better_than_the_centre():
    """~50 s on one shared core. Measured (seed 1, 12 epochs): accuracy 81 %; MaxBoxAcc / pointing
    game: rollout 0.39 / 0.68, generic attention 0.24 / 0.54, HiResCAM at the automatic layer
    0.13 / 0.48, centre baseline 0.04 / 0.28. Grad-CAM (channel-averaged gradients) at the token
    layers is not better than the centre on this model (0.02 / 0.22): reported, not asserted."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pp = Preprocess(size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), name="tiny")
        train = synthetic_arrays(768, image_size=48, seed=1)
        test = synthetic_arrays(128, image_size=48, seed=2)
        torch.manual_seed(1)
        net = HybridViT(len(train.classes))
        x, y = pp(list(train.images)), torch.from_numpy(train.labels)
        opt = torch.optim.Adam(net.parameters(), 2e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            net.train()
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 32):
                idx = perm[i : i + 32]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        net.eval()
        xt = pp(list(test.images))
        with torch.no_grad():
            pred = net(xt).argmax(1).numpy()
        accuracy = float((pred == test.labels).mean())
        assert accuracy >= 0.6, accuracy
        gt = [b[None] for b in test.boxes]
        res = camlens.explain(
            net, xt, ["attention_rollout", "generic_attention", "hirescam", "gradcam"], targets=test.labels.tolist()
        )
        assert res["hirescam"].layer == "output of blocks.1.ln1"
        reps = {
            m: evaluate_maps(e.maps[:, 0], gt, correct=pred == test.labels, tolerance=0, name=m) for m, e in res.items()
        }
        print(f"\naccuracy {accuracy:.1%}")
        for rep in reps.values():
            print(rep.table())
        base = reps["gradcam"].baseline
        for m, margin in (("attention_rollout", 0.2), ("generic_attention", 0.1), ("hirescam", 0.05)):
            got = reps[m].metrics
            assert got["maxboxacc"] >= base["maxboxacc"] + margin, (m, got, base)
            assert got["pointing_game"] >= base["pointing_game"] + margin, (m, got, base)
    finally:
        torch.set_num_threads(n)
