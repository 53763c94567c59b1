"""The fast output path of issue 18: top-k from the explaining forward, LUT colouring, PIL overlays.

Oracles: ``camlens.predict`` (a separate forward) for ``Explanation.top``; matplotlib's colormap
call for the lookup table; the reference overlay (normalize the small map, bilinear resize,
matplotlib colormap, float blend) computed here; the PNG's decoded pixels for ``save``.
"""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

import camlens
from camlens.errors import InputError
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
    from camlens.explanation import upsample

    m = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(0))
    want = F.interpolate(m, size=dst, mode="bilinear", align_corners=False)
    got = upsample(m, dst)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
