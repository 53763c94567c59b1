import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from camlens.api.explanation import Explanation
from camlens.base.errors import InputError, OutputExistsError
from camlens.base.localization import localize, scale_boxes
from camlens.viz import (
    attribution_heat,
    attribution_rgb,
    batch_grid,
    colorize,
    explanation_figure,
    normalize,
    overlay,
    overlay_figure,
    patch_boxes,
    pixel_figure,
    resize_map,
    save_explanation,
    save_figure,
    topk_figure,
    unique_names,
)

NAMES = ["cat", "dog", "bird", "fish"]


def _exp(n=2, k=2, size=(16, 16), img_sizes=((30, 40), (20, 20)), pixel=False, method="gradcam"):
    """A hand-built explanation: map i,k is a bright rectangle at a known place."""
    h, w = size
    maps = torch.zeros(n, k, h, w)
    for i in range(n):
        for j in range(k):
            maps[i, j, 2 + i : 6 + i, 3 + 2 * j : 9 + 2 * j] = 1.0 + j
    imgs = [np.full((*img_sizes[i % len(img_sizes)], 3), 40 * (i + 1), np.uint8) for i in range(n)]
    raw = torch.randn(n, k, 3, h, w, generator=torch.Generator().manual_seed(0)) if pixel else maps[:, :, ::4, ::4]
    classes = torch.tensor([[0, 1], [2, 3]])[:n, :k]
    return Explanation(
        maps=maps,
        raw=raw,
        classes=classes,
        scores=torch.ones(n, k),
        probs=torch.tensor([[0.7, 0.2], [0.55, 0.25]])[:n, :k],
        method=method,
        layer="layer4",
        class_names=NAMES,
        images=imgs,
        sources=["img_a", "img_b"][:n],
        model_name="toy",
        ranks=torch.tensor([[1, 2], [1, 2]])[:n, :k],  # the targets are each image's top-2
    )


def _panels(fig):
    """The image panels of a figure (colorbars left out)."""
    return [a for a in fig.axes if a.get_visible() and a.get_label() != "<colorbar>"]


# ---------------------------------------------------------------- arrays
def test_normalize_minmax_with_epsilon():
    m = np.array([[1.0, 3.0], [2.0, 5.0]])
    assert np.allclose(normalize(m), [[0.0, 0.5], [0.25, 1.0]])
    assert normalize(np.full((3, 3), 7.0)).tolist() == np.zeros((3, 3)).tolist()  # no NaN
    t = normalize(torch.tensor([[[0.0, 2.0]], [[4.0, 4.0]]]))
    assert isinstance(t, torch.Tensor) and t.tolist() == [[[0.0, 1.0]], [[0.0, 0.0]]]


def test_colorize_uses_the_colormap_on_the_normalized_map():
    m = np.array([[0.0, 10.0], [5.0, 2.5]])
    got = colorize(m, "viridis")
    cm = matplotlib.colormaps["viridis"]
    want = (cm(np.array([[0.0, 1.0], [0.5, 0.25]]))[..., :3] * 255 + 0.5).astype(np.uint8)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    # jet by default: min is dark blue, max dark red
    j = colorize(m)
    assert tuple(j[0, 0]) == (0, 0, 128) and tuple(j[0, 1]) == (128, 0, 0)
    with pytest.raises(InputError, match="colormap"):
        colorize(m, "no_such_map")


def test_overlay_alpha_blend_and_resize():
    img = np.full((4, 6, 3), 100, np.uint8)
    m = np.array([[0.0, 1.0], [0.0, 1.0]])
    assert np.array_equal(overlay(img, m, alpha=0.0), img)
    heat = colorize(resize_map(m, (4, 6)))
    assert np.array_equal(overlay(img, m, alpha=1.0), heat)
    half = overlay(img, m, alpha=0.5).astype(int)
    assert np.abs(half - (0.5 * 100 + 0.5 * heat.astype(float))).max() <= 1
    assert overlay(img, m).shape == (4, 6, 3)
    with pytest.raises(InputError):
        overlay(img[..., 0], m)


def test_resize_map_bilinear():
    r = resize_map(np.full((2, 3), 4.0), (7, 5))
    assert r.shape == (7, 5) and np.allclose(r, 4.0)
    ramp = np.tile(np.arange(4.0), (2, 1))
    up = resize_map(ramp, (2, 8))
    # align_corners=False: output x maps to input (x + 0.5) / 2 - 0.5, clamped at the borders
    xs = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    assert np.allclose(up[0], xs)


def test_attribution_rgb_and_heat():
    a = np.zeros((3, 2, 2))
    assert np.allclose(attribution_rgb(a), 0.5)  # zero -> grey
    a[0, 0, 0], a[2, 1, 1] = 2.0, -2.0
    rgb = attribution_rgb(a, percentile=100)
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [1.0, 0.5, 0.5] and rgb[1, 1].tolist() == [0.5, 0.5, 0.0]
    heat = attribution_heat(np.stack([np.eye(3), -np.eye(3), np.zeros((3, 3))]), percentile=100)
    assert heat.tolist() == np.eye(3).tolist()


# ---------------------------------------------------------------- figures
def test_topk_figure_titles_images_and_boxes():
    e = _exp()
    fig = topk_figure(e, 0, boxes=True)
    axes = _panels(fig)
    assert len(axes) == 3  # original + 2 classes
    assert axes[0].get_title() == "img_a"
    assert axes[1].get_title() == "1st: cat (70.0%)" and axes[2].get_title() == "2nd: dog (20.0%)"
    assert axes[1].images[0].get_array().shape == (30, 40, 3)  # overlay at the original image size
    want = scale_boxes(localize(e.maps[0]), (16, 16), (30, 40))
    assert patch_boxes(axes[1]) == [want[0].tolist()] and patch_boxes(axes[2]) == [want[1].tolist()]
    assert "Grad-CAM" in fig.get_suptitle() and "toy" in fig.get_suptitle()


def test_batch_grid_titles_colours_and_boxes():
    imgs = [np.zeros((10, 12, 3), np.uint8), np.zeros((8, 8, 3), np.uint8), np.zeros((10, 10, 3), np.uint8)]
    maps = [np.eye(5), np.ones((4, 4)), np.zeros((3, 3))]
    fig = batch_grid(
        imgs,
        maps,
        [0, 1, "bird"],
        [0, 2, "bird"],
        [0.9, 0.51, 0.333],
        class_names=NAMES,
        ncols=2,
        boxes=[[1, 2, 5, 6], [-1, -1, -1, -1], [0, 0, 3, 3]],
        gt_boxes=[[0, 0, 4, 4]] * 3,
    )
    axes = _panels(fig)
    assert len(axes) == 3 and len(fig.axes) == 4  # 2x2 grid, last cell hidden
    assert axes[0].get_title() == "true: cat\npred: cat (90.0%)"
    assert axes[1].get_title() == "true: dog\npred: bird (51.0%)"
    assert axes[2].get_title() == "true: bird\npred: bird (33.3%)"
    green, red = matplotlib.colors.to_rgba("tab:green"), matplotlib.colors.to_rgba("tab:red")
    assert axes[0].title.get_color() in ("tab:green", green) and axes[1].title.get_color() in ("tab:red", red)
    assert patch_boxes(axes[0]) == [[1, 2, 5, 6]] and patch_boxes(axes[1]) == []
    assert patch_boxes(axes[2], "gt") == [[0, 0, 4, 4]]
    assert axes[0].images[0].get_array().shape == (10, 12, 3)
    # without maps or labels: the plain images
    fig2 = batch_grid(imgs[:1])
    assert np.array_equal(np.asarray(fig2.axes[0].images[0].get_array()), imgs[0])
    with pytest.raises(InputError, match="3 images but 2 probs"):
        batch_grid(imgs, maps, probs=[0.1, 0.2])
    # the look: cell size in inches and the colormap; an unknown option names the valid ones
    big = batch_grid(imgs[:1], maps[:1], cell=5.0, cmap="gray", alpha=1.0)
    assert big.get_size_inches()[0] > fig2.get_size_inches()[0] * 1.5
    gray = np.asarray(big.axes[0].images[0].get_array())
    assert np.allclose(gray[..., 0], gray[..., 1], atol=1)  # alpha=1 in gray: no colour left
    with pytest.raises(InputError, match="valid: alpha, cmap, cell"):
        batch_grid(imgs, maps, colour="red")


def test_pixel_figure_rgb_and_heat_panels():
    e = _exp(pixel=True, method="guided_backprop")
    fig = pixel_figure(e, 1)
    axes = _panels(fig)
    assert [a.get_title() for a in axes] == [
        "img_b",
        "1st: bird (55.0%)\nRGB",
        "1st: bird (55.0%)\nheat",
        "2nd: fish (25.0%)\nRGB",
        "2nd: fish (25.0%)\nheat",
    ]
    rgb = axes[1].images[0].get_array()
    assert rgb.shape == (20, 20, 3) and rgb.min() >= 0 and rgb.max() <= 1
    with pytest.raises(InputError, match="not a pixel method"):
        pixel_figure(_exp(), 0)


def test_explanation_figure_rows_and_show_delegation():
    e = _exp()
    fig = explanation_figure(e, boxes=True)
    axes = _panels(fig)
    assert len(axes) == 6  # 2 rows x (image + 2 classes)
    assert [a.get_title() for a in axes] == [
        "img_a",
        "1st: cat (70.0%)",
        "2nd: dog (20.0%)",
        "img_b",
        "1st: bird (55.0%)",
        "2nd: fish (25.0%)",
    ]
    want = scale_boxes(localize(e.maps[1, 0]), (16, 16), (20, 20)).tolist()
    assert patch_boxes(axes[4]) == [want]
    one = e.figure(index=1)
    assert [a.get_title() for a in _panels(one)][1] == "1st: bird (55.0%)"
    with pytest.raises(InputError, match="out of range"):
        explanation_figure(e, index=5)


def test_figure_renders_to_a_decodable_png(tmp_path):
    fig = topk_figure(_exp(), 0, boxes=True)
    p = save_figure(fig, tmp_path / "f.png", dpi=50)
    with Image.open(p) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100
        arr = np.asarray(im.convert("RGB"))
    assert arr.std() > 5  # not blank


def test_overlay_figure_size_and_title(tmp_path):
    img = np.zeros((300, 451, 3), np.uint8)
    fig = overlay_figure(img, np.eye(7), "Grad-CAM · 1st: cat (70.0%)")
    p = save_figure(fig, tmp_path / "o.png", metadata={"Title": "x"})
    with Image.open(p) as im:
        assert im.size == (451, 330)  # the image plus a 30 px title band, at dpi 100
    assert fig.texts[0].get_text() == "Grad-CAM · 1st: cat (70.0%)"
    small = overlay_figure(np.zeros((48, 64, 3), np.uint8), np.eye(3), "t")
    save_figure(small, tmp_path / "s.png")
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (320, 390)  # upscaled x5 to at least 320 px wide


# ---------------------------------------------------------------- saving
def test_save_explanation_files_content_and_no_overwrite(tmp_path):
    e = _exp()
    paths = save_explanation(e, tmp_path / "out", threshold=0.5)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "img_a_gradcam_top1.png",
            "img_a_gradcam_top2.png",
            "img_a_gradcam.npy",
            "img_a_gradcam.json",
            "img_b_gradcam_top1.png",
            "img_b_gradcam_top2.png",
            "img_b_gradcam.npy",
            "img_b_gradcam.json",
        ]
    )
    out = tmp_path / "out"
    with Image.open(out / "img_a_gradcam_top2.png") as im:
        im.load()
        # 40x30 image upscaled x8 to 320 px wide + a 30 x min(8, 5) = 150 px title band + a 22 x 5 px colorbar band
        assert im.size == (320, 500)
        assert "dog (20.0%)" in im.text["Title"] and "Grad-CAM" in im.text["Title"]
    assert np.array_equal(np.load(out / "img_b_gradcam.npy"), e.maps[1].numpy())
    js = json.loads((out / "img_a_gradcam.json").read_text())
    assert js["classes"] == [0, 1] and js["class_names"] == ["cat", "dog"]
    assert js["probs"] == pytest.approx([0.7, 0.2]) and js["method"] == "gradcam" and js["layer"] == "layer4"
    assert js["model"] == "toy" and "torch" in js["versions"] and "camlens" in js["versions"]
    assert js["boxes_map"] == localize(e.maps[0], 0.5).tolist()
    assert js["boxes"] == scale_boxes(localize(e.maps[0], 0.5), (16, 16), (30, 40)).tolist()
    assert js["image_size"] == [30, 40] and js["threshold"] == 0.5
    # existing files are never replaced without overwrite, and nothing is written
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    e2 = _exp()
    e2.sources = ["img_a", "new"]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_explanation(e2, out)
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert not (out / "new_gradcam.json").exists()
    assert len(save_explanation(e2, out, overwrite=True)) == 8


def test_save_explanation_formats_suffix_and_duplicate_sources(tmp_path):
    e = _exp()
    e.sources = ["same", "same"]
    paths = e.save(tmp_path, formats="png", suffix="class")
    assert sorted(p.name for p in paths) == [
        "same-2_gradcam_bird.png",
        "same-2_gradcam_fish.png",
        "same_gradcam_cat.png",
        "same_gradcam_dog.png",
    ]
    with Image.open(tmp_path / "same-2_gradcam_fish.png") as im:
        assert im.text["Title"] == "Grad-CAM · 2nd: fish (25.0%)"  # the true rank (exp.ranks), class-named file
    with pytest.raises(InputError, match="format"):
        save_explanation(e, tmp_path, formats=("gif",))
    assert unique_names(["a", "a", "a-2", "b"]) == ["a", "a-3", "a-2", "b"]
