"""``camlens explain`` with detectors: ``--target box:x0,y0,x1,y1[:label]`` for a DETR saved in a
folder (``hf:FOLDER``) and an Ultralytics YOLO (``yolo:yolov8n.yaml``, random weights) gives the map
``camlens.explain`` gives for the same box; ``--score-threshold`` selects the detections; a store of
a folder of images of different sizes has one row per detection; panels are titled with the
detection's rank, class and score; ``camlens models`` lists the detector families."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens.cli import main
from camlens.targets import Detection
from camlens.viz.panels import target_label
from tests.models.test_detr import build

SIZES = [(96, 128), (80, 100)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("det_photos")
    rng = np.random.default_rng(3)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


@pytest.fixture(scope="module")
def detr_folder(tmp_path_factory):
    net, _ = build("detr")
    d = tmp_path_factory.mktemp("detr_model")
    net.save_pretrained(d)
    return d


def _image(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255


def _run(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    return res.exit_code, res.output


def _loaded(name: str):
    """The model as the CLI loads it (a yaml's random weights from the CLI's seed; threshold 0)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = camlens.load_model(name)
    for attr in ("threshold", "conf"):  # the CLI reports the top-k however low (keep_all_detections)
        if isinstance(getattr(net, attr, None), float):
            setattr(net, attr, 0.0)
    return net


def _box_target_matches_explain(name: str, photo, tmp_path):
    """The CLI's map for ``--target box:...:label`` (the model's best detection's box, rounded) equals
    ``camlens.explain`` with ``Detection([box], [label])`` on the same image."""
    net = _loaded(name)
    x = _image(photo)
    with torch.no_grad():
        det = net([x])[0]
    j = int(det["scores"].argmax())
    box = [round(float(v)) for v in det["boxes"][j]]
    label = int(det["labels"][j])
    spec = f"box:{','.join(map(str, box))}:{label}"
    code, out = _run(["explain", str(photo), "--model", name, "--target", spec, "--out", str(tmp_path),
                      "--format", "npy,json", "--method", "gradcam"])  # fmt: skip
    assert code == 0, out
    stored = np.load(tmp_path / f"{photo.stem}_gradcam.npy")
    summary = json.loads((tmp_path / f"{photo.stem}_gradcam.json").read_text())
    assert summary["explained_boxes"] == [[float(v) for v in box]]
    ref = camlens.explain(net, x[None], "gradcam", targets=Detection([box], [label]))
    assert float(ref.scores[0, 0]) > 0  # the box matched the detection (IoU >= 0.5, its label)
    assert stored.shape == (1, *x.shape[-2:])
    peak = float(np.abs(ref.maps[0].numpy()).max())
    assert peak > 0
    np.testing.assert_allclose(stored, ref.maps[0].numpy(), atol=1e-5 * peak, rtol=1e-4)


def test_box_target_on_a_detr_saved_in_a_folder(detr_folder, photos, tmp_path):
    _box_target_matches_explain(f"hf:{detr_folder}", photos / "p0.png", tmp_path)


@pytest.mark.slow  # Ultralytics' import and a YOLOv8n build: ~15 s on 2 cores
@pytest.mark.skipif(importlib.util.find_spec("ultralytics") is None, reason="needs camlens[yolo] (Ultralytics)")
def test_box_target_on_a_yolo_from_its_yaml(photos, tmp_path):
    _box_target_matches_explain("yolo:yolov8n.yaml", photos / "p1.png", tmp_path)


def test_a_box_label_the_detector_does_not_have_is_refused(detr_folder, photos, tmp_path):
    code, out = _run(["explain", str(photos / "p0.png"), "--model", f"hf:{detr_folder}",
                      "--target", "box:10,10,50,50:9", "--out", str(tmp_path)])  # fmt: skip
    assert code != 0 and "label 9 is not a class of this detector: it has 5 classes" in out


def test_score_threshold_selects_the_detections(detr_folder, photos, tmp_path):
    """--score-threshold T: the panels are the detections scoring >= T (at most --topk), best first;
    above every score the run says so by image and writes nothing."""
    name = f"hf:{detr_folder}"
    with torch.no_grad():
        scores = _loaded(name)([_image(photos / "p0.png")])[0]["scores"].sort(descending=True).values
    thr = float(scores[1] + scores[2]) / 2  # two detections above it
    args = ["explain", str(photos / "p0.png"), "--model", name, "--method", "gradcam"]
    code, out = _run([*args, "--score-threshold", f"{thr:.9f}", "--topk", "5", "--out", str(tmp_path / "a"),
                      "--format", "npy"])  # fmt: skip
    assert code == 0, out
    assert np.load(tmp_path / "a" / "p0_gradcam.npy").shape[0] == 2
    code, out = _run(["explain", str(photos / "p0.png"), "--model", name, "--score-threshold", "0.99",
                      "--out", str(tmp_path / "b"), "--method", "gradcam"])  # fmt: skip
    assert code == 1 and "p0: nothing to explain: no detection scores >= score_threshold=0.99" in out
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_a_folder_of_different_sizes_into_a_store(detr_folder, photos, tmp_path):
    """A folder (a dataset run) of images of different sizes, batched together: one row per
    detection with its box; equal to explain_dataset with the same target."""
    name = f"hf:{detr_folder}"
    code, out = _run(["explain", str(photos), "--model", name, "--topk", "2", "--out", str(tmp_path / "s"),
                      "--method", "gradcam", "-q"])  # fmt: skip
    assert code == 0, out
    res = camlens.open_results(tmp_path / "s")
    t = res.table
    assert list(t.height) == [96, 96, 80, 80] and list(t["rank"]) == [1, 2, 1, 2]
    ref = camlens.explain_dataset(_loaded(name), photos, "gradcam", tmp_path / "r", progress=False,
                                  targets=Detection(score_threshold=0.0, max_boxes=2))  # fmt: skip
    for col in ("detection", "class_id", "det_x0", "det_y1", "score"):
        np.testing.assert_allclose(t[col].to_numpy(float), ref.table[col].to_numpy(float), rtol=1e-5)
    for (_, a), (_, b) in zip(t.iterrows(), ref.table.iterrows(), strict=True):
        np.testing.assert_allclose(res.map(a), ref.map(b), rtol=1e-4, atol=1e-7)


def test_named_files_of_different_sizes_in_one_batch(detr_folder, photos, tmp_path):
    """Two named photos of different sizes (one batch): each .npy at its own photo's size."""
    code, out = _run(["explain", str(photos / "p0.png"), str(photos / "p1.png"), "--model", f"hf:{detr_folder}",
                      "--out", str(tmp_path), "--format", "npy", "--method", "gradcam", "--topk", "1"])  # fmt: skip
    assert code == 0, out
    assert np.load(tmp_path / "p0_gradcam.npy").shape == (1, 96, 128)
    assert np.load(tmp_path / "p1_gradcam.npy").shape == (1, 80, 100)


def test_panel_title_says_rank_class_and_score(detr_folder, photos):
    net = _loaded(f"hf:{detr_folder}")
    e = camlens.explain(net, _image(photos / "p0.png")[None], "gradcam", targets=Detection(score_threshold=0.0))
    s = float(e.scores[0, 1])
    assert target_label(e, 0, 1) == f"detection 2: {e.labels()[0][1]} (score {s:.3g})"
    given = camlens.explain(net, _image(photos / "p0.png")[None], "gradcam", targets=Detection([[5, 5, 60, 60]]))
    assert not target_label(given, 0, 0).startswith("detection")  # a given box is not a ranked detection


def test_models_lists_the_detector_families():
    code, out = _run(["models"])
    assert code == 0
    lines = out.split("detector families")[1].splitlines()
    for family in ("yolo:PATH", "hf:FOLDER", "torchvision"):
        assert sum(line.strip().startswith(family) for line in lines) == 1
