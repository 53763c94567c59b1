"""CAM-ready networks: the notebooks' VGG16-CAM layer shapes, the grouped CAM convolution, the CAM and
Grad-CAM identities, and head conversion for the other families (the input model is never modified)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.base.errors import CheckpointError, HeadError, WeightsNotFoundError
from camlens.models.cam_ready import CAMNet, cam_ready, check_cam_ready, vgg16_cam


@pytest.fixture(scope="module")
def vgg_cam():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return vgg16_cam(num_classes=5, weights="random")


def _x(n=2, size=64, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_vgg16_cam_layer_shapes_at_224_are_the_notebooks():
    """conv5_3 -> (3x3 conv, 2 groups) 1024 x 14 x 14 -> GAP -> linear 1024 -> C, no bias (shapes on
    the meta device: no compute)."""
    with torch.device("meta"):
        m = vgg16_cam(num_classes=7, weights="random")
    shapes = {}
    hooks = [
        mod.register_forward_hook(lambda mod, a, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
        for n, mod in m.named_modules()
        if n
    ]
    try:
        logits = m(torch.empty(2, 3, 224, 224, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    assert isinstance(m, CAMNet)
    last = list(m.features.children())[-1]
    assert isinstance(last, nn.ReLU)  # relu5_3: the last max-pool is dropped
    assert len([c for c in m.features if isinstance(c, nn.Conv2d)]) == 13
    assert shapes["features.28"] == (2, 512, 14, 14)  # conv5_3 (torchvision's index kept)
    assert shapes["features"] == (2, 512, 14, 14)
    assert shapes["cam_conv"] == (2, 1024, 14, 14)
    assert shapes["cam_relu"] == (2, 1024, 14, 14)
    assert shapes["gap"] == (2, 1024, 1, 1)
    assert tuple(logits.shape) == (2, 7)
    assert tuple(m.cam_conv.weight.shape) == (1024, 256, 3, 3)  # notebook 003: (3, 3, 256, 1024)
    assert m.cam_conv.groups == 2 and m.cam_conv.padding == (1, 1) and m.cam_conv.stride == (1, 1)
    assert tuple(m.fc.weight.shape) == (7, 1024) and m.fc.bias is None
    card = m.camlens
    assert card.name == "vgg16_cam" and card.layer == "cam_relu" and card.preprocess.name == "imagenet"
    assert card.class_names is None


def test_grouped_cam_conv_equals_notebook_split_concat(vgg_cam):
    """Notebook 003: split conv5_3 in two halves of 256 channels, convolve each with its 512-kernel
    half, concatenate, add the bias."""
    a = torch.randn(2, 512, 6, 6, generator=torch.Generator().manual_seed(0))
    w, b = vgg_cam.cam_conv.weight.detach(), vgg_cam.cam_conv.bias.detach()
    ref = torch.cat([F.conv2d(a[:, :256], w[:512], padding=1), F.conv2d(a[:, 256:], w[512:], padding=1)], 1)
    ref = ref + b[None, :, None, None]
    with torch.no_grad():
        out = vgg_cam.cam_conv(a)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_vgg16_cam_identities(vgg_cam):
    """mean(CAM) = logit (no bias); Grad-CAM on the pooled features = ReLU(CAM) / (h w); CAM by hand."""
    x = _x()
    feats = {}
    h = vgg_cam.cam_relu.register_forward_hook(lambda m, a, o: feats.__setitem__("A", o.detach()))
    try:
        with torch.no_grad():
            logits = vgg_cam(x)
    finally:
        h.remove()
    A = feats["A"]  # (2, 1024, 4, 4) for a 64x64 input
    assert A.shape == (2, 1024, 4, 4)
    res = camlens.explain(vgg_cam, x, method=["cam", "gradcam"], targets="top2")
    cam, gc = res["cam"].raw, res["gradcam"].raw
    W = vgg_cam.fc.weight.detach()
    ref = torch.einsum("kc,nchw->nkhw", W, A)  # all classes
    idx = res["cam"].classes
    torch.testing.assert_close(cam, ref[torch.arange(2)[:, None], idx], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cam.mean((2, 3)), logits.gather(1, idx), rtol=1e-4, atol=1e-5)
    hw = A.shape[-1] * A.shape[-2]
    torch.testing.assert_close(gc, cam.relu() / hw, rtol=1e-4, atol=1e-6)
    assert "cam_relu" in res["cam"].layer
    assert not any(p.grad is not None for p in vgg_cam.parameters())


def test_vgg16_cam_full_state_dict_round_trip(vgg_cam, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vgg16cam.safetensors"
    save_file({k: v.contiguous() for k, v in vgg_cam.state_dict().items()}, str(path))
    m = camlens.load_model("vgg16_cam", weights=path, num_classes=5)
    for (k, a), (_, b) in zip(vgg_cam.state_dict().items(), m.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert m.camlens.name == "vgg16_cam" and not m.training
    with pytest.raises(CheckpointError, match="do not fit"):
        vgg16_cam(num_classes=3, weights=path)  # a 5-class CAM state dict cannot fill a 3-class head


def test_vgg16_cam_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="never downloads") as info:
        vgg16_cam(num_classes=2)
    assert "weights='random'" in str(info.value)


def test_imagenet_names_for_1000_classes():
    with torch.device("meta"):
        m = camlens.load_model("vgg16_cam", weights="random")
    assert len(m.camlens.class_names) == 1000 and m.camlens.class_names[281] == "tabby"
    assert m.fc.weight.shape == (1000, 1024)


# ------------------------------------------------------------------------------------------------ other families
FAMILIES = [
    "resnet18",
    "mobilenet_v3_small",
    "convnext_tiny",
    pytest.param("efficientnet_b0", marks=pytest.mark.slow),
    pytest.param("densenet121", marks=pytest.mark.slow),
]
_CONVERTED: dict = {}


def converted(name):
    """``(source, before, cam_ready(source, 3))`` built once per name."""
    if name not in _CONVERTED:
        import torchvision

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            src = torchvision.models.get_model(name, weights=None).eval()
        before = {k: v.clone() for k, v in src.state_dict().items()}
        _CONVERTED[name] = (src, before, cam_ready(src, 3))
    return _CONVERTED[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_cam_ready_families(name):
    """A new linear head of C outputs; explain(method='cam') needs no other argument and its map
    averages to the logit minus the bias (checked here by hand); the input model is untouched."""
    src, before, m = converted(name)
    assert src.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in src.state_dict().items())
    assert m is not src and not m.training
    x = _x(2, 64)
    with torch.no_grad():
        logits = m(x)
    assert logits.shape == (2, 3)
    e = camlens.explain(m, x, method="cam", targets=[[0, 2], [0, 2]])
    lin = dict(m.named_modules())[m.camlens.extra["head"][0]]
    assert isinstance(lin, nn.Linear) and lin.out_features == 3
    bias = lin.bias.detach()[[0, 2]]
    torch.testing.assert_close(e.raw.mean((2, 3))[:, 0] + bias[0], logits[:, 0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(e.raw.mean((2, 3))[:, 1] + bias[1], logits[:, 2], rtol=1e-4, atol=1e-4)


def test_convnext_norm_moves_before_pooling():
    src, _, m = converted("convnext_tiny")
    norm = src.classifier[0]
    assert isinstance(m.avgpool.norm, type(norm)) and isinstance(m.avgpool.pool, nn.AdaptiveAvgPool2d)
    assert m.avgpool.norm is not norm
    torch.testing.assert_close(m.avgpool.norm.weight, norm.weight)  # pretrained scale kept
    assert [type(c) for c in m.classifier] == [nn.Flatten, nn.Linear]
    # logits = linear(mean over positions of the per-position channel LayerNorm)
    x = _x(1, 64)
    with torch.no_grad():
        f = m.features(x)
        ln = F.layer_norm(f.permute(0, 2, 3, 1), (f.shape[1],), norm.weight, norm.bias, norm.eps)
        ref = m.classifier[1](ln.mean((1, 2)))
        torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)


def test_mobilenet_v3_head_is_one_linear():
    src, _, m = converted("mobilenet_v3_small")
    lins = [c for c in m.classifier if isinstance(c, nn.Linear)]
    assert len(lins) == 1 and lins[0].in_features == 576 and lins[0].out_features == 3
    assert m.classifier[0].p == src.classifier[2].p  # the dropout rate is kept


def test_efficientnet_lite0_by_name(lite0):
    m = cam_ready("efficientnet_lite0", 4, class_names=["a", "b", "c", "d"])
    assert m._fc.out_features == 4 and m.camlens.extra["head"] == ["_fc"]
    assert m.camlens.layer == "_avg_pooling" and m.camlens.capture == "input"
    assert m.camlens.preprocess.name == "efficientnet_lite" and m.camlens.class_names == ["a", "b", "c", "d"]
    # the pretrained backbone is kept
    torch.testing.assert_close(m._conv_stem.weight, lite0._conv_stem.weight)
    e = camlens.explain(m, camlens.base.io.sample_image("chelsea"), method="cam")
    assert e.maps.shape == (1, 1, 224, 224) and e.labels()[0][0] in "abcd"
    assert check_cam_ready(m) < 1e-3


def test_not_cam_ready_errors():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(HeadError, match="no nn.Linear"):
        cam_ready(net, 2)

    class MaxHead(nn.Module):  # global max pooling: logits are not mean(A) W + b
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).relu().amax((2, 3)) * 2.0)

    with pytest.raises(HeadError):
        cam_ready(MaxHead(), 2)
    with pytest.raises(camlens.CamlensError, match="class names"):
        cam_ready(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), 2, class_names=["a"])
