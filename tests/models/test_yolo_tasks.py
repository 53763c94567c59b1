"""Ultralytics YOLO segmentation and classification models, and the refusals (pose, OBB, exported
files). Oracles: ``YOLO.predict`` (instance masks with ``retina_masks=True``, i.e. in the photo's
pixels; classification ``probs``), Grad-CAM against plain autograd on the raw network output at a
hooked layer, the hygiene snapshot of test_core_hygiene. Random weights, BatchNorm calibrated as in
test_detectors_yolo (scores of order one)."""

from __future__ import annotations

import importlib.util
import json
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import camlens
from camlens.base.errors import CamlensError, TargetError
from camlens.models.detectors import load_yolo
from camlens.targets import Detection, InstanceMask
from tests.api.test_hygiene import assert_untouched, snapshot
from tests.targets.test_empty_targets import TinyDetector

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: importing it at collection patches PIL
    pytest.skip("needs camlens[yolo] (Ultralytics)", allow_module_level=True)
from camlens.models.detectors.yolo import YoloClassifier, ultralytics_yolo
from tests.models.test_yolo import _photo, _tensor, calibrate, one_thread

CONF = 0.1


def _seg(yaml: str, bias: float = -4.0):
    torch.manual_seed(0)
    y = ultralytics_yolo()(yaml)
    calibrate(y.model, bias)
    y.model.fuse(verbose=False).to(memory_format=torch.channels_last)  # what predict runs (same kernels)
    return y


@pytest.fixture(scope="module")
def seg():
    return _seg("yolov8n-seg.yaml")


@pytest.mark.parametrize(
    ("h", "w", "block", "imgsz"),
    [(250, 320, 1, 320), (500, 640, 2, 320), (160, 128, 1, 160)],
    ids=["padded-3px", "downscaled-2x", "unpadded"],
)
def test_instance_masks_equal_predict(seg, h, w, block, imgsz):
    """Masks, boxes, labels and scores equal ``predict(retina_masks=True)`` to the pixel: a
    letterbox padded by 3 px (prototypes upsampled 4x before the crop), a 2x downscaled photo
    mapped back, and an unpadded frame (prototypes cropped and resized directly)."""
    img = _photo(h, w, seed=h + 1, block=block)
    ad = load_yolo(seg, imgsz=imgsz, conf=CONF)
    with one_thread():
        ref = seg.predict(img[..., ::-1].copy(), imgsz=imgsz, conf=CONF, verbose=False, retina_masks=True)[0]
        with torch.no_grad():
            ours = ad.eval()(_tensor(img)[None])[0]
    assert len(ref.boxes) >= 3
    assert ours["labels"].tolist() == ref.boxes.cls.long().tolist()
    torch.testing.assert_close(ours["boxes"], ref.boxes.xyxy, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["scores"], ref.boxes.conf, atol=1e-5, rtol=0)
    assert ours["masks"].shape == (len(ref.boxes), h, w)
    assert torch.equal(ours["masks"], ref.masks.data.bool())
    assert int(ours["masks"].sum()) > 100


@pytest.mark.slow
def test_yolo11_instance_masks_equal_predict():
    y = _seg("yolo11n-seg.yaml", -4.0)
    img = _photo(250, 320, seed=9)
    with one_thread():
        ref = y.predict(img[..., ::-1].copy(), imgsz=320, conf=CONF, verbose=False, retina_masks=True)[0]
        with torch.no_grad():
            ours = load_yolo(y, imgsz=320, conf=CONF).eval()(_tensor(img)[None])[0]
    assert len(ref.boxes) >= 3 and ours["labels"].tolist() == ref.boxes.cls.long().tolist()
    assert torch.equal(ours["masks"], ref.masks.data.bool())


def test_instance_mask_gradcam_equals_plain_autograd(seg):
    """Grad-CAM of one instance's mask score sum_p M(p) m(p), by hand: the instance's mask
    coefficients and the prototypes from the raw network output, the logits upsampled 4x to the
    128x160 letterbox (126x160 photo, 1 px of padding above) and cropped, summed over its mask."""
    ad = load_yolo(seg, imgsz=160, conf=CONF)
    image = _tensor(_photo(126, 160, seed=1))
    e = camlens.explain(ad, image[None], "gradcam", targets=InstanceMask(score_threshold=0.0, max_boxes=1))
    layer = ad.camlens.layer
    with torch.no_grad():
        det = ad(image[None])[0]
    c = int(det["candidate"][0])
    M = det["masks"][0].float()
    assert torch.equal(torch.as_tensor(e.extras["masks"][0, 0]), det["masks"][0])
    feats = {}
    handle = dict(ad.named_modules())[layer].register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        x, frames = ad.transform([image.clone().requires_grad_(True)])
        (y, protos) = ad.net(x)[0]
    finally:
        handle.remove()
    assert frames.padded == (128, 160) and frames.offsets == [(1, 0)]
    coeffs = y[0, 4 + 80 :, c]  # (32,)
    logits = (coeffs @ protos[0].reshape(32, -1)).reshape(1, 1, 32, 40)
    logits = F.interpolate(logits, size=(128, 160), mode="bilinear", align_corners=False)[0, 0, 1:127]
    score = (M * logits).sum()
    assert float(e.scores[0, 0]) == pytest.approx(float(score), rel=1e-5)
    A = feats["A"]
    (G,) = torch.autograd.grad(score, A)
    cam = (G.mean((2, 3), keepdim=True) * A).sum(1).relu()[0].detach()
    assert float(cam.max()) > 0
    torch.testing.assert_close(e.raw[0, 0], cam, atol=1e-5 * float(cam.abs().max()), rtol=1e-4)


def test_instance_mask_on_a_box_detector_is_a_clear_error():
    with pytest.raises(TargetError, match="InstanceMask explains an instance segmenter"):
        camlens.explain(TinyDetector(), torch.rand(1, 3, 16, 16), "gradcam", targets=InstanceMask(), layer="conv")


def test_segmentation_hygiene_and_no_socket(seg, monkeypatch):
    touched: list[str] = []

    def refuse(*a, **k):
        touched.append(repr(a[:2]))
        raise OSError("test: the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ad = load_yolo(seg, imgsz=160, conf=CONF)
    x = _tensor(_photo(120, 160, seed=5))[None]
    with torch.no_grad():
        before_out = ad.eval()(x)[0]
    seg.model.train()
    try:
        before = snapshot(seg.model)
        camlens.explain(ad, x, ["gradcam", "saliency"], targets=InstanceMask(score_threshold=0.0, max_boxes=1))
        assert_untouched(seg.model, before)
    finally:
        seg.model.eval()
    with torch.no_grad():
        after_out = ad.eval()(x)[0]
    assert torch.equal(before_out["masks"], after_out["masks"]) and torch.equal(before_out["boxes"], after_out["boxes"])
    assert touched == []


@pytest.fixture(scope="module")
def cls():
    torch.manual_seed(0)
    y = ultralytics_yolo()("yolov8n-cls.yaml")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in y.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        y.model.train()
        y.model(torch.rand(4, 3, 64, 64, generator=g))
        y.model.eval()
    return y


def test_classifier_topk_equals_predict_and_gradcam_equals_autograd(cls):
    m = load_yolo(cls, imgsz=64)
    assert isinstance(m, YoloClassifier) and m.camlens.class_names == [cls.names[i] for i in range(1000)]
    img = _photo(80, 64, seed=3)  # shorter side 64: predict centre-crops 64x64, as the card says
    with one_thread():
        ref = cls.predict(img[..., ::-1].copy(), imgsz=64, verbose=False)[0].probs
    e = camlens.explain(m, img, "gradcam", targets="top5")
    assert e.classes[0].tolist() == list(ref.top5)
    np.testing.assert_allclose(e.probs[0].numpy(), ref.data[list(ref.top5)].numpy(), rtol=1e-5)
    layer = m.camlens.layer
    assert e.layer == f"output of {layer}" and layer == "net.model.9.conv"
    x = m.camlens.preprocess([img])
    feats = {}
    handle = dict(m.named_modules())[layer].register_forward_hook(lambda mod, a, o: feats.setdefault("A", o))
    try:
        logits = cls.model(x)[1]
    finally:
        handle.remove()
    A = feats["A"]
    (G,) = torch.autograd.grad(logits[0, ref.top1], A)
    cam = (G.mean((2, 3), keepdim=True) * A).sum(1).relu()[0].detach()
    assert float(cam.max()) > 0
    torch.testing.assert_close(e.raw[0, 0], cam, atol=1e-5 * float(cam.abs().max()), rtol=1e-4)


def test_classifier_through_load_model_and_hygiene(cls, tmp_path):
    m = camlens.load_model("yolo:yolov8n-cls.yaml", imgsz=64)
    assert isinstance(m, YoloClassifier) and m.camlens.extra["weights"] == "random" and not m.training
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = cls.model(x)[1].clone()
    before = snapshot(cls.model)
    camlens.explain(cls, x, ["gradcam", "saliency"], targets=[3])  # a YOLO object passed directly
    assert_untouched(cls.model, before)
    with torch.no_grad():
        assert torch.equal(cls.model(x)[1], logits)
    with pytest.raises(CamlensError, match="imgsz= only"):
        load_yolo(cls, conf=0.3)


@pytest.mark.parametrize("yaml", ["yolov8n-pose.yaml", "yolov8n-obb.yaml"])
def test_pose_and_obb_are_refused_naming_what_is_supported(yaml):
    y = ultralytics_yolo()(yaml)
    with pytest.raises(CamlensError, match="detection, segmentation and classification.*pose and OBB"):
        load_yolo(y)


@pytest.mark.parametrize("spec", ["yolo:best.onnx", "yolo:best.tflite", "yolo:best.engine", "yolo:best.torchscript"])
def test_exported_files_are_refused_naming_the_fix(spec):
    with pytest.raises(CamlensError, match=r"exported YOLO model.*Pass the PyTorch checkpoint.*yolo:best\.pt"):
        camlens.load_model(spec)


def test_box_target_with_an_unknown_label_on_a_segmenter(seg):
    ad = load_yolo(seg, imgsz=160, conf=CONF)
    with pytest.raises(TargetError, match="label 80 is not a class of this detector"):
        camlens.explain(ad, torch.rand(1, 3, 128, 160), "gradcam", targets=Detection([[4, 4, 60, 60]], [80]))


@pytest.mark.slow
def test_cli_explains_a_yolo_classifier_by_class(tmp_path):
    """``camlens explain --model yolo:yolov8n-cls.yaml``: the classifier path (top-k classes), not
    the detector's boxes."""
    from click.testing import CliRunner
    from PIL import Image

    from camlens.cli import main

    Image.fromarray(_photo(64, 64, seed=7)).save(tmp_path / "photo.png")
    args = ["explain", "--model", "yolo:yolov8n-cls.yaml", str(tmp_path / "photo.png"), "--topk", "2"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o" / "photo_gradcam.json").read_text())
    assert d["ranks"] == [1, 2] and "explained_boxes" not in d and d["layer"] == "output of net.model.9.conv"
