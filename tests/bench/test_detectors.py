"""Smoke run of the detector benchmark (``python -m benchmarks.detectors --quick``): YOLOv8n and a tiny
DETR at 64 px, every contender reported with its range, the lowered thresholds and the load average
recorded, camlens' Eigen-CAM equal to pytorch-grad-cam's recipe map. No timing is asserted."""

from __future__ import annotations

import importlib.util
import json

import pytest


@pytest.mark.slow
def test_detector_benchmark_quick(tmp_path):
    if importlib.util.find_spec("ultralytics") is None:  # not importorskip: importing it patches PIL
        pytest.skip("needs camlens[yolo] (Ultralytics)")
    pytest.importorskip("transformers")
    pytest.importorskip("pytorch_grad_cam")
    from benchmarks.detectors import main

    out = tmp_path / "detectors.json"
    assert main(["--quick", "--threads", "1", "--out", str(out)], log=lambda *a: None) == 0
    res = json.loads(out.read_text())
    by_model = {m: [r for r in res["rows"] if r["model"] == m] for m in ("yolov8n", "detr")}
    for m, rows in by_model.items():
        assert rows[0]["contender"].startswith(("YOLOv8n forward", "DETR forward")) and rows[0]["ratio_to_forward"] == 1
        assert "camlens gradcam, top-10" in [r["contender"] for r in rows]
        assert all(0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] for r in rows)
        meta = res["meta"][m]
        assert meta["maps"][1] == 10  # ten detections explained: the lowered threshold left enough
        assert meta["detections_after_post_processing"] >= 10
        assert len(meta["loadavg_before"]) == 3 and len(meta["loadavg_after"]) == 3
    assert any("pytorch-grad-cam EigenCAM recipe" in r["contender"] for r in by_model["yolov8n"])
    yolo = res["meta"]["yolov8n"]
    assert yolo["conf_lowered_to"] < yolo["best_candidate_score"]
    (agree,) = [v for k, v in yolo.items() if k.startswith("pearson")]
    assert agree > 0.999
    assert "none documented" in res["meta"]["detr"]["peer_recipe"]
