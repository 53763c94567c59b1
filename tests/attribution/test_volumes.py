"""Volumes and clips ``(N, C, D, H, W)`` through the engine: closed forms and autograd references on
hand-built 3-D networks, the CAM identity, trilinear upsampling, and per-frame equality with 2-D maps.

Per-frame identity (a 2-D network applied to each frame, its features stacked along time, global
average pooling over ``(T, h, w)`` and the same linear head; so the clip's logit is the mean of the
frames' logits, :math:`s = \\frac1T\\sum_t s_t`):

* CAM: each frame's slice of the clip map equals the frame's 2-D CAM (CAM has no gradient);
* Grad-CAM, HiResCAM, LayerCAM, saliency, Input x Gradient, Guided Backprop: the gradient of the
  clip score at frame ``t`` is :math:`\\frac1T` times the frame score's, so each slice is the 2-D map
  divided by ``T``. For Grad-CAM this needs the linear head (its channel weights are spatial means,
  over all frames here, over one frame in 2-D: equal only when the gradient is the same everywhere);
* not: Score-CAM, Eigen-CAM, RISE, occlusion (their masks, principal axis or windows span frames).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.api.explanation import upsample
from camlens.base.errors import CamlensError, InputError, NotApplicableError

D64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gap_net(c_in: int = 2, c: int = 5, k: int = 4, head: nn.Module | None = None) -> nn.Module:
    """Conv3d -> ReLU -> Conv3d(stride 2) -> ReLU -> global average pooling -> head."""
    torch.manual_seed(3)
    return (
        nn.Sequential(
            nn.Conv3d(c_in, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv3d(6, c, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Flatten(),
            head if head is not None else nn.Linear(c, k),
        )
        .to(D64)
        .eval()
    )


def volume(n: int = 2, c: int = 2, shape=(6, 8, 10), seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, *shape, dtype=D64, generator=_gen(seed))


def features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net[:4](x)  # what enters the global pooling


# ------------------------------------------------------------------------------------------ closed forms
def test_cam_identity_on_a_3d_gap_network():
    net, x = gap_net(), volume()
    exp = camlens.explain(net, x, "cam", targets="top3")
    A = features(net, x)
    W, b = net[6].weight, net[6].bias
    ref = torch.einsum("nkc,ncdhw->nkdhw", W[exp.classes], A)  # M_c = sum_k W_ck A_k
    assert exp.raw.shape == (2, 3, 3, 4, 5) and exp.spatial_dims == 3
    torch.testing.assert_close(exp.raw, ref, rtol=1e-10, atol=1e-12)
    logits = net(x).gather(1, exp.classes)
    torch.testing.assert_close(exp.raw.mean((2, 3, 4)) + b[exp.classes], logits, rtol=1e-10, atol=1e-12)


def test_gradcam_is_relu_cam_over_dhw_on_a_gap_linear_head():
    net, x = gap_net(), volume()
    cam = camlens.explain(net, x, "cam", targets="top2")
    grad = camlens.explain(net, x, "gradcam", targets="top2")
    d, h, w = cam.raw.shape[2:]
    torch.testing.assert_close(grad.raw, cam.raw.relu() / (d * h * w), rtol=1e-10, atol=1e-14)
    assert grad.maps.shape == (2, 2, 6, 8, 10)


def test_gradcam_equals_an_autograd_reference_on_a_nonlinear_head():
    head = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    net, x = gap_net(head=head), volume(seed=1)
    exp = camlens.explain(net, x, "gradcam", targets=[[0, 3], [2, 1]])
    A = features(net, x).detach().requires_grad_(True)
    logits = net[4:](A)
    ref = []
    for k in range(2):
        s = logits.gather(1, exp.classes[:, k : k + 1]).sum()
        (g,) = torch.autograd.grad(s, A, retain_graph=True)
        alpha = g.mean((2, 3, 4))  # (N, C)
        ref.append(torch.einsum("nc,ncdhw->ndhw", alpha, A.detach()).relu())
    torch.testing.assert_close(exp.raw, torch.stack(ref, 1), rtol=1e-10, atol=1e-14)
    assert float(exp.raw.amax()) > 1e-4  # not a degenerate all-zero reference


def test_maps_are_the_trilinear_upsampling_of_raw():
    net, x = gap_net(), volume(shape=(5, 7, 9))
    exp = camlens.explain(net, x, "gradcam++", targets="top2")
    ref = F.interpolate(exp.raw.float(), size=(5, 7, 9), mode="trilinear", align_corners=False)
    torch.testing.assert_close(exp.maps, ref, rtol=1e-5, atol=1e-6)
    assert exp.image_maps(1).shape == (2, 5, 7, 9) and exp.map(0, 1).shape == (5, 7, 9)


def test_upsample_3d_matches_f_interpolate():
    m = torch.randn(2, 3, 3, 4, 5, generator=_gen(4))
    for size in [(7, 9, 11), (3, 8, 10), (6, 4, 5)]:
        ref = F.interpolate(m, size=size, mode="trilinear", align_corners=False)
        torch.testing.assert_close(upsample(m, size), ref, rtol=1e-5, atol=1e-6)


class _GuidedReLU(torch.autograd.Function):
    """The guided rule written out: backward g * [x > 0] * [g > 0]."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (x > 0) * (g > 0)


def test_guided_backprop_equals_an_autograd_reference():
    net, x = gap_net(), volume(seed=2)
    exp = camlens.explain(net, x, "guided_backprop", targets="top2")
    xr = x.clone().requires_grad_(True)
    h = _GuidedReLU.apply(net[0](xr))
    h = _GuidedReLU.apply(net[2](h))
    logits = net[4:](h)
    ref = []
    for k in range(2):
        (g,) = torch.autograd.grad(logits.gather(1, exp.classes[:, k : k + 1]).sum(), xr, retain_graph=True)
        ref.append(g)
    ref_t = torch.stack(ref, 1)  # (N, K, C, D, H, W)
    torch.testing.assert_close(exp.raw, ref_t, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(exp.maps, ref_t.abs().amax(2).float())
    assert exp.kind == "pixel" and exp.spatial_dims == 3
    saliency = camlens.explain(net, x, "saliency", targets="top2")
    assert not torch.allclose(saliency.raw, exp.raw)  # the rule changed something: the test can fail


# ------------------------------------------------------------------------------------------ per frame
class PerFrame(nn.Module):
    """A 2-D network applied to each frame of a clip ``(N, C, T, H, W)``; its features stacked as
    ``(N, C', T, h, w)`` (the module ``features``), pooled over ``(T, h, w)``, then its own head."""

    def __init__(self, net2d: nn.Sequential) -> None:
        super().__init__()
        self.body, self.head = net2d[:4], net2d[6]
        self.features = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, t = x.shape[:3]
        f = self.body(x.transpose(1, 2).flatten(0, 1))  # (N*T, C', h, w)
        f = self.features(f.unflatten(0, (n, t)).transpose(1, 2))  # (N, C', T, h, w)
        return self.head(f.mean((2, 3, 4)))


def net2d() -> nn.Sequential:
    torch.manual_seed(5)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 5, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(5, 4),
        )
        .to(D64)
        .eval()
    )


@pytest.mark.parametrize(
    "method, scale",
    [
        ("cam", 1.0),
        ("gradcam", 1.0 / 3),
        ("hirescam", 1.0 / 3),
        ("layercam", 1.0 / 3),
        ("saliency", 1.0 / 3),
        ("input_x_gradient", 1.0 / 3),
        ("guided_backprop", 1.0 / 3),
    ],
)
def test_per_frame_maps_equal_the_2d_maps_of_each_frame(method, scale):
    m2 = net2d()
    clip_model = PerFrame(m2)
    clip = torch.randn(2, 3, 3, 12, 10, dtype=D64, generator=_gen(6))  # (N, C, T=3, H, W)
    targets = [[1], [3]]
    layer = "features" if method in ("cam", "gradcam", "hirescam", "layercam") else None
    e3 = camlens.explain(clip_model, clip, method, targets=targets, layer=layer)
    assert e3.shape == (2, 1, 3, 12, 10)
    # the clip's logits are the frames' mean: the test's premise
    frames_logits = torch.stack([m2(clip[:, :, t]) for t in range(3)]).mean(0)
    torch.testing.assert_close(clip_model(clip), frames_logits)
    for t in range(3):
        e2 = camlens.explain(m2, clip[:, :, t], method, targets=targets)
        raw3 = e3.raw[:, :, :, t] if e3.kind == "pixel" else e3.raw[:, :, t]
        torch.testing.assert_close(raw3, e2.raw * scale, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(e3.maps[:, :, t], e2.maps * scale, rtol=1e-5, atol=1e-7)
        assert float(e2.raw.abs().amax()) > 1e-6


# ------------------------------------------------------------------------------------------ refusals
def test_an_image_only_method_is_refused_on_volumes_with_the_alternatives():
    with pytest.raises(NotApplicableError, match="ablationcam.*images.*Methods for volumes.*gradcam"):
        camlens.explain(gap_net(), volume(), "ablationcam")


def test_volume_inputs_of_the_wrong_rank_or_channels_are_named():
    with pytest.raises(InputError, match=r"\(N, C, D, H, W\)"):
        camlens.explain(gap_net(), torch.zeros(1, 1, 2, 3, 4, 5, dtype=D64), "gradcam")
    with pytest.raises(InputError, match="2-channel volumes / clips but the input has 1"):
        camlens.explain(gap_net(), torch.zeros(1, 1, 6, 8, 8, dtype=D64), "gradcam")


def test_blur_baseline_is_refused_on_volumes():
    with pytest.raises(CamlensError, match="baseline='blur'.*volumes"):
        camlens.explain(gap_net(), volume(n=1), "integrated_gradients", steps=2, baseline="blur")


def test_2d_features_captured_from_a_volume_input_are_refused():
    class Squash(nn.Module):  # a 3-D input whose named layer gives 2-D features
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.conv(x.mean(2)).mean((2, 3)))

    with pytest.raises(InputError, match=r"not \(N, C, d, h, w\)"):
        camlens.explain(Squash().double(), volume(n=1), "gradcam", layer="conv")


def test_a_volume_is_normalized_as_a_whole_not_per_slice():
    net, x = gap_net(), volume()
    exp = camlens.explain(net, x, "gradcam", targets="top2")
    u = exp.normalized()
    m = exp.maps
    lo = m.amin((2, 3, 4), keepdim=True)
    hi = m.amax((2, 3, 4), keepdim=True)
    torch.testing.assert_close(u, (m - lo) / (hi - lo))
    assert (u.amax((3, 4)) < 0.999).any()  # some slices do not reach 1: the scale is the volume's
