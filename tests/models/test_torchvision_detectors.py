"""torchvision's detectors through the detector adapter (camlens.models.detectors.torchvision).

Oracles: torchvision's own ``model(images)`` in eval mode (the adapter re-does its post-processing
on the raw candidates: same boxes, labels and scores on two non-square images of different sizes,
resized and padded differently); Grad-CAM of one detection against plain autograd on torchvision's
own output score of that detection, at a hooked layer; the hygiene snapshot of test_core_hygiene."""

from __future__ import annotations

import socket

import pytest
import torch

import camlens
from camlens.base.errors import CamlensError, TargetError
from camlens.models.detectors import TorchvisionAdapter, as_detector, is_detector
from camlens.models.tasks import keep_all_detections
from camlens.models.zoo import load_model
from camlens.targets import Detection
from tests.api.test_hygiene import assert_untouched, snapshot
from tests.targets.test_tasks import FRCNN_KW, _calibrate_batchnorm

FCOS_KW = dict(min_size=64, max_size=96, score_thresh=0.05, topk_candidates=20, detections_per_img=20)
RETINA_KW = dict(min_size=64, max_size=96, score_thresh=0.0, topk_candidates=20, detections_per_img=20)
SSD_KW = dict(score_thresh=0.0, topk_candidates=20, detections_per_img=10)


def _images() -> list[torch.Tensor]:
    """Two non-square images of different sizes: resized differently, padded to one batch."""
    g = torch.Generator().manual_seed(7)
    return [torch.rand(3, 64, 96, generator=g), torch.rand(3, 80, 60, generator=g)]


@pytest.fixture(scope="module")
def frcnn():
    """Faster R-CNN (MobileNetV3 FPN), random weights, BatchNorm calibrated and class logits
    sharpened as in test_targets_tasks, so features and scores are of order one."""
    torch.manual_seed(0)
    m = load_model("fasterrcnn_mobilenet_v3_large_320_fpn", "random", **FRCNN_KW)
    _calibrate_batchnorm(m)
    with torch.no_grad():
        m.roi_heads.box_predictor.cls_score.weight.mul_(10)
    return m


@pytest.fixture(scope="module")
def fcos():
    torch.manual_seed(0)
    return load_model("fcos_resnet50_fpn", "random", **FCOS_KW)


def _equal_outputs(model: torch.nn.Module) -> None:
    imgs = _images()
    with torch.no_grad():
        want = model(imgs)
        got = as_detector(model)(imgs)
    for w, g, im in zip(want, got, imgs):
        assert len(w["boxes"]) >= 3  # real detections, not an empty list
        assert g["labels"].tolist() == w["labels"].tolist()
        torch.testing.assert_close(g["boxes"], w["boxes"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["scores"], w["scores"], atol=1e-6, rtol=0)
        assert float(g["boxes"][:, 2].max()) <= im.shape[-1] and float(g["boxes"][:, 3].max()) <= im.shape[-2]
    assert want[0]["boxes"].shape != want[1]["boxes"].shape or not torch.equal(want[0]["boxes"], want[1]["boxes"])


def test_faster_rcnn_adapter_equals_torchvision_forward(frcnn):
    assert len({int(v) for v in frcnn(_images())[0]["labels"]}) >= 2  # labels vary (sharpened head)
    _equal_outputs(frcnn)


@pytest.mark.slow
def test_fcos_adapter_equals_torchvision_forward(fcos):
    _equal_outputs(fcos)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kw"), [("retinanet_resnet50_fpn", RETINA_KW), ("ssdlite320_mobilenet_v3_large", SSD_KW)]
)
def test_retinanet_and_ssd_adapters_equal_torchvision_forward(name, kw):
    torch.manual_seed(0)
    _equal_outputs(load_model(name, "random", **kw))


def _reference_gradcam(model: torch.nn.Module, x: torch.Tensor, layer: str, box: torch.Tensor, label: int):
    """Grad-CAM by hand through torchvision's own forward: the detection with this box and label,
    d score / d features by plain autograd, mapped to the photo as the padded frame says."""
    feats = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        out = model(x)[0]
    finally:
        handle.remove()
    j = int(((out["boxes"] - box).abs().sum(1) + 1e9 * (out["labels"] != label)).argmin())
    torch.testing.assert_close(out["boxes"][j].detach(), box, atol=1e-4, rtol=0)
    A = feats["A"]
    (G,) = torch.autograd.grad(out["scores"][j], A)
    cam = (G.mean((2, 3), keepdim=True) * A).sum(1, keepdim=True).detach()  # signed: relu=False
    return cam, float(out["scores"][j].detach())


@pytest.mark.parametrize("name", ["frcnn", pytest.param("fcos", marks=pytest.mark.slow)])
def test_gradcam_of_one_detection_equals_plain_autograd(name, request):
    model = request.getfixturevalue(name)
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(4))  # padded to 64x96 (frcnn)
    own = Detection(score_threshold=0.0, max_boxes=1)
    e = camlens.explain(model, x, "gradcam", targets=own, relu=False)  # signed (a random FCOS's map is negative)
    layer = model.camlens.layer
    assert e.layer == f"output of {layer}"
    cam, score = _reference_gradcam(model, x, layer, torch.as_tensor(e.extras["boxes"][0, 0]), int(e.classes[0, 0]))
    assert float(e.scores[0, 0]) == pytest.approx(score, rel=1e-5)
    assert 0.05 < score < 0.9999 and float(cam.abs().max()) > 1e-4
    torch.testing.assert_close(e.raw[0, 0], cam[0, 0], rtol=1e-4, atol=1e-5 * float(cam.abs().max()))


def test_hygiene_and_no_socket(frcnn, monkeypatch):
    touched: list[str] = []

    def refuse(*a, **k):
        touched.append(repr(a[:2]))
        raise OSError("test: the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before_out = frcnn(x)[0]
    frcnn.train()
    frcnn.backbone.eval()  # a mix of modes, as the user may leave it
    try:
        before = snapshot(frcnn)
        camlens.explain(frcnn, x, ["gradcam", "saliency"], targets=Detection(score_threshold=0.0, max_boxes=1))
        assert_untouched(frcnn, before)
        assert frcnn.training and not frcnn.backbone.training
    finally:
        frcnn.eval()
    with torch.no_grad():
        after_out = frcnn(x)[0]
    assert torch.equal(before_out["boxes"], after_out["boxes"]) and torch.equal(
        before_out["scores"], after_out["scores"]
    )
    assert touched == []


def test_adapter_keeps_torchvision_layer_names_and_thresholds(frcnn):
    ad = as_detector(frcnn)
    assert isinstance(ad, TorchvisionAdapter) and is_detector(frcnn)
    names = dict(ad.named_modules())
    assert names["backbone.body.16"] is frcnn.backbone.body._modules["16"]
    assert not any(n.startswith("net.") for n in names)
    assert ad.camlens is frcnn.camlens  # the zoo card: class names, default layer
    assert {k for k in ad.state_dict()} == {k for k in frcnn.state_dict()}
    # thresholds are read from the detector when it runs
    old = frcnn.roi_heads.score_thresh
    try:
        frcnn.roi_heads.score_thresh = 0.3
        assert ad.score_thresh == 0.3
        keep_all_detections(ad)
        assert frcnn.roi_heads.score_thresh == 0.0
        frcnn.roi_heads.score_thresh = 0.9999
        with pytest.raises(TargetError, match=r"keeps scores > 0\.9999: load it with box_score_thresh="):
            camlens.explain(frcnn, torch.rand(1, 3, 64, 96), "gradcam")
    finally:
        frcnn.roi_heads.score_thresh = old
    with pytest.raises(CamlensError, match="no adapter options"):
        as_detector(frcnn, conf=0.5)


def test_a_box_with_an_unknown_label_is_a_clear_error(frcnn):
    with pytest.raises(TargetError, match="label 91 is not a class of this detector: it has 91 classes"):
        camlens.explain(frcnn, torch.rand(1, 3, 64, 96), "gradcam", targets=Detection([[4, 4, 40, 40]], [91]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"])
def test_mask_and_keypoint_rcnn_boxes_equal_torchvision_forward(name):
    """User-built Mask R-CNN and Keypoint R-CNN (not in the zoo): their boxes, labels and scores."""
    import torchvision

    torch.manual_seed(0)
    kw = dict(min_size=64, max_size=96, box_score_thresh=0.0, rpn_post_nms_top_n_test=30, box_detections_per_img=20)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw).eval()
    assert is_detector(model)
    _equal_outputs(model)
