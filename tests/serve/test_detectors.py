"""The web app with a detector: a served detector is chosen, its detections listed (class, score,
box in the photo's and the display's pixels), and one explained by its index — the map equals
``camlens.explain`` with a ``Detection`` target over that detection; only detector methods are
offered and accepted; a classifier is not a detector. A tiny random DETR (and a classifier beside
it, so that the model is chosen)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens.attribution.registry import methods
from camlens.attribution.traits import model_traits
from camlens.models.detectors import as_detector
from camlens.serve.app import create_app
from camlens.serve.detect import CandidateDetection
from camlens.serve.service import ModelPool, Service
from tests.conftest import TinyCNN
from tests.models.test_detr import build

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient


@pytest.fixture(scope="module")
def served():
    net, _ = build("detr")
    det = as_detector(net, threshold=0.0)
    svc = Service(ModelPool({"classifier": TinyCNN().eval(), "detr": det}))
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (72, 120, 3), dtype=np.uint8)
    client = TestClient(create_app(svc))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    up = client.post("/api/image", content=buf.getvalue(), headers={"x-filename": "p.png", "content-type": "image/png"})
    assert up.status_code == 200, up.text
    return client, det, rgb, up.json()["id"]


def test_the_detector_is_offered_with_its_methods_only(served):
    client, det, _, _ = served
    info = client.get("/api/info").json()
    assert [m["name"] for m in info["models"]] == ["classifier", "detr"]
    got = client.get("/api/methods", params={"model": "detr"}).json()
    traits = model_traits(det)
    assert got["methods"] == [n for n, i in methods().items() if i.applies(traits)]
    assert "gradcam" in got["methods"] and "cam" in got["not_applicable"]  # CAM needs a classifier head


def test_detections_are_listed_best_first_with_their_boxes(served):
    client, det, rgb, image_id = served
    r = client.get(f"/api/detections/{image_id}", params={"model": "detr", "score_threshold": 0.1})
    assert r.status_code == 200, r.text
    body = r.json()
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        ref = det([x])[0]
    keep = (ref["scores"] >= 0.1).nonzero().flatten()
    keep = keep[ref["scores"][keep].argsort(descending=True)]
    assert len(keep) >= 2
    dets = body["detections"]
    assert [d["index"] for d in dets] == keep.tolist() and [d["rank"] for d in dets] == list(range(1, len(keep) + 1))
    for d, j in zip(dets, keep.tolist(), strict=True):
        assert d["class_id"] == int(ref["labels"][j]) and d["score"] == pytest.approx(float(ref["scores"][j]))
        np.testing.assert_allclose(d["box"], ref["boxes"][j].numpy(), atol=1e-4)
    h, w = body["image"]["height"], body["image"]["width"]
    assert (h, w) == (72, 120)


def test_clicking_a_detection_explains_it(served):
    client, det, rgb, image_id = served
    dets = client.get(f"/api/detections/{image_id}", params={"model": "detr"}).json()["detections"]
    d = dets[1]  # the second best: not simply the top detection
    req = {"image_id": image_id, "model": "detr", "methods": ["gradcam"], "index": d["index"]}
    r = client.post("/api/explain_detection", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    (panel,) = body["panels"]
    assert panel["cls"] == d["index"] and panel["title"] == f"detection 2: {d['class_name']} (score {d['score']:.3g})"
    npy = client.get(f"/api/result/{body['id']}/maps/gradcam.npy")
    stored = np.load(io.BytesIO(npy.content))
    # reference: plain autograd on that query's class score (no box matching, no camlens target)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    feats = {}
    layer = dict(det.named_modules())[det.camlens.layer]
    h = layer.register_forward_hook(lambda m, a, o: feats.setdefault("A", o))
    try:
        out = det([x])[0]
    finally:
        h.remove()
    j = d["index"]
    assert float(out["scores"][j].detach()) == pytest.approx(d["score"], rel=1e-5)
    (g,) = torch.autograd.grad(out["scores"][j], feats["A"])
    cam = (g.mean((2, 3), keepdim=True) * feats["A"]).sum(1).relu()[0].detach()
    ref = camlens.explain(det, [rgb], "gradcam", targets=CandidateDetection(d["box"], d["class_id"], d["candidate"]))
    torch.testing.assert_close(ref.raw[0, 0], cam, atol=1e-6 * float(cam.abs().max()), rtol=1e-4)
    assert float(ref.scores[0, 0]) == pytest.approx(d["score"], rel=1e-5)  # exactly that detection's score
    peak = float(ref.maps.abs().max())
    assert peak > 0
    np.testing.assert_allclose(stored.reshape(ref.maps.shape[-2:]), ref.maps[0, 0].numpy(), atol=1e-5 * peak)
    assert client.get(panel["heat_url"]).status_code == 200


def test_wrong_requests_are_clear(served):
    client, _, _, image_id = served
    r = client.get(f"/api/detections/{image_id}", params={"model": "classifier"})
    assert r.status_code == 400 and "classifier is not a detector" in r.json()["error"]
    r = client.post(
        "/api/explain_detection", json={"image_id": image_id, "model": "detr", "methods": ["cam"], "index": 0}
    )
    assert r.status_code >= 400 and "cam" in r.json()["error"]
    r = client.post("/api/explain_detection", json={"image_id": image_id, "model": "detr", "index": 999})
    assert r.status_code == 404 and "no detection 999" in r.json()["error"]
