"""Ultralytics YOLO (v8, v11) through the detector adapter: detections equal ``YOLO.predict``'s on
letterboxed, non-square images mapped back to their pixels; Grad-CAM of one detection equals a
plain-autograd reference at the captured neck layer; a detection's map does not depend on its batch;
``layer=`` picks a neck output; hygiene; no socket opened, nothing written; clear errors.

Models are built from Ultralytics' bundled yaml files (random weights, nothing downloaded). A random
YOLO's activations fade layer after layer (BatchNorm's running variance is 1), so every score would
be ~1e-4: the tests first set each BatchNorm's statistics from four random images (``calibrate``)
and set the class bias, which gives scores spread over (0, 1)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import camlens
from camlens.base.errors import CamlensError, TargetError
from camlens.models.detectors import YoloAdapter, load_yolo
from camlens.targets import Detection

if importlib.util.find_spec("ultralytics") is None:  # not importorskip: importing it at collection patches PIL
    pytest.skip("needs camlens[yolo] (Ultralytics)", allow_module_level=True)
from camlens.models.detectors.yolo import ultralytics_yolo

IMGSZ = 320
CONF = 0.1  # the calibrated random networks' scores: a few to ~100 detections per image


def calibrate(net: torch.nn.Module, bias: float = -4.0, seed: int = 0) -> torch.nn.Module:
    """BatchNorm statistics from four random 256x320 images; class bias ``bias``; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batch
        net.train()
        net(torch.rand(4, 3, 256, 320, generator=g))
        net.eval()
        for seq in net.model[-1].cv3:
            seq[-1].bias.fill_(bias)
    return net


#: the class bias that gives each calibrated random network a few to ~100 detections at CONF
BIAS = {"yolov8n.yaml": -4.0, "yolo11n.yaml": -6.0}


@pytest.fixture(scope="module", params=["yolov8n.yaml", pytest.param("yolo11n.yaml", marks=pytest.mark.slow)])
def yolo(request):
    torch.manual_seed(0)
    y = ultralytics_yolo()(request.param)
    calibrate(y.model, BIAS[request.param])
    # what predict() runs: conv + BN fused, weights in channels-last memory format (its backend's
    # copy); the same kernels on both sides, so the same floats (another layout rounds otherwise)
    y.model.fuse(verbose=False).to(memory_format=torch.channels_last)
    return y


@contextlib.contextmanager
def one_thread():
    """One torch thread (what ``YOLO.predict`` sets, process-wide), the caller's count restored."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _photo(h: int, w: int, seed: int, block: int = 1) -> np.ndarray:
    """A random RGB uint8 photo; ``block=2``: constant 2x2 blocks, so a 2x downscale is exact
    (bilinear and OpenCV's resize then agree to the bit)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((h // block, w // block, 3)) * 255).astype(np.uint8)
    return small.repeat(block, 0).repeat(block, 1)


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


def test_importing_ultralytics_leaves_pil_image_open_alone():
    """Ultralytics replaces PIL.Image.open at import (an unreadable image then tries to install
    pi-heif): camlens' import of it puts the user's opener back."""
    from PIL import Image

    before = Image.open
    ultralytics_yolo()
    assert Image.open is before and Image.open.__module__ == "PIL.Image"


def test_importing_ultralytics_leaves_numpy_and_torch_print_options_alone(tmp_path):
    """Ultralytics sets a float formatter for numpy and torch at import (it changed a repr-based
    digest in compare's resume, CI stop 34): camlens' import of it puts the user's options back."""
    code = (
        "import numpy as np, torch\n"
        "np.set_printoptions(precision=3); torch.set_printoptions(precision=6)\n"
        "a, t = np.get_printoptions(), torch._tensor_str.get_printoptions()\n"
        "from camlens.models.detectors.yolo import ultralytics_yolo\n"
        "ultralytics_yolo()\n"
        "import ultralytics.utils\n"  # imported: the import-time settings ran
        "assert np.get_printoptions() == a, np.get_printoptions()\n"
        "assert torch._tensor_str.get_printoptions() == t, torch._tensor_str.get_printoptions()\n"
        "print('ok')\n"
    )
    env = {**os.environ, "YOLO_CONFIG_DIR": str(tmp_path), "PYTHONPATH": str(Path(camlens.__file__).parents[1])}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


@pytest.mark.parametrize(
    ("h", "w", "block"),
    [(250, 320, 1), (500, 640, 2)],
    ids=["padded-only", "downscaled-2x"],
)
def test_detections_equal_yolo_predict(yolo, h, w, block):
    """Letterboxed (250x320 -> padded to 256x320; 500x640 -> 250x320 -> 256x320), boxes mapped
    back to the photo's pixels: equal to ``YOLO.predict`` (BGR input, as it expects) to 1e-4 px."""
    img = _photo(h, w, seed=h, block=block)
    ad = load_yolo(yolo, imgsz=IMGSZ, conf=CONF)
    with one_thread():  # predict() sets torch's thread count to 1 (another reduction order rounds otherwise)
        ref = yolo.predict(img[..., ::-1].copy(), imgsz=IMGSZ, conf=CONF, verbose=False)[0].boxes
        with torch.no_grad():
            ours = ad.eval()(_tensor(img)[None])[0]
    assert len(ref) >= 3  # real detections, not an empty list
    assert ours["labels"].tolist() == ref.cls.long().tolist()
    torch.testing.assert_close(ours["boxes"], ref.xyxy, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["scores"], ref.conf, atol=1e-5, rtol=0)
    assert float(ours["boxes"][:, 2].max()) <= w and float(ours["boxes"][:, 3].max()) <= h


def _reference_gradcam(ad: YoloAdapter, image: torch.Tensor, layer: str):
    """Grad-CAM by hand: the best kept candidate (highest class score above conf), d score / d
    features at ``layer`` by plain autograd on the head's raw output."""
    feats = {}
    mod = dict(ad.named_modules())[layer]
    handle = mod.register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        x, _ = ad.transform([image.clone().requires_grad_(True)])  # a fused YOLO's weights need no grad
        y = ad.net(x)[0]  # (1, 4 + C, A)
    finally:
        handle.remove()
    cls = y[0, 4:]
    c, a = divmod(int(cls.detach().flatten().argmax()), cls.shape[1])
    A = feats["A"]
    (G,) = torch.autograd.grad(cls[c, a], A)
    return (G.mean((2, 3), keepdim=True) * A).sum(1).relu()[0].detach(), float(cls[c, a].detach())


def test_gradcam_of_one_detection_equals_autograd_reference(yolo):
    ad = load_yolo(yolo, imgsz=160, conf=CONF)
    image = _tensor(_photo(120, 160, seed=1))
    e = camlens.explain(ad, image[None], "gradcam", targets=Detection(score_threshold=0.0, max_boxes=1))
    layer = ad.camlens.layer
    assert layer == f"net.model.{yolo.model.model[-1].f[0]}"  # the P3 neck output feeding the head
    ref, score = _reference_gradcam(ad, image, layer)
    assert 0.05 < score < 0.9999  # a score whose gradient is not rounded away
    assert float(e.scores[0, 0]) == pytest.approx(score, abs=1e-6)
    assert float(ref.max()) > 0
    torch.testing.assert_close(e.raw[0, 0], ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4)
    assert e.maps.shape == (1, 1, 120, 160)


def test_same_detection_alone_and_in_a_batch_of_other_sizes(yolo):
    """``rect=False``: every image letterboxed to 320x320, as predict does for images of different
    sizes; then a detection's map is the same alone and in a batch."""
    ad = load_yolo(yolo, imgsz=160, conf=CONF, rect=False)
    a, b = _tensor(_photo(120, 160, seed=2)), _tensor(_photo(100, 80, seed=3))
    own = Detection(score_threshold=0.0, max_boxes=2)
    alone = camlens.explain(ad, a[None], "gradcam", targets=own)
    both = camlens.explain(ad, [a, b], "gradcam", targets=own)
    assert float(alone.maps.abs().max()) > 0
    torch.testing.assert_close(both.maps[0, :, :120, :160], alone.maps[0], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(both.extras["boxes"][0], alone.extras["boxes"][0], atol=1e-3)  # batched conv rounding


def test_layer_picks_a_neck_output_and_the_default_is_stated(yolo):
    ad = load_yolo(yolo, imgsz=160, conf=CONF)
    necks = ad.camlens.extra["neck_layers"]
    assert list(necks) == ["P3/8", "P4/16", "P5/32"]
    assert "P3/8" in ad.camlens.extra["layer_choice"]
    x = _tensor(_photo(120, 160, seed=4))[None]
    own = Detection(score_threshold=0.0, max_boxes=1)
    p3 = camlens.explain(ad, x, "gradcam", targets=own)
    p5 = camlens.explain(ad, x, "gradcam", targets=own, layer=necks["P5/32"])
    assert p5.layer == f"output of {necks['P5/32']}" and p3.layer == f"output of {necks['P3/8']}"
    assert "P3/8" in p3.extras["layer_choice"] and "layer_choice" not in p5.extras  # the default, and why
    assert p3.raw.shape[-2:] == (16, 20) and p5.raw.shape[-2:] == (4, 5)  # strides 8 and 32 of 128x160


def test_hygiene(yolo):
    ad = load_yolo(yolo, imgsz=160, conf=CONF)
    net = yolo.model
    x = _tensor(_photo(120, 160, seed=5))[None]
    with torch.no_grad():
        before = ad.eval()(x)[0]["boxes"].clone()
    net.train()
    flags = {n: m.training for n, m in net.named_modules()}
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    camlens.explain(ad, x, ["gradcam", "saliency"], targets=Detection(score_threshold=0.0, max_boxes=1))
    assert {n: m.training for n, m in net.named_modules()} == flags
    assert {n: p.requires_grad for n, p in net.named_parameters()} == grads
    assert all(p.grad is None for p in net.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    with torch.no_grad():
        assert torch.equal(ad.eval()(x)[0]["boxes"], before)


@pytest.mark.slow
def test_pt_checkpoint_and_yaml_through_load_model(tmp_path):
    torch.manual_seed(0)
    y = ultralytics_yolo()("yolov8n.yaml")
    calibrate(y.model)
    path = tmp_path / "best.pt"
    y.save(str(path))
    m = camlens.load_model(f"yolo:{path}", imgsz=160)
    assert isinstance(m, YoloAdapter) and not m.training and m.camlens.extra["detector"] == "YOLO"
    ref = load_yolo(ultralytics_yolo()(str(path)), imgsz=160).eval()
    x = torch.rand(1, 3, 120, 160, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = m(x)[0], ref(x)[0]
    assert len(a["boxes"]) > 0 and torch.equal(a["boxes"], b["boxes"])
    r = camlens.load_model("yolo:yolov8n.yaml", imgsz=160)
    assert r.camlens.extra["weights"] == "random"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("yolo:model.engine", "exported YOLO model"),
        ("yolo:best_openvino_model/", "exported YOLO model"),
        ("yolo:missing.pt", "no such file. camlens never downloads"),
        ("yolo:weights.pth", "expected a .pt checkpoint or a model .yaml"),
    ],
)
def test_load_errors(spec, match):
    with pytest.raises(CamlensError, match=match):
        camlens.load_model(spec)


def test_no_detection_above_conf_is_a_clear_error(yolo):
    ad = load_yolo(yolo, imgsz=160, conf=0.9999)
    with pytest.raises(TargetError, match=r"conf=0\.9999"):
        camlens.explain(ad, _tensor(_photo(120, 160, seed=6))[None], "gradcam")


def test_a_box_with_an_unknown_label_is_a_clear_error(yolo):
    ad = load_yolo(yolo, imgsz=160, conf=CONF)
    with pytest.raises(TargetError, match="label 80 is not a class of this detector: it has 80 classes"):
        camlens.explain(ad, torch.rand(1, 3, 128, 160), "gradcam", targets=Detection([[4, 4, 60, 60]], [80]))


@pytest.mark.slow
def test_no_socket_opened_and_nothing_written(tmp_path):
    """A fresh interpreter with every way to the network refused: importing Ultralytics through
    camlens, building a YOLO from its yaml and explaining it open no socket; the call writes nothing
    (Ultralytics' own settings file appears in YOLO_CONFIG_DIR at its first import, and only there)."""
    script = textwrap.dedent(
        """
        import json, os, socket, sys
        touched = []
        def refuse(*a, **k):  # recorded: a caller may swallow the error (an "am I online?" probe)
            touched.append(repr(a[:2]))
            raise OSError("test: the network was touched")
        socket.socket.connect = socket.socket.connect_ex = refuse
        socket.getaddrinfo = socket.create_connection = refuse
        import torch, camlens
        from camlens.targets import Detection
        m = camlens.load_model("yolo:yolov8n.yaml", imgsz=128, conf=0.0)
        before = sorted(os.listdir("."))
        own = Detection(score_threshold=0.0, max_boxes=1)
        e = camlens.explain(m, torch.rand(1, 3, 96, 128), "gradcam", targets=own)
        after = sorted(os.listdir("."))
        print(json.dumps({"shape": list(e.maps.shape), "before": before, "after": after, "touched": touched}))
        """
    )
    cfg = tmp_path / "cfg"
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "YOLO_CONFIG_DIR": str(cfg),
        "PYTHONPATH": str(Path(camlens.__file__).parents[1]),
    }
    env.pop("YOLO_OFFLINE", None)  # camlens sets it
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["touched"] == []
    assert res["shape"] == [1, 1, 96, 128]
    assert res["before"] == res["after"] == []
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert all(w.startswith("cfg") for w in written), written


@pytest.mark.slow
def test_cli_explains_a_yolo_per_detection(tmp_path):
    """``camlens explain --model yolo:yolov8n.yaml photo.png``: the top detections listed with label,
    score and box, one overlay per detection, boxes in the photo's pixels; ``--target box:`` too."""
    from click.testing import CliRunner
    from PIL import Image

    from camlens.cli import main

    Image.fromarray(_photo(120, 160, seed=7)).save(tmp_path / "photo.png")
    args = ["explain", "--model", "yolo:yolov8n.yaml", str(tmp_path / "photo.png"), "--topk", "2"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "label" in r.output and "score" in r.output and "box" in r.output
    d = json.loads((tmp_path / "o" / "photo_gradcam.json").read_text())
    assert len(d["explained_boxes"]) == 2
    assert all(0 <= b[0] < b[2] <= 160 and 0 <= b[1] < b[3] <= 120 for b in d["explained_boxes"])
    assert (tmp_path / "o" / "photo_gradcam_top1.png").exists() and (tmp_path / "o" / "photo_gradcam_top2.png").exists()
    r = CliRunner().invoke(
        main, [*args[:4], "--out", str(tmp_path / "o2"), "--target", "box:10,20,100,90:3"], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o2" / "photo_gradcam.json").read_text())
    assert d["explained_boxes"] == [[10.0, 20.0, 100.0, 90.0]] and d["class_names"] == ["3"]


@pytest.mark.slow
def test_segmentation_model_boxes_equal_predict():
    """A YOLO segmentation model (``yolov8n-seg.yaml``): its boxes, labels and scores as a detector's,
    equal to ``YOLO.predict``'s (its masks: test_detectors_yolo_tasks)."""
    torch.manual_seed(0)
    y = ultralytics_yolo()("yolov8n-seg.yaml")
    calibrate(y.model)
    y.model.fuse(verbose=False).to(memory_format=torch.channels_last)
    img = _photo(250, 320, seed=8)
    ad = load_yolo(y, imgsz=IMGSZ, conf=CONF)
    with one_thread():
        ref = y.predict(img[..., ::-1].copy(), imgsz=IMGSZ, conf=CONF, verbose=False)[0].boxes
        with torch.no_grad():
            ours = ad.eval()(_tensor(img)[None])[0]
    assert len(ref) >= 3
    assert ours["labels"].tolist() == ref.cls.long().tolist()
    torch.testing.assert_close(ours["boxes"], ref.xyxy, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["scores"], ref.conf, atol=1e-5, rtol=0)
