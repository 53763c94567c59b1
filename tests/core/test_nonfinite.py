"""NaN/Inf never become a plausible explanation (issue 17.4): non-finite inputs, weights (hence
logits) and maps raise NonFiniteError naming the images or the parameters, for CAM, Grad-CAM and
guided backprop. Oracle: the positions we poisoned."""

from __future__ import annotations

import pytest
import torch

import camlens
from camlens.base.errors import CamlensError, NonFiniteError
from tests.conftest import TinyCNN

METHODS = ["cam", "gradcam", "guided_backprop"]


def tiny():
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused_naming_the_image(method, bad):
    net = tiny()
    x = torch.randn(3, 3, 16, 16)
    x[2, 1, 4, 5] = bad
    before = x.clone()
    with pytest.raises(NonFiniteError, match=r"input holds NaN or Inf values \(image\(s\) 2\)"):
        camlens.explain(net, x, method=method)
    assert torch.equal(x.nan_to_num(), before.nan_to_num())  # the caller's tensor is untouched
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # no hook left
    ok = camlens.explain(net, x[:2], method=method)  # the clean images are fine
    assert torch.isfinite(ok.maps).all()


@pytest.mark.parametrize("method", METHODS)
def test_nan_weights_are_named(method):
    net = tiny()
    with torch.no_grad():
        net.conv2.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"weights hold NaN/Inf \(conv2\.weight\)"):
        camlens.explain(net, torch.randn(2, 3, 16, 16), method=method)


def test_a_nan_map_from_finite_logits_is_refused():
    """A feature channel that is +inf where the head only sees it clamped: the logits are finite, the
    Grad-CAM map (0 * inf) is not — refused, not returned."""

    class Poison(torch.nn.Module):
        def forward(self, a):
            return torch.cat([a[:, :1], torch.full_like(a[:, 1:], float("inf"))], 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3, padding=1)
            self.poison = Poison()
            self.fc = torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.poison(torch.relu(self.conv(x))).clamp(max=1.0).mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    assert torch.isfinite(net(torch.randn(1, 3, 8, 8))).all()
    with pytest.raises(NonFiniteError, match="gradcam produced NaN/Inf in its maps"):
        camlens.explain(net, torch.randn(1, 3, 8, 8), method="gradcam", layer="poison")


def test_non_finite_error_is_a_camlens_error():
    assert issubclass(NonFiniteError, CamlensError) and issubclass(NonFiniteError, ValueError)


# ------------------------------------------------------------------------------------------------ dtype tolerance
def test_bf16_cam_head_check_fits_the_dtype():
    """Issue 17.8: a bf16 GAP + linear network is CAM-ready (its logits carry bf16 rounding); the
    map equals the float32 one to bf16 precision; a LayerNorm-after-pooling head is still refused."""
    import torchvision

    from camlens.base.errors import HeadError

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # logits of a trained network's size (|y| ~ 10): bf16 rounding ~ 0.06-0.25
        net.fc.weight.mul_(30)
    x = torch.randn(2, 3, 64, 64)
    ref = camlens.explain(net, x, method="cam", layer="layer4", targets=[[3], [7]])
    e = camlens.explain(net.to(torch.bfloat16), x.to(torch.bfloat16), method="cam", layer="layer4", targets=[[3], [7]])
    scale = ref.raw.abs().max()
    assert (e.raw.float() - ref.raw).abs().max() < 0.05 * scale

    class NormHead(torch.nn.Module):  # GAP -> LayerNorm -> linear: not CAM-ready in any dtype
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.norm = torch.nn.LayerNorm(8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.norm(torch.relu(self.conv(x)).mean((2, 3))))

    bad = NormHead().eval().to(torch.bfloat16)
    with pytest.raises(HeadError, match="max difference"):
        camlens.explain(bad, torch.randn(1, 3, 16, 16, dtype=torch.bfloat16), method="cam", layer="conv")
