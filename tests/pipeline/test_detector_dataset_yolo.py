"""An Ultralytics YOLO (v8n, random calibrated weights) in the dataset pipeline: the stored maps,
boxes, scores and classes equal ``camlens.explain`` of each image alone (images of different sizes
batched together). The DETR cases and the store's behaviour are in ``test_detector_dataset.py``."""

from __future__ import annotations

import pytest
import torch

import camlens
from camlens.models.detectors import as_detector
from camlens.targets import Detection
from tests.models.test_yolo import BIAS, calibrate, ultralytics_yolo  # skips without Ultralytics
from tests.pipeline.test_detector_dataset import check_store_against_explain, write_images


@pytest.mark.slow  # importing and calibrating Ultralytics' YOLOv8n: ~20 s on 2 cores
def test_yolo_store_equals_explain_per_image(tmp_path):
    folder = write_images(tmp_path)
    torch.manual_seed(0)
    y = ultralytics_yolo()("yolov8n.yaml")
    calibrate(y.model, BIAS["yolov8n.yaml"])
    ad = as_detector(y, imgsz=128, conf=0.05, rect=False)  # every image letterboxed alike: batch-independent
    target = Detection(score_threshold=0.0, max_boxes=2)
    res = camlens.explain_dataset(
        ad, folder, "gradcam", tmp_path / "s", targets=target, batch_size=2, num_workers=0, progress=False
    )
    assert res.maps("gradcam").shape == (3, 2, 96, 128)
    assert check_store_against_explain(res, ad, folder, target) >= 2
