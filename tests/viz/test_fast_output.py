"""The fast output path of issue 18: top-k from the explaining forward, LUT colouring, PIL overlays.

Oracles: ``camlens.predict`` (a separate forward) for ``Explanation.top``; matplotlib's colormap
call for the lookup table; the reference overlay (normalize the small map, bilinear resize,
matplotlib colormap, float blend) computed here; the PNG's decoded pixels for ``save``.
"""

from __future__ import annotations

import warnings

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens.base.errors import InputError
from camlens.viz import colorize, colormap_lut, overlay, save_explanation, save_png
from tests.conftest import TinyCNN

NAMES = [f"class{i}" for i in range(7)]


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (30, 44, 3), dtype=np.uint8), rng.integers(0, 255, (26, 26, 3), dtype=np.uint8)]


def test_top_uses_the_same_forward_and_equals_predict(monkeypatch):
    torch.manual_seed(0)
    net = TinyCNN(classes=7).eval()
    imgs = _images()
    exp = camlens.explain(net, imgs, "gradcam", targets="top2", class_names=NAMES)
    assert exp.logits is not None and exp.logits.shape == (2, 7)
    want = camlens.predict(net, imgs, topk=5, class_names=NAMES)
    got = exp.top(5)
    assert [[c for c, _, _ in r] for r in got] == [[c for c, _, _ in r] for r in want]
    assert [[n for _, n, _ in r] for r in got] == [[n for _, n, _ in r] for r in want]
    np.testing.assert_allclose([[p for *_, p in r] for r in got], [[p for *_, p in r] for r in want], rtol=1e-5)
    assert [c for c, _, _ in got[0][:2]] == exp.classes[0].tolist()  # the top-2 targets are its first two
    assert len(exp.top(100)[0]) == 7  # at most the number of classes
    assert exp.select([1]).top(1) == [got[1][:1]]
    with pytest.raises(InputError):
        exp.top(0)
    exp.logits = None
    with pytest.raises(InputError, match="predict"):
        exp.top()


def test_cli_top5_table_needs_no_second_forward(tmp_path, monkeypatch):
    from camlens.cli import main

    img = tmp_path / "a.png"
    Image.fromarray(_images()[0]).save(img)

    def no_predict(*a, **k):
        raise AssertionError("the CLI ran a second forward for its top-5 table")

    monkeypatch.setattr(camlens, "predict", no_predict)
    out = tmp_path / "out"
    args = ["explain", str(img), "--model", "resnet18", "--weights", "random", "--method", "gradcam"]
    r = CliRunner().invoke(main, [*args, "--out", str(out), "--format", "json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.strip().startswith(("1 ", "2 ", "3 ", "4 ", "5 "))]
    assert len(lines) == 5  # the five rows of the table
    import json

    js = json.loads((out / "a_gradcam.json").read_text())
    assert str(js["classes"][0]) in lines[0] and str(js["classes"][1]) in lines[1]  # top-1/2 = the explained


@pytest.mark.parametrize("cmap", ["jet", "viridis", "RdBu_r"])
def test_colormap_lut_equals_the_colormap(cmap):
    cm = matplotlib.colormaps[cmap]
    v = np.concatenate([np.linspace(0, 1, 1001), np.arange(257) / 256, [np.nextafter(1, 0), 0.5 - 1e-7]])
    v = v.astype(np.float32).reshape(1, -1)
    want = (cm(v)[..., :3] * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(colorize(v, cmap, normalized=True), want)
    assert colormap_lut(cmap).shape == (256, 3)


def test_overlay_normalizes_the_small_map_then_resizes():
    img = _images()[0]
    m = torch.rand(7, 7, generator=torch.Generator().manual_seed(3)) * 5 - 1
    got = overlay(img, m, alpha=0.4, cmap="jet")
    small = (m - m.min()) / (m.max() - m.min())
    big = F.interpolate(small[None, None], size=img.shape[:2], mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = (matplotlib.colormaps["jet"](big)[..., :3] * 255 + 0.5).astype(np.uint8)
    want = np.clip(0.6 * img.astype(np.float64) + 0.4 * heat + 0.5, 0, 255).astype(np.uint8)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert (got.astype(int) != want.astype(int)).mean() < 0.01  # float32 vs float64 rounding only
    assert np.array_equal(overlay(img, torch.zeros(3, 3)), overlay(img, torch.full((5, 5), 7.0)))  # no NaN


def test_save_without_title_is_the_overlay_itself(tmp_path):
    torch.manual_seed(0)
    net = TinyCNN(classes=7).eval()
    imgs = _images()
    exp = camlens.explain(net, imgs, "gradcam", targets="top2", class_names=NAMES)
    exp.sources = ["a", "b"]
    paths = save_explanation(exp, tmp_path, formats="png", title=False)
    assert len(paths) == 4
    with Image.open(tmp_path / "a_gradcam_top2.png") as im:
        im.load()
        assert (
            im.size == (44, 30) and "Grad-CAM" in im.text["Title"] and NAMES[int(exp.classes[0, 1])] in im.text["Title"]
        )
        px = np.asarray(im.convert("RGB"))
    assert np.array_equal(px, overlay(imgs[0], exp.maps[0, 1]))  # PNG is lossless: exactly the overlay
    titled = save_explanation(exp, tmp_path / "t", formats="png", title=True, compress_level=9)
    with Image.open(titled[0]) as im:
        assert im.size[1] > 30 * (320 / 44)  # the matplotlib figure with its title band


def test_save_png_boxes_metadata_and_compression(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    save_png(rgb, tmp_path / "a.png", metadata={"Title": "x · y"}, boxes=[[5, 4, 15, 12], [-1, -1, -1, -1]])
    save_png(rgb, tmp_path / "b.png", compress_level=9, boxes=[[5, 4, 15, 12]], box_width=1)
    with Image.open(tmp_path / "a.png") as im:
        assert im.text["Title"] == "x · y"
        a = np.asarray(im.convert("RGB"))
    with Image.open(tmp_path / "b.png") as im:
        b = np.asarray(im.convert("RGB"))
    # one-pixel outline on the box's own pixels: columns 5 and 14, rows 4 and 11
    lime = (b == [0, 255, 0]).all(-1)
    assert lime[4, 5:15].all() and lime[11, 5:15].all() and lime[4:12, 5].all() and lime[4:12, 14].all()
    assert not lime[5:11, 6:14].any() and lime.sum() == 2 * 10 + 2 * 6
    assert (a == [0, 255, 0]).all(-1).sum() > lime.sum()  # width 2 (default)


@pytest.mark.parametrize(
    ("src", "dst"), [((7, 7), (224, 224)), ((5, 3), (17, 40)), ((30, 20), (12, 7)), ((4, 4), (4, 4))]
)
def test_upsample_equals_bilinear_interpolate(src, dst):
    from camlens.api.explanation import upsample

    m = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(m, size=dst, mode="bilinear", align_corners=False)
    got = upsample(m, dst)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _figure_pixels(img, m, title, **kw) -> np.ndarray:
    import io

    from camlens.viz import figure_png, overlay_figure

    return np.asarray(Image.open(io.BytesIO(figure_png(overlay_figure(img, m, title, **kw)))).convert("RGB"))


@pytest.mark.parametrize("shape", [(30, 40), (147, 222), (316, 474), (499, 201), (17, 500), (1, 1)])
def test_titled_overlay_drawn_with_pil_equals_the_figure(shape):
    """The PIL titled overlay has the figure's size, picture and title band, to a few grey levels
    (text anti-aliasing and the nearest-neighbour upscale's rounding differ)."""
    from camlens.viz import overlay_png, render_map

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]  # a smooth photo: a nearest-neighbour row off by one
    img = np.stack([xx * 255 // max(1, shape[1] - 1), yy * 255 // max(1, shape[0] - 1), 0 * xx + 90], -1)
    img = img.astype(np.uint8)  # (non-integer upscale) then differs by a grey level, not by noise
    m = rng.random((7, 7)).astype(np.float32)
    title = "Grad-CAM · 1st: Egyptian cat (63.3%)"
    ref = _figure_pixels(img, m, title)
    got = overlay_png(img, m, title)
    assert got is not None and got.shape == ref.shape and got.dtype == np.uint8
    ih = round(shape[0] * max(1.0, min(320 / shape[1], max(1.0, 4096 / shape[0]))))
    band = got.shape[0] - ih
    if shape[1] >= 320:  # no upscale: the picture is render_map's, pixel for pixel
        shown, _ = render_map(img, m)
        assert np.array_equal(got[band:], shown)
    assert np.abs(got[band:].astype(int) - ref[band:]).mean() < 2.0
    # the title: dark glyphs in the band, centred like the figure's, white around them
    dark_got, dark_ref = got[:band].min(2) < 128, ref[:band].min(2) < 128
    assert dark_got.any() and dark_ref.any()
    cx_got, cx_ref = np.nonzero(dark_got)[1].mean(), np.nonzero(dark_ref)[1].mean()
    assert abs(cx_got - cx_ref) <= 3 and abs(dark_got.sum() - dark_ref.sum()) <= 0.25 * dark_ref.sum()


def test_titled_overlay_boxes_where_the_figure_draws_them():
    from camlens.viz import overlay_png

    img = np.full((100, 160, 3), 128, np.uint8)  # upscaled x2 to 320 wide
    m = np.zeros((10, 16), np.float32)
    box = np.array([20, 10, 120, 70])
    got = overlay_png(img, m, "t", boxes=box, alpha=0.0)
    ref = _figure_pixels(img, m, "t", boxes=box, alpha=0.0)
    band = got.shape[0] - 200
    green = lambda a: (a[..., 1] > 200) & (a[..., 0] < 100) & (a[..., 2] < 100)  # noqa: E731
    g, r = green(got[band:]), green(ref[band:])
    ys, xs = np.nonzero(g)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == pytest.approx((40 - 1.5, 240 + 1.5, 20 - 1.5, 140 + 1.5), abs=1)
    assert (g != r).mean() < 0.002  # the same lines, to the anti-aliased edge pixels
    assert not green(got[:band]).any()  # clipped to the picture, as the figure's axes
    assert overlay_png(img, m, "t", boxes=np.array([-1, -1, -1, -1]), alpha=0.0).min(2)[band:].min() == 128


def test_titles_the_default_font_cannot_draw_go_through_the_figure(tmp_path, monkeypatch):
    """A class name in CJK: overlay_png declines, save() writes the matplotlib figure instead."""
    import camlens.viz as viz

    assert viz.overlay_png(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2)), "猫") is None
    assert viz.overlay_png(np.zeros((8, 8, 3), np.uint8), np.ones((2, 2)), "Grad-CAM · −") is not None
    names = ["猫", *NAMES[1:]]
    exp = camlens.explain(TinyCNN().eval(), _images(), "gradcam", 0, class_names=names)
    used = []
    real = viz.overlay_figure
    monkeypatch.setattr(viz.export, "overlay_figure", lambda *a, **k: used.append(1) or real(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-process notice that no installed font has 猫
        paths = save_explanation(exp, tmp_path, formats=["png"])
    assert len(paths) == 2 and len(used) == 2 and all(Image.open(p).size[0] == 320 for p in paths)
    used.clear()
    save_explanation(camlens.explain(TinyCNN().eval(), _images(), "gradcam", 1, class_names=names), tmp_path / "b")
    assert used == []  # "class1": drawn with PIL
