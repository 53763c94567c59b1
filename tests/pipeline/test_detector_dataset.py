"""Detectors in the dataset pipeline (``explain_dataset``, ``camlens explain DIR --out STORE``): one
table row per image x detection x method; the stored maps, boxes, scores and classes equal
``camlens.explain`` of each image alone with the model's own detections (YOLO and DETR, images of
different sizes batched together); an image with no detection above the threshold is a row saying
why, never a zero map; resume and the store's integrity checks cover the new rows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.base.errors import InputError, StoreError
from camlens.models.detectors import as_detector
from camlens.pipeline.store import DETECTION_COLUMNS
from camlens.targets import Detection
from tests.models.test_detr import build

SIZES = [(96, 128), (80, 100), (64, 64)]  # batched by two: a mixed-size batch and a single image


def write_images(d: Path) -> Path:
    """Random PNGs of :data:`SIZES` in ``d`` (``im0.png``…)."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"im{i}.png")
    return d


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("det_images"))


def _image(folder: Path, i: int) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(folder / f"im{i}.png"))).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def detr():
    net, _ = build("detr")
    return as_detector(net, threshold=0.0, size=(64, 96))  # a fixed input: an image's map is batch-independent


def _best_scores(ad, folder):
    with torch.no_grad():
        return [float(d["scores"].max()) for d in ad([_image(folder, i) for i in range(len(SIZES))])]


def check_store_against_explain(res, ad, folder, target, method="gradcam"):
    """Every stored row equals camlens.explain of its image alone: rank, class, score, detection
    index, the detection's box in the image's pixels, and the map (cropped to the image)."""
    t = res.table
    done = 0
    for i in range(len(SIZES)):
        rows = t[(t.image_id == i) & (t.method == method)].sort_values("rank")
        if rows.skipped.iloc[0]:
            continue
        e = camlens.explain(ad, _image(folder, i)[None], method, targets=target)
        k = int(np.isfinite(e.extras["boxes"][0]).all(1).sum())
        assert list(rows["rank"]) == list(range(1, k + 1))
        assert list(rows.class_id) == e.classes[0, :k].tolist()
        assert list(rows.detection) == e.extras["detections"][0, :k].tolist()
        np.testing.assert_allclose(rows.score, e.scores[0, :k].numpy(), rtol=1e-5, atol=1e-6)
        box = rows[["det_x0", "det_y0", "det_x1", "det_y1"]].to_numpy()
        np.testing.assert_allclose(box, e.extras["boxes"][0, :k], atol=1e-3)
        for r, (_, row) in enumerate(rows.iterrows()):
            m = res.map(row)
            assert m.shape == SIZES[i] and float(np.abs(m).max()) > 0
            ref = e.maps[0, r].numpy()
            np.testing.assert_allclose(m, ref, atol=1e-5 * float(np.abs(ref).max()), rtol=1e-4)
        done += 1
    return done


def test_detr_store_equals_explain_per_image(detr, folder, tmp_path):
    target = Detection(score_threshold=0.0, max_boxes=3)
    res = camlens.explain_dataset(
        detr, folder, "gradcam", tmp_path / "s", targets=target, batch_size=2, num_workers=0, progress=False
    )
    assert set(DETECTION_COLUMNS) <= set(res.table.columns)
    assert len(res.table) == 3 * len(SIZES) and not res.table.skipped.any()
    assert list(res.table.height) == [h for h, _ in SIZES for _ in range(3)]
    assert res.maps("gradcam").shape == (3, 3, 96, 128)  # the largest image's frame
    assert check_store_against_explain(res, detr, folder, target) == 3


def test_an_image_with_no_detection_is_a_row_saying_why(detr, folder, tmp_path):
    """A threshold between the images' best scores: the images below it get one row per method
    with the reason and no map (NaN, and ``map()`` refuses), inside a mixed batch and alone."""
    best = _best_scores(detr, folder)
    assert max(best) - min(best) > 1e-3  # a threshold can separate them
    thr = (max(best) + min(best)) / 2
    target = Detection(score_threshold=thr, max_boxes=2)
    res = camlens.explain_dataset(
        detr, folder, ["gradcam", "saliency"], tmp_path / "s", targets=target, batch_size=2, num_workers=0,
        progress=False,
    )  # fmt: skip
    t = res.table
    empty = [i for i, b in enumerate(best) if b < thr]
    assert empty and len(empty) < len(SIZES)
    for i in range(len(SIZES)):
        rows = t[t.image_id == i]
        if i in empty:
            assert len(rows) == 2 and (rows["rank"] == 0).all() and (rows.detection == -1).all()
            assert all(f"score_threshold={thr:g}" in why for why in rows.skipped)
            assert all(math.isnan(v) for v in rows.det_x0)
            assert np.isnan(np.asarray(res.maps("gradcam")[i])).all()  # never a zero map
            with pytest.raises(InputError, match="has no map: no detection scores"):
                res.map(rows.iloc[0])
        else:
            assert len(rows) and (rows["rank"] >= 1).all() and not rows.skipped.any()
    assert check_store_against_explain(res, detr, folder, target, "saliency") == len(SIZES) - len(empty)


def test_detector_store_resumes_and_checks_its_files(detr, folder, tmp_path):
    out = tmp_path / "s"
    target = Detection(score_threshold=0.0, max_boxes=2)
    kw = dict(targets=target, batch_size=2, num_workers=0, progress=False)
    first = camlens.explain_dataset(detr, folder, "gradcam", out, **kw)
    before = first.table.copy()
    again = camlens.explain_dataset(detr, folder, "gradcam", out, **kw)
    assert again.stats.computed == 0 and again.stats.skipped == len(SIZES)
    # another threshold is another run: refused, not mixed into the same table
    with pytest.raises(camlens.CamlensError, match="score_threshold"):
        camlens.explain_dataset(detr, folder, "gradcam", out, **{**kw, "targets": Detection(score_threshold=0.5)})
    # a damaged table chunk: reading refuses it; a rerun recomputes its images and the table is whole again
    chunk = sorted((out / "chunks").glob("part-*.parquet"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (out / "results.parquet").unlink()
    with pytest.raises(StoreError, match="part-"):
        _ = camlens.open_results(out).table
    fixed = camlens.explain_dataset(detr, folder, "gradcam", out, **kw)
    assert fixed.stats.computed == 2  # the damaged chunk's batch of two
    cols = ["image_id", "rank", "detection", "class_id"]
    assert fixed.table[cols].equals(before[cols])
    np.testing.assert_allclose(fixed.table.det_x0, before.det_x0)


def test_a_hf_detr_passed_directly_defaults_to_its_own_detections(folder, tmp_path):
    net, _ = build("detr")
    res = camlens.explain_dataset(net, folder, "gradcam", tmp_path / "s", num_workers=0, progress=False)
    sig = res.run["signature"]
    assert sig["detections"]["boxes"] == "own" and sig["detections"]["score_threshold"] == 0.5
    assert sig["canvas"] == [96, 128]
    assert set(res.table.image_id) == set(range(len(SIZES)))  # a row per image: detections or the reason


def test_a_detector_store_refuses_figures_clearly(detr, folder, tmp_path):
    with pytest.raises(InputError, match="figures='none'"):
        camlens.explain_dataset(detr, folder, "gradcam", tmp_path / "s", figures="overlay", progress=False)
