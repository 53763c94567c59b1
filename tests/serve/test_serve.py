"""`camlens serve` without a browser: the HTTP API against camlens.explain / localize / metrics as
oracles, bad inputs (4xx with a clear message, the server keeps serving), the per-model queue, and
the CLI's bind messages. The real-browser test is tests/serve/test_serve_browser.py."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

import camlens
from camlens.attribution.registry import ATTENTION_MODELS
from camlens.base.localization import localize, scale_boxes
from camlens.serve.app import create_app
from camlens.serve.render import heat_values
from camlens.serve.service import THRESHOLDS, Limits, ModelPool, Panel, Service


class Net(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> GAP -> linear, 6 classes; counts how many forwards overlap."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 6)
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self._count = threading.Lock()

    def forward(self, x):
        with self._count:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            return self.fc(self.pool(self.features(x)).flatten(1))
        finally:
            with self._count:
                self.active -= 1


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 30000, height: int | None = None) -> bytes:
    """A ~60-byte PNG whose header claims width x height pixels (a square by default)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height or width, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def photo() -> np.ndarray:
    g = np.random.default_rng(0)
    img = (g.random((60, 90, 3)) * 255).astype(np.uint8)
    img[15:45, 20:50] = (230, 40, 40)
    return img


def _client(net: nn.Module | None = None, **limits) -> tuple[TestClient, Service, nn.Module]:
    net = net if net is not None else Net().eval()
    svc = Service(ModelPool({"net": net}, max_queue=limits.pop("max_queue", 8)), Limits(**limits))
    return TestClient(create_app(svc)), svc, net


def _upload(client: TestClient, data: bytes, name: str = "photo.png"):
    return client.post("/api/image", content=data, headers={"x-filename": name, "content-type": "image/png"})


def test_explain_matches_the_library(photo):
    client, _, net = _client()
    info = _upload(client, _png(photo)).json()
    assert (info["width"], info["height"]) == (90, 60)
    r = client.post("/api/explain", json={"image_id": info["id"], "methods": ["gradcam", "saliency"], "explain": 2})
    assert r.status_code == 200, r.text
    res = r.json()
    top = camlens.predict(net, photo, topk=5)[0]
    assert [p["id"] for p in res["predictions"]] == [c for c, _, _ in top]
    np.testing.assert_allclose([p["prob"] for p in res["predictions"]], [p for _, _, p in top], rtol=1e-6)
    classes = [c for c, _, _ in top[:2]]
    assert res["classes"] == classes
    for method in ("gradcam", "saliency"):
        ref = camlens.explain(net, photo, method=method, targets=[classes])
        got = np.load(io.BytesIO(client.get("/" + f"api/result/{res['id']}/maps/{method}.npy").content))
        np.testing.assert_allclose(got, ref.maps[0].numpy(), rtol=1e-5, atol=1e-7)
        for j, c in enumerate(classes):
            p = next(q for q in res["panels"] if q["method"] == method and q["cls"] == c)
            assert p["prob"] == pytest.approx(float(ref.probs[0, j]), rel=1e-6)
            # the slider's boxes are camlens.localize's, scaled to the shown image
            want = [scale_boxes(localize(ref.maps[0, j], t), (224, 224), (60, 90)).tolist() for t in THRESHOLDS]
            assert p["boxes"] == want
            assert (p["detail_url"] is not None) == (method == "saliency")
    assert {m["name"]: m["kind"] for m in res["methods"]} == {"gradcam": "layer", "saliency": "pixel"}
    assert all(m["cost_ms"] > 0 for m in res["methods"])


def test_another_class_reuses_the_cached_maps(photo):
    client, _svc, net = _client()
    iid = _upload(client, _png(photo)).json()["id"]
    first = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"], "explain": 1}).json()
    c0 = first["classes"][0]
    other = next(p["id"] for p in first["predictions"] if p["id"] != c0)
    again = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"], "classes": [c0, other]}).json()
    assert again["classes"] == [c0, other]
    new = next(p for p in again["panels"] if p["cls"] == other)
    old = next(p for p in again["panels"] if p["cls"] == c0)
    assert new["classes_in_call"] == 1 and old["ms"] == first["panels"][0]["ms"]  # only the new class was computed
    ref = camlens.explain(net, photo, method="gradcam", targets=[[c0, other]]).maps[0].numpy()
    got = np.load(io.BytesIO(client.get("/" + f"api/result/{again['id']}/maps/gradcam.npy").content))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    cached = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"], "classes": [c0, other]})
    assert cached.json()["methods"][0]["cached"] is True


def test_bad_inputs_are_4xx_with_a_clear_message_and_the_server_keeps_serving(photo):
    client, _, _ = _client(max_upload_bytes=50_000, max_pixels=1_000_000)
    # header says 2000x1000: over the server's limit but under PIL's own bomb guard
    r = _upload(client, _bomb_png(2000, 1000))
    assert r.status_code == 413 and "2000x1000 = 2,000,000 pixels" in r.json()["error"], r.text
    text = b"this is a text file, not a JPEG\n" * 10
    cases = [
        (_upload(client, text, "notes.jpg"), 415, "notes.jpg: not an image file"),
        (client.post("/api/image", files={"file": ("notes.jpg", text, "image/jpeg")}), 415, "not an image file"),
        (_upload(client, _bomb_png(), "bomb.png"), 413, "900,000,000 pixels, more than"),
        (_upload(client, b"\0" * 60_000, "big.png"), 413, "59 KiB, more than this server's limit of 49 KiB"),
        (_upload(client, b"", "empty.png"), 400, "empty"),
        (client.get("/api/sample/nosuch"), 404, "no bundled photo"),
    ]
    for r, status, words in cases:
        assert r.status_code == status, (r.status_code, r.text)
        assert words in r.json()["error"], r.json()
    big = (np.random.default_rng(1).random((400, 400, 3)) * 255).astype(np.uint8)  # ~480 KB of noise
    r = client.post("/api/image", files={"file": ("big.png", _png(big), "image/png")})
    assert r.status_code == 413 and "470 KiB, more than this server's limit of 49 KiB" in r.json()["error"]

    iid = _upload(client, _png(photo)).json()["id"]
    crafted = [
        ({"image_id": iid, "methods": ["gradcam", "nosuch"]}, 400, "unknown method 'nosuch'"),
        ({"image_id": iid, "methods": ["gradcam"], "model": "resnet9000"}, 400, "unknown model 'resnet9000'"),
        ({"image_id": iid, "methods": ["gradcam"], "classes": [6]}, 400, "class id 6 is out of range 0..5"),
        ({"image_id": "u0000", "methods": ["gradcam"]}, 404, "upload it again"),
        ({"image_id": iid, "methods": ["gradcam"], "topk": "many"}, 422, "topk"),
        ({"image_id": iid, "methods": ["gradcam"], "evil": 1}, 422, "evil"),
    ]
    for body, status, words in crafted:
        r = client.post("/api/explain", json=body)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"], r.json()
    r = client.post("/api/explain", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()

    ok = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"]})
    assert ok.status_code == 200
    rid = ok.json()["id"]
    for url, status, words in [
        (f"/api/result/{rid}/figure.png?threshold=0.33", 400, "threshold 0.33 is not one of"),
        (f"/api/result/{rid}/heat/gradcam/{ok.json()['classes'][0]}.png?cmap=rainbow9", 400, "unknown colormap"),
        (f"/api/result/{rid}/maps/cam.npy", 404, "no cam maps"),
        ("/api/result/nosuch/summary.json", 404, "explain the image again"),
        ("/api/nosuch", 404, "Not Found"),
    ]:
        r = client.get(url)
        assert r.status_code == status and words in r.json()["error"], (url, r.text)
    assert client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"]}).status_code == 200


def test_two_concurrent_requests_equal_two_sequential_ones_and_are_serialized(photo):
    other = np.ascontiguousarray(photo[::-1, ::-1])
    jobs = [(photo, ["gradcam", "gradcam++"]), (other, ["saliency", "gradcam"])]

    def run(client, img, methods):
        iid = _upload(client, _png(img), f"{img[0, 0, 0]}.png").json()["id"]
        res = client.post("/api/explain", json={"image_id": iid, "methods": methods}).json()
        maps = {m: client.get(f"/api/result/{res['id']}/maps/{m}.npy").content for m in methods}
        return res["predictions"], res["classes"], maps

    seq_client, _, _ = _client(Net().eval())
    sequential = [run(seq_client, img, ms) for img, ms in jobs]

    net = Net(delay=0.05).eval()  # slow forwards: unserialized requests would overlap
    with TestClient(create_app(Service(ModelPool({"net": net})))) as client:
        out: list = [None, None]
        barrier = threading.Barrier(2)

        def worker(i):
            barrier.wait()
            out[i] = run(client, *jobs[i])

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert out == sequential  # predictions, classes and the .npy bytes of every map
    assert net.max_active == 1  # never two forwards on the model at once


def test_a_full_queue_answers_503_then_serves(photo):
    client, svc, _ = _client(max_queue=1)
    iid = _upload(client, _png(photo)).json()["id"]
    entry = svc.pool.entry("net")
    entry.lock.acquire()  # the model is busy
    results = []
    t = threading.Thread(
        target=lambda: results.append(client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"]}))
    )
    try:
        t.start()
        for _ in range(200):
            if entry.waiting == 1:
                break
            time.sleep(0.01)
        assert entry.waiting == 1
        r = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"]})
        assert r.status_code == 503 and "busy" in r.json()["error"]
    finally:
        entry.lock.release()
        t.join(30)
    assert results[0].status_code == 200  # the waiting request got its turn


def test_waiting_requests_are_served_in_arrival_order():
    from camlens.serve.service import FifoLock

    lock, order = FifoLock(), []
    lock.acquire()
    threads = []
    for i in range(5):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        while lock.waiting != i + 1:  # each thread queued before the next starts
            time.sleep(0.001)
    lock.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_model_choice_one_model_per_name_loaded_once(photo):
    loads = []

    def load_b():
        loads.append("b")
        torch.manual_seed(5)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
        )

    def broken():
        raise camlens.CamlensError("the weights file is not on this machine")

    a = Net().eval()
    svc = Service(ModelPool({"a": a, "b": load_b, "broken": broken}))
    client = TestClient(create_app(svc))
    assert [m["loaded"] for m in client.get("/api/info").json()["models"]] == [True, False, False]
    iid = _upload(client, _png(photo)).json()["id"]
    for _ in range(2):
        rb = client.post("/api/explain", json={"image_id": iid, "model": "b", "methods": ["gradcam"], "explain": 1})
        assert rb.status_code == 200 and rb.json()["model"] == "b"
    assert loads == ["b"]  # loaded on first use, then kept
    net_b = svc.pool.entry("b").model
    assert rb.json()["predictions"][0]["id"] == camlens.predict(net_b, photo, topk=1)[0][0][0]
    ra = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"], "explain": 1}).json()
    assert ra["model"] == "a" and len(ra["predictions"]) == 5  # the default model; b has 3 classes
    r = client.post("/api/explain", json={"image_id": iid, "model": "broken", "methods": ["gradcam"]})
    assert r.status_code == 409 and "not on this machine" in r.json()["error"]


def test_a_method_that_fails_on_this_model_is_reported_beside_the_others(photo):
    torch.manual_seed(0)
    mlp_head = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3),
    ).eval()  # fmt: skip
    client = TestClient(create_app(Service(ModelPool({"mlp": mlp_head}))))
    iid = _upload(client, _png(photo)).json()["id"]
    r = client.post("/api/explain", json={"image_id": iid, "methods": ["cam", "gradcam"]})
    assert r.status_code == 200, r.text
    res = r.json()
    by = {m["name"]: m for m in res["methods"]}
    assert by["cam"]["error"] and "gradcam" in by["cam"]["error"] and by["gradcam"]["error"] is None
    assert {p["method"] for p in res["panels"]} == {"gradcam"}
    only_cam = client.post("/api/explain", json={"image_id": iid, "methods": ["cam"]})
    assert only_cam.status_code == 400 and "cam:" in only_cam.json()["error"]


def _panel(m: np.ndarray, pixel: bool = False) -> Panel:
    return Panel(
        "x", 0, "c", 0.5, 1.0, m.astype(np.float32), np.zeros((3, *m.shape)) if pixel else None, None, {}, 1.0, 1, []
    )


def test_signed_maps_get_a_diverging_colormap_centred_at_zero():
    m = np.array([[-2.0, 0.0], [1.0, 4.0]])
    v = heat_values(_panel(m), True, "RdBu_r", (2, 2))
    np.testing.assert_allclose(v, 0.5 + 0.5 * m / 4.0)  # 0 -> the middle colour, +-max|m| -> the ends
    u = heat_values(_panel(m), False, "jet", (2, 2))
    np.testing.assert_allclose(u, (m + 2) / 6)  # one sign: min-max, as camlens.viz
    from camlens.serve.render import resolve_cmap
    from camlens.serve.service import is_signed

    assert is_signed(m) and not is_signed(np.abs(m))
    assert resolve_cmap("auto", True) == "RdBu_r" and resolve_cmap("auto", False) == "jet"


def test_figure_summary_and_curves(photo):
    client, _svc, net = _client()
    iid = _upload(client, _png(photo), "my photo.png").json()["id"]
    res = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam", "saliency"]}).json()
    rid, c = res["id"], res["classes"][0]
    fig = client.get(f"/api/result/{rid}/figure.png?alpha=0.4&threshold=0.5&cmap=viridis")
    assert fig.status_code == 200 and "my_photo_camlens.png" in fig.headers["content-disposition"]
    with Image.open(io.BytesIO(fig.content)) as im:
        assert im.format == "PNG" and im.size[0] > 300
    s = json.loads(client.get(f"/api/result/{rid}/summary.json?threshold=0.5").content)
    ref = camlens.explain(net, photo, method="gradcam", targets=[res["classes"]])
    item = next(i for i in s["maps"] if i["method"] == "gradcam" and i["class"] == c)
    assert item["box"] == scale_boxes(localize(ref.maps[0, 0], 0.5), (224, 224), (60, 90)).tolist()
    assert s["image"] == {"name": "my photo.png", "size": [60, 90], "display_size": [60, 90]}

    from camlens.metrics import deletion_curve, insertion_curve

    r = client.post("/api/faithfulness", json={"result_id": rid, "method": "gradcam", "cls": c})
    assert r.status_code == 200, r.text
    cur = r.json()
    for kind, fn in (("deletion", deletion_curve), ("insertion", insertion_curve)):
        want = fn(net, [photo], ref.maps[0, :1], [c], steps=20)
        np.testing.assert_allclose(cur[kind]["map"]["probs"], want.probs[0].numpy(), rtol=1e-5)
        assert cur[kind]["map"]["auc"] == pytest.approx(float(want.auc[0]), rel=1e-5)
        assert len(cur[kind]["random"]["probs"]) == 21
    bad = client.post("/api/faithfulness", json={"result_id": rid, "method": "cam", "cls": c})
    assert bad.status_code == 404
    assert "faithfulness" in json.loads(client.get(f"/api/result/{rid}/summary.json").content)


def test_page_loads_nothing_from_outside():
    from importlib import resources

    client, _, _ = _client()
    r = client.get("/")
    assert r.status_code == 200 and "camlens" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    static = resources.files("camlens.serve") / "static"
    for f in ("index.html", "app.js", "style.css"):
        text = (static / f).read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "") and "https://" not in text, f
        assert client.get(f"/static/{f}").status_code == 200
    info = client.get("/api/info").json()
    assert info["models"] == [{"name": "net", "loaded": True}]
    assert {"gradcam", "cam", "guided_backprop"} <= {m["name"] for m in info["methods"]}


def test_cli_binds_loopback_by_default_and_warns_for_all_interfaces(monkeypatch):
    from click.testing import CliRunner

    import camlens.cli.serve as cli_serve
    from camlens.cli import main

    seen = {}

    def fake_run(app, sock):
        seen["addr"] = sock.getsockname()
        seen["app"] = app

    monkeypatch.setattr(cli_serve, "_run", fake_run)
    r = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert r.exit_code == 0, r.output
    assert seen["addr"][0] == "127.0.0.1" and "loopback only" in r.stdout and "warning" not in r.output
    assert f"http://127.0.0.1:{seen['addr'][1]}/" in r.stdout
    # the loopback server refuses other Host headers (DNS rebinding)
    assert TestClient(seen["app"]).get("/api/info").status_code == 400
    assert TestClient(seen["app"], base_url="http://127.0.0.1").get("/api/info").status_code == 200

    r = CliRunner().invoke(main, ["serve", "--host", "0.0.0.0", "--port", "0"])
    assert r.exit_code == 0, r.output
    assert seen["addr"][0] == "0.0.0.0" and "warning: bound to 0.0.0.0" in r.stderr
    r = CliRunner().invoke(main, ["serve", "--model", "resnet18", "--port", "0"])
    assert r.exit_code == 1 and "never downloads" in r.output
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = CliRunner().invoke(main, ["serve", "--port", str(taken.getsockname()[1])])
    assert r.exit_code == 1 and "cannot bind 127.0.0.1" in r.output and "--port 0" in r.output


def test_cli_offers_a_checkpoint_as_the_default_model(monkeypatch, tmp_path):
    from click.testing import CliRunner

    import camlens.cli.serve as cli_serve
    from camlens.cli import main

    ckpt = tmp_path / "runs" / "shapes"
    ckpt.mkdir(parents=True)
    net = Net().eval()
    calls = []

    def fake_load(name="efficientnet_lite0", weights=None, *, checkpoint=None, device=None):
        calls.append((name, checkpoint))
        return net if checkpoint else Net().eval()

    seen = {}
    monkeypatch.setattr(camlens, "load_model", fake_load)
    monkeypatch.setattr(cli_serve, "_run", lambda app, sock: seen.setdefault("app", app))
    r = CliRunner().invoke(main, ["serve", "--checkpoint", str(ckpt), "--model", "efficientnet_lite0", "--port", "0"])
    assert r.exit_code == 0, r.output
    assert "models: checkpoint:shapes, efficientnet_lite0 (default checkpoint:shapes" in r.stdout
    assert calls == [("efficientnet_lite0", str(ckpt))]  # the zoo model loads on first use only
    info = TestClient(seen["app"], base_url="http://127.0.0.1").get("/api/info").json()
    assert info["default_model"] == "checkpoint:shapes"
    assert [m["name"] for m in info["models"]] == ["checkpoint:shapes", "efficientnet_lite0"]


@pytest.mark.slow
def test_the_command_serves_until_stopped(tmp_path):
    """The real `camlens serve` process: it prints where it listens, answers, and stops on SIGTERM."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "camlens", "serve", "--port", "0", "--model", "efficientnet_lite0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        line = proc.stdout.readline()
        assert "loopback only" in line, line + proc.stderr.read()
        url = line.split()[2]
        info = httpx.get(url + "api/info", timeout=30).json()
        assert info["models"] == [{"name": "efficientnet_lite0", "loaded": True}]
        page = httpx.get(url, timeout=30)
        assert page.status_code == 200 and "camlens" in page.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert list(tmp_path.iterdir()) == []  # nothing written


# ------------------------------------------------------------------------- issue 24: what applies, progress, boxes
#: the methods for transformers only (the attention methods and AttnLRP)
ATTENTION = {n for n, i in camlens.methods().items() if i.applies_to is ATTENTION_MODELS}
DETECTOR_ONLY = {n for n, i in camlens.methods().items() if i.applies_to.text == "detectors"}  # drise, DETR attention


def test_method_list_offers_only_what_applies_and_refuses_the_rest_before_any_work(photo):
    from tests.core.test_attention import TinyAttnNet

    net = Net().eval()
    client = TestClient(create_app(Service(ModelPool({"net": net, "vit": TinyAttnNet().eval()}))))
    cnn = client.get("/api/methods", params={"model": "net"}).json()
    assert not ATTENTION & set(cnn["methods"]) and not DETECTOR_ONLY & set(cnn["methods"])
    assert {"gradcam", "scorecam", "saliency", "rise"} <= set(cnn["methods"])
    assert "drise" in DETECTOR_ONLY
    assert set(cnn["not_applicable"]) == ATTENTION | DETECTOR_ONLY and cnn["describe"] == "Net (a CNN classifier)"
    vit = client.get("/api/methods", params={"model": "vit"}).json()
    assert set(vit["methods"]) >= ATTENTION and not DETECTOR_ONLY & set(vit["methods"])
    iid = _upload(client, _png(photo)).json()["id"]
    for method in ("attention_rollout", "drise"):
        r = client.post("/api/explain", json={"image_id": iid, "model": "net", "methods": ["gradcam", method]})
        assert r.status_code == 400 and f"{method} does not apply to Net" in r.json()["error"]
    assert net.max_active == 0  # refused before any forward (no prediction either)


def test_progress_of_a_long_request_rises_to_one(photo):
    client, _, _ = _client(Net(delay=0.004).eval())
    iid = _upload(client, _png(photo)).json()["id"]
    box: dict = {}

    def work():
        box["r"] = client.post(
            "/api/explain", json={"image_id": iid, "methods": ["gradcam", "occlusion"], "explain": 1, "job": "job-1"}
        )

    t = threading.Thread(target=work)
    t.start()
    seen = []
    while t.is_alive():
        p = client.get("/api/progress/job-1").json()
        if p["state"] != "unknown":
            seen.append(p)
        time.sleep(0.02)
    t.join()
    assert box["r"].status_code == 200, box["r"].text
    final = client.get("/api/progress/job-1").json()
    fractions = [p["fraction"] for p in seen] + [final["fraction"]]
    assert fractions == sorted(fractions) and final == {**final, "state": "done", "fraction": 1.0}
    mid = [p for p in seen if p["method"] == "occlusion" and 0 < p["done"] < p["total"]]
    assert mid, seen[-3:]  # seen while occlusion ran: the images forwarded out of the estimate
    assert all(0.5 <= p["fraction"] < 1 and p["eta"] and "occluded forwards" in p["estimate"] for p in mid)
    # 224 px, window 16, stride 8: 27 x 27 windows + the unoccluded image
    occ = next(m for m in box["r"].json()["methods"] if m["name"] == "occlusion")
    assert occ["estimate"].startswith("≈730 occluded forwards, ~")
    assert client.get("/api/progress/nobody").json()["state"] == "unknown"


def test_pixel_methods_get_no_box_by_default(photo):
    client, _, _ = _client()
    iid = _upload(client, _png(photo)).json()["id"]
    info = {m["name"]: m for m in client.get("/api/info").json()["methods"]}
    assert not any(info[m]["box"] for m in ("saliency", "integrated_gradients", "guided_backprop"))
    assert info["gradcam"]["box"] and info["rise"]["box"] and info["occlusion"]["box"]
    assert info["scorecam"]["slow"] and info["rise"]["slow"] and not info["gradcam"]["slow"]
    res = client.post("/api/explain", json={"image_id": iid, "methods": ["saliency", "gradcam"], "explain": 1}).json()
    assert {m["name"]: m["box"] for m in res["methods"]} == {"saliency": False, "gradcam": True}
    figs = {}
    for name in ("saliency", "gradcam"):
        rid = client.post("/api/explain", json={"image_id": iid, "methods": [name], "explain": 1}).json()["id"]
        for pb in (False, True):
            png = client.get(f"/api/result/{rid}/figure.png", params={"threshold": 0.3, "pixel_boxes": pb}).content
            figs[name, pb] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert not np.array_equal(figs["saliency", False], figs["saliency", True])  # the box only when asked
    assert np.array_equal(figs["gradcam", False], figs["gradcam", True])  # a layer map's box always
