"""Exact identities and class discrimination on real networks and real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.base.io import sample_image
from camlens.core.inputs import prepare_inputs


def test_lite0_classifies_the_cat(lite0, cat):
    top = camlens.predict(lite0, cat, topk=5)[0]
    assert top[0][1] in {"Egyptian cat", "tabby", "tiger cat"} and top[0][2] > 0.5
    assert {t[1] for t in top[:3]} == {"Egyptian cat", "tabby", "tiger cat"}


@pytest.mark.parametrize("photo", ["chelsea", "coffee"])
def test_lite0_gradcam_equals_relu_cam_over_hw(lite0, photo):
    """For a GAP + linear head, d y_c / d A = W_c / (hw): Grad-CAM = ReLU(CAM) / (hw), and
    CAM's spatial mean plus the bias is the logit."""
    img = sample_image(photo)
    logits = lite0(prepare_inputs(img, lite0)[0]).detach()[0]
    targets = [[*logits.topk(2).indices.tolist(), int(logits.argmin())]]  # best two and the worst class
    res = camlens.explain(lite0, img, method=["cam", "gradcam", "hirescam"], targets=targets)
    cam, grad = res["cam"], res["gradcam"]
    h, w = cam.raw.shape[-2:]
    assert (h, w) == (7, 7) and "_avg_pooling" in cam.layer
    ref = cam.raw.relu() / (h * w)
    assert ref.abs().max() > 0.05
    torch.testing.assert_close(grad.raw, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    torch.testing.assert_close(res["hirescam"].raw, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    bias = lite0._fc.bias.detach()[cam.classes]
    torch.testing.assert_close(cam.raw.mean((2, 3)) + bias, cam.scores, rtol=1e-5, atol=1e-4)
    assert (cam.raw[0, 2] < 0).any()  # no ReLU in CAM: the worst class has negative evidence


def _square(a: np.ndarray, size: int = 224) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))


@pytest.mark.parametrize(
    "method", ["cam", "gradcam", "xgradcam", "hirescam", pytest.param("scorecam", marks=pytest.mark.slow)]
)
def test_class_discriminative_on_a_collage(lite0, method):
    """Cat | rocket side by side: each photo's own class puts most of its map energy on that photo."""
    cat, rocket = sample_image("chelsea"), sample_image("rocket")
    cat_id = camlens.predict(lite0, cat, 1)[0][0][0]
    rocket_id = camlens.predict(lite0, rocket, 1)[0][0][0]
    collage = np.concatenate([_square(cat), _square(rocket)], axis=1)
    opts = {"max_channels": 32} if method == "scorecam" else {}
    e = camlens.explain(lite0, collage, method=method, targets=[[cat_id, rocket_id]], **opts)
    m = e.maps[0].clamp_min(0)
    half = m.shape[-1] // 2
    left = (m[..., :half].sum((1, 2)) / m.sum((1, 2))).tolist()
    assert left[0] > 0.8, f"cat map energy on the cat: {left[0]:.2f}"
    assert 1 - left[1] > 0.65, f"rocket map energy on the rocket: {1 - left[1]:.2f}"


def test_densenet121_functional_relu_and_pool():
    """torchvision's DenseNet ends in F.relu(inplace=True) + F.adaptive_avg_pool2d (functional):
    the automatic layer is that pooling's input, and the GAP identity holds there too."""
    torch.manual_seed(0)
    model = camlens.load_model("densenet121", weights="random")
    x = torch.randn(2, 3, 64, 64)
    res = camlens.explain(model, x, method=["cam", "gradcam"], targets="top2")
    cam, grad = res["cam"], res["gradcam"]
    assert "functional" in cam.layer and cam.raw.shape[1:] == (2, 2, 2)
    h, w = cam.raw.shape[-2:]
    torch.testing.assert_close(grad.raw, cam.raw.relu() / (h * w), rtol=1e-4, atol=1e-6)
    b = model.classifier.bias.detach()[cam.classes]
    torch.testing.assert_close(cam.raw.mean((2, 3)) + b, cam.scores, rtol=1e-4, atol=1e-4)
    # explicit module layer with in-place ReLU following it (norm5 -> F.relu(inplace=True))
    e = camlens.explain(model, x, method="gradcam", layer="features.norm5")
    assert torch.isfinite(e.maps).all() and e.maps.abs().sum() > 0


@pytest.mark.slow
def test_vgg_without_global_pooling_falls_back_to_last_spatial_layer():
    torch.manual_seed(0)
    model = camlens.load_model("vgg11", weights="random")
    e = camlens.explain(model, torch.randn(1, 3, 64, 64), method="gradcam")
    assert e.layer == "output of features.20"  # the last max-pool: VGG's flatten+MLP has no GAP
    with pytest.raises(camlens.base.errors.HeadError, match="gradcam"):
        camlens.explain(model, torch.randn(1, 3, 64, 64), method="cam")
    x = torch.randn(3, 3, 64, 64)  # a batch: the pooling probe runs on one image, then the batch
    auto, named = (camlens.explain(model, x, method="gradcam", layer=layer) for layer in (None, "features.20"))
    assert auto.layer == named.layer
    torch.testing.assert_close(auto.maps, named.maps)


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.slow
def test_vgg_auto_layer_costs_two_forwards(n):
    """No global pooling: the pass that looked for it also saw the last spatial module, so the
    fallback needs no extra probe: one watching pass + the final pass, at any batch size."""
    from camlens.core.layers import fallback_layer

    torch.manual_seed(0)
    model = camlens.load_model("vgg11", weights="random")
    x = torch.randn(n, 3, 64, 64)
    expected = "features.20"  # VGG-11's last max-pool, by reading torchvision's architecture
    assert fallback_layer(model, x).name == expected
    calls = []
    h = model.register_forward_pre_hook(lambda m, a: calls.append(len(a[0])))
    try:
        e = camlens.explain(model, x, method="gradcam")
    finally:
        h.remove()
    assert e.layer == f"output of {expected}" and calls == [n, n]
    torch.testing.assert_close(e.maps, camlens.explain(model, x, method="gradcam", layer=expected).maps)


def test_resnet_named_layer_equals_auto(lite0):
    torch.manual_seed(0)
    model = camlens.load_model("resnet18", weights="random")
    x = torch.randn(2, 3, 64, 64)
    auto = camlens.explain(model, x, method="gradcam")
    named = camlens.explain(model, x, method="gradcam", layer="avgpool", capture="input")
    out4 = camlens.explain(model, x, method="gradcam", layer="layer4")
    torch.testing.assert_close(auto.raw, named.raw)
    torch.testing.assert_close(auto.raw, out4.raw)
