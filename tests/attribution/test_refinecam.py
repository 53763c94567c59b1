"""RefineCAM (Domeniconi et al., ICPR 2026): the product of min-max-rescaled base CAMs of several
layers, against a reference written here with plain autograd, TorchCAM 0.5's RefineCAM (LayerCAM
base: its GradCAMpp is not the paper's Grad-CAM++) and pytorch-grad-cam 1.5.7's (the default
Grad-CAM++ base, multiplied at the input's resolution) on ResNet-18 with random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.base.errors import MethodError
from tests.conftest import TinyCNN

tv = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def r18():
    torch.manual_seed(0)
    return tv.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def rx(r18):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = r18(x)
    classes = logits.argmax(1).tolist()
    assert float(logits.amax(1).min()) > 0.1  # scores of order one: the comparisons cannot degenerate
    return x, classes


def _gradcam_pp(G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ of one image (C, h, w), the paper's closed form."""
    den = 2 * G**2 + A.sum(dim=(1, 2), keepdim=True) * G**3
    alpha = torch.where(den != 0, G**2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return torch.einsum("c,chw->hw", (alpha * G.relu()).sum(dim=(1, 2)), A).relu()


def test_equals_the_reference_written_here():
    """TinyCNN: act1 (16x16) and the input of the pooling (8x8), the stages found automatically."""
    torch.manual_seed(0)
    net = TinyCNN(c1=6, c2=5, classes=4).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exp = camlens.explain(net, x, "refinecam", targets=[[1, 3], [2, 0]])
    assert exp.extras["layers"].startswith("act1, ") and exp.extras["resolution"] == "16x16"
    for n, classes in enumerate([[1, 3], [2, 0]]):
        a1 = net.act1(net.conv1(x[n : n + 1]))
        a2 = net.act2(net.conv2(a1))
        logits = net.fc(a2.mean(dim=(2, 3)))
        for j, c in enumerate(classes):
            g1, g2 = torch.autograd.grad(logits[0, c], [a1, a2], retain_graph=True)
            maps = []
            for g, a in ((g1, a1), (g2, a2)):
                m = _gradcam_pp(g[0], a[0].detach())
                maps.append(((m - m.min()) / (m.max() - m.min() + 1e-8))[None, None])
            ref = maps[0] * F.interpolate(maps[1], size=(16, 16), mode="bilinear", align_corners=False)
            assert float(ref.max()) > 0.1
            torch.testing.assert_close(exp.raw[n, j], ref[0, 0], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_stages_found_on_resnet18(r18, rx):
    x, classes = rx
    for stages, names in ((3, ["layer2", "layer3", "layer4"]), (4, ["layer1", "layer2", "layer3", "layer4"])):
        exp = camlens.explain(r18, x[:1], "refinecam", targets=classes[:1], layer="layer4", stages=stages)
        assert exp.extras["layers"] == ", ".join(names) and exp.raw.shape[-2:] == (8 * 2 ** (stages - 3),) * 2
    given = camlens.explain(r18, x[:1], "refinecam", targets=classes[:1], layer="layer4", layers="layer3, layer4")
    assert given.extras["layers"] == "layer3, layer4" and given.raw.shape[-2:] == (4, 4)


@pytest.mark.slow
def test_equals_torchcam_with_the_layercam_base(r18, rx):
    tc = pytest.importorskip("torchcam.methods")
    x, classes = rx
    m = copy.deepcopy(r18)
    with tc.RefineCAM(m, ["layer2", "layer3", "layer4"], input_shape=(3, 64, 64), base_method=tc.LayerCAM) as ext:
        theirs = ext(classes, m(x))[0].detach()
    exp = camlens.explain(r18, x, "refinecam", targets=[[c] for c in classes], layer="layer4", base="layercam")
    ours = exp.raw[:, 0]
    torch.testing.assert_close(ours / ours.amax(dim=(1, 2), keepdim=True), theirs, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_equals_pytorch_grad_cam_at_the_input_resolution(r18, rx):
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    x, classes = rx
    m = copy.deepcopy(r18)
    cam = pgc.RefineCAM(m, [m.layer2, m.layer3, m.layer4])
    theirs = cam(x, [targets_mod.ClassifierOutputTarget(c) for c in classes])
    exp = camlens.explain(r18, x, "refinecam", targets=[[c] for c in classes], layer="layer4", resolution="input")
    assert exp.raw.shape == (2, 1, 64, 64)
    for ours, ref in zip(exp.maps[:, 0].numpy(), theirs):
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999


def test_one_resolution_only_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with pytest.raises(MethodError, match="at least two layers"):
        camlens.explain(net.eval(), torch.randn(1, 3, 8, 8), "refinecam")


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"base": "scorecam"}, "base must be"),
        ({"resolution": "pixel"}, "resolution must be"),
        ({"stages": 1}, "stages"),
    ],
)
def test_bad_options(opts, words):
    torch.manual_seed(0)
    with pytest.raises(MethodError, match=words):
        camlens.explain(TinyCNN().eval(), torch.randn(1, 3, 16, 16), "refinecam", **opts)


def test_cost_counts_the_forwards():
    torch.manual_seed(0)
    net = TinyCNN().eval()
    x = torch.randn(3, 3, 16, 16)
    seen: list[int] = []
    h = net.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    try:
        camlens.explain(net, x, "refinecam", targets="top2")
    finally:
        h.remove()

    class Ctx:
        pass

    ctx = Ctx()
    ctx.x = x  # type: ignore[attr-defined]
    est = camlens.methods()["refinecam"].estimate(ctx)  # type: ignore[arg-type]
    assert est is not None and sum(seen) - len(x) == est.forwards == len(x) + 1
