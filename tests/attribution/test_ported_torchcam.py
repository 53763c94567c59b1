"""TorchCAM's CAM cases, ported (re-implemented, not copied): the map sizes on torchvision's
MobileNetV2 (random weights) at its default layers, CAM values against the closed form
``M_c = sum_k W[c, k] A_k`` from the head weights, and cross-checks against the installed TorchCAM
with ``normalized=False`` where both compute the same map.

Deliberate difference: **Grad-CAM++.** camlens follows the paper's exponential-score closed
form, ``a = G^2 / (2 G^2 + sum_ab(A) G^3)`` (0 where the denominator is 0, no epsilon), checked
here against a hand-written implementation of that formula, not against TorchCAM: TorchCAM 0.5
sums ``G^3 * A`` over the map in the denominator (the paper multiplies the map's sum of ``A`` by
the pixel's own ``G^3``) and divides in place through a boolean-mask index, which acts on a copy,
so its coefficient stays ``G^2``.
"""

from __future__ import annotations

import pytest
import torch

import camlens

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def mnv2():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v2(weights=None).eval()


@pytest.mark.parametrize("size,fmap", [((64, 64), (2, 2)), ((96, 128), (3, 4))])
def test_cam_size_on_mobilenet_v2(mnv2, size, fmap):
    """TorchCAM: CAM of MobileNetV2 is (N, H/32, W/32) at the features entering the pooling."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
    got = camlens.explain(mnv2, x, ["cam", "gradcam", "scorecam"], max_channels=2)
    for e in got.values():
        assert e.raw.shape == (1, 1, *fmap) and e.maps.shape == (1, 1, *size)
        assert not torch.isnan(e.raw).any()


def test_cam_values_closed_form(mnv2):
    """CAM = head weights x features (no bias, no ReLU), the features read by a hook-free forward."""
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    e = camlens.explain(mnv2, x, "cam", targets=[[1, 5], [0, 9]], layer="features")
    with torch.no_grad():
        A = mnv2.features(x)
    W = mnv2.classifier[1].weight
    for n, row in enumerate([[1, 5], [0, 9]]):
        for k, c in enumerate(row):
            torch.testing.assert_close(e.raw[n, k], torch.einsum("c,chw->hw", W[c], A[n]), rtol=1e-4, atol=1e-5)
    # and the bias closes the loop: mean(CAM) + b = logit (the head check camlens runs)
    with torch.no_grad():
        logits = mnv2(x)
    got = e.raw.mean(dim=(2, 3)) + e.extras["bias"]
    torch.testing.assert_close(got, logits.gather(1, torch.tensor([[1, 5], [0, 9]])), rtol=1e-4, atol=1e-4)


def _torchcam(cls_name: str, model, layer: str, x, classes, **kw):
    methods = pytest.importorskip("torchcam.methods")
    extractor = getattr(methods, cls_name)(model, target_layer=layer, input_shape=tuple(x.shape[1:]), **kw)
    try:
        with torch.set_grad_enabled(cls_name != "CAM"):
            scores = model(x)
        return extractor(classes, scores, normalized=False)[0].detach()
    finally:
        extractor.remove_hooks()


# XGradCAM is left out: on this random network its maps are ~1e-11 (all but cut by the ReLU), where
# the two libraries' different epsilons in sum(A) + eps decide; the pytorch-grad-cam cross-check
# covers it on ResNet-18.
@pytest.mark.slow
@pytest.mark.parametrize("method,cls_name", [("cam", "CAM"), ("gradcam", "GradCAM"), ("layercam", "LayerCAM")])
def test_cross_check_torchcam_equal(method, cls_name):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()  # TorchCAM hooks it: a private copy
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    classes = [3, 8]
    kw = {"fc_layer": "classifier.1"} if cls_name == "CAM" else {}
    theirs = _torchcam(cls_name, model, "features", x, classes, **kw)
    ours = camlens.explain(model, x, method, targets=classes, layer="features").raw[:, 0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))


def test_gradcam_pp_against_the_paper_formula(mnv2):
    """The paper's closed form written out by hand (the reference camlens follows, see the docstring)."""
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(3))
    with torch.enable_grad():
        A = mnv2.features(x).detach().requires_grad_(True)
        logits = mnv2.classifier(torch.nn.functional.adaptive_avg_pool2d(A, 1).flatten(1))
        (G,) = torch.autograd.grad(logits[0, 4], A)
    G, A = G[0].double(), A.detach()[0].double()
    den = 2 * G**2 + A.sum(dim=(1, 2), keepdim=True) * G**3
    alpha = torch.where(den != 0, G**2 / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))
    w = (alpha * G.relu()).sum(dim=(1, 2))
    ref = torch.einsum("c,chw->hw", w, A).relu()
    got = camlens.explain(mnv2, x, "gradcam++", targets=4, layer="features").raw[0, 0]
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
