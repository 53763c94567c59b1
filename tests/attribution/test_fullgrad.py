"""FullGrad (Srinivas & Fleuret 2019): the full-gradient completeness identity on hand-built ReLU
networks with BatchNorm in eval mode, the saliency map against a reference written here with plain
autograd, and pytorch-grad-cam 1.5.7's ``FullGrad`` on ResNet-18 with random weights."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.base.errors import MethodError
from tests.api.test_hygiene import assert_untouched, snapshot


class BiasNet(nn.Module):
    """conv(bias) -> BN(eval) -> ReLU(inplace) -> maxpool -> conv(bias) -> BN(no affine) -> ReLU
    -> avgpool -> linear(bias): piecewise linear, so the full-gradient decomposition is exact."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.act1 = nn.ReLU(inplace=True)  # would overwrite bn1's output: the capture must not see that
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(5, affine=False)
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(5, classes)

    def forward(self, x):
        x = self.pool(self.act1(self.bn1(self.conv1(x))))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.fixture
def biasnet() -> BiasNet:
    torch.manual_seed(0)
    net = BiasNet().double()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        net.bn1.weight.uniform_(0.5, 1.5)
        net.bn1.bias.uniform_(-0.5, 0.5)
        for conv in (net.conv1, net.conv2):
            conv.bias.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.fixture
def bx() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_completeness_input_part_plus_bias_part_equals_the_logit(biasnet, bx):
    """The paper's eq. 2: f(x) = grad_x f . x + sum_l grad_{b_l} f . b_l (BatchNorm's effective bias)."""
    exp = camlens.explain(biasnet, bx, "fullgrad", targets=[[0, 2], [1, 0]])
    ex = exp.extras
    assert ex["bias_layers"] == 4 and "skipped_layers" not in ex
    total = ex["input_part"] + ex["bias_part"]
    torch.testing.assert_close(total, exp.scores.double(), rtol=0, atol=1e-10)
    assert float(ex["completeness_error"].abs().max()) < 1e-10
    # the biases carry a real share of the logit: the identity above is not the input part alone
    assert float(ex["bias_part"].abs().min()) > 1e-3


def _psi(t: torch.Tensor, size, per_channel: bool) -> torch.Tensor:
    t = t.abs()
    dims = (2, 3) if per_channel else (1, 2, 3)
    t = (t - t.amin(dims, keepdim=True)) / (t.amax(dims, keepdim=True) - t.amin(dims, keepdim=True) + 1e-7)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False).sum(1)


def _reference(net: BiasNet, x: torch.Tensor, k: int, per_channel: bool) -> torch.Tensor:
    """Eq. 5 with plain autograd: the layers' pre-activations kept by writing the forward out."""
    x = x.clone().requires_grad_(True)
    z1 = net.conv1(x)
    z2 = net.bn1(z1)
    z3 = net.conv2(net.pool(z2.relu()))
    z4 = net.bn2(z3)
    z5 = net.fc(F.adaptive_avg_pool2d(z4.relu(), 1).flatten(1))
    grads = torch.autograd.grad(z5[:, k].sum(), [x, z1, z2, z3, z4])
    bn1, bn2 = net.bn1, net.bn2
    b2 = bn1.bias - bn1.running_mean * bn1.weight / (bn1.running_var + bn1.eps).sqrt()
    b4 = -bn2.running_mean / (bn2.running_var + bn2.eps).sqrt()
    biases = [net.conv1.bias, b2, net.conv2.bias, b4]
    size = x.shape[-2:]
    out = _psi(grads[0] * x, size, per_channel)
    for g, b in zip(grads[1:], biases):
        out = out + _psi(g * b.detach()[None, :, None, None], size, per_channel)
    return out.detach()


@pytest.mark.parametrize("scale", ["layer", "channel"])
def test_map_equals_the_reference_written_here(biasnet, bx, scale):
    exp = camlens.explain(biasnet, bx, "fullgrad", targets=[[2], [1]], scale=scale)
    for n, k in enumerate([2, 1]):
        ref = _reference(biasnet, bx[n : n + 1], k, per_channel=scale == "channel")[0]
        torch.testing.assert_close(exp.raw[n, 0].double(), ref, rtol=1e-6, atol=1e-6)
    assert exp.extras["scale"] == scale


def test_scales_differ(biasnet, bx):
    """The two conventions are different maps (so the reference test above tells them apart)."""
    a = camlens.explain(biasnet, bx, "fullgrad", targets=[[2], [1]]).raw
    b = camlens.explain(biasnet, bx, "fullgrad", targets=[[2], [1]], scale="channel").raw
    assert float((a - b).abs().max()) > 1e-2


def test_nothing_left_on_the_model_and_no_parameter_grad(biasnet, bx):
    before = snapshot(biasnet)
    out_before = biasnet(bx).detach()
    camlens.explain(biasnet, bx, "fullgrad", targets="top2")
    assert_untouched(biasnet, before)
    assert torch.equal(biasnet(bx).detach(), out_before)


def test_batch_statistics_batchnorm_is_skipped_and_named(biasnet, bx):
    net = copy.deepcopy(biasnet)
    net.bn2 = nn.BatchNorm2d(5, track_running_stats=False).double()
    exp = camlens.explain(net, bx, "fullgrad", targets=[[0], [0]])
    assert exp.extras["skipped_layers"] == "bn2" and exp.extras["bias_layers"] == 3


def test_refuses_a_model_without_conv_or_bn_biases():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with pytest.raises(MethodError, match="input_x_gradient"):
        camlens.explain(net.eval(), torch.randn(1, 3, 8, 8), "fullgrad")


def test_bad_scale(biasnet, bx):
    with pytest.raises(MethodError, match="scale must be one of layer, channel"):
        camlens.explain(biasnet, bx, "fullgrad", scale="pixel")


def test_cost_counts_the_one_extra_forward(biasnet, bx):
    seen = []
    h = biasnet.register_forward_pre_hook(lambda m, a: seen.append(len(a[0])))
    try:
        camlens.explain(biasnet, bx, "fullgrad", targets="top2")
    finally:
        h.remove()
    est = camlens.methods()["fullgrad"].estimate(_Ctx(bx))
    assert est is not None and sum(seen) - len(bx) == est.forwards == len(bx) and est.backwards == len(bx)


class _Ctx:
    def __init__(self, x):
        self.x = x


@pytest.mark.slow
def test_equals_pytorch_grad_cam_on_resnet18():
    """pytorch-grad-cam rescales each channel separately (scale="channel"); its layers are the
    Conv2d/BatchNorm2d with a bias, the same as camlens' spatial ones on ResNet-18."""
    tv = pytest.importorskip("torchvision")
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    torch.manual_seed(0)
    net = tv.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        classes = net(x).abs().argmax(1).tolist()  # the largest |logit|: scores of order one
    exp = camlens.explain(net, x, "fullgrad", targets=[[c] for c in classes], scale="channel")
    assert float(exp.scores.abs().min()) > 0.5  # the comparison cannot degenerate to rounding noise
    assert exp.extras["bias_layers"] == 20 and float(exp.extras["completeness_error"].abs().max()) < 1e-4
    theirs = pgc.FullGrad(copy.deepcopy(net), [])(x, targets=[targets_mod.ClassifierOutputTarget(c) for c in classes])
    for ours, ref in zip(exp.raw[:, 0].numpy(), theirs):
        assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
