"""``camlens explain`` on detectors and segmenters: --target box:/mask: and the default top detections."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from camlens.cli import main
from camlens.cli.explain import parse_targets
from camlens.targets import Detection, Segmentation


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_parse_targets():
    names = ["__background__", "person", "bicycle"]
    t = parse_targets(["box:1,2,30,40:person", "box:0,0,5,5:2"], names, "detection", 2)
    assert isinstance(t, Detection) and t.label_spec == [1, 2]
    assert parse_targets([], names, "detection", 3).max_boxes == 3
    assert parse_targets([], names, None, 3) is None
    with pytest.raises(Exception, match="x0,y0,x1,y1"):
        parse_targets(["box:1,2,3"], names, "detection", 2)
    with pytest.raises(Exception, match="unknown label"):
        parse_targets(["box:1,2,3,4:zebra"], names, "detection", 2)
    with pytest.raises(Exception, match="x1 > x0"):
        parse_targets(["box:5,2,3,4"], names, "detection", 2)


def test_explain_detector_top_detections_and_boxes(tmp_path):
    img = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "photo.png")
    r = run(
        "explain", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "random",
        tmp_path / "photo.png", "--out", tmp_path / "o", "--topk", "2",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o" / "photo_gradcam.json").read_text())
    assert len(d["explained_boxes"]) == 2 and all(b is not None for b in d["explained_boxes"])
    assert all(0 <= b[0] < b[2] <= 160 and 0 <= b[1] < b[3] <= 120 for b in d["explained_boxes"])
    assert "label" in r.output and "score" in r.output
    r = run(
        "explain", "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--weights", "random",
        tmp_path / "photo.png", "--out", tmp_path / "o2", "--target", "box:10,20,100,90:person",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o2" / "photo_gradcam.json").read_text())
    assert d["explained_boxes"] == [[10.0, 20.0, 100.0, 90.0]] and d["class_names"] == ["person"]


def test_explain_segmenter_mask_target(tmp_path):
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "photo.png")
    m = np.zeros((64, 64), np.uint8)
    m[10:30, 20:50] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    r = run(
        "explain", "--model", "lraspp_mobilenet_v3_large", "--weights", "random", tmp_path / "photo.png",
        "--out", tmp_path / "o", "--target", f"mask:{tmp_path / 'mask.png'}:cat",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    d = json.loads((tmp_path / "o" / "photo_gradcam.json").read_text())
    assert d["class_names"] == ["cat"]
    t = parse_targets([f"mask:{tmp_path / 'mask.png'}:8"], None, "segmentation", 1)
    assert isinstance(t, Segmentation) and t.category == [8] and t.mask.sum() == 600
