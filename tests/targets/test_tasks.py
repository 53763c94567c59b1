"""Target objects (Detection, Segmentation, Similarity, the user protocol) and the zoo's detectors
and segmenters. Oracles: hand computations from the model's own outputs (torchvision's box_iou,
explicit loops), closed forms on hand-built networks, autograd references written in the test."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou as tv_box_iou

import camlens
from camlens.base.errors import InputError, MethodError, TargetError
from camlens.models.zoo import load_model
from camlens.targets import Detection, Segmentation, Similarity, Target, box_iou

# small and cheap: few proposals, every box kept (random weights score about 1/num_classes)
FRCNN_KW = dict(
    min_size=64,
    max_size=128,
    box_score_thresh=0.0,
    rpn_pre_nms_top_n_test=30,
    rpn_post_nms_top_n_test=30,
    box_detections_per_img=20,
)


def _calibrate_batchnorm(m: nn.Module) -> None:
    """Set the backbone's BatchNorm statistics from a fixed batch of random images.

    torchvision initialises a depthwise convolution with std sqrt(2 / (9 C)) (fan-out counts all C
    filters), so the random MobileNetV3 shrinks its input by about sqrt(C) per block: its last layer
    holds values of order 1e-8, every score is decided by the biases and rounding, and an oracle
    comparing two maps of order 1e-9 holds on one CPU and not another (issue 24). Statistics measured
    on the model's own resized, normalized input bring every layer back to order one."""
    bns = [b for b in m.backbone.modules() if isinstance(b, nn.BatchNorm2d)]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average: one batch sets the statistics
    imgs = torch.rand(8, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    m.backbone.train()
    try:
        with torch.no_grad():
            m.backbone(m.transform(list(imgs))[0].tensors)
    finally:
        m.eval()


@pytest.fixture(scope="module")
def frcnn():
    torch.manual_seed(0)
    m = load_model("fasterrcnn_mobilenet_v3_large_320_fpn", "random", **FRCNN_KW)
    _calibrate_batchnorm(m)
    # random heads give all classes ~equal scores; sharpen the class logits so labels and scores vary
    with torch.no_grad():
        m.roi_heads.box_predictor.cls_score.weight.mul_(10)
    return m


def test_frcnn_fixture_is_not_degenerate(frcnn):
    """The oracles below compare maps built from the features and the scores: both must be of
    order one, or float rounding decides the outcome (issue 24)."""
    feats = {}
    h = frcnn.backbone.body._modules["16"].register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        with torch.no_grad():
            out = frcnn(torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(4)))
    finally:
        h.remove()
    assert 0.1 < float(feats["A"].abs().max()) < 100
    assert float(out[0]["scores"].max()) > 0.05  # 91 classes: a uniform head would give 0.011


def _hand_score(out: dict, ref: torch.Tensor, label: int, thr: float) -> float:
    """max over predictions of the same label with IoU >= thr of IoU * score (0 if none)."""
    best = 0.0
    ious = tv_box_iou(ref[None], out["boxes"])[0]
    for j in range(len(out["boxes"])):
        if int(out["labels"][j]) == label and float(ious[j]) >= thr:
            best = max(best, float(ious[j]) * float(out["scores"][j]))
    return best


def test_box_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 2, generator=g) * 50
    a = torch.cat([a, a + 1 + torch.rand(5, 2, generator=g) * 40], 1)
    b = torch.rand(7, 2, generator=g) * 50
    b = torch.cat([b, b + 1 + torch.rand(7, 2, generator=g) * 40], 1)
    torch.testing.assert_close(box_iou(a, b), tv_box_iou(a, b))


def test_detection_score_equals_hand_computation(frcnn):
    torch.manual_seed(1)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = frcnn(x)
    o = out[0]
    assert len(o["boxes"]) >= 3
    refs = o["boxes"][:3] + torch.tensor([2.0, -1.0, 1.0, 3.0])  # near some predictions
    labels = o["labels"][:3].tolist()
    t = Detection(refs, labels, iou=0.5).bind(out)
    s = t(out)
    assert s.shape == (1, 3)
    for k in range(3):
        assert float(s[0, k]) == pytest.approx(_hand_score(o, refs[k], labels[k], 0.5), rel=1e-5, abs=1e-7)
    # a box far from everything scores 0; its own detections (boxes=None) score their own score
    assert float(Detection([[0, 0, 1, 1]], [labels[0]]).bind(out)(out)[0, 0]) == 0.0
    own = Detection(score_threshold=0.0, max_boxes=4).bind(out)
    assert own.k == 4
    np.testing.assert_allclose(own(out)[0].numpy(), o["scores"][:4].numpy(), rtol=1e-6)
    assert own.labels[0].tolist() == o["labels"][:4].tolist()


def test_detection_batch_of_different_sizes_equals_per_image_calls(frcnn):
    """Image b is image a upsampled 2x (nearest): the detector's resize brings both to the same
    64x96 tensor, so the batch pads nothing extra and equals per-image calls, and b's boxes (in b's
    original pixels) are exactly twice a's."""
    torch.manual_seed(2)
    a = torch.rand(3, 64, 96)
    b = F.interpolate(a[None], scale_factor=2, mode="nearest")[0]
    with torch.no_grad():
        both = frcnn([a, b])
        oa, ob = frcnn([a]), frcnn([b])
    torch.testing.assert_close(both[1]["boxes"], 2 * both[0]["boxes"], rtol=1e-4, atol=1e-3)
    refs = [both[0]["boxes"][:2] + 1.0, 2 * (both[0]["boxes"][:2] + 1.0)]
    labs = [both[0]["labels"][:2].tolist()] * 2
    t = Detection(refs, labs).bind(both)
    batch = t(both)
    single_a = Detection([refs[0]], [labs[0]]).bind(oa)(oa)
    single_b = Detection([refs[1]], [labs[1]]).bind(ob)(ob)
    torch.testing.assert_close(batch, torch.cat([single_a, single_b]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batch[0], batch[1], rtol=1e-4, atol=1e-6)


def test_explain_detector_gradcam_and_hygiene(frcnn):
    torch.manual_seed(3)
    x = torch.rand(2, 3, 64, 96)
    frcnn.train()  # in train mode a detector wants targets and returns losses: eval must hold
    try:
        e = camlens.explain(frcnn, x, "gradcam", targets=Detection(score_threshold=0.0, max_boxes=2))
        assert frcnn.training and all(m.training for m in frcnn.modules())
    finally:
        frcnn.eval()
    assert e.maps.shape == (2, 2, 64, 96)
    assert e.layer == "output of backbone.body.16"
    assert e.extras["boxes"].shape == (2, 2, 4)
    assert all(p.grad is None for p in frcnn.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in frcnn.modules())  # transform hook removed
    assert torch.isnan(e.probs).all() and (e.scores > 0).all()
    # a list of images of different sizes: one batched forward, maps in each image's pixels
    imgs = [torch.rand(3, 64, 96), torch.rand(3, 80, 80)]
    e2 = camlens.explain(frcnn, imgs, "gradcam", targets=Detection(score_threshold=0.0, max_boxes=1))
    assert e2.maps.shape == (2, 1, 80, 96)
    assert float(e2.maps[0, :, 64:].abs().sum()) == 0.0  # beyond image 0
    assert e2.extras["image_sizes"] == [(64, 96), (80, 80)]
    with pytest.raises(InputError, match="one size"):
        camlens.explain(frcnn, imgs, "saliency", targets=Detection(score_threshold=0.0))
    with pytest.raises(MethodError, match="one size"):  # masks one batch: not 'list' has no attribute 'detach'
        camlens.explain(frcnn, imgs, "scorecam", targets=Detection(score_threshold=0.0), max_channels=2)


def test_detector_gradcam_equals_autograd_reference(frcnn):
    """Grad-CAM at backbone.body.16 for a box, against a hook + autograd computation in the test,
    mapped to the original pixels by cropping the padded frame."""
    torch.manual_seed(4)
    x = torch.rand(1, 3, 64, 80)  # resized to 64x80, padded to 64x96 by the transform
    e = camlens.explain(frcnn, x, "gradcam", targets=Detection(score_threshold=0.0, max_boxes=1))
    ref = torch.as_tensor(e.extras["boxes"][0])
    lab = e.classes[0].tolist()
    feats = {}
    h = frcnn.backbone.body._modules["16"].register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        out = frcnn(x)
    finally:
        h.remove()
    A = feats["A"]
    s = Detection(ref, lab).bind(out)(out)[0, 0]
    (G,) = torch.autograd.grad(s, A)
    cam = (G.mean(dim=(2, 3), keepdim=True) * A).sum(1, keepdim=True).relu().detach()
    full = F.interpolate(cam, size=(64, 96), mode="bilinear", align_corners=False)[..., :64, :80]
    want = F.interpolate(full, size=(64, 80), mode="bilinear", align_corners=False)[0, 0]
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(e.maps[0, 0], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_detector_scorecam_masks_follow_the_padded_frame(frcnn):
    """Score-CAM on a detector: each channel's mask is mapped as the maps are — upsampled over the
    resized, padded frame, cropped to the image, resized to it — then the masked images are scored
    by the bound detection target. Hand loop over the same channels; the mask stretched over the
    input (the earlier behaviour) gives a different map."""
    torch.manual_seed(4)
    x = torch.rand(1, 3, 64, 80)  # resized to 64x80, padded to 64x96 by the transform
    det = camlens.explain(frcnn, x, "gradcam", targets=Detection(score_threshold=0.0, max_boxes=1))
    # iou=0: every masked copy scores IoU * score of its best same-label box, continuous in the mask,
    # rather than 0 whenever the best overlap misses a threshold
    target = Detection(torch.as_tensor(det.extras["boxes"][0]), det.classes[0].tolist(), iou=0.0)
    e = camlens.explain(frcnn, x, "scorecam", targets=target, max_channels=12, dedupe=False, batch_size=4)
    feats = {}
    h = frcnn.backbone.body._modules["16"].register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        with torch.no_grad():
            out = frcnn(x)
    finally:
        h.remove()
    A = feats["A"][0]
    bound = target.bind(out)
    ch = A.mean(dim=(1, 2)).topk(12).indices.sort().values

    def norm(t):
        return (t - t.min()) / (t.max() - t.min()) if t.max() > t.min() else torch.zeros_like(t)

    def cam(stretch: bool) -> torch.Tensor:
        s = []
        for c in ch.tolist():
            key = norm(A[c])[None, None]
            if stretch:
                m = F.interpolate(key, size=(64, 80), mode="bilinear", align_corners=False)
            else:
                full = F.interpolate(key, size=(64, 96), mode="bilinear", align_corners=False)[..., :64, :80]
                m = F.interpolate(full, size=(64, 80), mode="bilinear", align_corners=False)
            with torch.no_grad():
                s.append(bound.take([0])(frcnn(x * norm(m)))[0, 0])
        scores.append(torch.stack(s))
        return (torch.stack(s)[:, None, None] * A[ch]).sum(0).relu()

    scores: list[torch.Tensor] = []
    want = cam(False)
    assert float(scores[0].max()) > 0.1 and float(want.abs().max()) > 0.1  # of order one (issue 24)
    torch.testing.assert_close(e.raw[0, 0], want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    stretched = cam(True)
    assert float((scores[1] - scores[0]).abs().max()) > 0.05  # the frame changes the masked scores
    assert float((stretched - want).abs().max()) > 0.05 * float(want.abs().max())  # and the map


class TinyFCN(nn.Module):
    """features = ReLU(conv3x3(x)) (4 channels), logits = conv1x1(features) (3 classes)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(4, 3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        return {"out": self.classifier(self.features(x))}


def test_segmentation_target_closed_form_on_tiny_fcn():
    m = TinyFCN().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        A = m.features(x)
        O = m.classifier(A)
    W = m.classifier.weight[:, :, 0, 0].detach()
    out = {"out": O}
    t = Segmentation(1).bind(out)
    s = t(out)
    M = (O.argmax(1) == 1).float()  # (N, H, W)
    want = ((W[1][None, :, None, None] * A).sum(1) + m.classifier.bias[1]) * M
    torch.testing.assert_close(s[:, 0], want.sum((1, 2)).detach(), rtol=1e-5, atol=1e-5)
    # a given mask; two categories -> K = 2
    mask = np.zeros((8, 8), bool)
    mask[2:5, 3:7] = True
    s2 = Segmentation([0, 2], mask=mask).bind(out)(out)
    torch.testing.assert_close(s2, O[:, [0, 2]][:, :, 2:5, 3:7].sum((2, 3)))
    # Grad-CAM at the features: dy/dA_k(ij) = M_ij W_ck, so alpha_k = W_ck mean(M)
    e = camlens.explain(m, x, "gradcam", targets=Segmentation(1), layer="features")
    alpha = W[1][None, :] * M.mean((1, 2))[:, None]  # (N, C)
    cam = (alpha[:, :, None, None] * A).sum(1).relu()
    torch.testing.assert_close(e.raw[:, 0], cam, rtol=1e-5, atol=1e-6)
    with pytest.raises(TargetError, match="out of range"):
        Segmentation(5).bind(out)


def test_gradcam_on_fcn_resnet50_equals_autograd_reference():
    torch.manual_seed(0)
    m = load_model("fcn_resnet50", "random")
    x = torch.randn(1, 3, 64, 64)
    e = camlens.explain(m, x, "gradcam", targets=Segmentation(3))
    assert e.layer == "output of backbone.layer4"
    feats = {}
    h = m.backbone.layer4.register_forward_hook(lambda mod, a, o: feats.setdefault("A", o))
    try:
        out = m(x)["out"]
    finally:
        h.remove()
    A = feats["A"]
    mask = (out.argmax(1) == 3).float().detach()
    score = (out[:, 3] * mask).sum()
    (G,) = torch.autograd.grad(score, A)
    cam = (G.mean((2, 3), keepdim=True) * A).sum(1).relu().detach()
    torch.testing.assert_close(e.raw[:, 0], cam, rtol=1e-4, atol=1e-5 * float(cam.abs().max() + 1e-12))
    assert float(e.scores[0, 0]) == pytest.approx(float(score.detach()), rel=1e-5)


class TinyEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).mean((2, 3)))


def test_similarity_gradient_and_self_reference():
    m = TinyEmbed().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 8, generator=g)
    r = torch.randn(2, 5, generator=g)  # K = 2 references
    e = camlens.explain(m, x, "saliency", targets=Similarity(r))
    xr = x.clone().requires_grad_(True)
    emb = m(xr)
    for k in range(2):
        cos = (emb * r[k]).sum(1) / (emb.norm(dim=1) * r[k].norm())
        (gk,) = torch.autograd.grad(cos.sum(), xr, retain_graph=True)
        torch.testing.assert_close(e.raw[:, k], gk, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(e.scores[:, k], cos.detach())
    with torch.no_grad():
        own = m(x[:1])[0]
    with torch.no_grad():
        s = Similarity(own).bind(m(x[:1]))(m(x[:1]))
    assert float(s[0, 0]) == pytest.approx(1.0, abs=1e-6)
    # a reference image is embedded by the model: the image itself scores the maximum, 1
    e2 = camlens.explain(m, x, "gradcam", targets=Similarity(x[1]), layer="conv")
    assert float(e2.scores[1, 0]) == pytest.approx(1.0, abs=1e-5)
    assert float(e2.scores[0, 0]) < 1.0
    with pytest.raises(TargetError, match="dimensions"):
        Similarity(torch.ones(7))(m(x))


class Margin(Target):
    """A user target: the margin between two logits, K = 1 (the documented protocol)."""

    def __call__(self, output):
        return (output[:, 1] - output[:, 0])[:, None]


def test_user_target_protocol_and_classic_forms_still_work():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    e = camlens.explain(m, x, "saliency", targets=Margin())
    xr = x.clone().requires_grad_(True)
    out = m(xr)
    (g,) = torch.autograd.grad((out[:, 1] - out[:, 0]).sum(), xr)
    torch.testing.assert_close(e.raw[:, 0], g)
    assert e.classes.tolist() == [[-1], [-1]]
    # the classic forms are unchanged
    assert camlens.explain(m, x, "gradcam", targets=[2, 1]).classes.tolist() == [[2], [1]]
    assert camlens.explain(m, x, "gradcam", targets=lambda z: z[:, 0]).classes.tolist() == [[-1], [-1]]

    class Bad(Target):
        def __call__(self, output):
            return output[:, 0]

    with pytest.raises(TargetError, match=r"\(N, K\)"):
        camlens.explain(m, x, "gradcam", targets=Bad())


def test_zoo_task_models_default_layers_and_no_download():
    expected = {
        "fasterrcnn_mobilenet_v3_large_320_fpn": "backbone.body.16",
        "retinanet_resnet50_fpn": "backbone.body.layer4",
        "fcos_resnet50_fpn": "backbone.body.layer4",
        "ssdlite320_mobilenet_v3_large": "backbone.features.0",
        "fcn_resnet50": "backbone.layer4",
        "deeplabv3_mobilenet_v3_large": "backbone.16",
        "lraspp_mobilenet_v3_large": "backbone.16",
    }
    for name, layer in expected.items():
        m = load_model(name, "random")
        assert m.camlens.layer == layer, name
        assert dict(m.named_modules())[layer] is not None
        assert not m.training
        assert m.camlens.class_names and m.camlens.class_names[0] == "__background__"
    with pytest.raises(camlens.base.errors.WeightsNotFoundError, match="never downloads"):
        load_model("fcos_resnet50_fpn", None)
    with pytest.raises(camlens.base.errors.CamlensError, match="unexpected option"):
        load_model("resnet18", "random", min_size=3)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("retinanet_resnet50_fpn", dict(min_size=64, max_size=96, score_thresh=0.0, topk_candidates=20)),
        ("fcos_resnet50_fpn", dict(min_size=64, max_size=96, score_thresh=0.0, topk_candidates=20)),
        ("ssdlite320_mobilenet_v3_large", dict(score_thresh=0.0, topk_candidates=20, detections_per_img=10)),
    ],
)
def test_other_detectors_explain_their_boxes(name, kw):
    torch.manual_seed(0)
    m = load_model(name, "random", **kw)
    x = torch.rand(1, 3, 64, 96)
    e = camlens.explain(m, x, ["gradcam", "eigencam"], targets=Detection(score_threshold=0.0, max_boxes=2))
    assert e["gradcam"].maps.shape == (1, 2, 64, 96)
    assert torch.isfinite(e["gradcam"].maps).all() and torch.isfinite(e["eigencam"].maps).all()
    assert all(p.grad is None for p in m.parameters())


def test_segmenters_explain_by_default():
    for name in ("deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"):
        torch.manual_seed(0)
        m = load_model(name, "random")
        e = camlens.explain(m, torch.randn(1, 3, 64, 64), ["gradcam", "hirescam"])
        assert e["gradcam"].maps.shape == (1, 1, 64, 64)
        c = int(e["gradcam"].classes[0, 0])
        assert c > 0  # the largest predicted non-background class
        assert torch.isfinite(e["hirescam"].maps).all()


def test_detection_and_segmentation_figures(frcnn):
    from camlens.viz import patch_boxes

    img = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    e = camlens.explain(frcnn, img, "gradcam", targets=Detection(score_threshold=0.0, max_boxes=2))
    fig = e.figure()  # show() displays and returns None (issue 12 item 10)
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 2  # one panel per box
    for k, ax in enumerate(axes):
        want = [int(v) for v in np.round(e.extras["boxes"][0, k])]
        assert patch_boxes(ax) == [want]
        assert ax.get_title() == f"{e.class_names[int(e.classes[0, k])]} {float(e.scores[0, k]):.3g}"
    m = TinyFCN().eval()
    s = camlens.explain(m, torch.randn(1, 3, 8, 8), "gradcam", targets=Segmentation([1, 2]), layer="features")
    fig = s.figure()
    axes = [a for a in fig.axes if a.get_visible()]
    assert len(axes) == 2
    assert s.extras["masks"].shape == (1, 2, 8, 8)
    drawn = [bool(ax.collections) for ax in axes]  # the outline is a contour set
    has_region = [bool(s.extras["masks"][0, k].any() and not s.extras["masks"][0, k].all()) for k in range(2)]
    assert drawn == has_region


def test_references_made_under_inference_mode(frcnn):
    """Reference boxes / embeddings computed under inference_mode (the natural way to get them)
    used to raise 'Inference tensors cannot be saved for backward'."""
    x = torch.rand(1, 3, 64, 96)
    with torch.inference_mode():
        out = frcnn(x)
    e = camlens.explain(frcnn, x, "gradcam", targets=Detection(out[0]["boxes"][:1], out[0]["labels"][:1]))
    assert float(e.scores[0, 0]) > 0
    m = TinyEmbed().eval()
    with torch.inference_mode():
        ref = m(x[:, :, :8, :8])[0]
    e2 = camlens.explain(m, x[:, :, :8, :8], "saliency", targets=Similarity(ref))
    assert float(e2.scores[0, 0]) == pytest.approx(1.0, abs=1e-5)


def test_scorecam_with_a_target_object_equals_hand_loop():
    """Score-CAM scores each masked copy with the bound target of its own image."""
    m = TinyFCN().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    e = camlens.explain(m, x, "scorecam", targets=Segmentation(2), layer="features", dedupe=False)
    with torch.no_grad():
        out = m(x)
        t = Segmentation(2).bind(out)
        A = m.features(x)
        for n in range(2):
            w = []
            for c in range(A.shape[1]):
                a = A[n, c]
                h = (a - a.min()) / (a.max() - a.min()) if a.max() > a.min() else torch.zeros_like(a)
                w.append(t.take([n])(m(x[n : n + 1] * h))[0, 0])
            want = (torch.stack(w)[:, None, None] * A[n]).sum(0).relu()
            torch.testing.assert_close(e.raw[n, 0], want, rtol=1e-4, atol=1e-4)


def test_smoothgrad_and_ig_with_a_target_object():
    """Repeated batches (noisy copies, path points) are scored against their own image's target."""
    m = TinyEmbed().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 8, generator=g)
    r = torch.randn(2, 5, generator=g)
    sal = camlens.explain(m, x, "saliency", targets=Similarity(r))
    sg = camlens.explain(m, x, "smoothgrad", targets=Similarity(r), n_samples=3, noise_level=0.0)
    torch.testing.assert_close(sg.raw, sal.raw, rtol=1e-5, atol=1e-7)
    ig = camlens.explain(m, x, "integrated_gradients", targets=Similarity(r), steps=16)
    assert ig.raw.shape == sal.raw.shape and torch.isfinite(ig.raw).all()


def test_pixel_method_on_a_detector(frcnn):
    x = torch.rand(1, 3, 64, 96)
    e = camlens.explain(frcnn, x, "saliency", targets=Detection(score_threshold=0.0, max_boxes=1))
    assert e.raw.shape == (1, 1, 3, 64, 96) and float(e.raw.abs().sum()) > 0
    assert all(p.grad is None for p in frcnn.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_targets_and_black_box_on_cuda():
    torch.manual_seed(0)
    m = load_model("fasterrcnn_mobilenet_v3_large_320_fpn", "random", device="cuda", **FRCNN_KW)
    x = torch.rand(2, 3, 64, 96, device="cuda")
    for method in ("gradcam", "drise"):
        e = (
            camlens.explain(m, x, method, targets=Detection(score_threshold=0.0, max_boxes=2), n_masks=16)
            if (method == "drise")
            else camlens.explain(m, x, method, targets=Detection(score_threshold=0.0, max_boxes=2))
        )
        assert e.maps.device.type == "cuda" and torch.isfinite(e.maps).all()
    seg = TinyFCN().cuda().eval()
    e = camlens.explain(seg, torch.randn(1, 3, 8, 8, device="cuda"), "rise", targets=Segmentation(1), n_masks=16)
    assert e.maps.device.type == "cuda"
    emb = TinyEmbed().cuda().eval()
    xe = torch.randn(1, 3, 8, 8, device="cuda")
    e = camlens.explain(emb, xe, "gradcam", targets=Similarity(xe[0].cpu()), layer="conv")
    assert float(e.scores[0, 0]) == pytest.approx(1.0, abs=1e-4)


def test_task_model_weights_from_a_file(tmp_path):
    torch.manual_seed(0)
    a = load_model("lraspp_mobilenet_v3_large", "random")
    path = tmp_path / "seg.pth"
    torch.save(a.state_dict(), path)
    torch.manual_seed(1)
    b = load_model("lraspp_mobilenet_v3_large", str(path))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n
    assert "fasterrcnn_mobilenet_v3_large_320_fpn" in camlens.models.zoo.available_models()
    with pytest.raises(camlens.base.errors.CheckpointError):
        load_model("deeplabv3_mobilenet_v3_large", str(path))  # another architecture


def test_detection_batch_figure_draws_each_explained_box(frcnn):
    from camlens.viz import patch_boxes

    x = torch.rand(2, 3, 64, 96)
    e = camlens.explain(frcnn, x, "gradcam", targets=Detection(score_threshold=0.0, max_boxes=1))
    fig = e.figure()  # show() displays and returns None (issue 12 item 10)
    drawn = [patch_boxes(ax) for ax in fig.axes if ax.get_visible() and patch_boxes(ax)]
    want = [[[int(v) for v in np.round(e.extras["boxes"][i, 0])]] for i in range(2)]
    assert drawn == want
    one = e.select([1])
    assert one.extras["boxes"].shape == (1, 1, 4)
    np.testing.assert_array_equal(one.extras["boxes"][0], e.extras["boxes"][1])


def test_detection_with_probability_vectors_is_drise_similarity():
    """With "probs" (D, C) and "objectness" (D,), the score is IoU x cos(one-hot, p) x objectness."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 15.0]])
    probs = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4]])
    obj = torch.tensor([0.9, 0.6])
    out = [
        {"boxes": boxes, "labels": probs.argmax(1), "scores": probs.max(1).values, "probs": probs, "objectness": obj}
    ]
    ref = torch.tensor([[0.0, 0.0, 10.0, 12.0]])
    t = Detection(ref, [2], iou=0.0).bind(out)
    iou = tv_box_iou(ref, boxes)[0]
    cos = probs[:, 2] / probs.norm(dim=1)
    assert float(t(out)[0, 0]) == pytest.approx(float((iou * cos * obj).max()), rel=1e-6)


def test_cam_on_a_detector_or_segmenter_is_a_clear_error(frcnn):
    with pytest.raises(camlens.base.errors.HeadError, match="logits"):  # a detector has linear layers, no classifier
        camlens.explain(frcnn, torch.rand(1, 3, 64, 96), "cam", targets=Detection(score_threshold=0.0))
    with pytest.raises(camlens.base.errors.HeadError, match="gradcam"):
        camlens.explain(TinyFCN().eval(), torch.randn(1, 3, 8, 8), "cam", targets=Segmentation(1), layer="features")
