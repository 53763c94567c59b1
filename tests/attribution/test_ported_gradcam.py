"""pytorch-grad-cam's model runs, ported (re-implemented, not copied): every camlens method on
torchvision ResNet-18 and VGG-11 with random weights at 32 px — the size at which the last
features are 1x1 and every layer map upsampled from them is constant (24 of these cases failed
before issue 19's relative-threshold normalization). Then cross-checks against the installed
pytorch-grad-cam where both compute the same map.

Deliberate differences, with the reason:

* **Grad-CAM++'s epsilon.** pytorch-grad-cam divides by ``2 G^2 + sum(A) G^3 + 1e-6`` and zeroes
  the coefficient where ``G == 0``; camlens uses the paper's closed form with no epsilon and
  zeroes it only where the denominator is exactly 0. The maps agree to the relative size of that
  epsilon (checked by correlation, not equality).
* **Eigen-CAM's sign.** pytorch-grad-cam centres the features and keeps LAPACK's arbitrary sign of
  the singular vector; camlens (``center=True``) orients it along the mean activation (issue 19), so
  the maps agree up to the choice of sign before the ReLU.
* **Normalization order.** pytorch-grad-cam min-max normalizes at feature resolution (``+1e-7`` in
  the denominator) and then resizes with OpenCV; camlens's ``maps`` are upsampled first and
  normalized on demand. The cross-check normalizes camlens's ``raw`` the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camlens

torchvision = pytest.importorskip("torchvision")

METHODS = sorted(camlens.methods())
LAYER_METHODS = sorted(m for m, i in camlens.methods().items() if i.kind == "layer")
#: keep the expensive methods cheap (each option goes only to the methods that take it)
OPTIONS = {"steps": 8, "n_samples": 4, "max_channels": 16, "n_masks": 64, "window": 8, "stride": 8}
_MODELS: dict[str, torch.nn.Module] = {}


def model(name: str) -> torch.nn.Module:
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = getattr(torchvision.models, name)(weights=None).eval()
    return _MODELS[name]


#: methods for other models: they must refuse a CNN classifier clearly (the message names the fix)
NOT_FOR_CNN_CLASSIFIERS = {
    "attention_rollout": "no global self-attention module",
    "generic_attention": "no global self-attention module",
    "drise": "Detection",
    "legrad": "no global self-attention module",
    "attnlrp": "no global self-attention module",
    "generic_attention_detr": "for detectors",
}
#: layer methods whose map is not at the explained layer's grid (RefineCAM multiplies finer stages' CAMs)
FINER_THAN_THE_LAYER = {"refinecam"}


def _opts(method: str) -> dict:
    takes = camlens.methods()[method].options()
    return {k: v for k, v in OPTIONS.items() if k in takes}


@pytest.mark.parametrize("arch", ["resnet18", "vgg11"])
@pytest.mark.parametrize("method", METHODS)
def test_run_all_models_32px(arch, method):
    net = model(arch)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    if method == "cam" and arch == "vgg11":
        with pytest.raises(camlens.CamlensError):  # VGG's head is not GAP + linear: CAM does not apply
            camlens.explain(net, x, method, **_opts(method))
        return
    if method in NOT_FOR_CNN_CLASSIFIERS:
        with pytest.raises(camlens.base.errors.MethodError, match=NOT_FOR_CNN_CLASSIFIERS[method]):
            camlens.explain(net, x, method, **_opts(method))
        return
    e = camlens.explain(net, x, method, targets="top2", **_opts(method))
    assert e.maps.shape == (2, 2, 32, 32)
    assert torch.isfinite(e.maps).all() and torch.isfinite(e.raw).all()
    n = e.normalized()
    assert float(n.min()) >= 0.0 and float(n.max()) <= 1.0
    for m, nm in zip(e.maps.flatten(0, 1), n.flatten(0, 1)):
        if float(m.amax() - m.amin()) <= 1e-5 * float(m.abs().amax()):  # constant up to float32 ripple
            assert torch.equal(nm, torch.zeros_like(nm))
        else:
            assert float(nm.max()) == 1.0 and float(nm.min()) == 0.0
    if arch == "resnet18" and method in LAYER_METHODS and method not in FINER_THAN_THE_LAYER:
        # layer4 is 1x1 at 32 px: every layer map is constant and normalizes to exact zeros
        assert e.raw.shape[-2:] == (1, 1)
        assert torch.equal(n, torch.zeros_like(n))


# -------------------------------------------------------------- cross-checks with the peer
def _pgc_normalized(raw: torch.Tensor, size) -> np.ndarray:
    """pytorch-grad-cam's pipeline on camlens's raw maps: ``scale_cam_image`` ((m - min) / (max + 1e-7))
    at feature resolution, bilinear resizing with half-pixel centres (OpenCV's INTER_LINEAR), then
    ``scale_cam_image`` once more on the resized map (its multi-layer aggregation step)."""

    def scale(m: torch.Tensor) -> torch.Tensor:
        m = m - m.amin(dim=(-2, -1), keepdim=True)
        return m / (m.amax(dim=(-2, -1), keepdim=True) + 1e-7)

    return scale(F.interpolate(scale(raw), size=size, mode="bilinear", align_corners=False))[:, 0].numpy()


PGC_SAME = {"gradcam": "GradCAM", "xgradcam": "XGradCAM", "layercam": "LayerCAM", "hirescam": "HiResCAM"}


@pytest.fixture(scope="module")
def resnet_case():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    return net, torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(5)), [3, 7]


def _pgc(cls_name: str, net, x, classes) -> np.ndarray:
    pgc = pytest.importorskip("pytorch_grad_cam")
    targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")
    with getattr(pgc, cls_name)(model=net, target_layers=[net.layer4]) as cam:
        return cam(input_tensor=x, targets=[targets_mod.ClassifierOutputTarget(c) for c in classes])


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(PGC_SAME))
def test_cross_check_pytorch_grad_cam_equal(resnet_case, method):
    net, x, classes = resnet_case
    theirs = _pgc(PGC_SAME[method], net, x, classes)
    raw = camlens.explain(net, x, method, targets=classes, layer="layer4").raw
    np.testing.assert_allclose(_pgc_normalized(raw, x.shape[-2:]), theirs, atol=2e-4)


@pytest.mark.slow
def test_cross_check_pytorch_grad_cam_gradcam_pp_up_to_epsilon(resnet_case):
    net, x, classes = resnet_case
    theirs = _pgc("GradCAMPlusPlus", net, x, classes)
    ours = _pgc_normalized(camlens.explain(net, x, "gradcam++", targets=classes, layer="layer4").raw, x.shape[-2:])
    for a, b in zip(ours, theirs):
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999


def test_cross_check_pytorch_grad_cam_eigencam_up_to_sign(resnet_case):
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    net, x, _ = resnet_case
    with torch.no_grad():
        feats = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
    proj = torch.from_numpy(get_2d_projection(feats.numpy()))  # centred, arbitrary sign, no ReLU
    ours = camlens.explain(net, x, "eigencam", layer="layer4", center=True).raw[:, 0]
    for o, p in zip(ours, proj):
        assert torch.allclose(o, p.relu(), rtol=1e-3, atol=1e-4) or torch.allclose(o, (-p).relu(), rtol=1e-3, atol=1e-4)
