"""DETR-family detectors (Hugging Face DETR, Conditional DETR, RT-DETR) through the detector adapter:
detections equal the library's post-processing, Grad-CAM of one detection equals a plain-autograd
reference, a detection's map does not depend on its batch, hygiene, clear errors. Tiny models from
configs with random weights (a 4-stage basic ResNet built from its config: nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import camlens
from camlens.base.errors import TargetError
from camlens.models.detectors import DetrAdapter, as_detector
from camlens.targets import Detection

T = pytest.importorskip("transformers")

SIZES = [(96, 128), (80, 100)]  # non-square, different sizes


def _resnet(out_features):
    return T.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=out_features,
    )


def _common():
    return dict(
        num_queries=12,
        d_model=32,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        num_labels=5,
        init_std=0.1,  # spread-out scores: random queries that differ (the default 0.02 makes them alike)
    )


def build(family: str):
    torch.manual_seed(0)
    if family == "detr":
        cfg = T.DetrConfig(backbone_config=_resnet(["stage4"]), encoder_layers=1, decoder_layers=1, **_common())
        return T.DetrForObjectDetection(cfg).eval(), T.DetrImageProcessor()
    if family == "conditional_detr":
        cfg = T.ConditionalDetrConfig(
            backbone_config=_resnet(["stage4"]), encoder_layers=1, decoder_layers=1, **_common()
        )
        return T.ConditionalDetrForObjectDetection(cfg).eval(), T.ConditionalDetrImageProcessor()
    cfg = T.RTDetrConfig(
        backbone_config=_resnet(["stage2", "stage3", "stage4"]),
        encoder_in_channels=[16, 16, 32],
        encoder_hidden_dim=32,
        decoder_layers=1,
        decoder_in_channels=[32, 32, 32],
        feat_strides=[8, 16, 32],
        **_common(),
    )
    return T.RTDetrForObjectDetection(cfg).eval(), T.RTDetrImageProcessor()


FAMILIES = ["detr", "conditional_detr", "rt_detr"]


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return [torch.rand(3, h, w, generator=g) for h, w in SIZES]


def _raw(net, ad, imgs):
    (pv, pm), _ = ad.transform(imgs)
    return net(pixel_values=pv) if ad.family == "RTDetr" else net(pixel_values=pv, pixel_mask=pm)


@pytest.mark.parametrize("family", FAMILIES)
def test_detections_equal_the_librarys_post_processing(family, images):
    """Boxes (in each non-square photo's own pixels), labels and scores equal
    ``post_process_object_detection(outputs, threshold, target_sizes)`` on the same outputs."""
    net, proc = build(family)
    ad = as_detector(net, threshold=0.1)
    with torch.no_grad():
        ours = ad(images)
        ref = proc.post_process_object_detection(_raw(net, ad, images), threshold=0.1, target_sizes=SIZES)
    assert sum(len(r["scores"]) for r in ref) >= 4  # a real comparison, not two empty lists
    for o, r in zip(ours, ref):
        assert o["labels"].tolist() == r["labels"].tolist()
        torch.testing.assert_close(o["boxes"], r["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(o["scores"], r["scores"], atol=1e-6, rtol=0)


def test_detr_input_equals_the_processors(images):
    """Without resizing, the adapter's input is the processor's: ImageNet-normalized, padded at the
    bottom and right to the largest image, with the pixel mask."""
    net, proc = build("detr")
    ad = as_detector(net)
    arrays = [t.permute(1, 2, 0).numpy() for t in images]
    enc = proc(images=arrays, do_resize=False, do_rescale=False, return_tensors="pt")
    (pv, pm), frames = ad.transform(images)
    torch.testing.assert_close(pv, enc["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(pm, enc["pixel_mask"].long())
    assert frames.resized == SIZES and frames.padded == (96, 128)


def _reference_gradcam(net, ad, image, layer):
    """Grad-CAM by hand: the best detection's query and class (its class score as the library's
    post-processing computes it), d score / d features at ``layer`` by plain autograd."""
    feats = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        raw = _raw(net, ad, [image])
    finally:
        handle.remove()
    logits = raw.logits[0]
    p = logits.softmax(-1)[:, :-1] if ad.kind == "softmax" else logits.sigmoid()
    q, c = divmod(int(p.detach().flatten().argmax()), p.shape[1])
    A = feats["A"]
    (G,) = torch.autograd.grad(p[q, c], A)
    return (G.mean((2, 3), keepdim=True) * A).sum(1).relu()[0].detach(), float(p[q, c].detach())


@pytest.mark.parametrize("family", FAMILIES)
def test_gradcam_of_one_detection_equals_autograd_reference(family, images):
    net, _ = build(family)
    ad = as_detector(net, threshold=0.0)
    x = images[0][None]
    e = camlens.explain(ad, x, "gradcam", targets=Detection(score_threshold=0.0, max_boxes=1))
    layer = ad.camlens.layer.removeprefix("net.")
    ref, score = _reference_gradcam(net, ad, images[0], layer)
    assert 0.05 < score < 0.999  # not a saturated, gradient-free score
    assert float(e.scores[0, 0]) == pytest.approx(score, abs=1e-6)  # the match is the query itself (IoU 1)
    assert ref.abs().max() > 0
    torch.testing.assert_close(e.raw[0, 0], ref, atol=1e-6 * float(ref.abs().max()) + 1e-9, rtol=1e-4)
    assert e.maps.shape == (1, 1, *SIZES[0])
    assert e.layer == f"output of {ad.camlens.layer}"
    assert e.extras["layer_choice"] == ad.camlens.extra["layer_choice"]  # the default layer, and why


def test_same_detection_alone_and_in_a_batch_of_other_sizes(images):
    """With a fixed input size the network sees each image the same way in any batch: the map of a
    detection explained alone equals its map inside a batch of images of different sizes."""
    net, _ = build("detr")
    ad = as_detector(net, threshold=0.0, size=(64, 96))
    own = Detection(score_threshold=0.0, max_boxes=2)
    alone = camlens.explain(ad, images[0][None], "gradcam", targets=own)
    both = camlens.explain(ad, list(images), "gradcam", targets=own)
    h, w = SIZES[0]
    assert float(alone.maps[0].abs().max()) > 0
    torch.testing.assert_close(both.maps[0, :, :h, :w], alone.maps[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both.scores[0], alone.scores[0])
    np.testing.assert_allclose(both.extras["boxes"][0], alone.extras["boxes"][0], atol=1e-4)
    assert both.extras["image_sizes"] == SIZES


def test_explain_takes_the_hf_model_directly_and_leaves_no_trace(images):
    net, _ = build("conditional_detr")
    net.train()  # explain runs in eval mode and gives the flags back
    flags = {n: m.training for n, m in net.named_modules()}
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    x = images[1][None].clone()
    x0 = x.clone()
    with torch.no_grad():
        before = net.eval()(pixel_values=x).logits.clone()
    net.train()
    e = camlens.explain(net, x, ["gradcam", "saliency"], targets=Detection(score_threshold=0.0, max_boxes=2))
    assert e["gradcam"].maps.shape == (1, 2, *SIZES[1]) and e["saliency"].maps.shape == (1, 2, *SIZES[1])
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert {n: p.requires_grad for n, p in net.named_parameters()} == grads
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert torch.equal(x, x0)
    with torch.no_grad():
        assert torch.equal(net.eval()(pixel_values=x).logits, before)


def test_no_detection_above_the_threshold_is_a_clear_error(images):
    net, _ = build("detr")
    ad = as_detector(net, threshold=0.999)
    with pytest.raises(TargetError, match=r"threshold=0\.999.*as_detector"):
        camlens.explain(ad, images[0][None], "gradcam")  # a detector's default target: its own detections


def test_a_box_with_a_label_the_model_does_not_have_is_a_clear_error(images):
    net, _ = build("detr")
    with pytest.raises(TargetError, match="label 7 is not a class of this detector: it has 5 classes"):
        camlens.explain(net, images[0][None], "gradcam", targets=Detection([[10, 10, 60, 50]], [7]))


def test_the_card_says_the_layer_and_why():
    net, _ = build("rt_detr")
    ad = as_detector(net)
    assert isinstance(ad, DetrAdapter) and ad.family == "RTDetr"
    assert ad.camlens.layer == "net.model.encoder_input_proj.2"
    assert "coarsest" in ad.camlens.extra["layer_choice"] and ad.camlens.extra["task"] == "detection"
    assert as_detector(ad) is ad
