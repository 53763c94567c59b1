"""Issue 24 item 2 and 3: one colour rule everywhere, colorbars in saved PNGs, a shared scale across an
image's classes, the montage, and random weights said wherever classes are shown."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import camlens
from camlens import viz
from camlens.api.explanation import Explanation

NAMES = ["cat", "dog", "car", "cup"]


def _exp(maxima=(4.0, 1.0), lo=0.0, size=(16, 16), img=(30, 40), method="gradcam") -> Explanation:
    """One image, K maps: a ramp from ``lo`` to ``maxima[k]`` (all positive when lo >= 0)."""
    h, w = size
    ramp = torch.linspace(0, 1, w).expand(h, w)
    maps = torch.stack([lo + (mx - lo) * ramp for mx in maxima])[None].float()
    k = len(maxima)
    return Explanation(
        maps=maps,
        raw=maps[:, :, ::4, ::4],
        classes=torch.arange(k)[None],
        scores=torch.tensor([list(maxima)]),
        probs=torch.full((1, k), 0.5),
        method=method,
        layer="layer4",
        class_names=NAMES,
        images=[np.full((*img, 3), 100, np.uint8)],
        sources=["img"],
        model_name="toy",
        ranks=torch.arange(1, k + 1)[None],
    )


# ------------------------------------------------------------------------------------- the rule
def test_a_map_of_one_sign_gets_the_whole_colormap_not_half_a_symmetric_one():
    """CAM of a top class, 0.84 .. 21.65: min-max on the sequential colormap (was: +-21.65 red/blue)."""
    m = np.linspace(0.84, 21.65, 64).reshape(8, 8)
    sc = viz.color_scale(m)
    assert (sc.kind, sc.cmap) == ("sequential", "jet") and (sc.lo, sc.hi) == pytest.approx((0.84, 21.65))
    pos = sc.position(m)
    assert pos.min() == 0.0 and pos.max() == 1.0  # contrast: the ends of the colormap
    img = np.full((8, 8, 3), 100, np.uint8)
    out, got = viz.render_map(img, m, alpha=1.0)
    assert got == sc
    lut = viz.colormap_lut("jet")
    assert np.array_equal(out[0, 0], lut[0]) and np.array_equal(out[-1, -1], lut[255])


def test_maps_with_both_signs_diverge_around_zero_and_negative_maps_stay_blue():
    m = np.array([[-1.0, 0.0], [2.0, 0.5]])
    sc = viz.color_scale(m)
    assert (sc.kind, sc.lo, sc.hi, sc.cmap) == ("diverging", -2.0, 2.0, "RdBu_r")
    assert sc.position(np.array(0.0)) == pytest.approx(0.5)
    neg = viz.color_scale(-m - 3)  # all negative: [-L, 0] on the blue half
    assert (neg.kind, neg.lo, neg.hi) == ("negative", -5.0, 0.0) and neg.span == (0.0, 0.5)
    assert viz.color_scale(np.abs(m)).kind == "sequential"
    # rounding noise below 1 % of the largest magnitude does not make a map two-signed
    assert viz.color_scale(np.array([-1e-4, 0.5, 2.0])).kind == "sequential"


def test_web_app_colours_follow_the_same_rule():
    from camlens.serve.render import heat_rgb

    m = np.linspace(0.84, 21.65, 64, dtype=np.float32).reshape(8, 8)
    panel = SimpleNamespace(map=m, raw=None, method="cam")
    result = SimpleNamespace(image=SimpleNamespace(display=np.zeros((8, 8, 3), np.uint8)), signed=lambda _m: True)
    rgb = heat_rgb(result, panel)  # "auto": was RdBu_r on +-21.65 for CAM, a pale red everywhere
    lut = viz.colormap_lut("jet")
    assert np.array_equal(rgb[0, 0], lut[0]) and np.array_equal(rgb[-1, -1], lut[255])
    two = SimpleNamespace(map=m - 10.0, raw=None, method="cam")
    rgb2 = heat_rgb(result, two)
    sc = viz.color_scale(m - 10.0, diverging_cmap="RdBu_r")
    assert sc.kind == "diverging"
    assert np.array_equal(rgb2[-1, -1], viz.colormap_lut("RdBu_r")[255])


# ------------------------------------------------------------------------------------- colorbar
def _png(path) -> tuple[np.ndarray, dict]:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(im.text)


def test_saved_png_holds_a_colorbar_of_the_maps_scale(tmp_path):
    exp = _exp(maxima=(4.0, 1.0), lo=0.5)
    paths = exp.save(tmp_path, formats="png")
    arr, text = _png(paths[0])
    img_h, img_w = exp.images[0].shape[:2]
    lay = viz.png._overlay_layout(img_h, img_w, text["Title"], 320, 4096, 100, colorbar=True)
    g = viz.colorbar_geometry(lay)
    assert arr.shape[:2] == (int(lay.height), int(lay.width)) and lay.bar > 0
    row = arr[int((g.y0 + g.y1) / 2), int(g.x0) : int(g.x1)].astype(int)
    want = viz.color_scale(exp.map(0, 0)).colors()  # jet from the map's min to its max
    assert np.abs(row[0] - want[0]).max() <= 2 and np.abs(row[-1] - want[-1]).max() <= 2
    idx = np.abs(row[:, None, :] - want[None].astype(int)).sum(-1).argmin(1)  # nearest colour along the bar
    assert (np.diff(idx) >= 0).all() and idx[0] <= 2 and idx[-1] >= 253
    # without the colorbar the band is gone: the PNG is shorter by it
    (bare,) = exp.save(tmp_path / "bare", formats="png", colorbar=False)[:1]
    assert _png(bare)[0].shape[0] == arr.shape[0] - int(lay.bar)


def test_saved_png_colorbar_pil_and_figure_agree():
    m = np.linspace(-1, 3, 49).reshape(7, 7)
    img = np.full((60, 80, 3), 90, np.uint8)
    got = viz.overlay_png(img, m, "t", colorbar=True)
    import io

    ref = np.asarray(Image.open(io.BytesIO(viz.figure_png(viz.overlay_figure(img, m, "t", colorbar=True)))))[..., :3]
    assert got.shape == ref.shape
    lay = viz.png._overlay_layout(60, 80, "t", 320, 4096, 100, colorbar=True)
    g = viz.colorbar_geometry(lay)
    y = int((g.y0 + g.y1) / 2)
    sl = slice(int(g.x0) + 2, int(g.x1) - 2)
    assert np.abs(got[y, sl].astype(int) - ref[y, sl]).mean() < 6  # the same gradient (diverging, tick at 0)


# ------------------------------------------------------------------------------------- shared scale
def test_shared_scale_makes_the_second_map_weaker_by_the_ratio_of_maxima(tmp_path):
    exp = _exp(maxima=(4.0, 1.0), lo=0.5, img=(40, 400))  # >= 320 wide: the PNG is not upscaled
    own = [viz.color_scale(exp.map(0, k)) for k in range(2)]
    assert own[1].position(exp.map(0, 1).numpy()).max() == 1.0  # own scales: both maps reach the top
    sc = viz.image_scale(exp, 0)
    assert sc.shared and (sc.kind, sc.lo, sc.hi) == ("sequential", 0.0, 4.0)
    u1, u2 = (sc.unit(exp.map(0, k).numpy()).max() for k in range(2))
    assert u2 / u1 == pytest.approx(1.0 / 4.0)  # the ratio of the raw maxima
    # the figure and the saved PNG colour with that scale; the JSON states it and the raw ranges
    fig = exp.figure(shared_scale=True)
    assert len([a for a in fig.axes if a.get_label() == "<colorbar>"]) == 1
    assert "0 … 4" in fig.get_suptitle()
    paths = exp.save(tmp_path, shared_scale=True)
    js = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    assert js["value_range"] == [pytest.approx([0.5, 4.0]), pytest.approx([0.5, 1.0])]
    assert [(s["min"], s["max"], s["shared"]) for s in js["color_scales"]] == [(0.0, 4.0, True)] * 2
    top2 = next(p for p in paths if p.name.endswith("top2.png"))
    arr, text = _png(top2)
    assert "shared scale" in text["Title"]
    want, _ = viz.render_map(exp.images[0], exp.map(0, 1), scale=sc)
    np.testing.assert_allclose(arr[-want.shape[0] :].astype(float), want.astype(float), atol=40)
    # brightest pixel of top-2: the colour a quarter of the way up jet
    lut = viz.colormap_lut("jet")
    assert abs(int(want[:, -1].max(0)[0]) - int(0.5 * 100 + 0.5 * lut[64][0])) <= 3


# ------------------------------------------------------------------------------------- montage
def test_montage_is_methods_by_classes(tiny, tiny_x):
    exps = camlens.explain(tiny, tiny_x[:1], method=["gradcam", "cam"], targets="top3")
    fig = viz.montage(exps, shared_scale=True)
    panels = [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]
    assert len(panels) == 2 * (1 + 3)
    assert [a.get_ylabel() for a in panels[::4]] == ["Grad-CAM", "CAM"]
    assert len([a for a in fig.axes if a.get_label() == "<colorbar>"]) == 2  # one per method
    assert [a.get_title() for a in panels[1:4]] == [viz.target_label(exps["cam"], 0, j) for j in range(3)]
    w, h = fig.get_size_inches()
    assert w == pytest.approx(2.4 * 4) and h > 2 * 2.4 * 0.9
    each = viz.montage(exps["gradcam"])  # one explanation: one row, a colorbar per panel
    assert len([a for a in each.axes if a.get_label() == "<colorbar>"]) == 3
    with pytest.raises(camlens.CamlensError, match="out of range"):
        viz.montage(exps, 5)


def test_cli_montage_and_shared_scale(tmp_path, tiny_png):
    from click.testing import CliRunner

    from camlens.cli import main

    out = tmp_path / "o"
    args = ["explain", str(tiny_png), "--model", "efficientnet_lite0", "--weights", "random", "--out", str(out)]
    args += ["--method", "gradcam", "--method", "cam", "--topk", "2", "--figures", "montage", "--shared-scale"]
    args += ["--map-size", "photo"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "random weights" in r.output  # the top-5 table and the last line
    arr, _ = _png(out / f"{tiny_png.stem}_montage.png")
    assert arr.shape[1] > arr.shape[0] > 100
    assert not list(out.glob("*_top1.png"))
    js = json.loads((out / f"{tiny_png.stem}_gradcam.json").read_text())
    assert js["random_weights"] is True and js["color_scales"][0]["shared"] is True
    assert np.load(out / f"{tiny_png.stem}_cam.npy").shape == (2, 40, 60) and js["map_size"] == [40, 60]


def test_maps_saved_at_the_photo_size(tmp_path):
    exp = _exp(maxima=(4.0, 1.0), img=(30, 40))
    (npy,) = exp.save(tmp_path / "in", formats="npy")
    assert np.load(npy).shape == (2, 16, 16)  # the default: the model's input size
    (npy, js) = exp.save(tmp_path / "photo", formats="npy,json", map_size="photo")
    arr = np.load(npy)
    assert arr.shape == (2, 30, 40)
    np.testing.assert_allclose(arr[1], viz.resize_map(exp.map(0, 1), (30, 40)))
    summary = json.loads(js.read_text())
    assert summary["map_size"] == [30, 40] and summary["image_size"] == [30, 40]
    with pytest.raises(camlens.CamlensError, match="map_size"):
        exp.save(tmp_path / "bad", map_size="native")


# ------------------------------------------------------------------------------------- random weights
def test_random_weights_are_said_in_titles_and_json(tmp_path, tiny_png):
    net = camlens.load_model("efficientnet_lite0", "random")
    assert net.camlens.extra["weights"] == "random"
    exp = camlens.explain(net, [str(tiny_png)], method="gradcam")
    assert exp.random_weights
    assert "random weights" in exp.figure().get_suptitle()
    paths = exp.save(tmp_path)
    js = json.loads(next(p for p in paths if p.suffix == ".json").read_text())
    assert js["random_weights"] is True
    assert "random weights" in _png(next(p for p in paths if p.suffix == ".png"))[1]["Title"]
    assert not camlens.explain(camlens.load_model("efficientnet_lite0"), [str(tiny_png)]).random_weights


def test_web_app_says_random_weights(tiny_png):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from camlens.serve.app import create_app
    from camlens.serve.service import ModelPool, Service

    net = camlens.load_model("efficientnet_lite0", "random")
    client = TestClient(create_app(Service(ModelPool({"lite": net}))))
    iid = client.post(
        "/api/image", content=tiny_png.read_bytes(), headers={"x-filename": "a.png", "content-type": "image/png"}
    ).json()["id"]
    res = client.post("/api/explain", json={"image_id": iid, "methods": ["gradcam"]}).json()
    assert res["random_weights"] is True and res["model_label"] == "lite (random weights)"
    summary = client.get(res["summary_url"]).json()
    assert summary["random_weights"] is True


@pytest.fixture
def tiny_png(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "pic.png"
    g = np.random.default_rng(0)
    Image.fromarray((g.random((40, 60, 3)) * 255).astype(np.uint8)).save(p)
    return p
